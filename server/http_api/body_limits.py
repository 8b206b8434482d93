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

from dataclasses import dataclass

from convoy.config import ModelConfig
from convoy.datatypes import ITEMSIZE

#: Generous text per JSON element: a 17-digit float with exponent, separator and indentation.
JSON_BYTES_PER_ELEMENT = 64
#: Room in a JSON request beyond its tensor values (names, shapes, outputs, parameters, id).
JSON_OVERHEAD_BYTES = 1 << 20


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
