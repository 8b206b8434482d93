"""Typed model and server configuration, built once at start-up (or on a repository load).

These mirror the parts of Triton's ModelConfig that Convoy honours; `server/model_config.py`
builds them from config.pbtxt. Lower layers (batching, runtimes) see only these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from convoy.padding import Padding
from convoy.types import TensorSpec


class TimeoutAction(enum.Enum):
    REJECT = "REJECT"
    DELAY = "DELAY"


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """How one priority level's queue behaves (Triton's ModelQueuePolicy)."""

    timeout_action: TimeoutAction = TimeoutAction.REJECT
    #: Queue timeout in µs applied to every request of this level; 0 means none.
    default_timeout_us: int = 0
    allow_timeout_override: bool = False
    #: Most requests this level may hold; 0 means the server-wide bound.
    max_queue_size: int = 0


@dataclass(frozen=True, slots=True)
class DynamicBatching:
    """The `dynamic_batching` block: when to dispatch a batch."""

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policy: dict[int, QueuePolicy] = field(default_factory=dict)
    preserve_ordering: bool = False


@dataclass(frozen=True, slots=True)
class SequenceControl:
    """One control input the sequence batcher fills (Triton's ControlInput + Control)."""

    #: The model input it feeds (not one of the declared inputs: clients never send it).
    input_name: str
    #: "START", "END", "READY" or "CORRID".
    kind: str
    #: V2 datatype of the tensor (INT32, FP32, BOOL, or for CORRID: UINT64, INT64, INT32, UINT32,
    #: BYTES).
    datatype: str
    #: Values meaning false and true (START / END / READY).
    false_value: float | int | bool = 0
    true_value: float | int | bool = 1


@dataclass(frozen=True, slots=True)
class SequenceState:
    """One implicit state (Triton's sequence_batching.state): the batcher feeds the sequence's
    state as input `input_name` and keeps what the model returns as output `output_name`."""

    input_name: str
    output_name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SequenceBatching:
    """The `sequence_batching` block: requests of a sequence reach one slot, in order."""

    #: "direct" (a sequence owns one batch slot: its rows are always at the same index) or
    #: "oldest" (a sequence owns an instance; the oldest ready sequences are batched together).
    strategy: str = "direct"
    max_sequence_idle_us: int = 1_000_000
    controls: tuple[SequenceControl, ...] = ()
    states: tuple[SequenceState, ...] = ()
    max_queue_delay_us: int = 0
    #: direct: a batch waits (up to max_queue_delay) until this fraction of slots is ready.
    minimum_slot_utilization: float = 0.0
    #: oldest: sequences one instance holds at once (0: max_batch_size); others wait.
    max_candidate_sequences: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()

    def control(self, kind: str) -> SequenceControl | None:
        for control in self.controls:
            if control.kind == kind:
                return control
        return None


@dataclass(frozen=True, slots=True)
class EnsembleStep:
    """One step of an ensemble: maps are composing model tensor -> ensemble tensor."""

    model_name: str
    #: -1: the latest ready version at the time of each request.
    model_version: int
    input_map: dict[str, str]
    output_map: dict[str, str]


@dataclass(frozen=True, slots=True)
class EnsembleScheduling:
    steps: tuple[EnsembleStep, ...]
    #: Ensemble requests in progress at once (0: the server's --max-queue-size).
    max_inflight_requests: int = 0


@dataclass(frozen=True, slots=True)
class BatchInput:
    """One `batch_input` (ragged batching): a tensor the batcher derives from the shapes of
    `source_input` across a batch's requests and feeds the model as each of `target_names`."""

    #: Triton's BatchInput.Kind name, e.g. "BATCH_ACCUMULATED_ELEMENT_COUNT".
    kind: str
    target_names: tuple[str, ...]
    #: "INT32" or "FP32".
    datatype: str
    source_input: str


@dataclass(frozen=True, slots=True)
class BatchOutput:
    """One `batch_output`: outputs `target_names` are scattered back per request following the
    shape of each request's `source_input` (kind BATCH_SCATTER_WITH_INPUT_SHAPE)."""

    kind: str
    target_names: tuple[str, ...]
    source_input: str


class InstanceKind(enum.Enum):
    AUTO = "KIND_AUTO"
    CPU = "KIND_CPU"
    GPU = "KIND_GPU"
    MODEL = "KIND_MODEL"


@dataclass(frozen=True, slots=True)
class InstanceGroup:
    name: str
    count: int = 1
    kind: InstanceKind = InstanceKind.AUTO
    gpus: tuple[int, ...] = ()


class VersionPolicyKind(enum.Enum):
    LATEST = "latest"
    ALL = "all"
    SPECIFIC = "specific"


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    kind: VersionPolicyKind = VersionPolicyKind.LATEST
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those present on disk, highest first."""
        ordered = sorted(available, reverse=True)
        if self.kind is VersionPolicyKind.ALL:
            return ordered
        if self.kind is VersionPolicyKind.SPECIFIC:
            return [v for v in ordered if v in self.versions]
        return ordered[: self.num_versions]


@dataclass(frozen=True, slots=True)
class WarmupInput:
    datatype: str
    dims: tuple[int, ...]
    #: "zero", "random" or "file" (input_data_file, relative to the version folder's warmup/ dir).
    source: str
    file: str = ""


@dataclass(frozen=True, slots=True)
class WarmupSample:
    name: str
    batch_size: int
    inputs: dict[str, WarmupInput]
    count: int = 1


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything Convoy needs to know about one model, validated."""

    name: str
    backend: str
    platform: str = ""
    #: 0: the model does not batch and inputs carry their full shape.
    max_batch_size: int = 0
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    dynamic_batching: DynamicBatching | None = None
    sequence_batching: SequenceBatching | None = None
    #: Set for `platform: "ensemble"` (backend "ensemble": no runtime of its own).
    ensemble: EnsembleScheduling | None = None
    instance_groups: tuple[InstanceGroup, ...] = ()
    version_policy: VersionPolicy = VersionPolicy()
    warmup: tuple[WarmupSample, ...] = ()
    parameters: dict[str, str] = field(default_factory=dict)
    #: Padded batching (parameters padding_*, max_batch_tokens; convoy/padding.py), or None.
    padding: Padding | None = None
    default_model_filename: str = ""
    #: Fraction of requests the payload log records (parameter payload_log_sample_rate; 0 = off).
    payload_log_sample_rate: float = 0.0
    #: p99 request-latency objective in ms (parameter latency_slo_ms; 0 = none): batches are
    #: sized and requests admitted to meet it (batching/slo.py).
    latency_slo_ms: float = 0.0
    #: `model_transaction_policy { decoupled: true }`: 0..N responses per request, streamed.
    decoupled: bool = False
    #: Ragged batching: tensors the batcher adds to each batch, outputs it scatters by shape.
    batch_inputs: tuple[BatchInput, ...] = ()
    batch_outputs: tuple[BatchOutput, ...] = ()
    #: The completed config as JSON (Triton's field names), for runtimes that hand it to model
    #: code (the python backend's `initialize(args)["model_config"]`); "" until completed.
    document: str = ""

    @property
    def instance_count(self) -> int:
        return sum(group.count for group in self.instance_groups) or 1

    def placement(self, instance_index: int) -> tuple[InstanceKind, int | None]:
        """(kind, GPU id or None) of the instance with this index, counting through the groups
        in order; a GPU group's instances are spread round-robin over its `gpus` (GPU 0 if none)."""
        index = instance_index
        for group in self.instance_groups:
            if index < group.count:
                if group.kind is InstanceKind.GPU:
                    gpus = group.gpus or (0,)
                    return group.kind, gpus[index % len(gpus)]
                return group.kind, None
            index -= group.count
        return InstanceKind.AUTO, None

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    @property
    def ragged(self) -> bool:
        """Requests batch raggedly: an input allows it, or the batcher adds batch inputs."""
        return bool(self.batch_inputs or self.batch_outputs) or any(
            spec.allow_ragged_batch for spec in self.inputs
        )

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None


@dataclass(frozen=True, slots=True)
class ModelVersionSource:
    """Where one version of a model lives on disk, handed to a runtime to load."""

    config: ModelConfig
    version: int
    path: Path  # the version folder, e.g. models/add_sub/1


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Server-wide settings from the command line."""

    model_repository: Path
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    grpc_max_message_bytes: int = 256 * 1024 * 1024
    http_max_body_bytes: int = 256 * 1024 * 1024
    #: Limit on an infer request's JSON (decompressed); binary tensor data counts only toward
    #: http_max_body_bytes. JSON costs ~16x its size to parse, hence the smaller default.
    http_max_json_bytes: int = 16 * 1024 * 1024
    #: HTTP request line + headers: at most this many bytes and this many headers (else 431).
    http_max_head_bytes: int = 64 * 1024
    http_max_headers: int = 100
    #: Seconds a connection may take to send a complete request head (HTTP) or finish its
    #: handshake (gRPC) before it is closed: idle connections cannot pile up.
    header_timeout: float = 5.0
    #: Open connections per front end (HTTP, gRPC) beyond which new ones are refused at once
    #: (HTTP: 503); 0 sets it below the process's open-file limit.
    max_connections: int = 0
    #: Bound on every model queue whose policy sets no max_queue_size.
    max_queue_size: int = 8192
    #: Seconds in-flight work gets to finish on SIGTERM/SIGINT.
    shutdown_grace: float = 30.0
    #: Seconds a batch may run before its requests fail and its instance is replaced (0 = no
    #: limit); a model's `execution_timeout_ms` parameter overrides it.
    execution_timeout: float = 0.0
    #: Where model code runs unless a model's `isolation` parameter says otherwise: "thread"
    #: (in this process) or "process" (a worker process per instance).
    isolation: str = "thread"
    #: Load every model at start; with False only `load_models` are loaded (explicit mode).
    load_all: bool = True
    load_models: tuple[str, ...] = ()
    #: Readiness needs every model ready (Triton's --strict-readiness); False: only a started,
    #: responsive server.
    strict_readiness: bool = True
    #: --model-control-mode poll: seconds between scans of the repository (0: no polling).
    repository_poll_secs: float = 0.0
    strict_readiness: bool = True
    log_level: str = "INFO"
    #: "text" or "json" (one object per line).
    log_format: str = "text"
    #: Access log destination: "" off, "-" standard error, otherwise a file path.
    access_log: str = ""
    #: OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); "" sends no traces there.
    trace_otlp_endpoint: str = ""
    #: Print every request's spans to standard output as JSON lines.
    trace_console: bool = False
    #: JSON file of API keys (see convoy/auth.py); None: every endpoint is open.
    api_keys_file: Path | None = None
    #: With API keys on: health (live/ready) and /metrics answer only to a valid key.
    protect_health: bool = False
    protect_metrics: bool = False
    #: PEM server certificate and key: gRPC, HTTP and metrics speak TLS when set.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: PEM CA bundle: clients must present a certificate it signed (mutual TLS).
    tls_client_ca: Path | None = None
    #: Showback ledger: per API key x model x version usage appended as JSON lines every
    #: `usage_interval` seconds (None: no ledger; the Prometheus usage counters need only keys).
    usage_ledger: Path | None = None
    usage_interval: float = 60.0
    #: Where sampled request/response payloads go (models opt in); None: payload logging off.
    payload_log_dir: Path | None = None
    #: A model's payload log file is rotated past this size, keeping `payload_log_backups` old ones.
    payload_log_max_bytes: int = 100 * 1024 * 1024
    payload_log_backups: int = 5
    #: Elements kept per logged tensor (the rest is cut and marked truncated); 0 keeps all.
    payload_log_max_elements: int = 65536
    #: Outcomes waiting for the payload log's writer; past it they are dropped and counted.
    payload_log_queue_size: int = 1024
    #: `convoy capacity` reports (capacity.json files or their folders) shown on /catalog.
    capacity_reports: tuple[Path, ...] = ()
    #: Front-end processes: 1 serves everything from this process; N > 1 starts N workers
    #: sharing the ports in front of this process, which keeps the models (engine/process.py).
    workers: int = 1
    #: With workers: MiB of shared memory per front end for large inputs (engine/arena.py);
    #: 0 sends every tensor over the socket.
    ipc_arena_mb: int = 64
    #: Where roll-outs keep their state across restarts (engine/rollout/manager.py); None: in
    #: memory only (the admin API then refuses to start one).
    rollout_state: Path | None = None
