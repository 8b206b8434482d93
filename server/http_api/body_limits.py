"""How much infer request body a model can need, so that a hostile body costs at most that.

Parsing JSON costs far more than its size: 250 MiB of `0.0,` becomes ~65M Python floats (~4 GiB)
before any shape check can run. So the body is measured against what the model's declared inputs
can carry before it is inflated past that or parsed: with fixed dims and a numeric datatype, at
most max_batch_size x prod(dims) elements per input, each needing at most JSON_BYTES_PER_ELEMENT
of text (or its item size in binary). Variable dims and BYTES inputs have no such bound: then only
the server's limits apply (--http-max-json-bytes for the JSON part, --http-max-body-bytes for the
whole body).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from convoy.config import ModelConfig
from convoy.datatypes import ITEMSIZE
from convoy.errors import InvalidInput

#: Generous text per JSON element: a 17-digit float with exponent, separator and indentation.
JSON_BYTES_PER_ELEMENT = 64
#: Room in a JSON request beyond its tensor values (names, shapes, outputs, parameters, id).
JSON_OVERHEAD_BYTES = 1 << 20
#: Commas a JSON request may hold beyond one per value its shapes claim (ids, parameters).
SPARE_COMMAS = 65536
#: The JSON pre-check runs on JSON parts from this size (smaller ones parse in no time).
PRECHECK_BYTES = 1 << 20

_SHAPE = re.compile(rb'"shape"\s*:\s*\[([^\]]*)\]')


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """Byte limits for one infer request: the whole (decompressed) body and its JSON part."""

    body: int
    json: int
    #: Why the limits are what they are, for the error message.
    reason: str


def body_limits(config: ModelConfig, max_body_bytes: int, max_json_bytes: int) -> BodyLimits:
    """The limits for a request to `config`'s model under the server's limits."""
    elements = 0
    binary = 0
    bounded = True
    for spec in config.inputs:
        if spec.datatype == "BYTES" or any(d < 0 for d in spec.dims):
            bounded = False
            break
        count = max(config.max_batch_size, 1)
        for dim in spec.dims:
            count *= dim
        elements += count
        binary += count * ITEMSIZE.get(spec.datatype, 8)
    if not bounded or not config.inputs:
        return BodyLimits(max_body_bytes, min(max_json_bytes, max_body_bytes), "the server's limits")
    json = elements * JSON_BYTES_PER_ELEMENT + JSON_OVERHEAD_BYTES
    if json < max_json_bytes:
        reason = f"what model '{config.name}''s declared inputs can need"
    else:
        json, reason = max_json_bytes, "the server's JSON limit"
    body = min(json + binary, max_body_bytes)
    return BodyLimits(body, min(json, body), reason)


def check_claimed_values(config: ModelConfig, text: bytes) -> None:
    """Before parsing a large JSON part: refuse it when it holds far more values than its own
    `shape` fields claim (the bomb: 250 MiB of values for shape [1, 16]). Parsing holds the GIL
    (~40 ms per MiB here), wherever it runs; counting commas and shapes takes ~1 ms per MiB.
    Skipped for models with BYTES inputs, whose strings may hold commas."""
    if len(text) < PRECHECK_BYTES or any(spec.datatype == "BYTES" for spec in config.inputs):
        return
    claimed = 0
    for found in _SHAPE.finditer(text):
        count = 1
        for dim in found.group(1).split(b","):
            dim = dim.strip()
            count *= int(dim) if dim.isdigit() else 1
        claimed += count
    commas = text.count(b",")
    if commas > 2 * claimed + SPARE_COMMAS:
        raise InvalidInput(
            f"the request's JSON holds about {commas} values but its shapes claim {claimed}"
        )
