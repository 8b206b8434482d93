"""Typed model and server configuration, built once at start-up (or on a repository load).

These mirror the parts of Triton's ModelConfig that Convoy honours; `server/model_config.py`
builds them from config.pbtxt. Lower layers (batching, runtimes) see only these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    #: Convoy's latency-first dispatch (parameter batch_dispatch: latency_first, and every
    #: latency_slo_ms model): a batch goes as soon as waiting cannot grow it. False: Triton's
    #: rule, a batch waits up to max_queue_delay for a preferred (or the maximum) size.
    latency_first: bool = False


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
    #: iterative_sequence: one request is a whole sequence, executed again each time the model
    #: reschedules it (set_release_flags(TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)).
    iterative: bool = False

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
class ResponseCachePolicy:
    """A model's `response_cache { enable: true }` and Convoy's `response_cache_*` parameters."""

    #: Seconds an entry lives (parameter response_cache_ttl_s); 0: the cache's default `ttl`.
    ttl_s: float = 0.0
    #: Bytes this model's entries may hold in the local cache (response_cache_max_bytes); 0:
    #: only the cache's global `size` bounds them.
    max_bytes: int = 0
    #: Look up each row of a batched request on its own and compute only the missing rows
    #: (response_cache_rows; on by default with dynamic_batching, whose requests already share
    #: batches row by row).
    rows: bool = False
    #: Entries are private to the API key that computed them (response_cache_per_key).
    per_key: bool = False


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
    #: The response cache's settings for this model, or None (not cached).
    response_cache: ResponseCachePolicy | None = None
    #: Histogram bucket bounds by metric family (config `model_metrics.metric_control`), in the
    #: family's own unit; families not named keep Convoy's defaults.
    metric_buckets: dict[str, tuple[float, ...]] = field(default_factory=dict)
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
    """Server-wide settings, built from the command line by convoy/settings.py (where each
    flag, its default and its bounds are declared)."""

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
    #: --model-control-mode: "none", "explicit" or "poll". Only "explicit" takes load and
    #: unload requests (Triton's rule).
    model_control_mode: str = "none"
    #: Load every model at start; with False only `load_models` are loaded (explicit mode).
    load_all: bool = True
    load_models: tuple[str, ...] = ()
    #: Readiness needs every model ready (Triton's --strict-readiness); False: only a started,
    #: responsive server.
    strict_readiness: bool = True
    #: --model-control-mode poll: seconds between scans of the repository (0: no polling).
    repository_poll_secs: float = 0.0
    log_level: str = "INFO"
    #: "text" or "json" (one object per line).
    log_format: str = "text"
    #: Access log destination: "" off, "-" standard error, otherwise a file path.
    access_log: str = ""
    #: OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); "" sends no traces there.
    trace_otlp_endpoint: str = ""
    #: Print every request's spans to standard output as JSON lines.
    trace_console: bool = False
    #: Triton's --trace-config settings as given ("level=TIMESTAMPS", "opentelemetry,url=...");
    #: read by convoy.trace_settings.trace_setup.
    trace_config: tuple[str, ...] = ()
    #: --allow-client-shm: clients may register and unregister shared-memory regions (Triton's
    #: flag, off by default as in Triton 2.73: a region lets a client make the server read and
    #: write any segment its user can open).
    allow_client_shm: bool = False
    #: The name server metadata reports (--server-name; Triton's --id).
    server_name: str = "convoy"
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
    #: Which front end owns the ports: "native" (server/native, Rust), "python" (grpc.aio and
    #: uvicorn), or "auto": native when the extension is built and one process serves.
    frontend: str = "auto"
    #: The native front end's threads (0: one per two cores, 1 to 4).
    native_threads: int = 0
    #: The response cache (--cache-config), or None: no model's responses are cached.
    cache: CacheSettings | None = None
    #: --metrics-config and the host/GPU gauges (--allow-gpu-metrics, --metrics-interval-ms).
    metrics: MetricsSettings = field(default_factory=lambda: MetricsSettings())
    #: Where roll-outs keep their state across restarts (engine/rollout/manager.py); None: in
    #: memory only (the admin API then refuses to start one).
    rollout_state: Path | None = None


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """`--cache-config local,size=N` or `--cache-config redis,host=H,port=P` (Triton's flag)."""

    #: "local" (this process's memory) or "redis" (a Redis server shared by replicas).
    kind: str
    #: local: the byte budget of every model's entries together.
    size: int = 0
    #: Seconds an entry lives unless its model says otherwise; 0: until evicted.
    ttl_s: float = 0.0
    #: redis: where it is, and how to talk to it (Triton's redis cache options).
    host: str = ""
    port: int = 0
    user: str = ""
    password: str = ""
    db: int = 0
    #: Milliseconds; 0 waits forever (as Triton's redis cache).
    connect_timeout_ms: int = 500
    socket_timeout_ms: int = 200
    pool_size: int = 4
    wait_timeout_ms: int = 100


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """What /metrics exports beyond the per-model counters (Triton's --metrics-config keys)."""

    #: Triton's cumulative *_duration_us counters (counter_latencies).
    counter_latencies: bool = True
    #: Triton's histogram families (histogram_latencies): nv_inference_first_response_histogram_ms
    #: for decoupled models. Convoy's own histograms are always exported.
    histogram_latencies: bool = False
    allow_gpu_metrics: bool = True
    allow_cpu_metrics: bool = True
    #: How often the host and GPU gauges are sampled (Triton's --metrics-interval-ms).
    interval_ms: int = 2000


class FlagError(ValueError):
    """A command-line setting that cannot be honoured (the CLI reports it and exits)."""


#: --cache-config keys per cache kind, with the type each takes.
_CACHE_KEYS = {
    "local": {"size": int, "ttl": float},
    "redis": {
        "host": str,
        "port": int,
        "user": str,
        "password": str,
        "db": int,
        "connect_timeout": int,
        "socket_timeout": int,
        "pool_size": int,
        "wait_timeout": int,
        "ttl": float,
    },
}
#: Seconds a Redis entry lives unless `ttl` says otherwise (Triton's redis cache sets none).
REDIS_DEFAULT_TTL_S = 3600.0


def parse_cache_config(values: list[str], byte_size: int = 0) -> CacheSettings | None:
    """Triton's `--cache-config <cache>,<key>=<value>` (repeatable, one cache kind) and its
    deprecated `--response-cache-byte-size N` (= local,size=N)."""
    if byte_size:
        values = [*values, f"local,size={byte_size}"]
    if not values:
        return None
    kind = ""
    given: dict[str, str] = {}
    for value in values:
        name, _, rest = value.partition(",")
        name = name.strip()
        if name not in _CACHE_KEYS:
            raise FlagError(
                f"--cache-config {value!r}: unknown cache '{name}'; expected local or redis "
                "(--cache-config local,size=BYTES or --cache-config redis,host=H,port=P)"
            )
        if kind and name != kind:
            raise FlagError(f"--cache-config: one cache at a time, got both {kind} and {name}")
        kind = name
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, equals, setting = item.partition("=")
            if not equals:
                raise FlagError(f"--cache-config {value!r}: expected {name},<key>=<value>, got {item!r}")
            if key not in _CACHE_KEYS[kind]:
                raise FlagError(
                    f"--cache-config {value!r}: '{key}' is not a {kind} cache setting; expected "
                    f"one of {sorted(_CACHE_KEYS[kind])}"
                )
            given[key] = setting
    # Each value has its key's type in _CACHE_KEYS (str, int or float).
    typed: dict[str, Any] = {}
    for key, setting in given.items():
        kind_of = _CACHE_KEYS[kind][key]
        try:
            typed[key] = kind_of(setting)
        except ValueError:
            expected = "a whole number" if kind_of is int else "a number"
            raise FlagError(f"--cache-config {kind},{key}={setting}: expected {expected}") from None
        if kind_of is not str and typed[key] < 0:
            raise FlagError(f"--cache-config {kind},{key}={setting}: must not be negative")
    ttl = typed.get("ttl", REDIS_DEFAULT_TTL_S if kind == "redis" else 0.0)
    if kind == "local":
        if not typed.get("size"):
            raise FlagError(
                "--cache-config local needs size=BYTES (more than 0): the cache's byte budget"
            )
        return CacheSettings("local", size=typed["size"], ttl_s=ttl)
    for required in ("host", "port"):
        if required not in typed:
            raise FlagError(f"--cache-config redis needs {required}= (as Triton's redis cache)")
    defaults = CacheSettings("redis")
    return CacheSettings(
        "redis",
        ttl_s=ttl,
        host=typed["host"],
        port=typed["port"],
        user=typed.get("user", ""),
        password=typed.get("password", ""),
        db=typed.get("db", 0),
        connect_timeout_ms=typed.get("connect_timeout", defaults.connect_timeout_ms),
        socket_timeout_ms=typed.get("socket_timeout", defaults.socket_timeout_ms),
        pool_size=typed.get("pool_size", defaults.pool_size),
        wait_timeout_ms=typed.get("wait_timeout", defaults.wait_timeout_ms),
    )


def parse_metrics_config(
    values: list[str], allow_gpu: bool = True, allow_cpu: bool = True, interval_ms: int = 2000
) -> MetricsSettings:
    """Triton's `--metrics-config <setting>=<value>` (repeatable); convoy/settings.py has
    already checked --metrics-interval-ms against its bound."""
    settings = {"counter_latencies": True, "histogram_latencies": False}
    for value in values:
        key, equals, setting = value.partition("=")
        key = key.strip()
        if "," in key:
            raise FlagError(
                f"--metrics-config {value!r}: per-group settings (<group>,<setting>=<value>) are "
                "not supported by Convoy; give <setting>=<value>"
            )
        if key in ("summary_latencies", "summary_quantiles"):
            raise FlagError(
                f"--metrics-config {key}: Convoy exports no summaries (their quantiles cannot be "
                "aggregated across replicas); use the *_seconds histograms with histogram_quantile"
            )
        if key not in settings or not equals:
            raise FlagError(
                f"--metrics-config {value!r}: expected counter_latencies=true|false or "
                "histogram_latencies=true|false"
            )
        lowered = setting.strip().lower()
        if lowered not in ("true", "false"):
            raise FlagError(f"--metrics-config {key}: expected true or false, got {setting!r}")
        settings[key] = lowered == "true"
    return MetricsSettings(
        counter_latencies=settings["counter_latencies"],
        histogram_latencies=settings["histogram_latencies"],
        allow_gpu_metrics=allow_gpu,
        allow_cpu_metrics=allow_cpu,
        interval_ms=interval_ms,
    )
