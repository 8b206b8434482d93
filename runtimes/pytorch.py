"""The `pytorch` backend: TorchScript archives (`model.pt`, torch.jit.load) and torch.export
programs (`model.pt2`, torch.export.load), run under torch.inference_mode.

Neither loader unpickles Python objects, so a model file cannot run code on load; a module saved
with plain torch.save is refused. A file named by `default_model_filename` is an exported program
when it ends in `.pt2` and TorchScript otherwise.

Calling convention: inputs go to `forward` positionally in config.pbtxt's input order (Triton's
INPUT__0, INPUT__1, ...), unless the module names every config input among its arguments (a
TorchScript forward's parameter names, an exported program's keyword inputs): then by keyword.
Ragged batching: a ragged input arrives flattened to one dimension, and the `batch_input` targets
follow the declared inputs, in the order config.pbtxt lists them.
The module returns one tensor, a tuple/list mapped onto the config's outputs in order, or a dict
keyed by output name. Outputs come back in their declared datatype (floating ones are cast).

Placement: KIND_GPU runs on cuda:<gpu> and fails to load without CUDA; KIND_AUTO on cuda:0 when
CUDA is available (as in Triton), else the CPU; KIND_CPU on the CPU. Config `parameters`:
  precision              fp32 (default), fp16 or bf16: the module and floating inputs are cast
  cuda_graphs            true/false; default true on a GPU when every input's non-batch dims are
                         static: one graph per batch bucket (powers of two up to max_batch_size);
                         with padded batching and padding_buckets, per batch bucket x length
                         bucket under max_batch_tokens (cuda_graphs.graph_plan)
  cuda_graph_limit       most graphs captured (default: all planned), the cheapest kept
With padded batching (convoy/padding.py) the lengths input, when configured, follows the config's
inputs: last by position, or by its name when inputs go by keyword.
  intra_op_thread_count  CPU threads per instance; default the cores shared out among instances
On a GPU each instance has its own CUDA stream; inputs are staged in pinned host memory and copied
without blocking. A batch that runs out of memory is split in halves and retried, and the
instance's largest batch is lowered to the half that fit.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from convoy.config import InstanceKind, ModelConfig, ModelVersionSource
from convoy.errors import ConvoyError, InferenceFailed, InstanceLost, ModelLoadFailed
from convoy.padding import with_full_lengths
from convoy.types import TensorSpec

from .base import Capabilities, RuntimeBase, cuda_context_lost
from .cuda_graphs import CudaGraphs, StaticInput, graph_plan

log = logging.getLogger("convoy.runtimes.pytorch")

#: V2 datatype -> torch dtype the module sees (BF16 arrives as raw uint16 bits and is viewed).
TORCH_DTYPE: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "float32": None,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

#: The parameters this backend reads; a near miss of one (a typo) is refused at load.
PARAMETERS = ("precision", "cuda_graphs", "cuda_graph_limit", "intra_op_thread_count")

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class TorchRuntime(RuntimeBase):
    #: Pinned host buffers on a GPU (see `batch_buffers`).
    capabilities = Capabilities(batch_buffers=True)

    def __init__(self, source: ModelVersionSource, instance_index: int) -> None:
        self._source = source
        #: Ragged batching: ragged inputs arrive flat, the batch inputs follow the declared
        #: inputs (by position, or by keyword), and a batch cannot be cut in row ranges.
        self._ragged = source.config.ragged
        self._config = _with_batch_inputs(source.config)
        self._instance_index = instance_index
        self._module = None
        self._device = torch.device("cpu")
        self._precision: torch.dtype | None = None
        self._by_keyword = False
        self._stream: torch.cuda.Stream | None = None
        self._graphs: CudaGraphs | None = None
        #: What the module is called with, in order: the config's inputs, then the padded
        #: batch's lengths input when there is one.
        self._inputs = _module_inputs(self._config)
        padding = self._config.padding
        #: A padded input and its dim (batch dim counted): where a batch's padded length is read.
        self._length_at = (padding.inputs[0].name, 1 + padding.inputs[0].axis) if padding else None
        #: Pinned host buffers batches are assembled into (CUDA only), by input name: the
        #: torch tensor and its numpy view; grown when a larger batch comes.
        self._staging: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
        #: Largest batch this instance runs at once; lowered when the device runs out of memory.
        self.max_batch_rows = self._config.max_batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def graph_buckets(self) -> list[int]:
        """Batch sizes with a captured CUDA graph (empty when graphs are off)."""
        return self._graphs.bucket_rows if self._graphs is not None else []

    @property
    def graph_captures(self) -> list[tuple[int, int]]:
        """(rows, padded length) of each captured CUDA graph (length 0: no padded dim)."""
        return self._graphs.captured if self._graphs is not None else []

    # --- the runtime verbs ---------------------------------------------------------------------
    def load(self) -> None:
        config = self._config
        path = _model_path(self._source)
        for spec in (*config.inputs, *config.outputs):
            if spec.datatype not in TORCH_DTYPE:
                raise ModelLoadFailed(
                    f"{path}: '{spec.name}' is {spec.datatype}; the pytorch backend exchanges "
                    f"numeric tensors only (tokenise text in a python-backend model)"
                )
        if not config.outputs:
            raise ModelLoadFailed(f"{self._config_file}: the pytorch backend needs `output` declared")
        self._device = self._choose_device()
        self._refuse_misspelt_parameters()
        self._precision = self._precision_parameter()
        # Per thread (OpenMP): this instance's thread, where every verb runs.
        torch.set_num_threads(self._thread_count())
        module, keywords = _load_module(path, self._device)
        if self._precision is not None:
            module = module.to(self._precision)
        self._module = module
        self._by_keyword = bool(config.inputs) and all(s.name in keywords for s in self._inputs)
        graphs_wanted = self._cuda_graphs_wanted()
        plan = self._graph_plan()
        if self._device.type == "cuda":
            self._stream = torch.cuda.Stream(self._device)
            if graphs_wanted:
                self._graphs = CudaGraphs(self._stream)
                with torch.inference_mode():
                    self._graphs.capture(self._run, self._static_inputs(), plan, self._device)
        log.info(
            "model '%s' instance %d: %s on %s (%s, inputs by %s, %d threads%s)",
            config.name,
            self._instance_index,
            path.name,
            self._device,
            str(self._precision or torch.float32).removeprefix("torch."),
            "keyword" if self._by_keyword else "position",
            torch.get_num_threads(),
            f", CUDA graphs for batches {self._graphs.captured}" if self._graphs else "",
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._config.padding is not None:
            inputs = with_full_lengths(self._config.padding, inputs)
        rows = 0
        if self._config.max_batch_size > 0 and inputs and not self._ragged:
            rows = next(iter(inputs.values())).shape[0]
            if rows > self.max_batch_rows:
                return self._infer_in_parts(inputs, rows, self.max_batch_rows)
        try:
            return self._infer_once(inputs, rows)
        except ConvoyError:
            raise
        except Exception as exc:
            if cuda_context_lost(exc):
                log.error("model '%s' lost its CUDA context", self._config.name, exc_info=exc)
                raise InstanceLost(
                    f"model '{self._config.name}' hit a fatal CUDA error ({_reason(exc)}); "
                    "reloading the model"
                ) from None
            if not _out_of_memory(exc):
                log.error("model '%s' failed a batch", self._config.name, exc_info=exc)
                raise InferenceFailed(
                    f"model '{self._config.name}' failed to execute the batch: {_reason(exc)}"
                ) from None
            if rows <= 1:
                raise InferenceFailed(
                    f"model '{self._config.name}' ran out of memory on {self._device} "
                    f"for a batch of {max(rows, 1)} row(s)"
                ) from None
        # Retried outside the except block: the failed attempt's tensors, which its traceback
        # holds, are released first.
        part = (rows + 1) // 2
        self.max_batch_rows = min(self.max_batch_rows, part)
        log.warning(
            "model '%s' instance %d ran out of memory on %s with a batch of %d rows: split in "
            "halves; batches of more than %d rows are split from now on",
            self._config.name,
            self._instance_index,
            self._device,
            rows,
            self.max_batch_rows,
        )
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        return self._infer_in_parts(inputs, rows, part)

    def batch_buffers(self, rows: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """On a GPU: pinned host buffers the scheduler assembles each batch into, so the batch
        is copied once on the host and then straight to the device. Reused batch after batch
        (each batch's device copy has finished before the next batch is assembled)."""
        if self._stream is None:
            return None
        buffers = {}
        for name, array in like.items():
            shape = (rows, *array.shape[1:])
            # By per-row shape too: a padded model's batches come at several lengths, each
            # keeps its own buffer rather than reallocating pinned memory batch after batch.
            key = (name, shape[1:], array.dtype.str)
            held = self._staging.get(key)
            if held is None or held[1].shape[0] < rows:
                capacity = (max(rows, self._config.max_batch_size), *shape[1:])
                tensor = torch.empty(capacity, dtype=_torch_dtype_of(array), pin_memory=True)
                held = self._staging[key] = (tensor, tensor.numpy())
            buffers[name] = held[1][:rows]
        return buffers

    def close(self) -> None:
        self._staging = {}
        if self._graphs is not None:
            self._graphs.close()
        self._graphs = None
        self._module = None
        self._stream = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # --- execution -----------------------------------------------------------------------------
    def _infer_in_parts(
        self, inputs: dict[str, np.ndarray], rows: int, part: int
    ) -> dict[str, np.ndarray]:
        pieces = [
            self.infer({name: array[start : start + part] for name, array in inputs.items()})
            for start in range(0, rows, part)
        ]
        return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}

    def _infer_once(self, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        specs = self._inputs
        with torch.inference_mode():
            if self._stream is None:
                # The module may write into its inputs: wire-backed (read-only) arrays are
                # copied first, the batch buffer (already a copy) is used in place.
                tensors = [self._cast(_tensor(_writable(inputs[s.name]), s.datatype)) for s in specs]
                outputs = [
                    self._declared(o, s)
                    for o, s in zip(self._run(tensors), self._config.outputs, strict=True)
                ]
            else:
                outputs = self._infer_cuda(inputs, rows)
        return {
            spec.name: _array(tensor, spec.datatype)
            for spec, tensor in zip(self._config.outputs, outputs, strict=True)
        }

    def _infer_cuda(self, inputs: dict[str, np.ndarray], rows: int) -> list[torch.Tensor]:
        stream = self._stream
        # The one copy on the way in, into pinned memory, from which the device copies without
        # blocking: the scheduler assembled the batch into our staging buffers already, else
        # (a lone request passed through) it is copied into pinned memory here.
        staged = [self._staged(inputs[spec.name], spec.datatype) for spec in self._inputs]
        bucket = None
        if self._graphs is not None:
            length = 0
            if self._length_at is not None:
                name, dim = self._length_at
                length = inputs[name].shape[dim]
            bucket = self._graphs.bucket_for(rows, length)
        with torch.cuda.stream(stream):
            if bucket is not None:
                outputs = self._graphs.replay(bucket, staged, rows)
            else:
                moved = [self._cast(t.to(self._device, non_blocking=True)) for t in staged]
                outputs = self._run(moved)
            host = []
            for output, spec in zip(outputs, self._config.outputs, strict=True):
                output = self._declared(output, spec)
                pinned = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
                host.append(pinned.copy_(output, non_blocking=True))
        stream.synchronize()
        return host

    def _staged(self, array: np.ndarray, datatype: str) -> torch.Tensor:
        for tensor, view in self._staging.values():
            if array.ctypes.data == view.ctypes.data and array.dtype == view.dtype:
                staged = tensor[: array.shape[0]]
                return staged.view(torch.bfloat16) if datatype == "BF16" else staged
        return _pinned(array, datatype)

    def _run(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Call the module on inputs in config order; its outputs in config order."""
        if self._by_keyword:
            result = self._module(**{s.name: t for s, t in zip(self._inputs, tensors, strict=True)})
        else:
            result = self._module(*tensors)
        return self._outputs(result)

    def _outputs(self, result) -> list[torch.Tensor]:
        declared = self._config.outputs
        name = self._config.name
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, dict):
            missing = [spec.name for spec in declared if spec.name not in result]
            if missing:
                raise InferenceFailed(
                    f"model '{name}' returned a dict without output(s) {missing}; "
                    f"it has keys {sorted(map(str, result))}"
                )
            tensors = [result[spec.name] for spec in declared]
        elif isinstance(result, (tuple, list)):
            if len(result) < len(declared):
                raise InferenceFailed(
                    f"model '{name}' returned {len(result)} tensor(s); config.pbtxt declares "
                    f"{len(declared)} outputs"
                )
            tensors = list(result[: len(declared)])
        else:
            raise InferenceFailed(
                f"model '{name}' returned {type(result).__name__}; expected a tensor, a tuple or "
                "list of tensors, or a dict of output name -> tensor"
            )
        for spec, tensor in zip(declared, tensors, strict=True):
            if not isinstance(tensor, torch.Tensor):
                raise InferenceFailed(
                    f"model '{name}' output '{spec.name}' is a {type(tensor).__name__}, not a tensor"
                )
        return tensors

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._precision is not None and tensor.is_floating_point():
            return tensor.to(self._precision)
        return tensor

    def _declared(self, tensor: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
        """The output in its declared dtype: floating results are cast (e.g. from fp16 precision),
        anything else must already match."""
        target = TORCH_DTYPE[spec.datatype]
        if tensor.dtype == target:
            return tensor
        if tensor.is_floating_point() and target.is_floating_point:
            return tensor.to(target)
        raise InferenceFailed(
            f"model '{self._config.name}' output '{spec.name}': the module returned "
            f"{str(tensor.dtype).removeprefix('torch.')}, config.pbtxt declares {spec.datatype}"
        )

    def _static_inputs(self) -> list[StaticInput]:
        inputs = []
        padding = self._config.padding
        for spec in self._inputs:
            dtype = TORCH_DTYPE[spec.datatype]
            if self._precision is not None and dtype.is_floating_point:
                dtype = self._precision
            lengths = padding is not None and spec.name == padding.lengths_input
            inputs.append(StaticInput(_shape(spec), dtype, lengths))
        return inputs

    # --- configuration -------------------------------------------------------------------------
    @property
    def _config_file(self) -> Path:
        return self._source.path.parent / "config.pbtxt"

    def _choose_device(self) -> torch.device:
        config = self._config
        kind, gpu = config.placement(self._instance_index)
        if kind is InstanceKind.GPU:
            if not torch.cuda.is_available():
                why = (
                    f"this PyTorch build ({torch.__version__}) has no CUDA support"
                    if torch.version.cuda is None
                    else "PyTorch sees no CUDA device"
                )
                raise ModelLoadFailed(
                    f"model '{config.name}' instance {self._instance_index} is KIND_GPU (GPU {gpu}) "
                    f"but {why}; use KIND_CPU to run it on the CPU"
                )
            count = torch.cuda.device_count()
            if gpu >= count:
                raise ModelLoadFailed(
                    f"model '{config.name}' instance {self._instance_index} asks for GPU {gpu}; "
                    f"PyTorch sees {count} GPU(s) (0..{count - 1})"
                )
            return torch.device("cuda", gpu)
        if kind is InstanceKind.AUTO and torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def _parameter(self, name: str) -> str:
        return self._config.parameters.get(name, "").strip().lower()

    def _refuse_misspelt_parameters(self) -> None:
        for key in self._config.parameters:
            close = difflib.get_close_matches(key, PARAMETERS, n=1, cutoff=0.8)
            if close and key not in PARAMETERS:
                raise ModelLoadFailed(
                    f"{self._config_file}: parameters.{key}: not a pytorch backend parameter "
                    f"(did you mean '{close[0]}'?); it reads {list(PARAMETERS)}"
                )

    def _precision_parameter(self) -> torch.dtype | None:
        value = self._parameter("precision")
        if value and value not in PRECISIONS:
            raise ModelLoadFailed(
                f"{self._config_file}: parameters.precision: expected fp32, fp16 or bf16, got '{value}'"
            )
        return PRECISIONS.get(value)

    def _thread_count(self) -> int:
        value = self._parameter("intra_op_thread_count")
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ModelLoadFailed(
                    f"{self._config_file}: parameters.intra_op_thread_count: expected a positive "
                    f"integer, got '{value}'"
                )
            return int(value)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cores or 1) // self._config.instance_count)

    def _cuda_graphs_wanted(self) -> bool:
        value = self._parameter("cuda_graphs")
        if value and value not in _TRUE + _FALSE:
            raise ModelLoadFailed(
                f"{self._config_file}: parameters.cuda_graphs: expected true or false, got '{value}'"
            )
        if self._ragged:
            if value in _TRUE:
                raise ModelLoadFailed(
                    f"{self._config_file}: parameters.cuda_graphs is true but the model batches "
                    "raggedly (allow_ragged_batch / batch_input): its batches have no fixed shape"
                )
            return False
        padding = self._config.padding
        # Padded dims take each graph's length bucket; any other variable dim rules graphs out.
        padded = {p.name: p.axis for p in padding.inputs} if padding and padding.buckets else {}
        dynamic = [
            spec.name
            for spec in self._config.inputs
            if any(d < 0 and padded.get(spec.name) != i for i, d in enumerate(_shape(spec)))
        ]
        if value in _TRUE and dynamic:
            raise ModelLoadFailed(
                f"{self._config_file}: parameters.cuda_graphs is true but input(s) {dynamic} have "
                "variable dims; CUDA graphs need every dim but the batch fixed (or padded to "
                "parameters.padding_buckets)"
            )
        return value not in _FALSE and not dynamic

    def _graph_plan(self) -> list[tuple[int, int]]:
        """The graphs to capture (cuda_graphs.graph_plan), parameter cuda_graph_limit applied."""
        value = self._parameter("cuda_graph_limit")
        if value and (not value.isdigit() or int(value) < 1):
            raise ModelLoadFailed(
                f"{self._config_file}: parameters.cuda_graph_limit: expected a positive integer "
                f"(most graphs captured), got '{value}'"
            )
        padding = self._config.padding
        lengths = padding.buckets if padding is not None else ()
        tokens = padding.max_batch_tokens if padding is not None else 0
        return graph_plan(self._config.max_batch_size, lengths, tokens, int(value or 0))


def _module_inputs(config: ModelConfig) -> tuple[TensorSpec, ...]:
    """The config's inputs, then a padded model's lengths input (one value per row)."""
    padding = config.padding
    if padding is None or not padding.lengths_input:
        return config.inputs
    return (*config.inputs, TensorSpec(padding.lengths_input, padding.lengths_datatype, ()))


def _with_batch_inputs(config: ModelConfig) -> ModelConfig:
    """The config with each batch input target declared as an input after the others: the order
    the module receives them in."""
    if not config.batch_inputs:
        return config
    inputs = list(config.inputs)
    for batch_input in config.batch_inputs:
        inputs += [TensorSpec(name, batch_input.datatype, (-1,)) for name in batch_input.target_names]
    return replace(config, inputs=tuple(inputs))


def _model_path(source: ModelVersionSource) -> Path:
    config: ModelConfig = source.config
    if config.default_model_filename:
        path = source.path / config.default_model_filename
        if not path.is_file():
            raise ModelLoadFailed(f"{path}: default_model_filename names this file; it does not exist")
        return path
    for filename in ("model.pt", "model.pt2"):
        if (source.path / filename).is_file():
            return source.path / filename
    raise ModelLoadFailed(
        f"{source.path}: the pytorch backend needs model.pt (TorchScript) or model.pt2 (torch.export)"
    )


def _load_module(path: Path, device: torch.device) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The callable module on `device` and the names it accepts as keyword inputs."""
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise ModelLoadFailed(
                f"{path}: not a torch.export program (write one with torch.export.save): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        example = program.example_inputs
        keywords = tuple(example[1]) if example else ()
        return program.module(), keywords
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadFailed(
            f"{path}: not a TorchScript archive (write one with torch.jit.script(...).save or "
            f"torch.jit.trace(...).save; pickled modules from torch.save are not loaded): {first}"
        ) from None
    module.eval()
    keywords = tuple(argument.name for argument in module.forward.schema.arguments[1:])
    return module, keywords


def _out_of_memory(exc: Exception) -> bool:
    # TorchScript re-raises the allocator's OutOfMemoryError as a plain RuntimeError.
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def _reason(exc: Exception) -> str:
    """One line saying what failed: TorchScript errors carry the script's traceback, whose last
    line is the error itself."""
    lines = str(exc).strip().splitlines()
    last = lines[-1] if lines else ""
    name = type(exc).__name__
    return last if last.startswith(f"{name}:") else f"{name}: {last}"


def _shape(spec: TensorSpec) -> tuple[int, ...]:
    """The shape (without the batch dimension) the runtime receives for this input."""
    return spec.reshape if spec.reshape is not None else spec.dims


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy()


def _tensor(array: np.ndarray, datatype: str) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if datatype == "BF16" else tensor


def _torch_dtype_of(array: np.ndarray) -> torch.dtype:
    """The torch dtype holding a wire array's bytes (BF16 arrives as uint16 bits)."""
    return torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype


def _pinned(array: np.ndarray, datatype: str) -> torch.Tensor:
    wire = torch.uint16 if datatype == "BF16" else TORCH_DTYPE[datatype]
    pinned = torch.empty(array.shape, dtype=wire, pin_memory=True)
    np.copyto(pinned.numpy(), array)
    return pinned.view(torch.bfloat16) if datatype == "BF16" else pinned


def _array(tensor: torch.Tensor, datatype: str) -> np.ndarray:
    if datatype == "BF16":
        tensor = tensor.view(torch.uint16)
    return tensor.numpy()
