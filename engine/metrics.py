"""Prometheus metrics, read from the models' `ModelStats` at scrape time.

Nothing here runs on the request path: the scheduler only bumps the plain counters in
`batching/stats.py`, and this collector turns them into metric families when Prometheus scrapes
(on the metrics server's thread; int reads and dict/list copies are atomic under the GIL).

Triton's metric names and labels (`model`, `version`) come first, so Triton dashboards work
unchanged. prometheus_client appends `_total` to anything typed counter, so Triton's counters,
whose names lack it, are exposed untyped under their exact names; Convoy's own counters are
typed counters. Host CPU and memory come from /proc; GPU gauges from NVML (nvidia-ml-py, the
`gpu` extra) when it is importable and sees a GPU, and are left out otherwise. How the families
are written out (counters that keep their exact names) is engine/exposition.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
)
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
from convoy.config import MetricsSettings
from convoy.engine.exposition import ExactCounter
from convoy.engine.hardware_metrics import HardwareMonitor, load_pynvml
from convoy.engine.payload_log import PayloadLog
from convoy.engine.repository import ModelRepository, ModelVersion

if TYPE_CHECKING:
    from convoy.auth import Keyring
    from convoy.runtimes.custom_metrics import CustomMetrics

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
_HISTOGRAMS: tuple[tuple[str, str, Callable[[ModelStats], Histogram[Any]], float], ...] = (
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
    (
        "convoy_compute_input_seconds",
        "Compute input time per executed batch (merging the requests' inputs)",
        lambda s: s.batch_input,
        1e-9,
    ),
    (
        "convoy_compute_infer_seconds",
        "Compute infer time per executed batch (the model's own call)",
        lambda s: s.batch_infer,
        1e-9,
    ),
    (
        "convoy_compute_output_seconds",
        "Compute output time per executed batch (splitting the outputs back)",
        lambda s: s.batch_output,
        1e-9,
    ),
)

#: Padded and ragged models' batch-token histograms.
_TOKEN_HISTOGRAMS: tuple[tuple[str, str, Callable[[ModelStats], Histogram[Any]], float], ...] = (
    (
        "convoy_batch_tokens",
        "Tokens per executed batch: rows x padded length (padded batching), or the elements "
        "of the first ragged input (ragged batching)",
        lambda s: s.batch_tokens,
        1.0,
    ),
    (
        "convoy_batch_padding_ratio",
        "Share of each executed padded batch's tokens that are padding",
        lambda s: s.padding_ratio,
        1.0,
    ),
)

#: Triton's response cache counters (models with response_cache enabled): name, help, value.
_CACHE_COUNTERS: tuple[tuple[str, str, Callable[[ModelStats], int]], ...] = (
    (
        "nv_cache_num_hits_per_model",
        "Number of response cache hits per model",
        lambda s: s.cache.hit.count,
    ),
    (
        "nv_cache_num_misses_per_model",
        "Number of response cache misses per model (partial answers included)",
        lambda s: s.cache.miss.count,
    ),
)
_CACHE_DURATIONS: tuple[tuple[str, str, Callable[[ModelStats], int]], ...] = (
    (
        "nv_cache_hit_duration_per_model",
        "Cumulative time requests spend retrieving a cached response per model on cache hits "
        "(microseconds)",
        lambda s: s.cache.hit.ns // 1000,
    ),
    (
        "nv_cache_miss_duration_per_model",
        "Cumulative time requests spend looking up and inserting responses into the cache on a "
        "cache miss (microseconds)",
        lambda s: s.cache.miss.ns // 1000,
    ),
)


def _untyped(name: str, documentation: str) -> Metric:
    return Metric(name, documentation, "unknown")


class ModelCollector(Collector):
    """Per model-version metrics of every loaded version in the repository."""

    def __init__(self, repository: ModelRepository, settings: MetricsSettings | None = None) -> None:
        self.repository = repository
        self.settings = settings or MetricsSettings()

    def _loaded(self) -> list[tuple[str, ModelVersion]]:
        loaded = []
        for model in list(self.repository.models.values()):
            for entry in list(model.versions.values()):
                if entry.scheduler is not None:
                    loaded.append((model.name, entry))
        return loaded

    def collect(self) -> Iterator[Metric]:
        loaded = self._loaded()
        counters = _TRITON_COUNTERS if self.settings.counter_latencies else _TRITON_COUNTERS[:3]
        for name, documentation, value in counters:
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
            yield _histogram_family(name, documentation, histogram_of, scale, loaded)
        tokenised = [(m, e) for m, e in loaded if e.config.padding is not None or e.config.ragged]
        for name, documentation, histogram_of, scale in _TOKEN_HISTOGRAMS:
            if name == "convoy_batch_padding_ratio":
                models = [(m, e) for m, e in tokenised if e.config.padding is not None]
            else:
                models = tokenised
            yield _histogram_family(name, documentation, histogram_of, scale, models)
        if self.settings.histogram_latencies:
            decoupled = [(m, e) for m, e in loaded if e.config.decoupled]
            yield _histogram_family(
                "nv_inference_first_response_histogram_ms",
                "Duration from request to first response in milliseconds",
                lambda s: s.first_response,
                1e-6,
                decoupled,
            )
        yield from self._cache_families([(m, e) for m, e in loaded if e.config.response_cache])

    def _cache_families(self, cached: list[tuple[str, ModelVersion]]) -> Iterator[Metric]:
        if not cached:
            return
        durations = _CACHE_DURATIONS if self.settings.counter_latencies else ()
        for name, documentation, value in (*_CACHE_COUNTERS, *durations):
            family = _untyped(name, documentation)
            for model, entry in cached:
                labels = {"model": model, "version": str(entry.version)}
                family.add_sample(name, labels, value(entry.stats))
            yield family
        partial = CounterMetricFamily(
            "convoy_cache_partial",
            "Requests answered partly from the response cache (some rows computed)",
            labels=LABELS,
        )
        coalesced = CounterMetricFamily(
            "convoy_cache_coalesced",
            "Requests that waited for an identical request's computation instead of computing",
            labels=LABELS,
        )
        rows = CounterMetricFamily(
            "convoy_cache_rows",
            "Rows answered, by source: the cache (or an identical request in flight), or computed",
            labels=(*LABELS, "source"),
        )
        saved = CounterMetricFamily(
            "convoy_cache_saved_compute_seconds",
            "Compute the cached rows would have cost (the model's measured compute per row)",
            labels=LABELS,
        )
        for model, entry in cached:
            cache = entry.stats.cache
            version = str(entry.version)
            partial.add_metric([model, version], cache.partial)
            coalesced.add_metric([model, version], cache.coalesced)
            rows.add_metric([model, version, "cache"], cache.rows_cached)
            rows.add_metric([model, version, "computed"], cache.rows_computed)
            saved.add_metric([model, version], cache.saved_ns / 1e9)
        yield from (partial, coalesced, rows, saved)


def _histogram_family(
    name: str,
    documentation: str,
    histogram_of: Callable[[ModelStats], Histogram[Any]],
    scale: float,
    models: list[tuple[str, ModelVersion]],
) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=LABELS)
    for model, entry in models:
        buckets, total = _cumulative(histogram_of(entry.stats), scale)
        family.add_metric([model, str(entry.version)], buckets, total)
    return family


def _cumulative(histogram: Histogram[Any], scale: float) -> tuple[list[tuple[str, int]], float]:
    """Prometheus buckets (cumulative, `le` labels in the metric's unit) and the sum."""
    counts = list(histogram.buckets)  # one copy, so the buckets and +Inf agree
    total = histogram.total * scale
    buckets: list[tuple[str, int]] = []
    running = 0
    for bound, count in zip(histogram.bounds, counts, strict=False):
        running += count
        # (The ignores: prometheus_client leaves floatToGoString, which returns str, unannotated.)
        le = floatToGoString(round(bound * scale, 12))  # type: ignore[no-untyped-call]
        buckets.append((le, running))
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
    (
        "convoy_usage_cache_hits",
        "Requests answered wholly from the response cache, per API key",
        lambda u: u.cache_hits,
    ),
    (
        "convoy_usage_saved_compute_seconds",
        "Compute the response cache saved per API key (its cached rows at the model's cost per row)",
        lambda u: u.saved_compute_ns / 1e9,
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

    def __init__(self, keys: Keyring) -> None:
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

    def __init__(self, custom: CustomMetrics) -> None:
        self.custom = custom

    def collect(self) -> Iterator[Metric]:
        for name, description, kind, series in self.custom.merged():
            if kind == "histogram":
                metric = Metric(name, description, "histogram")
                for labels, (total, count, bounds, counts) in series.items():
                    labels = dict(labels)
                    for bound, hits in zip([*bounds, float("inf")], counts, strict=False):
                        metric.add_sample(
                            name + "_bucket",
                            {**labels, "le": floatToGoString(bound)},  # type: ignore[no-untyped-call]
                            hits,
                        )
                    metric.add_sample(name + "_count", labels, count)
                    metric.add_sample(name + "_sum", labels, total)
            else:
                # Counters keep their exact names (as Triton exports them): see ExactCounter.
                if kind == "gauge":
                    metric = Metric(name, description, "gauge")
                else:
                    metric = ExactCounter(name, description)
                for labels, (total, _, _, _) in series.items():
                    metric.add_sample(name, dict(labels), total)
            yield metric


class CacheStoreCollector(Collector):
    """What the response cache's store holds and what it refused, evicted or failed to reach."""

    # The LocalStore or the RedisStore: which one is read off its attributes.
    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store
        counts = getattr(store, "counts", None)
        if counts is not None:  # the local store
            yield GaugeMetricFamily(
                "convoy_cache_capacity_bytes", "The local response cache's byte budget", value=store.size
            )
            entries = GaugeMetricFamily(
                "convoy_cache_entries", "Entries in the response cache", labels=LABELS
            )
            size = GaugeMetricFamily(
                "convoy_cache_bytes", "Bytes the response cache's entries hold", labels=LABELS
            )
            evictions = CounterMetricFamily(
                "convoy_cache_evictions", "Entries evicted to make room", labels=LABELS
            )
            expired = CounterMetricFamily(
                "convoy_cache_expired", "Entries dropped because their TTL passed", labels=LABELS
            )
            inserted = CounterMetricFamily("convoy_cache_insertions", "Entries inserted", labels=LABELS)
            rejected = CounterMetricFamily(
                "convoy_cache_rejected",
                "Responses not cached: admission (asked for less often than what they would "
                "evict) or size (larger than the budget)",
                labels=(*LABELS, "reason"),
            )
            for owner, count in sorted(counts.copy().items()):
                model, version, _ = ([*owner.split("/"), "", ""])[:3]
                labels = [model, version]
                entries.add_metric(labels, count.entries)
                size.add_metric(labels, count.bytes)
                evictions.add_metric(labels, count.evictions)
                expired.add_metric(labels, count.expired)
                inserted.add_metric(labels, count.inserted)
                rejected.add_metric([*labels, "admission"], count.rejected_admission)
                rejected.add_metric([*labels, "size"], count.rejected_size)
            yield from (entries, size, evictions, expired, inserted, rejected)
        errors = getattr(store, "errors", None)
        if errors is not None:  # Redis
            family = CounterMetricFamily(
                "convoy_cache_errors",
                "Redis operations that failed (the request was served as a miss)",
                labels=("operation",),
            )
            for operation in ("get", "set", "ping", "decode"):
                family.add_metric([operation], errors.get(operation, 0))
            yield family
            yield CounterMetricFamily(
                "convoy_cache_skipped",
                "Cache operations skipped while Redis was failing (served as misses)",
                value=store.skipped,
            )


class Metrics:
    """The server's own registry: model, cache, host, GPU and process collectors."""

    def __init__(
        self,
        repository: ModelRepository,
        usage: UsageMeter | None = None,
        payload_log: PayloadLog | None = None,
        keys: Keyring | None = None,
        settings: MetricsSettings | None = None,
        cache_store: Any = None,
        load_nvml: Callable[[], Any] = load_pynvml,
    ) -> None:
        """`keys`: the server's convoy.auth.Keyring, for the quota counters; `cache_store`: the
        response cache's store; `load_nvml`: how NVML is imported (tests give a fake)."""
        settings = settings or MetricsSettings()
        self.registry = CollectorRegistry()
        self.registry.register(ModelCollector(repository, settings))
        self.registry.register(CustomCollector(repository.custom_metrics))
        if usage is not None:
            self.registry.register(UsageCollector(usage))
        if payload_log is not None:
            self.registry.register(PayloadLogCollector(payload_log))
        if keys is not None:
            self.registry.register(QuotaCollector(keys))
        if cache_store is not None:
            self.registry.register(CacheStoreCollector(cache_store))
        self.hardware = HardwareMonitor(
            settings.interval_ms / 1000,
            cpu=settings.allow_cpu_metrics,
            gpu=settings.allow_gpu_metrics,
            load_nvml=load_nvml,
        )
        self.registry.register(self.hardware)
        self.hardware.start()
        # Process and platform metrics as the default registry has them (not the GC collector:
        # it hooks gc.callbacks for the life of the process).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def close(self) -> None:
        self.hardware.close()
