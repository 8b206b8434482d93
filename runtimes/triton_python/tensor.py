"""pb_utils.Tensor: a named numpy array on the host."""

from __future__ import annotations

import numpy as np

from .datatypes import _NUMPY_TYPE, TRITONSERVER_TYPE_BF16, numpy_to_triton_type
from .errors import TritonModelException


# --- tensors ----------------------------------------------------------------------------------------
class Tensor:
    """A named tensor: a numpy array (BYTES as np.object_) on the CPU."""

    __slots__ = ("_array", "_name")

    def __init__(self, name: str, data) -> None:
        if not isinstance(name, str):
            raise TritonModelException(f"Tensor name must be a string, got {type(name).__name__}")
        array = data if type(data) is np.ndarray else np.asarray(data)
        if array.dtype not in _NUMPY_TYPE:
            if array.dtype.kind in "SU":
                array = array.astype(object)
            elif array.dtype.kind != "V":  # V: bfloat16 and the like travel as raw bits
                raise TritonModelException(
                    f"tensor '{name}': numpy dtype {array.dtype} has no Triton datatype"
                )
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def triton_dtype(self) -> int:
        code = numpy_to_triton_type(self._array.dtype)
        return TRITONSERVER_TYPE_BF16 if code is None else code

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self):
        """A DLPack capsule sharing the tensor's memory (torch.utils.dlpack.from_dlpack, cupy)."""
        return self._exportable().__dlpack__()

    def __dlpack__(self, stream=None, **kwargs):
        """The DLPack protocol, so `torch.from_dlpack(tensor)` takes a Tensor directly."""
        return self._exportable().__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()

    def _exportable(self) -> np.ndarray:
        """The array in a form DLPack can share. An input tensor views the request's bytes as
        received, which are read-only (DLPack consumers may write, so numpy refuses to export
        them): it is copied once, here, and the tensor keeps the copy (as_numpy() and later
        exports then see the same memory the consumer holds)."""
        array = self._array
        if array.dtype == object:
            raise TritonModelException(f"tensor '{self._name}': BYTES tensors have no DLPack form")
        if not array.flags.writeable:
            array = self._array = array.copy()
        return array

    @staticmethod
    def from_dlpack(name: str, capsule) -> Tensor:
        """A Tensor from an object with `__dlpack__` (torch, cupy, numpy) or a DLPack capsule;
        device tensors are copied to the host."""
        if hasattr(capsule, "__dlpack__"):
            holder = capsule
            if getattr(capsule, "device", None) is not None and hasattr(capsule, "cpu"):
                holder = capsule.cpu()  # torch on a GPU: Convoy's tensors live on the host
            return Tensor(name, np.from_dlpack(holder))
        try:
            import torch.utils.dlpack

            return Tensor(name, torch.utils.dlpack.from_dlpack(capsule).cpu().numpy())
        except ImportError:
            raise TritonModelException(
                "Tensor.from_dlpack needs an object with __dlpack__ (a raw capsule needs torch)"
            ) from None

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={self.shape()}, dtype={self._array.dtype})"
