"""Check wire tensors against a model's declared inputs and turn them into numpy views.

Both front ends call these with what they parsed, so every protocol gets the same checks and
the same messages: name, datatype, shape and byte size are verified before any allocation.
"""

from __future__ import annotations

import numpy as np

from convoy.config import ModelConfig
from convoy.datatypes import (
    ITEMSIZE,
    NUMPY_DTYPE,
    declared_datatype,
    deserialize_bytes,
    element_count,
    float32_to_bf16_bits,
)
from convoy.engine.shared_memory import SharedMemoryRef
from convoy.errors import InvalidInput
from convoy.types import Request, TensorSpec

#: Hard cap on elements of one tensor, whatever its declared shape says (forged shapes).
MAX_ELEMENTS = 1 << 31
#: Triton's limit on a shape's element count (an int64).
INT64_MAX = (1 << 63) - 1


def check_new_input(name: str, seen) -> None:
    """An input named twice in one request is refused (Triton's words)."""
    if name in seen:
        raise InvalidInput(f"input '{name}' already exists in request")


def shape_text(shape) -> str:
    """A shape as Triton writes it in messages: [1,-2,3]."""
    return "[" + ",".join(str(d) for d in shape) + "]"


def check_wire_shape(name: str, shape) -> None:
    """A request shape's own validity, before it is compared with the model: no negative
    dimension and an element count within an int64, read left to right as Triton reads it
    (a 0 dimension ends the count: the tensor is empty)."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidInput(
                f"invalid shape for input '{name}': shape {shape_text(shape)} contains one or "
                "more invalid dimensions"
            )
        if dim == 0:
            return
        count *= dim
        if count > INT64_MAX:
            raise InvalidInput(
                f"invalid shape for input '{name}': shape {shape_text(shape)} causes total "
                f"element count to exceed maximum size of {INT64_MAX}"
            )


def check_data_source(
    name: str,
    model: str,
    *,
    shared_memory: bool,
    inline: bool,
    binary: bool,
    inline_field: str,
    binary_field: str,
) -> None:
    """Where an input's data comes from must be unambiguous, checked (Triton's order and words)
    before the input is compared with the model: shared memory excludes data in the request;
    inline values (gRPC `contents`, HTTP `data`) exclude raw bytes (gRPC
    `raw_input_contents`, HTTP binary data); some source is needed."""
    if shared_memory:
        if inline or binary:
            raise InvalidInput(
                "unexpected 'content' provided when using shared memory for input tensor "
                f"'{name}' for model '{model}'"
            )
        return
    if inline and binary:
        raise InvalidInput(
            f"{inline_field} must not be specified when using {binary_field} for '{name}' for "
            f"model '{model}'"
        )
    if not (inline or binary):
        raise InvalidInput(
            f"unable to find data for input tensor '{name}' for model '{model}' in request."
        )


def input_spec(config: ModelConfig, name: str) -> TensorSpec:
    spec = config.input(name)
    if spec is None:
        expected = ", ".join(f"'{s.name}'" for s in config.inputs)
        raise InvalidInput(
            f"unexpected input '{name}' for model '{config.name}'; expected inputs: {expected}"
        )
    return spec


def check_shape(config: ModelConfig, spec: TensorSpec, datatype: str, shape: list[int]) -> int:
    """Validate datatype and shape; returns the batch rows the tensor carries."""
    name = spec.name
    if datatype != spec.datatype:
        raise InvalidInput(
            f"input '{name}': expected datatype {spec.datatype}, got {datatype or '(none)'}"
        )
    check_wire_shape(name, shape)
    dims = spec.dims
    if config.max_batch_size > 0:
        expected = [-1, *dims]
        if len(shape) != len(dims) + 1 or not _dims_match(shape[1:], dims):
            raise InvalidInput(
                f"input '{name}': expected shape {expected} (first dimension is the batch), got {shape}"
            )
        rows = shape[0]
        if rows < 1:
            raise InvalidInput(f"input '{name}': batch dimension must be >= 1, got {rows}")
        if rows > config.max_batch_size:
            raise InvalidInput(
                f"input '{name}': batch size {rows} exceeds max_batch_size "
                f"{config.max_batch_size} of model '{config.name}'"
            )
    else:
        if len(shape) != len(dims) or not _dims_match(shape, dims):
            raise InvalidInput(f"input '{name}': expected shape {list(dims)}, got {shape}")
        rows = 1
    if element_count(shape) > MAX_ELEMENTS:
        raise InvalidInput(f"input '{name}': shape {shape} has more than {MAX_ELEMENTS} elements")
    return rows


def _dims_match(shape, dims) -> bool:
    return all(d == -1 or d == s for s, d in zip(shape, dims, strict=True))


def from_raw(spec: TensorSpec, datatype: str, shape: list[int], raw) -> np.ndarray:
    """A numpy view of raw little-endian bytes (or the decoded BYTES elements)."""
    count = element_count(shape)
    if datatype == "BYTES":
        array = deserialize_bytes(raw, count, spec.name)
    else:
        expected = count * ITEMSIZE[datatype]
        if len(raw) != expected:
            raise InvalidInput(
                f"input '{spec.name}': {datatype} {shape} needs {expected} bytes, got {len(raw)}"
            )
        # A view of the wire bytes: no copy until the batch buffer.
        array = np.frombuffer(raw, dtype=NUMPY_DTYPE[datatype])
    return array.reshape(shape)


def check_value_count(spec: TensorSpec, shape: list[int], values) -> None:
    """The values (JSON lists, nested or not, or a protobuf repeated field) number what the
    shape needs: counted by list lengths, without converting anything and giving up as soon as
    there are too many, so a huge list costs no more than the declared shape allows. (A list
    mixing numbers and lists is left to the conversion, which refuses it.)"""
    count = element_count(shape)
    seen = 0
    stack = [values]
    while stack and seen <= count:
        current = stack.pop()
        if len(current) and isinstance(current[0], list):
            # More inner lists than values: no well-formed tensor needs the rest of them.
            stack.extend(current[: count + 1])
        else:
            seen += len(current)
    if seen != count:
        got = f"more than {count}" if seen > count else str(seen)
        raise InvalidInput(f"input '{spec.name}': shape {shape} needs {count} values, got {got}")


def from_values(spec: TensorSpec, datatype: str, shape: list[int], values) -> np.ndarray:
    """An array from JSON values or typed protobuf contents, checked against the shape."""
    count = element_count(shape)
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        for index, value in enumerate(values):
            if isinstance(value, str):
                array[index] = value.encode("utf-8")
            elif isinstance(value, (bytes, bytearray)):
                array[index] = bytes(value)
            else:
                raise InvalidInput(
                    f"input '{spec.name}': BYTES data must hold strings, got "
                    f"{type(value).__name__} at element {index}"
                )
    elif datatype == "BF16":
        array = float32_to_bf16_bits(_numeric(values, np.float32, spec.name, datatype))
    else:
        array = _numeric(values, NUMPY_DTYPE[datatype], spec.name, datatype)
    if array.size != count:
        raise InvalidInput(f"input '{spec.name}': shape {shape} needs {count} values, got {array.size}")
    return array.reshape(shape)


#: numpy kind of a JSON-typed datatype -> kinds its JSON values may parse to (no strings, null,
#: or booleans standing in for numbers; JSON integers are fine for floating-point types).
#: One numpy probe decides, so a boolean mixed among numbers still passes as 0/1.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_JSON_TYPES = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}


def from_json(spec: TensorSpec, datatype: str, shape: list[int], values: list) -> np.ndarray:
    """`from_values` for JSON `data`, whose elements must be of the datatype's JSON type."""
    if datatype != "BYTES" and values:
        kind = "f" if datatype == "BF16" else NUMPY_DTYPE[datatype].kind
        if not _json_kind_ok(values, kind):
            raise InvalidInput(
                f"input '{spec.name}': data is not a list of {datatype} values "
                f"(expected JSON {'true/false' if kind == 'b' else 'numbers'})"
            )
    return from_values(spec, datatype, shape, values)


def _json_kind_ok(values: list, kind: str) -> bool:
    try:
        probe_kind = np.asarray(values).dtype.kind
    except (TypeError, ValueError, OverflowError):
        return True  # ragged nesting and the like: from_values reports it
    if probe_kind in _JSON_KINDS[kind]:
        return True
    if probe_kind not in "fO":  # strings, booleans for a number, numbers for BOOL
        return False
    # numpy widened what it could not unify (huge integers -> float64 or object, null -> object):
    # look at the JSON values themselves.
    allowed = _JSON_TYPES[kind]
    return all(
        isinstance(v, allowed) and (kind == "b" or not isinstance(v, bool)) for v in _leaves(values)
    )


def _leaves(values):
    """The scalars of arbitrarily nested lists (iterative: no recursion limit to hit)."""
    stack = [iter(values)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            yield value
        else:
            stack.pop()


def _numeric(values, dtype, name: str, datatype: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"input '{name}': data is not a list of {datatype} values") from None
    return array.reshape(-1)


def apply_reshape(config: ModelConfig, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    if spec.reshape is None:
        return array
    if config.max_batch_size > 0:
        return array.reshape((array.shape[0], *spec.reshape))
    return array.reshape(spec.reshape)


def check_complete(config: ModelConfig, inputs: dict[str, np.ndarray]) -> int:
    """Every required input present, all with the same batch rows; returns the rows."""
    for spec in config.inputs:
        if spec.name not in inputs and not spec.optional:
            raise InvalidInput(f"missing required input '{spec.name}' for model '{config.name}'")
    if config.max_batch_size <= 0:
        return 1
    rows = None
    for name, array in inputs.items():
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise InvalidInput(
                f"input '{name}': batch dimension {array.shape[0]} differs from the other inputs' {rows}"
            )
    return rows or 1


def decode_raw_binary(config: ModelConfig, body) -> tuple[dict[str, np.ndarray], int]:
    """Triton's raw binary request (HTTP `Inference-Header-Content-Length: 0`): the whole body
    is the data of the model's only input, one batch row when the model batches; its shape is
    the config's dims with at most one variable dimension, deduced from the byte count. A BYTES
    input must have dims [1]: the body is that one element. (inputs, rows)"""
    if len(config.inputs) != 1:
        raise InvalidInput(
            "Raw request must only have 1 input (found 1) to be deduced but got "
            f"{len(config.inputs)} inputs in '{config.name}' model configuration"
        )
    spec = config.inputs[0]
    shape = [1] if config.max_batch_size > 0 else []
    variable = -1
    fixed = 1
    for dim in spec.dims:
        if dim == -1:
            if variable != -1:
                raise InvalidInput(
                    f"The shape of the raw input '{spec.name}' can not be deduced because there "
                    "are more than one variable-sized dimension"
                )
            variable = len(shape)
        else:
            fixed *= dim
        shape.append(dim)
    size = memoryview(body).nbytes
    if spec.datatype == "BYTES":
        if variable != -1 or fixed != 1:
            raise InvalidInput(
                f"For BYTE datatype raw input '{spec.name}', the model must have input shape [1]"
            )
        check_shape(config, spec, spec.datatype, shape)
        array = np.empty(1, dtype=object)
        array[0] = bytes(body)
        array = array.reshape(shape)
    else:
        if variable != -1:
            itemsize = ITEMSIZE[spec.datatype]
            shape[variable] = size // (fixed * itemsize) if fixed else 0
        check_shape(config, spec, spec.datatype, shape)
        array = from_raw(spec, spec.datatype, shape, body)
    inputs = {spec.name: apply_reshape(config, spec, array)}
    return inputs, check_complete(config, inputs)


def check_requested_outputs(config: ModelConfig, names) -> tuple[str, ...]:
    """The outputs a request names: each once (Triton's words), each one the model declares."""
    seen = set()
    for name in names:
        if name in seen:
            raise InvalidInput(f"output '{name}' already exists in request")
        seen.add(name)
    if config.outputs:
        for name in names:
            if config.output(name) is None:
                expected = ", ".join(f"'{s.name}'" for s in config.outputs)
                raise InvalidInput(
                    f"unexpected requested output '{name}' for model '{config.name}'; "
                    f"expected outputs: {expected}"
                )
    return tuple(names)


def output_datatype(config: ModelConfig, name: str, array: np.ndarray) -> str:
    """The V2 datatype of an output the engine returned (declared, else the array's own)."""
    return declared_datatype(config.output(name), array)


def non_negative_parameter(parameters: dict, name: str) -> int:
    """A request parameter that must be a non-negative integer (priority, timeout); 0 if absent."""
    value = parameters.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"parameter '{name}': expected a non-negative integer, got {value!r}")
    return value


#: The request parameters that put a tensor in a registered shared-memory region.
SHM_REGION = "shared_memory_region"
SHM_BYTE_SIZE = "shared_memory_byte_size"
SHM_OFFSET = "shared_memory_offset"


def shared_memory_ref(parameters, what: str) -> SharedMemoryRef | None:
    """The shared-memory location a tensor's parameters name, or None when they name none."""
    if not isinstance(parameters, dict):
        return None
    region = parameters.get(SHM_REGION)
    if region is None:
        for name in (SHM_BYTE_SIZE, SHM_OFFSET):
            if name in parameters:
                raise InvalidInput(f"{what}: parameter '{name}' needs '{SHM_REGION}'")
        return None
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{what}: parameter '{SHM_REGION}' must be a region name")
    if SHM_BYTE_SIZE not in parameters:
        raise InvalidInput(f"{what}: parameter '{SHM_REGION}' needs '{SHM_BYTE_SIZE}'")
    size = parameters[SHM_BYTE_SIZE]
    offset = parameters.get(SHM_OFFSET, 0)
    for name, value in ((SHM_BYTE_SIZE, size), (SHM_OFFSET, offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(
                f"{what}: parameter '{name}' must be a non-negative integer, got {value!r}"
            )
    return SharedMemoryRef(region, size, offset)


def build_request(
    request_id: str,
    inputs: dict[str, np.ndarray],
    requested: tuple[str, ...],
    rows: int,
    parameters: dict,
    future,
    received_ns: int,
    principal: str | None = None,
    deadline: float | None = None,
) -> Request:
    """The engine's Request for decoded, validated tensors: the same for every protocol (the
    scheduling parameters `priority` and `timeout` read here, once)."""
    return Request(
        id=request_id,
        inputs=inputs,
        requested_outputs=requested,
        rows=rows,
        future=future,
        priority=non_negative_parameter(parameters, "priority") if parameters else 0,
        timeout_us=non_negative_parameter(parameters, "timeout") if parameters else 0,
        deadline=deadline,
        parameters=parameters,
        received_ns=received_ns,
        principal=principal,
    )
