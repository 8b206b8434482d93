"""Triton's flag constants, TRITONSERVER_DataType codes, the dtype converters and BYTES
serialisation of triton_python_backend_utils."""

from __future__ import annotations

import numpy as np

from convoy.datatypes import serialize_bytes

from .errors import TritonModelException

# --- flags ----------------------------------------------------------------------------------------
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

# --- datatypes (TRITONSERVER_DataType values) ---------------------------------------------------
TRITONSERVER_TYPE_INVALID = 0
TRITONSERVER_TYPE_BOOL = 1
TRITONSERVER_TYPE_UINT8 = 2
TRITONSERVER_TYPE_UINT16 = 3
TRITONSERVER_TYPE_UINT32 = 4
TRITONSERVER_TYPE_UINT64 = 5
TRITONSERVER_TYPE_INT8 = 6
TRITONSERVER_TYPE_INT16 = 7
TRITONSERVER_TYPE_INT32 = 8
TRITONSERVER_TYPE_INT64 = 9
TRITONSERVER_TYPE_FP16 = 10
TRITONSERVER_TYPE_FP32 = 11
TRITONSERVER_TYPE_FP64 = 12
TRITONSERVER_TYPE_BYTES = 13
TRITONSERVER_TYPE_BF16 = 14

_TYPE_NUMPY: dict[int, type] = {
    TRITONSERVER_TYPE_BOOL: np.bool_,
    TRITONSERVER_TYPE_UINT8: np.uint8,
    TRITONSERVER_TYPE_UINT16: np.uint16,
    TRITONSERVER_TYPE_UINT32: np.uint32,
    TRITONSERVER_TYPE_UINT64: np.uint64,
    TRITONSERVER_TYPE_INT8: np.int8,
    TRITONSERVER_TYPE_INT16: np.int16,
    TRITONSERVER_TYPE_INT32: np.int32,
    TRITONSERVER_TYPE_INT64: np.int64,
    TRITONSERVER_TYPE_FP16: np.float16,
    TRITONSERVER_TYPE_FP32: np.float32,
    TRITONSERVER_TYPE_FP64: np.float64,
    TRITONSERVER_TYPE_BYTES: np.object_,
}
_NUMPY_TYPE = {np.dtype(t): code for code, t in _TYPE_NUMPY.items()}
_NUMPY_TYPE[np.dtype(np.bytes_)] = TRITONSERVER_TYPE_BYTES
_CONFIG_NAMES = {
    "TYPE_BOOL": TRITONSERVER_TYPE_BOOL,
    "TYPE_UINT8": TRITONSERVER_TYPE_UINT8,
    "TYPE_UINT16": TRITONSERVER_TYPE_UINT16,
    "TYPE_UINT32": TRITONSERVER_TYPE_UINT32,
    "TYPE_UINT64": TRITONSERVER_TYPE_UINT64,
    "TYPE_INT8": TRITONSERVER_TYPE_INT8,
    "TYPE_INT16": TRITONSERVER_TYPE_INT16,
    "TYPE_INT32": TRITONSERVER_TYPE_INT32,
    "TYPE_INT64": TRITONSERVER_TYPE_INT64,
    "TYPE_FP16": TRITONSERVER_TYPE_FP16,
    "TYPE_FP32": TRITONSERVER_TYPE_FP32,
    "TYPE_FP64": TRITONSERVER_TYPE_FP64,
    "TYPE_STRING": TRITONSERVER_TYPE_BYTES,
    "TYPE_BF16": TRITONSERVER_TYPE_BF16,
}


def triton_string_to_numpy(triton_type_string: str):
    """'TYPE_FP32' -> np.float32 (TYPE_STRING -> np.object_)."""
    code = _CONFIG_NAMES.get(triton_type_string)
    if code is None or code not in _TYPE_NUMPY:
        raise TritonModelException(f"unsupported data type '{triton_type_string}'")
    return _TYPE_NUMPY[code]


def triton_to_numpy_type(data_type: int):
    return _TYPE_NUMPY.get(data_type)


def numpy_to_triton_type(data_type) -> int | None:
    try:
        return _NUMPY_TYPE.get(np.dtype(data_type))
    except TypeError:
        return None


def serialize_byte_tensor(input_tensor: np.ndarray) -> np.ndarray | None:
    """BYTES elements, length-prefixed and concatenated in row-major order, as a uint8 array."""
    if input_tensor.size == 0:
        return np.empty([0], dtype=np.uint8)
    array = np.asarray(input_tensor, dtype=object)
    encoded = np.empty(array.shape, dtype=object)
    for index, value in np.ndenumerate(array):
        encoded[index] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return np.frombuffer(serialize_bytes(encoded), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor) -> np.ndarray:
    """The inverse of serialize_byte_tensor: a 1-D np.object_ array of bytes."""
    buffer = encoded_tensor.tobytes() if isinstance(encoded_tensor, np.ndarray) else encoded_tensor
    elements = []
    offset = 0
    view = memoryview(buffer)
    while offset < len(view):
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    result = np.empty(len(elements), dtype=object)
    result[:] = elements
    return result
