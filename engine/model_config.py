"""config.pbtxt (Triton's ModelConfig in protobuf text format) -> a validated typed ModelConfig.

Errors name the file and the field, e.g. ``models/x/config.pbtxt: input[0].dims: ...``.
The parsed protobuf is kept beside the typed config for the ModelConfig API, which returns it.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format, text_format

from convoy.config import (
    DynamicBatching,
    EnsembleScheduling,
    EnsembleStep,
    InstanceGroup,
    InstanceKind,
    ModelConfig,
    QueuePolicy,
    ResponseCachePolicy,
    SequenceBatching,
    SequenceControl,
    SequenceState,
    TimeoutAction,
    VersionPolicy,
    VersionPolicyKind,
    WarmupInput,
    WarmupSample,
)
from convoy.datatypes import CONFIG_TO_V2, V2_TO_CONFIG
from convoy.errors import InvalidConfig
from convoy.padding import parse_padding
from convoy.protos import model_config_pb2 as mc
from convoy.types import TensorSpec

from .batch_io import Fail, ragged_batching

if TYPE_CHECKING:
    from google.protobuf.message import Message

#: Triton `platform` strings -> Convoy backend names.
PLATFORM_TO_BACKEND = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "pytorch_torchscript": "pytorch",
    "torch_export": "pytorch",
}
#: Default model file per backend; also how a backend is guessed from a version folder.
DEFAULT_FILES = {"python": "model.py", "onnxruntime": "model.onnx", "pytorch": "model.pt"}
BACKEND_ALIASES = {"onnx": "onnxruntime", "torch": "pytorch", "libtorch": "pytorch"}


def read_config_proto(config_path: Path) -> mc.ModelConfig:
    """Parse a config.pbtxt; a missing file yields an empty config (filled in later)."""
    proto = mc.ModelConfig()
    if not config_path.exists():
        return proto
    try:
        text_format.Parse(config_path.read_text(), proto)
    except text_format.ParseError as exc:
        raise InvalidConfig(f"{config_path}: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidConfig(f"{config_path}: not UTF-8 text") from None
    return proto


def guess_backend(model_dir: Path) -> str:
    """The backend a model folder's files imply (model.py, model.onnx, model.pt[2])."""
    for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        for backend, filename in DEFAULT_FILES.items():
            if (version_dir / filename).exists():
                return backend
        if (version_dir / "model.pt2").exists():
            return "pytorch"
    return ""


@dataclass(frozen=True, slots=True)
class UnsupportedField:
    """A ModelConfig field whose behaviour Convoy does not implement: a config that sets it is
    refused at load rather than served as if it were honoured. `path` is dotted; `[]` walks
    every element of a repeated field (``input[].is_shape_tensor``)."""

    path: str
    #: What serving the model without the behaviour would get wrong.
    consequence: str


#: Every ModelConfig field Convoy reads none of, or reads without implementing. When a feature
#: lands, delete its entry. Accepted without an entry: input/output_pinned_memory (a copy hint
#: with no observable effect). A scalar set to its default (false, 0, "") counts as unset; a
#: message field counts as set even when empty (`model_operations {}` is refused), so an entry
#: names the scalar inside when only that matters (`response_cache.enable`).
UNSUPPORTED_FIELDS: tuple[UnsupportedField, ...] = (
    UnsupportedField("model_repository_agents", "the agents would never run"),
    UnsupportedField("model_operations", "the operation libraries would never be loaded"),
    UnsupportedField("metric_tags", "metrics would carry no such tags"),
    UnsupportedField("runtime", "the named runtime library would be ignored"),
    UnsupportedField("cc_model_filenames", "the per-GPU model files would be ignored"),
    UnsupportedField("optimization.graph", "the graph optimisation level would be ignored"),
    UnsupportedField("optimization.priority", "the model priority would be ignored"),
    UnsupportedField("optimization.cuda", "the CUDA settings would be ignored"),
    UnsupportedField(
        "optimization.execution_accelerators", "the execution accelerators would be ignored"
    ),
    UnsupportedField(
        "optimization.gather_kernel_buffer_threshold", "the gather kernel would never be used"
    ),
    UnsupportedField("optimization.eager_batching", "batches would not be formed eagerly"),
    UnsupportedField("input[].format", "the input would not be converted from that format"),
    UnsupportedField("input[].is_shape_tensor", "the shape tensor would be batched like data"),
    UnsupportedField("input[].is_non_linear_format_io", "the input layout would be ignored"),
    UnsupportedField("output[].label_filename", "classification labels would never be returned"),
    UnsupportedField("output[].is_shape_tensor", "the shape tensor would be split like data"),
    UnsupportedField("output[].is_non_linear_format_io", "the output layout would be ignored"),
    UnsupportedField("instance_group[].rate_limiter", "the rate limiter would be ignored"),
    UnsupportedField("instance_group[].secondary_devices", "the secondary devices would be ignored"),
    UnsupportedField("instance_group[].profile", "the TensorRT profiles would be ignored"),
    UnsupportedField("instance_group[].passive", "passive instances would be scheduled"),
    UnsupportedField("instance_group[].host_policy", "the host policy would be ignored"),
)


def _set_fields(message: Message, path: str, shown: str = "") -> list[str]:
    """The places `path` is set in `message`, spelled with indices (``input[1].format``)."""
    head, _, rest = path.partition(".")
    repeated = head.endswith("[]")
    name = head.removesuffix("[]")
    present = {field.name for field, _ in message.ListFields()}
    if name not in present:
        return []
    value = getattr(message, name)
    spelled = f"{shown}.{name}" if shown else name
    if repeated:
        if not rest:
            return [spelled]
        found: list[str] = []
        for index, element in enumerate(value):
            found.extend(_set_fields(element, rest, f"{spelled}[{index}]"))
        return found
    return _set_fields(value, rest, spelled) if rest else [spelled]


def refuse_unsupported(proto: mc.ModelConfig, fail: Fail) -> None:
    """Raise (through `fail(field, message)`) for the first field of UNSUPPORTED_FIELDS set."""
    for entry in UNSUPPORTED_FIELDS:
        places = _set_fields(proto, entry.path)
        if places:
            raise fail(
                places[0],
                f"is set, but Convoy does not implement it yet ({entry.consequence}); "
                "remove it from the config to serve this model without it",
            )


def build_model_config(proto: mc.ModelConfig, model_dir: Path) -> ModelConfig:
    """Validate a ModelConfig proto (already completed) into the typed config."""
    where = model_dir / "config.pbtxt"

    def fail(field: str, message: str) -> InvalidConfig:
        return InvalidConfig(f"{where}: {field}: {message}")

    name = proto.name or model_dir.name
    if name != model_dir.name:
        raise fail("name", f"'{name}' must match the model folder name '{model_dir.name}'")
    refuse_unsupported(proto, fail)
    backend = BACKEND_ALIASES.get(proto.backend, proto.backend)
    if proto.platform == "ensemble" and not proto.backend:
        backend = "ensemble"
    if not backend and proto.platform:
        backend = PLATFORM_TO_BACKEND.get(proto.platform, "")
        if not backend:
            raise fail(
                "platform",
                f"'{proto.platform}' is not supported; expected one of "
                f"{sorted([*PLATFORM_TO_BACKEND, 'ensemble'])} or a backend (python, onnxruntime, "
                "pytorch)",
            )
    if not backend:
        backend = guess_backend(model_dir)
    if not backend:
        raise fail("backend", "not set and no model.py / model.onnx / model.pt found to infer it")
    if proto.max_batch_size < 0:
        raise fail("max_batch_size", f"must be >= 0, got {proto.max_batch_size}")
    batching = proto.max_batch_size > 0

    inputs = tuple(_tensor_spec(t, f"input[{i}]", fail, batching) for i, t in enumerate(proto.input))
    outputs = tuple(_tensor_spec(t, f"output[{i}]", fail, batching) for i, t in enumerate(proto.output))
    for kind, specs in (("input", inputs), ("output", outputs)):
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise fail(kind, f"name '{spec.name}' appears more than once")
            seen.add(spec.name)

    batch_inputs, batch_outputs = ragged_batching(proto, inputs, outputs, backend, fail)

    dynamic = None
    if proto.HasField("dynamic_batching"):
        if not batching:
            raise fail("dynamic_batching", "requires max_batch_size > 0")
        dynamic = _dynamic_batching(proto.dynamic_batching, proto.max_batch_size, fail)
    sequence = None
    if proto.HasField("sequence_batching"):
        sequence = _sequence_batching(
            proto.sequence_batching, proto.max_batch_size, inputs, fail, backend
        )
    ensemble = None
    if backend == "ensemble":
        if not proto.HasField("ensemble_scheduling"):
            raise fail("ensemble_scheduling", "platform 'ensemble' needs an ensemble_scheduling block")
        if proto.model_warmup:
            raise fail("model_warmup", "an ensemble is not warmed up (warm up its composing models)")
        ensemble = _ensemble_scheduling(proto.ensemble_scheduling, fail)
    elif proto.HasField("ensemble_scheduling"):
        raise fail("ensemble_scheduling", 'is only valid with platform: "ensemble"')

    parameters = {k: v.string_value for k, v in proto.parameters.items()}
    latency_slo_ms = _latency_slo(proto, dynamic, fail)
    if dynamic is not None and _latency_first(proto, latency_slo_ms, fail):
        dynamic = replace(dynamic, latency_first=True)
    elif dynamic is None and proto.parameters.get(BATCH_DISPATCH) is not None:
        _latency_first(proto, latency_slo_ms, fail)  # a malformed value is named first
        raise fail(
            f"parameters.{BATCH_DISPATCH}",
            "needs dynamic_batching (it chooses when the dynamic batcher sends a batch); add a "
            "dynamic_batching block or remove the parameter",
        )
    padding = parse_padding(parameters, inputs, outputs, proto.max_batch_size, fail)
    if padding is not None and (sequence is not None or ensemble is not None):
        raise fail("parameters.padding_inputs", "padded batching needs dynamic batching")
    ragged = batch_inputs or batch_outputs or any(spec.allow_ragged_batch for spec in inputs)
    if padding is not None and ragged:
        raise fail(
            "parameters.padding_inputs",
            "padded batching and ragged batching (allow_ragged_batch, batch_input, batch_output) "
            "are two ways to batch different lengths: choose one",
        )

    groups = []
    for i, group in enumerate(proto.instance_group):
        if group.count < 0:
            raise fail(f"instance_group[{i}].count", f"must be >= 1, got {group.count}")
        groups.append(
            InstanceGroup(
                name=group.name or f"{name}_{i}",
                count=group.count or 1,
                kind=InstanceKind(mc.ModelInstanceGroup.Kind.Name(group.kind)),
                gpus=tuple(group.gpus),
            )
        )

    return ModelConfig(
        name=name,
        backend=backend,
        platform=proto.platform,
        max_batch_size=proto.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        dynamic_batching=dynamic,
        sequence_batching=sequence,
        ensemble=ensemble,
        instance_groups=tuple(groups) or (InstanceGroup(name=f"{name}_0"),),
        version_policy=_version_policy(proto, fail),
        warmup=tuple(_warmup(w, i, fail) for i, w in enumerate(proto.model_warmup)),
        parameters=parameters,
        padding=padding,
        default_model_filename=proto.default_model_filename,
        payload_log_sample_rate=_sample_rate(proto, fail),
        latency_slo_ms=latency_slo_ms,
        decoupled=proto.model_transaction_policy.decoupled,
        batch_inputs=batch_inputs,
        batch_outputs=batch_outputs,
        response_cache=_response_cache(proto, parameters, backend, dynamic, ragged, fail),
        metric_buckets=_metric_buckets(proto, fail),
    )


#: Convoy's response-cache parameters (config `parameters`, beside Triton's response_cache).
CACHE_PARAMETERS = (
    "response_cache_ttl_s",
    "response_cache_max_bytes",
    "response_cache_rows",
    "response_cache_per_key",
)


def _boolean(value: str, field: str, fail: Fail) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise fail(field, f"expected true or false, got '{value}'")


def _response_cache(
    proto: mc.ModelConfig,
    parameters: dict[str, str],
    backend: str,
    dynamic: DynamicBatching | None,
    ragged: object,
    fail: Fail,
) -> ResponseCachePolicy | None:
    """`response_cache { enable: true }` and the response_cache_* parameters, or None.
    `ragged` is truthy when the model batches raggedly."""
    given = {k: v for k, v in parameters.items() if k.startswith("response_cache")}
    for key in given:
        if key not in CACHE_PARAMETERS:
            raise fail(
                f"parameters.{key}",
                f"is not a response cache parameter; expected one of {list(CACHE_PARAMETERS)}",
            )
    if not proto.response_cache.enable:
        if given:
            key = sorted(given)[0]
            raise fail(f"parameters.{key}", "has no effect without response_cache { enable: true }")
        return None
    field = "response_cache.enable"
    if proto.model_transaction_policy.decoupled:
        raise fail(field, "a decoupled model's responses cannot be cached (as in Triton)")
    if proto.HasField("sequence_batching"):
        raise fail(field, "a sequence model's responses depend on its state and cannot be cached")
    if backend == "ensemble":
        raise fail(
            field,
            "an ensemble's responses are not cached; enable the cache on its composing models",
        )
    ttl = _non_negative(given.get("response_cache_ttl_s", ""), "parameters.response_cache_ttl_s", fail)
    max_bytes = _non_negative(
        given.get("response_cache_max_bytes", ""), "parameters.response_cache_max_bytes", fail
    )
    if max_bytes != int(max_bytes):
        raise fail(
            "parameters.response_cache_max_bytes", f"expected a whole number of bytes, got {max_bytes}"
        )
    rows = dynamic is not None and not ragged
    if "response_cache_rows" in given:
        rows = _boolean(given["response_cache_rows"], "parameters.response_cache_rows", fail)
        if rows and (proto.max_batch_size <= 0 or ragged):
            raise fail(
                "parameters.response_cache_rows",
                "row-level caching needs max_batch_size > 0 and no ragged batching",
            )
    per_key = _boolean(
        given.get("response_cache_per_key", "false"), "parameters.response_cache_per_key", fail
    )
    return ResponseCachePolicy(ttl_s=ttl, max_bytes=int(max_bytes), rows=rows, per_key=per_key)


def _non_negative(value: str, field: str, fail: Fail) -> float:
    value = value.strip()
    if not value:
        return 0.0
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not (number >= 0 and math.isfinite(number)):
        raise fail(field, f"expected a non-negative number, got '{value}'")
    return number


#: Histogram families whose buckets `model_metrics.metric_control` may set, with their unit.
HISTOGRAM_FAMILIES = {
    "nv_inference_first_response_histogram_ms": "milliseconds",
    "convoy_request_latency_seconds": "seconds",
    "convoy_queue_wait_seconds": "seconds",
    "convoy_compute_seconds": "seconds",
    "convoy_compute_input_seconds": "seconds",
    "convoy_compute_infer_seconds": "seconds",
    "convoy_compute_output_seconds": "seconds",
    "convoy_batch_size": "rows",
    "convoy_batch_tokens": "tokens",
    "convoy_batch_padding_ratio": "share of the batch's tokens",
}


def _metric_buckets(proto: mc.ModelConfig, fail: Fail) -> dict[str, tuple[float, ...]]:
    """Triton's `model_metrics { metric_control [...] }`: bucket bounds per histogram family."""
    buckets: dict[str, tuple[float, ...]] = {}
    for index, control in enumerate(proto.model_metrics.metric_control):
        field = f"model_metrics.metric_control[{index}]"
        family = control.metric_identifier.family
        if family not in HISTOGRAM_FAMILIES:
            raise fail(
                f"{field}.metric_identifier.family",
                f"'{family}' is not a histogram whose buckets can be set; expected one of "
                f"{sorted(HISTOGRAM_FAMILIES)}",
            )
        if family in buckets:
            raise fail(f"{field}.metric_identifier.family", f"'{family}' is set more than once")
        if not control.HasField("histogram_options"):
            raise fail(f"{field}.histogram_options", "must be set (the buckets)")
        bounds = tuple(control.histogram_options.buckets)
        if (
            not bounds
            or any(not math.isfinite(b) for b in bounds)
            or any(a >= b for a, b in itertools.pairwise(bounds))
        ):
            raise fail(
                f"{field}.histogram_options.buckets",
                f"expected strictly increasing finite bounds in {HISTOGRAM_FAMILIES[family]}, "
                f"got {list(bounds)}",
            )
        buckets[family] = bounds
    return buckets


def _sample_rate(proto: mc.ModelConfig, fail: Fail) -> float:
    """The `payload_log_sample_rate` parameter: a fraction of requests, 0 (default) to 1."""
    parameter = proto.parameters.get("payload_log_sample_rate")
    value = parameter.string_value.strip() if parameter is not None else ""
    if not value:
        return 0.0
    try:
        rate = float(value)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        raise fail(
            "parameters.payload_log_sample_rate",
            f"expected a fraction of requests between 0 and 1, got '{value}'",
        )
    return rate


#: The parameter choosing when the dynamic batcher sends a batch, and its values.
BATCH_DISPATCH = "batch_dispatch"
DISPATCH_TRITON = "triton"
DISPATCH_LATENCY_FIRST = "latency_first"


def _latency_first(proto: mc.ModelConfig, latency_slo_ms: float, fail: Fail) -> bool:
    """The `batch_dispatch` parameter: `triton` (the default: a batch waits up to
    max_queue_delay_microseconds for a preferred or the maximum size, as Triton's dynamic
    batcher does) or `latency_first` (it goes as soon as waiting cannot grow it). A latency
    objective plans its own batches, so latency_slo_ms models are latency-first."""
    parameter = proto.parameters.get(BATCH_DISPATCH)
    value = parameter.string_value.strip() if parameter is not None else ""
    if parameter is not None and value not in (DISPATCH_TRITON, DISPATCH_LATENCY_FIRST):
        raise fail(
            f"parameters.{BATCH_DISPATCH}",
            f"expected '{DISPATCH_TRITON}' (wait up to max_queue_delay_microseconds for a "
            f"preferred or the maximum batch size) or '{DISPATCH_LATENCY_FIRST}' (send a batch "
            f"as soon as waiting cannot grow it), got '{value}'",
        )
    if latency_slo_ms and value == DISPATCH_TRITON:
        raise fail(
            f"parameters.{BATCH_DISPATCH}",
            f"'{DISPATCH_TRITON}' cannot go with latency_slo_ms: a latency objective sizes and "
            "sends batches itself (latency-first); remove one of the two parameters",
        )
    return bool(latency_slo_ms) or value == DISPATCH_LATENCY_FIRST


def _latency_slo(proto: mc.ModelConfig, dynamic: DynamicBatching | None, fail: Fail) -> float:
    """The `latency_slo_ms` parameter: a p99 latency objective in ms, met by sizing dynamic
    batches (so it needs dynamic_batching); 0 (absent) means none."""
    parameter = proto.parameters.get("latency_slo_ms")
    value = parameter.string_value.strip() if parameter is not None else ""
    if not value:
        return 0.0
    try:
        objective = float(value)
    except ValueError:
        objective = -1.0
    if not (objective > 0 and math.isfinite(objective)):
        raise fail(
            "parameters.latency_slo_ms",
            f"expected a positive number of milliseconds, got '{value}'",
        )
    if dynamic is None:
        raise fail(
            "parameters.latency_slo_ms",
            "needs dynamic_batching (the objective is met by sizing batches); add a "
            "dynamic_batching block or remove the parameter",
        )
    return objective


def _tensor_spec(
    tensor: mc.ModelInput | mc.ModelOutput, field: str, fail: Fail, batching: bool
) -> TensorSpec:
    if not tensor.name:
        raise fail(f"{field}.name", "must be set")
    type_name = mc.DataType.Name(tensor.data_type)
    datatype = CONFIG_TO_V2.get(type_name)
    if datatype is None:
        raise fail(f"{field}.data_type", f"expected one of {sorted(CONFIG_TO_V2)}, got {type_name}")
    dims = tuple(int(d) for d in tensor.dims)
    if not dims and not batching:
        raise fail(f"{field}.dims", "must list at least one dimension")
    if any(d < -1 for d in dims):
        raise fail(f"{field}.dims", f"each dimension must be -1 (variable) or >= 0, got {list(dims)}")
    reshape = tuple(int(d) for d in tensor.reshape.shape) if tensor.HasField("reshape") else None
    return TensorSpec(
        name=tensor.name,
        datatype=datatype,
        dims=dims,
        optional=bool(getattr(tensor, "optional", False)),
        reshape=reshape,
        allow_ragged_batch=bool(getattr(tensor, "allow_ragged_batch", False)),
    )


def _queue_policy(policy: mc.ModelQueuePolicy, field: str, fail: Fail) -> QueuePolicy:
    if policy.max_queue_size < 0:
        raise fail(f"{field}.max_queue_size", f"must be >= 0, got {policy.max_queue_size}")
    return QueuePolicy(
        timeout_action=TimeoutAction(mc.ModelQueuePolicy.TimeoutAction.Name(policy.timeout_action)),
        default_timeout_us=policy.default_timeout_microseconds,
        allow_timeout_override=policy.allow_timeout_override,
        max_queue_size=policy.max_queue_size,
    )


def _dynamic_batching(
    block: mc.ModelDynamicBatching, max_batch_size: int, fail: Fail
) -> DynamicBatching:
    preferred = tuple(sorted(set(block.preferred_batch_size)))
    for size in preferred:
        if not 1 <= size <= max_batch_size:
            raise fail(
                "dynamic_batching.preferred_batch_size",
                f"each size must be between 1 and max_batch_size ({max_batch_size}), got {size}",
            )
    levels = block.priority_levels
    default_level = block.default_priority_level
    if levels and not 1 <= default_level <= levels:
        raise fail(
            "dynamic_batching.default_priority_level",
            f"must be between 1 and priority_levels ({levels}), got {default_level}",
        )
    per_level = {}
    for level, policy in block.priority_queue_policy.items():
        if not 1 <= level <= max(levels, 1):
            raise fail(
                "dynamic_batching.priority_queue_policy",
                f"level {level} is outside 1..priority_levels ({levels})",
            )
        per_level[int(level)] = _queue_policy(
            policy, f"dynamic_batching.priority_queue_policy[{level}]", fail
        )
    return DynamicBatching(
        max_queue_delay_us=block.max_queue_delay_microseconds,
        preferred_batch_sizes=preferred,
        priority_levels=levels,
        default_priority_level=default_level,
        default_queue_policy=_queue_policy(
            block.default_queue_policy, "dynamic_batching.default_queue_policy", fail
        ),
        priority_queue_policy=per_level,
        preserve_ordering=block.preserve_ordering,
    )


#: Control kind -> the name Convoy uses for it.
_CONTROL_KINDS = {
    "CONTROL_SEQUENCE_START": "START",
    "CONTROL_SEQUENCE_READY": "READY",
    "CONTROL_SEQUENCE_END": "END",
    "CONTROL_SEQUENCE_CORRID": "CORRID",
}
_CORRID_TYPES = ("UINT64", "INT64", "UINT32", "INT32", "BYTES")


def _sequence_batching(
    block: mc.ModelSequenceBatching,
    max_batch_size: int,
    inputs: tuple[TensorSpec, ...],
    fail: Fail,
    backend: str = "",
) -> SequenceBatching:
    """The `sequence_batching` block; anything Convoy does not implement is refused."""
    if block.iterative_sequence:
        if backend != "python":
            raise fail(
                "sequence_batching.iterative_sequence",
                f"needs a python-backend TritonPythonModel (it reschedules requests with "
                f"request.set_release_flags); the {backend} backend cannot",
            )
        if block.state:
            raise fail(
                "sequence_batching.iterative_sequence",
                "with sequence_batching.state is not supported by Convoy (implicit state across "
                "iterations; the model keeps its own)",
            )
    declared = {spec.name for spec in inputs}
    taken: set[str] = set()

    def claim(field: str, name: str) -> None:
        if not name:
            raise fail(field, "must be set")
        if name in declared:
            raise fail(
                field,
                f"'{name}' is also a declared input; control and state inputs are "
                "filled by the sequence batcher and must not be listed under input",
            )
        if name in taken:
            raise fail(field, f"'{name}' is used by more than one control or state input")
        taken.add(name)

    controls: list[SequenceControl] = []
    for i, item in enumerate(block.control_input):
        field = f"sequence_batching.control_input[{i}]"
        claim(f"{field}.name", item.name)
        if len(item.control) != 1:
            raise fail(f"{field}.control", f"expected exactly one control, got {len(item.control)}")
        control = item.control[0]
        kind = _CONTROL_KINDS[mc.ModelSequenceBatching.Control.Kind.Name(control.kind)]
        if any(c.kind == kind for c in controls):
            raise fail(f"{field}.control[0].kind", f"CONTROL_SEQUENCE_{kind} is given more than once")
        if kind == "CORRID":
            datatype = CONFIG_TO_V2.get(mc.DataType.Name(control.data_type), "")
            if datatype not in _CORRID_TYPES:
                raise fail(
                    f"{field}.control[0].data_type",
                    "CONTROL_SEQUENCE_CORRID expects TYPE_UINT64, TYPE_INT64, TYPE_UINT32, "
                    f"TYPE_INT32 or TYPE_STRING, got {mc.DataType.Name(control.data_type)}",
                )
            controls.append(SequenceControl(item.name, kind, datatype))
            continue
        given = [
            (name, values)
            for name, values in (
                ("INT32", list(control.int32_false_true)),
                ("FP32", list(control.fp32_false_true)),
                ("BOOL", list(control.bool_false_true)),
            )
            if values
        ]
        if len(given) != 1 or len(given[0][1]) != 2:
            raise fail(
                f"{field}.control[0]",
                f"CONTROL_SEQUENCE_{kind} needs exactly one of int32_false_true, fp32_false_true "
                "or bool_false_true with two values [false, true]",
            )
        datatype, (false_value, true_value) = given[0]
        controls.append(SequenceControl(item.name, kind, datatype, false_value, true_value))

    states = []
    for i, state in enumerate(block.state):
        field = f"sequence_batching.state[{i}]"
        claim(f"{field}.input_name", state.input_name)
        if not state.output_name:
            raise fail(f"{field}.output_name", "must be set")
        state_datatype = CONFIG_TO_V2.get(mc.DataType.Name(state.data_type))
        if state_datatype is None or state_datatype == "BYTES":
            raise fail(
                f"{field}.data_type",
                f"expected a numeric TYPE_*, got {mc.DataType.Name(state.data_type)}",
            )
        dims = tuple(int(d) for d in state.dims)
        if not dims or any(d < 1 for d in dims):
            raise fail(
                f"{field}.dims",
                f"expected fixed dimensions >= 1, got {list(dims)} "
                "(variable-sized state is not supported by Convoy)",
            )
        if state.use_growable_memory:
            raise fail(f"{field}.use_growable_memory", "is not supported by Convoy")
        for j, initial in enumerate(state.initial_state):
            if initial.WhichOneof("state_data") != "zero_data":
                raise fail(f"{field}.initial_state[{j}]", "only zero_data is supported by Convoy")
        states.append(SequenceState(state.input_name, state.output_name, state_datatype, dims))

    strategy = block.WhichOneof("strategy_choice") or "direct"
    preferred: tuple[int, ...]
    delay, utilization, candidates, preferred = 0, 0.0, 0, ()
    if strategy == "direct":
        delay = block.direct.max_queue_delay_microseconds
        utilization = block.direct.minimum_slot_utilization
        if not 0.0 <= utilization <= 1.0:
            raise fail(
                "sequence_batching.direct.minimum_slot_utilization",
                f"must be between 0 and 1, got {utilization}",
            )
    else:
        oldest = block.oldest
        if oldest.preserve_ordering:
            raise fail("sequence_batching.oldest.preserve_ordering", "is not supported by Convoy")
        delay = oldest.max_queue_delay_microseconds
        candidates = oldest.max_candidate_sequences
        if candidates < 0:
            raise fail(
                "sequence_batching.oldest.max_candidate_sequences", f"must be >= 0, got {candidates}"
            )
        preferred = tuple(sorted(set(oldest.preferred_batch_size)))
        for size in preferred:
            if not 1 <= size <= max(max_batch_size, 1):
                raise fail(
                    "sequence_batching.oldest.preferred_batch_size",
                    f"each size must be between 1 and max_batch_size ({max_batch_size}), got {size}",
                )
    return SequenceBatching(
        strategy=strategy,
        max_sequence_idle_us=block.max_sequence_idle_microseconds or 1_000_000,
        controls=tuple(controls),
        states=tuple(states),
        max_queue_delay_us=delay,
        minimum_slot_utilization=utilization,
        max_candidate_sequences=candidates,
        preferred_batch_sizes=preferred,
        iterative=block.iterative_sequence,
    )


def _ensemble_scheduling(block: mc.ModelEnsembling, fail: Fail) -> EnsembleScheduling:
    """The steps as written; the graph is checked against the composing models when they are
    loaded (engine/ensemble.py)."""
    if not block.step:
        raise fail("ensemble_scheduling.step", "must list at least one step")
    steps = []
    for i, step in enumerate(block.step):
        field = f"ensemble_scheduling.step[{i}]"
        if not step.model_name:
            raise fail(f"{field}.model_name", "must be set")
        if step.model_namespace:
            raise fail(f"{field}.model_namespace", "is not supported by Convoy")
        if step.model_version < -1:
            raise fail(
                f"{field}.model_version", f"expected -1 (latest) or a version, got {step.model_version}"
            )
        steps.append(
            EnsembleStep(
                model_name=step.model_name,
                model_version=int(step.model_version),
                input_map=dict(step.input_map),
                output_map=dict(step.output_map),
            )
        )
    return EnsembleScheduling(steps=tuple(steps), max_inflight_requests=block.max_inflight_requests)


def _version_policy(proto: mc.ModelConfig, fail: Fail) -> VersionPolicy:
    if not proto.HasField("version_policy"):
        return VersionPolicy()
    which = proto.version_policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy(kind=VersionPolicyKind.ALL)
    if which == "specific":
        versions = tuple(int(v) for v in proto.version_policy.specific.versions)
        if not versions:
            raise fail("version_policy.specific.versions", "must list at least one version")
        return VersionPolicy(kind=VersionPolicyKind.SPECIFIC, versions=versions)
    num = proto.version_policy.latest.num_versions if which == "latest" else 1
    if num < 1:
        raise fail("version_policy.latest.num_versions", f"must be >= 1, got {num}")
    return VersionPolicy(kind=VersionPolicyKind.LATEST, num_versions=num)


def _warmup(sample: mc.ModelWarmup, index: int, fail: Fail) -> WarmupSample:
    field = f"model_warmup[{index}]"
    inputs = {}
    for name, spec in sample.inputs.items():
        datatype = CONFIG_TO_V2.get(mc.DataType.Name(spec.data_type))
        if datatype is None:
            raise fail(f"{field}.inputs[{name}].data_type", "must be a valid TYPE_*")
        source = spec.WhichOneof("input_data_type")
        if source is None:
            raise fail(f"{field}.inputs[{name}]", "needs zero_data, random_data or input_data_file")
        inputs[name] = WarmupInput(
            datatype=datatype,
            dims=tuple(int(d) for d in spec.dims),
            source={"zero_data": "zero", "random_data": "random"}.get(source, "file"),
            file=spec.input_data_file if source == "input_data_file" else "",
        )
    return WarmupSample(
        name=sample.name or f"warmup_{index}",
        batch_size=max(sample.batch_size, 1) if sample.batch_size else 1,
        inputs=inputs,
        count=max(sample.count, 1),
    )


def runtime_view(config: ModelConfig) -> ModelConfig:
    """The config a runtime loads with: a sequence model's control and state inputs (and state
    outputs) declared like the others, so every backend passes them to the model. Clients see
    the config without them (`public_view`)."""
    policy = config.sequence_batching
    if policy is None:
        return config
    inputs = [TensorSpec(c.input_name, c.datatype, (1,)) for c in policy.controls]
    inputs += [TensorSpec(s.input_name, s.datatype, s.dims) for s in policy.states]
    outputs = [TensorSpec(s.output_name, s.datatype, s.dims) for s in policy.states]
    # An undeclared side stays undeclared, for the backend to read from the model file.
    return replace(
        config,
        inputs=(*config.inputs, *inputs) if config.inputs else (),
        outputs=(*config.outputs, *outputs) if config.outputs else (),
    )


def public_view(config: ModelConfig) -> ModelConfig:
    """The config without the tensors the sequence batcher fills and keeps (see runtime_view)."""
    policy = config.sequence_batching
    if policy is None:
        return config
    hidden_inputs = {c.input_name for c in policy.controls} | {s.input_name for s in policy.states}
    hidden_outputs = {s.output_name for s in policy.states}
    return replace(
        config,
        inputs=tuple(t for t in config.inputs if t.name not in hidden_inputs),
        outputs=tuple(t for t in config.outputs if t.name not in hidden_outputs),
    )


def complete_proto(proto: mc.ModelConfig, config: ModelConfig) -> mc.ModelConfig:
    """The proto the ModelConfig API returns: the user's config with what Convoy filled in."""
    full = mc.ModelConfig()
    full.CopyFrom(proto)
    full.name = config.name
    full.max_batch_size = config.max_batch_size
    if not full.backend and config.ensemble is None:
        full.backend = config.backend
    if not full.input:
        for spec in config.inputs:
            _fill_tensor(full.input.add(), spec)
    if not full.output:
        for spec in config.outputs:
            _fill_tensor(full.output.add(), spec)
    if not full.instance_group and config.ensemble is None:
        for group in config.instance_groups:
            full.instance_group.add(
                name=group.name,
                count=group.count,
                kind=mc.ModelInstanceGroup.Kind.Value(group.kind.value),
            )
    if not full.HasField("version_policy"):
        full.version_policy.latest.num_versions = 1
    if config.decoupled:
        full.model_transaction_policy.decoupled = True
    return full


def _fill_tensor(target: mc.ModelInput | mc.ModelOutput, spec: TensorSpec) -> None:
    target.name = spec.name
    # protobuf's stubs type Value() as int: it is a DataType number.
    target.data_type = mc.DataType.Value(V2_TO_CONFIG[spec.datatype])  # type: ignore[assignment]
    target.dims.extend(spec.dims)


#: int64/uint64 fields of ModelConfig that protobuf's JSON writes as strings; model code (and
#: Triton) sees them as numbers.
_INT64_FIELDS = frozenset(
    {
        "dims",
        "shape",
        "max_queue_delay_microseconds",
        "default_timeout_microseconds",
        "versions",
        "max_sequence_idle_microseconds",
        "priority_levels",
        "default_priority_level",
        "default_queue_delay_microseconds",
    }
)


def _numbers(value: Any, key: str = "") -> Any:
    """`value` (protobuf's JSON of a config) with the int64 fields as numbers."""
    if isinstance(value, dict):
        return {k: _numbers(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v, key) for v in value]
    if key in _INT64_FIELDS and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def config_document(proto: mc.ModelConfig) -> dict[str, Any]:
    """The config as Triton's JSON dict (proto field names, enums by name, numbers as numbers)."""
    document: dict[str, Any] = _numbers(
        json_format.MessageToDict(proto, preserving_proto_field_name=True)
    )
    return document


#: What Triton's normalisation adds to every non-ensemble config before model code sees it.
_TRITON_DEFAULTS = {
    "version_policy": {"latest": {"num_versions": 1}},
    "optimization": {"input_pinned_memory": {"enable": True}, "output_pinned_memory": {"enable": True}},
}


def model_code_document(proto: mc.ModelConfig) -> dict[str, Any]:
    """The config as Triton hands it to model code (auto_complete_config's ModelConfig,
    initialize's args["model_config"]): every field with its default too (`input: []`,
    `parameters: {}`, `max_batch_size: 0`, ...), and the version policy and pinned-memory
    settings Triton's normalisation fills in."""
    document: dict[str, Any] = _numbers(
        json_format.MessageToDict(
            proto, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )
    if not proto.HasField("ensemble_scheduling"):
        for key, value in _TRITON_DEFAULTS.items():
            document.setdefault(key, copy.deepcopy(value))
    return document


def without_filled_defaults(document: dict[str, Any], proto: mc.ModelConfig) -> dict[str, Any]:
    """`document` (from model_code_document(proto), then edited by model code) less the defaults
    Triton's normalisation added, where model code left them as they were: what config.pbtxt
    did not say stays unsaid."""
    document = dict(document)
    for key, value in _TRITON_DEFAULTS.items():
        if not proto.HasField(key) and document.get(key) == value:
            del document[key]
    return document


def proto_from_document(document: dict[str, Any], where: Path) -> mc.ModelConfig:
    """A config dict (as completed by model code) back into the proto; errors name the file."""
    try:
        return json_format.ParseDict(document, mc.ModelConfig())
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise InvalidConfig(
            f"{where}: the config as auto_complete_config left it is invalid: {exc}"
        ) from None
