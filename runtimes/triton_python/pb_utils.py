"""Triton's `triton_python_backend_utils`, written for Convoy from its documented behaviour.

Model code imports it as `import triton_python_backend_utils as pb_utils`; Convoy puts this
module in `sys.modules` under that name before importing a model.py (in the server and in
isolated worker processes). Tensors are numpy arrays (BYTES as `np.object_` of `bytes`) viewing
the request's data; nothing is copied on the way to `execute`.

The names live in the modules beside this one (datatypes, errors, tensor, inference, helpers);
this module is the one namespace model code sees. The server's services (BLS calls, custom
metrics) reach it through `bind` (called by the adapter when a model loads); which model is
executing comes from a context variable the adapter sets around `initialize` / `execute`, so a
BLS call knows its caller (the deadlock rule in engine/bls.py).
"""

from __future__ import annotations

from .datatypes import (
    _NUMPY_TYPE,
    TRITONSERVER_REQUEST_FLAG_SEQUENCE_END,
    TRITONSERVER_REQUEST_FLAG_SEQUENCE_START,
    TRITONSERVER_REQUEST_RELEASE_ALL,
    TRITONSERVER_REQUEST_RELEASE_RESCHEDULE,
    TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    TRITONSERVER_TYPE_BF16,
    TRITONSERVER_TYPE_BOOL,
    TRITONSERVER_TYPE_BYTES,
    TRITONSERVER_TYPE_FP16,
    TRITONSERVER_TYPE_FP32,
    TRITONSERVER_TYPE_FP64,
    TRITONSERVER_TYPE_INT8,
    TRITONSERVER_TYPE_INT16,
    TRITONSERVER_TYPE_INT32,
    TRITONSERVER_TYPE_INT64,
    TRITONSERVER_TYPE_INVALID,
    TRITONSERVER_TYPE_UINT8,
    TRITONSERVER_TYPE_UINT16,
    TRITONSERVER_TYPE_UINT32,
    TRITONSERVER_TYPE_UINT64,
    deserialize_bytes_tensor,
    numpy_to_triton_type,
    serialize_byte_tensor,
    triton_string_to_numpy,
    triton_to_numpy_type,
)
from .errors import TritonError, TritonModelException, convoy_error, error_of
from .helpers import (
    Logger,
    Metric,
    MetricFamily,
    ModelConfig,
    _model_dirs,
    get_input_config_by_name,
    get_input_tensor_by_name,
    get_model_dir,
    get_output_config_by_name,
    get_output_tensor_by_name,
    using_decoupled_model_transaction_policy,
)
from .inference import (
    InferenceRequest,
    InferenceResponse,
    InferenceResponseSender,
    Scope,
    ServerRequest,
    _Binding,
    bind,
    enter_scope,
    leave_scope,
)
from .tensor import Tensor

__all__ = [
    "TRITONSERVER_REQUEST_FLAG_SEQUENCE_END",
    "TRITONSERVER_REQUEST_FLAG_SEQUENCE_START",
    "TRITONSERVER_REQUEST_RELEASE_ALL",
    "TRITONSERVER_REQUEST_RELEASE_RESCHEDULE",
    "TRITONSERVER_RESPONSE_COMPLETE_FINAL",
    "TRITONSERVER_TYPE_BF16",
    "TRITONSERVER_TYPE_BOOL",
    "TRITONSERVER_TYPE_BYTES",
    "TRITONSERVER_TYPE_FP16",
    "TRITONSERVER_TYPE_FP32",
    "TRITONSERVER_TYPE_FP64",
    "TRITONSERVER_TYPE_INT8",
    "TRITONSERVER_TYPE_INT16",
    "TRITONSERVER_TYPE_INT32",
    "TRITONSERVER_TYPE_INT64",
    "TRITONSERVER_TYPE_INVALID",
    "TRITONSERVER_TYPE_UINT8",
    "TRITONSERVER_TYPE_UINT16",
    "TRITONSERVER_TYPE_UINT32",
    "TRITONSERVER_TYPE_UINT64",
    "_NUMPY_TYPE",
    "InferenceRequest",
    "InferenceResponse",
    "InferenceResponseSender",
    "Logger",
    "Metric",
    "MetricFamily",
    "ModelConfig",
    "Scope",
    "ServerRequest",
    "Tensor",
    "TritonError",
    "TritonModelException",
    "_Binding",
    "_model_dirs",
    "bind",
    "convoy_error",
    "deserialize_bytes_tensor",
    "enter_scope",
    "error_of",
    "get_input_config_by_name",
    "get_input_tensor_by_name",
    "get_model_dir",
    "get_output_config_by_name",
    "get_output_tensor_by_name",
    "leave_scope",
    "numpy_to_triton_type",
    "serialize_byte_tensor",
    "triton_string_to_numpy",
    "triton_to_numpy_type",
    "using_decoupled_model_transaction_policy",
]
