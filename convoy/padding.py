"""Padded batching's configuration: which inputs pad, to which lengths, and the token budget.

Read once at load from the model config's `parameters` (Convoy keys in a Triton-compatible
file); batching/padding.py collates by it, runtimes/pytorch.py plans CUDA graphs by it. Every
padding key and `max_batch_tokens` is validated here, and a near miss of one (or, with padding
on, any `padding_*` key Convoy does not know) is refused rather than ignored: a typo would
otherwise serve the model unpadded, or padded other than configured.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from convoy.types import TensorSpec

#: The keys this module reads (README "Padded batching" documents them).
PADDING_KEYS = (
    "padding_inputs",
    "padding_buckets",
    "padding_value",
    "padding_lengths_input",
    "padding_outputs",
    "padding_fill_buckets",
    "max_batch_tokens",
)
#: Datatypes a padded input may have (numeric: a pad value must mean something).
_NUMERIC = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
_FLOATING = ("FP16", "FP32", "FP64", "BF16")
LENGTHS_DATATYPES = ("INT32", "INT64")
#: `fail(field, message)`: builds the error raised for a bad value.
_Fail = Callable[[str, str], Exception]


@dataclass(frozen=True, slots=True)
class PaddedInput:
    """An input padded along one of its dims (`axis` indexes `dims`, the batch dim excluded)."""

    name: str
    axis: int
    value: int | float


@dataclass(frozen=True, slots=True)
class PaddedOutput:
    """An output trimmed back to each request's real length along `axis` (of `dims`)."""

    name: str
    axis: int


@dataclass(frozen=True, slots=True)
class Padding:
    """How a model's requests of different lengths share one dense batch."""

    #: Padded together to one length per batch (a request's length is the same on each).
    inputs: tuple[PaddedInput, ...]
    #: Lengths a batch pads to, ascending; () pads to the batch's longest request.
    buckets: tuple[int, ...] = ()
    #: Extra input receiving each row's real length ("" for none), and its datatype.
    lengths_input: str = ""
    lengths_datatype: str = "INT64"
    outputs: tuple[PaddedOutput, ...] = ()
    #: Most rows x padded length in one batch (0: rows only); the oldest request always goes.
    max_batch_tokens: int = 0
    #: How many buckets below the leader's may fill its batch when its own bucket does not.
    fill_buckets: int = 1

    def bucket_for(self, length: int) -> int:
        """The padded length of a request of `length` alone: its bucket (or itself)."""
        for bucket in self.buckets:
            if bucket >= length:
                return bucket
        return length

    @property
    def max_length(self) -> int:
        """The longest length served (0: no limit beyond the declared dims)."""
        return self.buckets[-1] if self.buckets else 0


def with_full_lengths(padding: Padding, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`inputs` with the lengths input added, every row at its full padded length, when it lacks
    one (a model_warmup sample is a merged batch without it)."""
    name = padding.lengths_input
    first = padding.inputs[0]
    if not name or name in inputs or first.name not in inputs:
        return inputs
    array = inputs[first.name]
    dtype = np.int32 if padding.lengths_datatype == "INT32" else np.int64
    return {**inputs, name: np.full(array.shape[0], array.shape[1 + first.axis], dtype)}


def parse_padding(
    parameters: dict[str, str],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    max_batch_size: int,
    fail: Callable[[str, str], Exception],
) -> Padding | None:
    """The model's `Padding`, or None when `padding_inputs` is unset. `fail(field, message)`
    builds the error raised for a bad value (the field is ``parameters.<key>``)."""
    _refuse_unknown(parameters, fail)
    values = {key: parameters.get(key, "").strip() for key in PADDING_KEYS}
    if not values["padding_inputs"]:
        for key in PADDING_KEYS[1:]:
            if values[key]:
                raise fail(f"parameters.{key}", "needs parameters.padding_inputs (padding is off)")
        return None
    if max_batch_size <= 0:
        raise fail("parameters.padding_inputs", "padded batching needs max_batch_size > 0")
    default_value = _number(values["padding_value"] or "0", "parameters.padding_value", fail)
    padded = _padded_inputs(values["padding_inputs"], inputs, default_value, fail)
    lengths, lengths_type = _lengths_input(values["padding_lengths_input"], inputs, fail)
    return Padding(
        inputs=padded,
        buckets=_buckets(values["padding_buckets"], fail),
        lengths_input=lengths,
        lengths_datatype=lengths_type,
        outputs=_padded_outputs(values["padding_outputs"], outputs, fail),
        max_batch_tokens=_count(values["max_batch_tokens"], "max_batch_tokens", 1, 0, fail),
        fill_buckets=_count(values["padding_fill_buckets"], "padding_fill_buckets", 0, 1, fail),
    )


def _refuse_unknown(parameters: dict[str, str], fail: _Fail) -> None:
    """A near miss of a padding key is a typo; with padding on, so is any other `padding_*`
    key. With padding off, other `padding_*` keys (a python model's own `padding_side`) pass."""
    padding_on = bool(parameters.get("padding_inputs", "").strip())
    for key in parameters:
        if key in PADDING_KEYS:
            continue
        close = difflib.get_close_matches(key, PADDING_KEYS, n=1, cutoff=0.85)
        if close or (padding_on and key.startswith("padding_")):
            raise fail(
                f"parameters.{key}",
                f"is not a Convoy padding parameter; expected one of {list(PADDING_KEYS)}"
                + (f" (did you mean '{close[0]}'?)" if close else ""),
            )


def _entries(text: str) -> list[str]:
    return [entry.strip() for entry in text.split(",") if entry.strip()]


def _number(text: str, field: str, fail: _Fail) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise fail(field, f"expected a number, got '{text}'") from None


def _count(text: str, key: str, least: int, default: int, fail: _Fail) -> int:
    if not text:
        return default
    if not text.isdigit() or int(text) < least:
        raise fail(f"parameters.{key}", f"expected an integer >= {least}, got '{text}'")
    return int(text)


def _axis(spec: TensorSpec, text: str | None, field: str, fail: _Fail) -> int:
    """The variable dim to pad/trim: given, or the only -1 in `dims`."""
    variable = [index for index, dim in enumerate(spec.dims) if dim == -1]
    if text is None:
        if len(variable) != 1:
            raise fail(
                field,
                f"'{spec.name}' has dims {list(spec.dims)}; name the dim to pad as "
                f"'{spec.name}:<index>' (an index into dims whose value is -1)",
            )
        return variable[0]
    if not text.isdigit() or int(text) not in variable:
        raise fail(
            field,
            f"'{spec.name}:{text}': expected the index of a -1 dim of {list(spec.dims)} "
            f"(one of {variable})",
        )
    return int(text)


def _padded_inputs(
    text: str, inputs: tuple[TensorSpec, ...], default_value: int | float, fail: _Fail
) -> tuple[PaddedInput, ...]:
    field = "parameters.padding_inputs"
    declared = {spec.name: spec for spec in inputs}
    padded: list[PaddedInput] = []
    for entry in _entries(text):
        head, has_value, value_text = entry.partition("=")
        name, has_axis, axis_text = head.strip().partition(":")
        spec = declared.get(name.strip())
        if spec is None and not declared:
            raise fail(field, "padded models declare their inputs in config.pbtxt; none are")
        if spec is None:
            raise fail(field, f"'{name.strip()}' is not a declared input; inputs: {sorted(declared)}")
        if spec.reshape is not None:
            raise fail(field, f"input '{spec.name}' has a reshape; padded inputs may not")
        if spec.datatype not in _NUMERIC + _FLOATING:
            raise fail(field, f"input '{spec.name}' is {spec.datatype}; padded inputs are numeric")
        axis = _axis(spec, axis_text.strip() if has_axis else None, field, fail)
        value = _number(value_text.strip(), field, fail) if has_value else default_value
        if spec.datatype not in _FLOATING and value != int(value):
            raise fail(
                field, f"input '{spec.name}' is {spec.datatype}; pad value {value} is not an integer"
            )
        if any(p.name == spec.name for p in padded):
            raise fail(field, f"input '{spec.name}' is listed twice")
        padded.append(PaddedInput(spec.name, axis, value))
    if not padded:
        raise fail(field, "expected input names, e.g. 'input_ids, attention_mask'")
    return tuple(padded)


def _padded_outputs(text: str, outputs: tuple[TensorSpec, ...], fail: _Fail) -> tuple[PaddedOutput, ...]:
    field = "parameters.padding_outputs"
    declared = {spec.name: spec for spec in outputs}
    trimmed: list[PaddedOutput] = []
    for entry in _entries(text):
        name, has_axis, axis_text = entry.partition(":")
        spec = declared.get(name.strip())
        if spec is None:
            raise fail(field, f"'{name.strip()}' is not a declared output; outputs: {sorted(declared)}")
        axis = _axis(spec, axis_text.strip() if has_axis else None, field, fail)
        trimmed.append(PaddedOutput(spec.name, axis))
    return tuple(trimmed)


def _buckets(text: str, fail: _Fail) -> tuple[int, ...]:
    if text.lower() in ("", "none"):
        return ()
    field = "parameters.padding_buckets"
    buckets = []
    for entry in _entries(text):
        if not entry.isdigit() or int(entry) < 1:
            raise fail(field, f"expected positive lengths like '16,32,64,128,256', got '{entry}'")
        buckets.append(int(entry))
    if buckets != sorted(set(buckets)):
        raise fail(field, f"expected strictly increasing lengths, got '{text}'")
    return tuple(buckets)


def _lengths_input(text: str, inputs: tuple[TensorSpec, ...], fail: _Fail) -> tuple[str, str]:
    if not text:
        return "", "INT64"
    field = "parameters.padding_lengths_input"
    name, _, datatype = text.partition(":")
    name, datatype = name.strip(), (datatype.strip().upper() or "INT64")
    if datatype not in LENGTHS_DATATYPES:
        raise fail(field, f"expected '<name>' or '<name>:INT32|INT64', got datatype '{datatype}'")
    if not name or any(spec.name == name for spec in inputs):
        raise fail(
            field,
            f"'{name}' must name a new input (the server fills it; clients never send it), "
            "not a declared one",
        )
    return name, datatype
