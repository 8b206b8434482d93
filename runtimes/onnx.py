"""The `onnxruntime` backend: a model.onnx executed by ONNX Runtime on CPU, CUDA or TensorRT.

Execution providers follow the instance's placement: KIND_CPU runs on the CPU provider; KIND_GPU
on CUDA on the instance's GPU (behind TensorRT when the parameter `tensorrt` is "true") and fails
to load where CUDA cannot be used; KIND_AUTO on CUDA when ONNX Runtime sees a GPU, else on CPU.
Config `parameters`: intra_op_thread_count (default: the cores shared out among all instances, so
they do not oversubscribe), inter_op_thread_count (default 1), tensorrt, tensorrt_fp16 and
tensorrt_cache_path (where TensorRT keeps built engines; without it they are rebuilt every load).

`OnnxRuntime.complete_config` fills the inputs/outputs config.pbtxt leaves out from the graph. It
never guesses batching: a model whose first dimension is the batch needs `max_batch_size` in
config.pbtxt, and that dimension is then left out of the dims it fills in.

BYTES tensors are ONNX string tensors, which ONNX Runtime's Python API carries as text: elements
must be UTF-8. BF16 inputs/outputs are refused at load, as its numpy API has no bfloat16.
CUDA runs FP32 matrix products in TF32 (ONNX Runtime's default: ~1e-3 relative error).
On GPU, `session.run` copies inputs to the device and outputs back. IO binding would only save
work with pinned staging buffers owned by the batcher, which Convoy does not have yet.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from convoy.config import InstanceKind, ModelConfig, ModelVersionSource
from convoy.datatypes import NUMPY_DTYPE, V2_TO_CONFIG
from convoy.errors import InvalidConfig, InvalidInput, ModelLoadFailed
from convoy.types import TensorSpec

from .base import RuntimeBase

log = logging.getLogger("convoy.runtimes.onnx")

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"
NVIDIA_VENDOR_ID = 0x10DE

#: ONNX element type (TensorProto.DataType name, lower case, as in ORT's "tensor(float)") -> V2.
ONNX_TO_V2: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "bfloat16": "BF16",
}


@dataclass(frozen=True, slots=True)
class GraphTensor:
    """A graph input or output as the model file declares it."""

    name: str
    #: ONNX element type ("float", "string", ...) or the whole type when not a tensor.
    onnx_type: str
    #: Full shape, batch dimension included; -1 for a symbolic dimension; None if rank unknown.
    dims: tuple[int, ...] | None


def cuda_device_count() -> int:
    """How many GPUs ONNX Runtime's CUDA provider can run on here (0 without onnxruntime-gpu)."""
    if CUDA not in ort.get_available_providers():
        return 0  # onnxruntime-gpu lists CUDA whether or not there is a GPU: look for one
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    # ORT's hardware discovery (>= 1.22) sits in capi; `get_ep_devices` is public but lists CUDA
    # only for plugin-EP builds, not for the onnxruntime-gpu wheels.
    discover = getattr(ort.capi._pybind_state, "get_hardware_devices", None)
    if discover is None:
        return 1  # cannot tell: try one; the session falls back to the CPU if it is not there
    found = sum(
        1
        for device in discover()
        if device.type == ort.OrtHardwareDeviceType.GPU and device.vendor_id == NVIDIA_VENDOR_ID
    )
    return min(found, len(visible.split(","))) if visible is not None else found


class OnnxRuntime(RuntimeBase):
    def __init__(self, source: ModelVersionSource, instance_index: int) -> None:
        self._source = source
        self._instance_index = instance_index
        self._session: ort.InferenceSession | None = None
        self._input_dtypes: dict[str, np.dtype] = {}
        self._output_names: list[str] = []
        self._string_outputs: frozenset[str] = frozenset()

    # --- config completion (called on the class, before any instance exists) -----------------
    @staticmethod
    def complete_config(source: ModelVersionSource) -> ModelConfig:
        """The config with inputs/outputs read from the graph where config.pbtxt omits them;
        declared ones are checked against the graph."""
        config = source.config
        path = _model_path(source)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ModelLoadFailed(f"{path}: not a readable ONNX model: {exc}") from None
        initializers = {tensor.name for tensor in model.graph.initializer}
        # Before IR version 4 initializers were listed among the inputs too; they are weights.
        inputs = [_proto_tensor(v) for v in model.graph.input if v.name not in initializers]
        outputs = [_proto_tensor(v) for v in model.graph.output]
        _check_declared(source, inputs, outputs)
        filled = {}
        if not config.inputs:
            filled["inputs"] = tuple(_spec(source, t, "input") for t in inputs)
        if not config.outputs:
            filled["outputs"] = tuple(_spec(source, t, "output") for t in outputs)
        return replace(config, **filled) if filled else config

    # --- the runtime verbs ---------------------------------------------------------------------
    def load(self) -> None:
        source = self._source
        config = source.config
        path = _model_path(source)
        kind, gpu = config.placement(self._instance_index)
        providers = self._providers(kind, gpu)
        options = self._session_options()
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise ModelLoadFailed(f"{path}: onnxruntime could not load it: {exc}") from None
        used = session.get_providers()
        if kind is InstanceKind.GPU and CUDA not in used:
            raise ModelLoadFailed(
                f"model '{config.name}' instance {self._instance_index} is KIND_GPU (GPU {gpu}) "
                f"but onnxruntime could not create {CUDA} (no CUDA device, or the CUDA/cuDNN "
                f"libraries onnxruntime-gpu needs are missing; the server log has onnxruntime's "
                f"reason); use KIND_CPU to run it on the CPU"
            )
        if providers[0][0] == TENSORRT and TENSORRT not in used:
            log.warning("model '%s': TensorRT requested but unavailable; running on CUDA", config.name)
        inputs = [_session_tensor(arg) for arg in session.get_inputs()]
        outputs = [_session_tensor(arg) for arg in session.get_outputs()]
        for tensor in (*inputs, *outputs):
            if tensor.onnx_type == "bfloat16":
                raise ModelLoadFailed(
                    f"{path}: '{tensor.name}' is bfloat16, which onnxruntime's Python API cannot "
                    "exchange as numpy arrays; cast to/from float16 or float32 inside the graph"
                )
            if tensor.onnx_type not in ONNX_TO_V2:
                raise ModelLoadFailed(
                    f"{path}: '{tensor.name}' has type {tensor.onnx_type}, {_SUPPORTED}"
                )
        _check_declared(source, inputs, outputs)
        self._input_dtypes = {t.name: NUMPY_DTYPE[ONNX_TO_V2[t.onnx_type]] for t in inputs}
        self._output_names = [t.name for t in outputs]
        self._string_outputs = frozenset(t.name for t in outputs if t.onnx_type == "string")
        self._session = session
        log.info(
            "model '%s' version %d instance %d: providers %s, %d intra-op threads",
            config.name,
            source.version,
            self._instance_index,
            used,
            options.intra_op_num_threads,
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name, array in inputs.items():
            dtype = self._input_dtypes.get(name)
            if dtype is None:
                raise InvalidInput(
                    f"input '{name}' is not an input of model '{self._source.config.name}'"
                )
            if dtype.kind == "O":
                array = _to_text(name, array)
            elif array.dtype != dtype:  # the config's datatypes were checked to match at load
                array = array.astype(dtype)
            feed[name] = array
        results = self._session.run(self._output_names, feed)
        outputs = dict(zip(self._output_names, results, strict=True))
        for name in self._string_outputs:
            outputs[name] = _to_bytes(outputs[name])
        return outputs

    def close(self) -> None:
        self._session = None

    # --- helpers ------------------------------------------------------------------------------
    def _providers(self, kind: InstanceKind, gpu: int | None) -> list[tuple[str, dict]]:
        config = self._source.config
        if kind is InstanceKind.CPU:
            return [(CPU, {})]
        if kind is not InstanceKind.GPU:  # AUTO / MODEL: a GPU when there is one
            count = cuda_device_count()
            if count == 0:
                return [(CPU, {})]
            gpu = self._instance_index % count
        elif CUDA not in ort.get_available_providers():
            raise ModelLoadFailed(
                f"model '{config.name}' instance {self._instance_index} is KIND_GPU but the "
                f"installed onnxruntime has no {CUDA} (install onnxruntime-gpu, or use KIND_CPU)"
            )
        providers: list[tuple[str, dict]] = []
        if _flag(self._source, "tensorrt"):
            trt: dict = {"device_id": gpu, "trt_fp16_enable": _flag(self._source, "tensorrt_fp16")}
            cache = config.parameters.get("tensorrt_cache_path")
            if cache:
                trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache)
            providers.append((TENSORRT, trt))
        providers.append((CUDA, {"device_id": gpu}))
        providers.append((CPU, {}))  # for the operators CUDA lacks
        return providers

    def _session_options(self) -> ort.SessionOptions:
        config = self._source.config
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        options = ort.SessionOptions()
        # Every instance runs its own session: share the cores out instead of each taking all.
        options.intra_op_num_threads = _count(
            self._source, "intra_op_thread_count", max(1, (cores or 1) // config.instance_count)
        )
        options.inter_op_num_threads = _count(self._source, "inter_op_thread_count", 1)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return options


_SUPPORTED = f"expected a tensor of one of {sorted(ONNX_TO_V2)}"


def _model_path(source: ModelVersionSource) -> Path:
    path = source.path / (source.config.default_model_filename or "model.onnx")
    if not path.is_file():
        raise ModelLoadFailed(f"{path}: onnxruntime backend needs this file")
    return path


def _config_path(source: ModelVersionSource) -> Path:
    return source.path.parent / "config.pbtxt"


def _flag(source: ModelVersionSource, name: str) -> bool:
    value = source.config.parameters.get(name, "false").strip().lower()
    if value not in ("true", "false"):
        raise InvalidConfig(
            f"{_config_path(source)}: parameters[{name}]: expected true or false, got '{value}'"
        )
    return value == "true"


def _count(source: ModelVersionSource, name: str, default: int) -> int:
    value = source.config.parameters.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise InvalidConfig(
            f"{_config_path(source)}: parameters[{name}]: expected a positive integer, got '{value}'"
        )
    return number


def _proto_tensor(value_info: onnx.ValueInfoProto) -> GraphTensor:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        return GraphTensor(value_info.name, kind or "undefined", None)
    tensor_type = value_info.type.tensor_type
    onnx_type = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    if not tensor_type.HasField("shape"):
        return GraphTensor(value_info.name, onnx_type, None)
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
    return GraphTensor(value_info.name, onnx_type, dims)


def _session_tensor(arg) -> GraphTensor:
    """From onnxruntime's NodeArg; its shape cannot tell a scalar from an unknown rank, so the
    dims are left to `complete_config`, which reads the graph itself."""
    onnx_type = arg.type[len("tensor(") : -1] if arg.type.startswith("tensor(") else arg.type
    return GraphTensor(arg.name, onnx_type, None)


def _spec(source: ModelVersionSource, tensor: GraphTensor, kind: str) -> TensorSpec:
    """The TensorSpec config.pbtxt would declare for a graph tensor."""
    config = source.config
    path = _model_path(source)
    datatype = ONNX_TO_V2.get(tensor.onnx_type)
    if datatype is None:
        raise InvalidConfig(f"{path}: {kind} '{tensor.name}' has type {tensor.onnx_type}, {_SUPPORTED}")
    if tensor.dims is None:
        raise InvalidConfig(
            f"{path}: {kind} '{tensor.name}' has no declared shape; declare the {kind}s in "
            f"{_config_path(source)}"
        )
    if config.max_batch_size == 0:
        return TensorSpec(name=tensor.name, datatype=datatype, dims=tensor.dims)
    if not tensor.dims or tensor.dims[0] != -1:
        raise InvalidConfig(
            _not_batching(config, tensor, f"{_config_path(source)}: max_batch_size", path)
        )
    return TensorSpec(name=tensor.name, datatype=datatype, dims=tensor.dims[1:])


def _check_declared(
    source: ModelVersionSource, inputs: list[GraphTensor], outputs: list[GraphTensor]
) -> None:
    """Raise InvalidConfig, naming config.pbtxt's field, where the declared inputs/outputs do not
    match the graph: unknown names, other datatypes, incompatible dims, undeclared inputs."""
    config = source.config
    where = _config_path(source)
    path = _model_path(source)
    scattered = {name for b in config.batch_outputs for name in b.target_names}
    for kind, declared, graph in (("input", config.inputs, inputs), ("output", config.outputs, outputs)):
        by_name = {t.name: t for t in graph}
        for index, spec in enumerate(declared):
            field = f"{where}: {kind}[{index}]"
            tensor = by_name.get(spec.name)
            if tensor is None:
                names = ", ".join(f"'{t.name}'" for t in graph)
                raise InvalidConfig(
                    f"{field}.name: '{spec.name}' is not an {kind} of {path}; its {kind}s: {names}"
                )
            datatype = ONNX_TO_V2.get(tensor.onnx_type)
            if datatype is not None and datatype != spec.datatype:
                raise InvalidConfig(
                    f"{field}.data_type: {V2_TO_CONFIG[spec.datatype]} but {path} declares "
                    f"'{spec.name}' as {tensor.onnx_type} ({V2_TO_CONFIG[datatype]})"
                )
            if spec.allow_ragged_batch and kind == "input":
                _check_ragged(spec, tensor, field, path)
            elif kind == "output" and spec.name in scattered:
                pass  # its shape is the requests' (batch_output), not the declared dims
            else:
                _check_dims(config, spec, tensor, f"{field}.dims", path)
        if kind == "input":
            _check_batch_inputs(config, by_name, where, path)
        lengths = config.padding.lengths_input if config.padding is not None else ""
        if kind == "input" and lengths and lengths not in by_name:
            raise InvalidConfig(
                f"{where}: parameters.padding_lengths_input: '{lengths}' is not an input of "
                f"{path}; its inputs: {', '.join(repr(t.name) for t in graph)}"
            )
        if declared and kind == "input":
            # Batch inputs and a padded model's lengths input are fed by the server, never
            # declared.
            filled = {name for b in config.batch_inputs for name in b.target_names}
            if lengths:
                filled.add(lengths)
            missing = [t.name for t in graph if config.input(t.name) is None and t.name not in filled]
            if missing:
                raise InvalidConfig(
                    f"{where}: input: {path} also needs input(s) {missing}; declare every input "
                    "or none (then they are read from the model)"
                )


def _check_ragged(spec: TensorSpec, tensor: GraphTensor, field: str, path) -> None:
    """A ragged input reaches the model flattened and concatenated: the graph takes it as [-1]."""
    if tensor.dims is not None and tensor.dims != (-1,):
        raise InvalidConfig(
            f"{field}.allow_ragged_batch: the model receives ragged input '{spec.name}' as one "
            f"dimension [-1] (every request's elements concatenated), but {path} gives it the "
            f"shape {list(tensor.dims)}"
        )


def _check_batch_inputs(config: ModelConfig, graph: dict, where, path) -> None:
    """Every batch input target is an input of the graph, of the batch input's datatype."""
    for index, batch_input in enumerate(config.batch_inputs):
        for name in batch_input.target_names:
            tensor = graph.get(name)
            if tensor is None:
                names = ", ".join(f"'{t}'" for t in graph)
                raise InvalidConfig(
                    f"{where}: batch_input[{index}].target_name: '{name}' is not an input of "
                    f"{path}; its inputs: {names}"
                )
            datatype = ONNX_TO_V2.get(tensor.onnx_type)
            if datatype is not None and datatype != batch_input.datatype:
                raise InvalidConfig(
                    f"{where}: batch_input[{index}].data_type: "
                    f"{V2_TO_CONFIG[batch_input.datatype]} but {path} declares '{name}' as "
                    f"{tensor.onnx_type} ({V2_TO_CONFIG[datatype]})"
                )


def _check_dims(config: ModelConfig, spec: TensorSpec, tensor: GraphTensor, field: str, path) -> None:
    if tensor.dims is None:
        return
    model_dims = tensor.dims
    shown = list(spec.dims) if spec.reshape is None else f"reshape {list(spec.reshape)}"
    if config.max_batch_size > 0:
        if not model_dims or model_dims[0] != -1:
            raise InvalidConfig(_not_batching(config, tensor, field, path))
        model_dims = model_dims[1:]
    dims = spec.dims if spec.reshape is None else spec.reshape
    compatible = len(dims) == len(model_dims) and all(
        d == m or d == -1 or m == -1 for d, m in zip(dims, model_dims, strict=True)
    )
    if not compatible:
        batch = " after the batch dimension" if config.max_batch_size > 0 else ""
        raise InvalidConfig(
            f"{field}: {shown} does not fit the shape {list(model_dims)}{batch} that {path} "
            f"gives '{spec.name}' (-1 is variable)"
        )


def _not_batching(config: ModelConfig, tensor: GraphTensor, field: str, path: Path) -> str:
    return (
        f"{field}: max_batch_size is {config.max_batch_size} but {path} gives '{tensor.name}' "
        f"the shape {list(tensor.dims)}, whose first dimension is not variable (the batch); "
        "set max_batch_size: 0 to serve it unbatched"
    )


def _to_text(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES elements as str, the only form onnxruntime turns into string tensors faithfully
    (it would store bytes objects as their repr)."""
    flat = array.reshape(-1)
    text = np.empty(flat.shape, dtype=object)
    for index, item in enumerate(flat):
        if isinstance(item, (bytes, bytearray, memoryview)):
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"input '{name}': element {index} is not UTF-8 text, which ONNX string "
                    "tensors need in onnxruntime"
                ) from None
        text[index] = item
    return text.reshape(array.shape)


def _to_bytes(array: np.ndarray) -> np.ndarray:
    """String outputs (str from onnxruntime) as the bytes Convoy's BYTES tensors carry."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for index, item in enumerate(flat):
        out[index] = item.encode("utf-8") if isinstance(item, str) else item
    return out.reshape(array.shape)
