"""Prometheus metrics, read from the models' `ModelStats` at scrape time.

Nothing here runs on the request path: the scheduler only bumps the plain counters in
`batching/stats.py`, and this collector turns them into metric families when Prometheus scrapes
(on the metrics server's thread; int reads and dict/list copies are atomic under the GIL).

Triton's metric names and labels (`model`, `version`) come first, so Triton dashboards work
unchanged. prometheus_client appends `_total` to anything typed counter, so Triton's counters,
whose names lack it, are exposed untyped under their exact names; Convoy's own counters are
typed counters. Host CPU and memory come from /proc; GPU gauges from NVML (nvidia-ml-py, the
`gpu` extra) when it is importable and sees a GPU, and are left out otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from convoy.batching.scheduler import Scheduler
from convoy.batching.stats import Histogram, ModelStats
from convoy.batching.usage import UsageMeter, UsageTotals
from convoy.engine.payload_log import PayloadLog
from convoy.engine.repository import ModelRepository, ModelVersion

log = logging.getLogger("convoy.metrics")

LABELS = ("model", "version")
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
DISPATCH_REASONS = (
    "full",
    "preferred_size",
    "delay_expired",
    "queue_drained",
    "instance_freed",
    "unbatched",
)
REJECTION_REASONS = ("queue_full", "timeout", "deadline", "latency_slo")

#: Triton's cumulative per-model counters: (name, help, value from the stats).
_TRITON_COUNTERS: tuple[tuple[str, str, Callable[[ModelStats], int]], ...] = (
    (
        "nv_inference_request_success",
        "Number of successful inference requests",
        lambda s: s.success.count,
    ),
    ("nv_inference_count", "Number of inferences performed (rows)", lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions (batches)", lambda s: s.execution_count),
    (
        "nv_inference_request_duration_us",
        "Cumulative duration of successful inference requests in microseconds",
        lambda s: s.success.ns // 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative time requests spent queued in microseconds",
        lambda s: s.queue.ns // 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds",
        lambda s: s.compute_input.ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds",
        lambda s: s.compute_infer.ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative compute output duration in microseconds",
        lambda s: s.compute_output.ns // 1000,
    ),
)

#: Convoy's histograms: (name, help, histogram from the stats, scale from its unit to the metric's).
_HISTOGRAMS: tuple[tuple[str, str, Callable[[ModelStats], Histogram], float], ...] = (
    (
        "convoy_request_latency_seconds",
        "Successful inference requests, receipt to response",
        lambda s: s.success,
        1e-9,
    ),
    (
        "convoy_queue_wait_seconds",
        "Time executed requests waited in the queue",
        lambda s: s.queue,
        1e-9,
    ),
    (
        "convoy_compute_seconds",
        "Compute time per executed batch (input + infer + output)",
        lambda s: s.batch_compute,
        1e-9,
    ),
    ("convoy_batch_size", "Rows per executed batch", lambda s: s.batch_size, 1.0),
)


def _untyped(name: str, documentation: str) -> Metric:
    return Metric(name, documentation, "unknown")


class ModelCollector(Collector):
    """Per model-version metrics of every loaded version in the repository."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def _loaded(self) -> list[tuple[str, ModelVersion]]:
        loaded = []
        for model in list(self.repository.models.values()):
            for entry in list(model.versions.values()):
                if entry.scheduler is not None:
                    loaded.append((model.name, entry))
        return loaded

    def collect(self) -> Iterator[Metric]:
        loaded = self._loaded()
        for name, documentation, value in _TRITON_COUNTERS:
            family = _untyped(name, documentation)
            for model, entry in loaded:
                labels = {"model": model, "version": str(entry.version)}
                family.add_sample(name, labels, value(entry.stats))
            yield family

        failures = _untyped(
            "nv_inference_request_failure", "Number of failed inference requests, by reason"
        )
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Requests queued or executing in the model's scheduler",
            labels=LABELS,
        )
        dispatches = CounterMetricFamily(
            "convoy_batch_dispatch",
            "Batches dispatched, by why the scheduler sent them when it did",
            labels=(*LABELS, "reason"),
        )
        rejections = CounterMetricFamily(
            "convoy_rejections",
            "Requests turned away by their queue, by reason",
            labels=(*LABELS, "reason"),
        )
        depth = GaugeMetricFamily(
            "convoy_queue_depth",
            "Requests waiting in the queue, by priority level (1 is highest)",
            labels=(*LABELS, "priority"),
        )
        batch_limit = GaugeMetricFamily(
            "convoy_batch_size_limit",
            "Rows a batch may hold under sustained load: max_batch_size, or the size planned "
            "for the model's latency objective",
            labels=LABELS,
        )
        padding = CounterMetricFamily(
            "convoy_padding_tokens",
            "Tokens of the padded batches executed: the requests' own (kind real) and the pad "
            "added to reach each batch's padded length (kind pad); pad / (real + pad) is the "
            "share of the model's work that padding costs",
            labels=(*LABELS, "kind"),
        )
        objective = GaugeMetricFamily(
            "convoy_latency_objective_seconds",
            "The model's latency objective (parameter latency_slo_ms), p99 from arrival",
            labels=LABELS,
        )
        share = GaugeMetricFamily(
            "convoy_latency_admission_share",
            "Share of the latency objective admission currently works to (AIMD)",
            labels=LABELS,
        )
        batch_cost = GaugeMetricFamily(
            "convoy_batch_cost_seconds",
            "Learned batch cost line for the latency objective: per batch (fixed) and per row",
            labels=(*LABELS, "part"),
        )
        for model, entry in loaded:
            version = str(entry.version)
            stats = entry.stats
            labels = {"model": model, "version": version}
            by_reason = stats.failures_by_reason.copy()
            for reason in FAILURE_REASONS:
                failures.add_sample(
                    "nv_inference_request_failure",
                    {**labels, "reason": reason},
                    by_reason.get(reason, 0),
                )
            reasons = stats.dispatch_reasons.copy()
            for reason in DISPATCH_REASONS:
                dispatches.add_metric([model, version, reason], reasons.get(reason, 0))
            rejected = stats.rejections.copy()
            for reason in REJECTION_REASONS:
                rejections.add_metric([model, version, reason], rejected.get(reason, 0))
            scheduler = entry.scheduler
            if scheduler is not None:
                pending.add_metric([model, version], scheduler.in_flight)
                for level, waiting in enumerate(scheduler.queue_depths, start=1):
                    depth.add_metric([model, version, str(level)], waiting)
                if isinstance(scheduler, Scheduler):  # the dynamic batcher's, not a sequence's
                    batch_limit.add_metric([model, version], scheduler.batch_size_limit)
                    tokens = scheduler.padding_tokens
                    if tokens is not None:
                        padding.add_metric([model, version, "real"], tokens[0])
                        padding.add_metric([model, version, "pad"], tokens[1])
                    plan = scheduler.latency_plan
                    if plan is not None:
                        objective.add_metric([model, version], plan.objective_s)
                        share.add_metric([model, version], plan.admission_share)
                        batch_cost.add_metric([model, version, "fixed"], plan.fixed_s)
                        batch_cost.add_metric([model, version, "per_row"], plan.per_row_s)
        yield from (failures, pending, dispatches, rejections, depth, batch_limit)
        yield from (objective, share, batch_cost, padding)

        for name, documentation, histogram_of, scale in _HISTOGRAMS:
            family = HistogramMetricFamily(name, documentation, labels=LABELS)
            for model, entry in loaded:
                histogram = histogram_of(entry.stats)
                buckets, total = _cumulative(histogram, scale)
                family.add_metric([model, str(entry.version)], buckets, total)
            yield family


def _cumulative(histogram: Histogram, scale: float) -> tuple[list[tuple[str, int]], float]:
    """Prometheus buckets (cumulative, `le` labels in the metric's unit) and the sum."""
    counts = list(histogram.buckets)  # one copy, so the buckets and +Inf agree
    total = histogram.total * scale
    buckets = []
    running = 0
    for bound, count in zip(histogram.bounds, counts, strict=False):
        running += count
        buckets.append((floatToGoString(round(bound * scale, 12)), running))
    buckets.append(("+Inf", running + counts[-1]))
    return buckets, total


class PayloadLogCollector(Collector):
    """Lines the payload log wrote and dropped (its queue was full), per model."""

    def __init__(self, payload_log: PayloadLog) -> None:
        self.payload_log = payload_log

    def collect(self) -> Iterator[Metric]:
        written = CounterMetricFamily(
            "convoy_payload_log_written", "Sampled requests written to the payload log", labels=["model"]
        )
        dropped = CounterMetricFamily(
            "convoy_payload_log_dropped",
            "Sampled requests not logged because the payload log's queue was full",
            labels=["model"],
        )
        pairs_written = CounterMetricFamily(
            "convoy_payload_log_pairs_written",
            "Roll-out disagreements written to the payload log",
            labels=["model"],
        )
        pairs_dropped = CounterMetricFamily(
            "convoy_payload_log_pairs_dropped",
            "Roll-out disagreements not logged because the payload log's queue was full",
            labels=["model"],
        )
        log = self.payload_log
        for family, counts in (
            (written, log.written),
            (dropped, log.dropped),
            (pairs_written, log.pairs_written),
            (pairs_dropped, log.pairs_dropped),
        ):
            for model, count in sorted(counts.copy().items()):
                family.add_metric([model], count)
        yield from (written, dropped, pairs_written, pairs_dropped)


class HostCollector(Collector):
    """Triton's host gauges from /proc: CPU utilisation since the last scrape, memory."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._lock = threading.Lock()  # two concurrent scrapes share the previous CPU sample
        self._previous = self._cpu_times()

    def _cpu_times(self) -> tuple[int, int] | None:
        """(busy, total) jiffies over all CPUs, or None without /proc."""
        try:
            with (self._proc / "stat").open() as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return total - idle, total

    def _memory(self) -> tuple[int, int] | None:
        """(used, total) bytes, used being total minus what is available, or None."""
        values = {}
        try:
            with (self._proc / "meminfo").open() as handle:
                for line in handle:
                    key, _, rest = line.partition(":")
                    if key in ("MemTotal", "MemAvailable"):
                        values[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        if len(values) != 2:
            return None
        return values["MemTotal"] - values["MemAvailable"], values["MemTotal"]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = self._cpu_times()
            previous, self._previous = self._previous, now
        if now is not None and previous is not None:
            busy, total = now[0] - previous[0], now[1] - previous[1]
            utilization = busy / total if total > 0 else 0.0
            yield GaugeMetricFamily(
                "nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", value=utilization
            )
        memory = self._memory()
        if memory is not None:
            yield GaugeMetricFamily(
                "nv_cpu_memory_used_bytes", "CPU memory used, in bytes", value=memory[0]
            )
            yield GaugeMetricFamily(
                "nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", value=memory[1]
            )


class GpuCollector(Collector):
    """Triton's GPU gauges from NVML, one series per GPU (label `gpu_uuid`)."""

    def __init__(self, nvml, handles: list, uuids: list[str]) -> None:
        self._nvml = nvml
        self._devices = list(zip(uuids, handles, strict=True))

    @classmethod
    def open(cls) -> GpuCollector | None:
        """A collector over every visible GPU, or None without nvidia-ml-py, a driver or a GPU."""
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return None
        try:
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        except pynvml.NVMLError as exc:
            log.warning("NVML sees no usable GPU, GPU metrics are off: %s", exc)
            handles = []
        if not handles:
            pynvml.nvmlShutdown()
            return None
        return cls(pynvml, handles, uuids)

    def close(self) -> None:
        self._nvml.nvmlShutdown()

    def collect(self) -> Iterator[Metric]:
        nvml = self._nvml
        utilization = GaugeMetricFamily(
            "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"]
        )
        used = GaugeMetricFamily(
            "nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"]
        )
        total = GaugeMetricFamily(
            "nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"]
        )
        power = GaugeMetricFamily("nv_gpu_power_usage", "GPU power usage in watts", labels=["gpu_uuid"])
        for uuid, handle in self._devices:
            # Each reading on its own: a GPU that cannot report one (no power sensor) still
            # reports the others.
            with contextlib.suppress(nvml.NVMLError):
                utilization.add_metric([uuid], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
            with contextlib.suppress(nvml.NVMLError):
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([uuid], memory.used)
                total.add_metric([uuid], memory.total)
            with contextlib.suppress(nvml.NVMLError):
                power.add_metric([uuid], nvml.nvmlDeviceGetPowerUsage(handle) / 1000)  # mW -> W
        yield from (utilization, used, total, power)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


#: Showback counters: (name, help, value from a principal's UsageTotals).
_USAGE_COUNTERS: tuple[tuple[str, str, Callable[[UsageTotals], float]], ...] = (
    ("convoy_usage_requests", "Requests per API key (admitted or rejected)", lambda u: u.requests),
    ("convoy_usage_rows", "Rows (batch items) per API key", lambda u: u.rows),
    ("convoy_usage_failures", "Admitted requests that failed, per API key", lambda u: u.failures),
    (
        "convoy_usage_rejections",
        "Requests rejected by the queue or the key's quota, per API key",
        lambda u: u.rejections,
    ),
    ("convoy_usage_queue_seconds", "Time queued, per API key", lambda u: u.queue_ns / 1e9),
    (
        "convoy_usage_compute_seconds",
        "Compute time per API key: each batch's time split by the key's share of its rows",
        lambda u: u.compute_ns / 1e9,
    ),
)


class UsageCollector(Collector):
    """Per key x model x version showback; the label sets are bounded by the key file."""

    def __init__(self, meter: UsageMeter) -> None:
        self.meter = meter

    def collect(self) -> Iterator[Metric]:
        snapshot = self.meter.snapshot()
        for name, documentation, value_of in _USAGE_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=("key", *LABELS))
            for (principal, model, version), totals in snapshot.items():
                family.add_metric([principal, model, version], value_of(totals))
            yield family
        # A roll-out's shadow work (mirrored copies of the key's requests), counted apart.
        shadow = self.meter.snapshot(shadow=True)
        for name, documentation, value_of in _USAGE_COUNTERS:
            if name == "convoy_usage_rejections":
                continue  # mirrors are dropped by their budget, never rejected by a queue
            family = CounterMetricFamily(
                name.replace("convoy_usage_", "convoy_usage_shadow_"),
                f"Roll-out shadow work: {documentation[0].lower()}{documentation[1:]}",
                labels=("key", *LABELS),
            )
            for (principal, model, version), totals in shadow.items():
                family.add_metric([principal, model, version], value_of(totals))
            yield family


class QuotaCollector(Collector):
    """Requests refused by an API key's quota, per key name."""

    def __init__(self, keys) -> None:
        self.keys = keys

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "convoy_quota_rejections",
            "Inference requests refused by their API key's quota",
            labels=("key",),
        )
        for name, count in self.keys.quota_rejections.copy().items():
            family.add_metric([name], count)
        yield family


class CustomCollector(Collector):
    """Metric families model code defined (pb_utils.MetricFamily), read at scrape time."""

    def __init__(self, custom) -> None:
        self.custom = custom

    def collect(self) -> Iterator[Metric]:
        for name, description, kind, series in self.custom.merged():
            if kind == "histogram":
                metric = Metric(name, description, "histogram")
                for labels, (total, count, bounds, counts) in series.items():
                    labels = dict(labels)
                    for bound, hits in zip([*bounds, float("inf")], counts, strict=False):
                        metric.add_sample(
                            name + "_bucket", {**labels, "le": floatToGoString(bound)}, hits
                        )
                    metric.add_sample(name + "_count", labels, count)
                    metric.add_sample(name + "_sum", labels, total)
            else:
                # Counters keep their exact names (as Triton exports them): untyped, like nv_*.
                metric = Metric(name, description, "gauge" if kind == "gauge" else "unknown")
                for labels, (total, _, _, _) in series.items():
                    metric.add_sample(name, dict(labels), total)
            yield metric


class Metrics:
    """The server's own registry: model, host, GPU and process collectors."""

    def __init__(
        self,
        repository: ModelRepository,
        usage: UsageMeter | None = None,
        payload_log: PayloadLog | None = None,
        keys=None,
    ) -> None:
        """`keys`: the server's convoy.auth.Keyring, for the quota counters."""
        self.registry = CollectorRegistry()
        self.registry.register(ModelCollector(repository))
        self.registry.register(CustomCollector(repository.custom_metrics))
        if usage is not None:
            self.registry.register(UsageCollector(usage))
        if payload_log is not None:
            self.registry.register(PayloadLogCollector(payload_log))
        if keys is not None:
            self.registry.register(QuotaCollector(keys))
        self.registry.register(HostCollector())
        self._gpu = GpuCollector.open()
        if self._gpu is not None:
            self.registry.register(self._gpu)
        # Process and platform metrics as the default registry has them (not the GC collector:
        # it hooks gc.callbacks for the life of the process).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def close(self) -> None:
        if self._gpu is not None:
            self.registry.unregister(self._gpu)
            self._gpu.close()
            self._gpu = None
