"""The Open Inference Protocol's tensor datatypes and their numpy and config-file counterparts.

BF16 has no numpy dtype: Convoy carries it as its raw 16-bit patterns (``uint16``), which is what
travels on the wire; runtimes that understand bfloat16 view those bits as such.
BYTES tensors are numpy ``object`` arrays of ``bytes``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from convoy.errors import InvalidInput

if TYPE_CHECKING:
    from convoy.types import TensorSpec

#: V2 datatype -> numpy dtype in which the tensor travels (little-endian, as on the wire).
NUMPY_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "BYTES": np.dtype(object),
}

#: bytes per element, for fixed-size datatypes.
ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in NUMPY_DTYPE.items() if name != "BYTES"}

#: config.pbtxt's TYPE_* names -> V2 datatype.
CONFIG_TO_V2: dict[str, str] = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
    "TYPE_BF16": "BF16",
}
V2_TO_CONFIG: dict[str, str] = {v: k for k, v in CONFIG_TO_V2.items()}

_NUMPY_TO_V2: dict[np.dtype, str] = {
    dt: name for name, dt in NUMPY_DTYPE.items() if name not in ("BF16", "BYTES")
}

_LENGTH = struct.Struct("<I")


def v2_datatype_of(array: np.ndarray) -> str:
    """The V2 datatype naming a numpy array's dtype (object/str/bytes arrays are BYTES)."""
    dt = array.dtype
    if dt.kind in "OSU":
        return "BYTES"
    found = _NUMPY_TO_V2.get(dt.newbyteorder("<") if dt.byteorder == ">" else dt)
    if found is None:
        raise InvalidInput(f"numpy dtype {dt} has no Open Inference Protocol datatype")
    return found


def declared_datatype(spec: TensorSpec | None, array: np.ndarray) -> str:
    """The V2 datatype an output goes out as: its TensorSpec's, else the array's own."""
    return spec.datatype if spec is not None else v2_datatype_of(array)


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def deserialize_bytes(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Decode `count` length-prefixed BYTES elements; the whole buffer must be consumed."""
    view = memoryview(buffer)
    end = len(view)
    # Every element takes at least its 4-byte length: check before allocating `count` slots,
    # so a forged shape cannot make the server allocate for elements the data cannot hold.
    if end < 4 * count:
        raise InvalidInput(
            f"input '{name}': BYTES data ({end} bytes) cannot hold the {count} elements its "
            "shape declares (each needs at least 4 bytes)"
        )
    items = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > end:
            raise InvalidInput(
                f"input '{name}': BYTES data holds fewer than the {count} elements its shape declares"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"input '{name}': BYTES element {index} declares {length} bytes but only "
                f"{end - offset} remain"
            )
        items[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidInput(
            f"input '{name}': BYTES data has {end - offset} bytes beyond the {count} elements "
            "its shape declares"
        )
    return items


def serialize_bytes(array: np.ndarray) -> bytes:
    """Encode a BYTES tensor as 4-byte little-endian lengths each followed by the element."""
    parts: list[bytes] = []
    append = parts.append
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray)):
            item = str(item).encode("utf-8")
        append(_LENGTH.pack(len(item)))
        append(bytes(item))
    return b"".join(parts)


def to_wire_bytes(array: np.ndarray, datatype: str) -> bytes:
    """Raw little-endian bytes of a tensor as the protocol sends it."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    dt = NUMPY_DTYPE[datatype]
    if array.dtype != dt:
        array = array.astype(dt)
    return np.ascontiguousarray(array).tobytes()


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns to float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (round-to-nearest-even) and return the raw bits."""
    as_int = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((as_int >> 16) & 1) + 0x7FFF
    return ((as_int + rounding) >> 16).astype(np.uint16)
