"""Per model-version counters behind both the statistics API and the Prometheus metrics.

Durations are cumulative nanoseconds, as Triton's ModelStatistics reports them. Everything here
is updated on the event loop thread only, so plain ints suffice; the metrics exporter reads them
from its own thread at scrape time (int reads and dict copies are atomic under the GIL).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

#: Bucket upper bounds (inclusive) for request latency and compute time, in nanoseconds.
LATENCY_BOUNDS_NS = tuple(
    int(ms * 1_000_000)
    for ms in (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
)
#: Bucket upper bounds for time spent queued, in nanoseconds (finer at the low end).
QUEUE_BOUNDS_NS = tuple(
    int(ms * 1_000_000)
    for ms in (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)
)
#: Bucket upper bounds for rows per executed batch.
BATCH_SIZE_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Tokens per executed batch (padded or ragged models).
TOKEN_BOUNDS = tuple(1 << n for n in range(4, 18))
#: Share of an executed padded batch's tokens that are padding.
PADDING_RATIO_BOUNDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Triton's default buckets for nv_inference_first_response_histogram_ms (100, 500, 2000,
#: 5000 ms), in nanoseconds.
FIRST_RESPONSE_BOUNDS_NS = tuple(ms * 1_000_000 for ms in (100, 500, 2000, 5000))

#: Histogram family -> (ModelStats attribute, scale from the family's unit to the stored one),
#: for `model_metrics.metric_control` bucket overrides (engine/model_config.py lists them).
HISTOGRAM_ATTRIBUTES = {
    "convoy_request_latency_seconds": ("success", 1e9),
    "convoy_queue_wait_seconds": ("queue", 1e9),
    "convoy_compute_seconds": ("batch_compute", 1e9),
    "convoy_compute_input_seconds": ("batch_input", 1e9),
    "convoy_compute_infer_seconds": ("batch_infer", 1e9),
    "convoy_compute_output_seconds": ("batch_output", 1e9),
    "convoy_batch_size": ("batch_size", 1.0),
    "convoy_batch_tokens": ("batch_tokens", 1.0),
    "convoy_batch_padding_ratio": ("padding_ratio", 1.0),
    "nv_inference_first_response_histogram_ms": ("first_response", 1e6),
}


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


#: What a histogram counts: integers (nanoseconds, rows, tokens), or the padding ratio's fractions.
Number = TypeVar("Number", int, float)


@dataclass(slots=True)
class Histogram(Generic[Number]):
    """Observations counted into fixed buckets (one bisect per add), plus their count and sum.

    `buckets[i]` counts values <= `bounds[i]` and above the bound before it; the last slot
    counts values above every bound. A histogram of durations stands in for a `Duration`
    (`count`, `ns`), so the statistics API and the metrics' `_count`/`_sum` are the same numbers.
    """

    bounds: tuple[Number, ...]
    buckets: list[int] = field(default_factory=list)
    total: Number = 0

    def __post_init__(self) -> None:
        if not self.buckets:
            self.buckets = [0] * (len(self.bounds) + 1)

    @property
    def count(self) -> int:
        return sum(self.buckets)

    @property
    def ns(self) -> Number:
        return self.total

    def add(
        self, value: Number, _bisect: Callable[[tuple[Number, ...], Number], int] = bisect_left
    ) -> None:
        # On the request path twice per request: the bucket and the sum only (the count is
        # summed when read), and bisect bound as a default argument (no global lookup).
        self.buckets[_bisect(self.bounds, value)] += 1
        self.total += value


@dataclass(slots=True)
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class CacheStats:
    """The response cache's work for one model version (engine/response_cache.py)."""

    #: Triton's cache_hit / cache_miss: requests answered from the cache (the lookup time), and
    #: requests computed (lookup plus insert time). A partial answer counts as a miss.
    hit: Duration = field(default_factory=Duration)
    miss: Duration = field(default_factory=Duration)
    partial: int = 0
    #: Requests that waited for an identical request's computation (single-flight).
    coalesced: int = 0
    rows_cached: int = 0
    rows_computed: int = 0
    #: Estimated compute the cached rows would have cost.
    saved_ns: int = 0


@dataclass(slots=True)
class ModelStats:
    #: Successful requests, receipt to response (the request-latency histogram).
    success: Histogram[int] = field(default_factory=partial(Histogram, LATENCY_BOUNDS_NS))
    fail: Duration = field(default_factory=Duration)
    #: Time each executed request waited in the queue (the queue-wait histogram).
    queue: Histogram[int] = field(default_factory=partial(Histogram, QUEUE_BOUNDS_NS))
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    #: Rows served (Triton's inference_count) and batches executed (execution_count).
    inference_count: int = 0
    execution_count: int = 0
    #: Wall-clock milliseconds of the last completed inference (0 = never).
    last_inference_ms: int = 0
    batch_stats: dict[int, BatchSizeStats] = field(default_factory=dict)
    #: Failures by reason: REJECTED (queue full / deadline), CANCELED, BACKEND, OTHER.
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    #: Why each batch was dispatched: full, preferred_size, delay_expired, queue_drained,
    #: instance_freed, unbatched.
    dispatch_reasons: dict[str, int] = field(default_factory=dict)
    #: REJECTED failures by why: queue_full, timeout (queue policy timeout or client deadline).
    rejections: dict[str, int] = field(default_factory=dict)
    #: Compute time per executed batch (input + infer + output), and rows per executed batch.
    batch_compute: Histogram[int] = field(default_factory=partial(Histogram, LATENCY_BOUNDS_NS))
    batch_size: Histogram[int] = field(default_factory=partial(Histogram, BATCH_SIZE_BOUNDS))
    #: Each executed batch's compute stages (Triton's compute input / infer / output), per batch.
    batch_input: Histogram[int] = field(default_factory=partial(Histogram, LATENCY_BOUNDS_NS))
    batch_infer: Histogram[int] = field(default_factory=partial(Histogram, LATENCY_BOUNDS_NS))
    batch_output: Histogram[int] = field(default_factory=partial(Histogram, LATENCY_BOUNDS_NS))
    #: Padded and ragged models: tokens per executed batch (real + pad) and the pad's share.
    batch_tokens: Histogram[int] = field(default_factory=partial(Histogram, TOKEN_BOUNDS))
    padding_ratio: Histogram[float] = field(default_factory=partial(Histogram, PADDING_RATIO_BOUNDS))
    #: Decoupled models: receipt to the first response (Triton's first-response histogram).
    first_response: Histogram[int] = field(default_factory=partial(Histogram, FIRST_RESPONSE_BOUNDS_NS))
    cache: CacheStats = field(default_factory=CacheStats)

    @classmethod
    def for_buckets(cls, buckets: dict[str, tuple[float, ...]]) -> ModelStats:
        """Statistics whose histograms use a model's configured bounds (in each family's unit)."""
        stats = cls()
        for family, bounds in buckets.items():
            attribute, scale = HISTOGRAM_ATTRIBUTES[family]
            stored = tuple(round(b * scale) if scale != 1.0 else b for b in bounds)
            histogram: Histogram[Any] = Histogram(stored)
            setattr(stats, attribute, histogram)
        return stats

    def record_tokens(self, real: int, pad: int) -> None:
        total = real + pad
        self.batch_tokens.add(total)
        if total:
            self.padding_ratio.add(pad / total)

    def record_batch(
        self,
        rows: int,
        requests: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        reason: str,
    ) -> None:
        per_size = self.batch_stats.get(rows)
        if per_size is None:
            per_size = self.batch_stats[rows] = BatchSizeStats()
        per_size.compute_input.add(input_ns)
        per_size.compute_infer.add(infer_ns)
        per_size.compute_output.add(output_ns)
        self.execution_count += 1
        self.inference_count += rows
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.dispatch_reasons[reason] = self.dispatch_reasons.get(reason, 0) + 1
        self.batch_compute.add(input_ns + infer_ns + output_ns)
        self.batch_input.add(input_ns)
        self.batch_infer.add(infer_ns)
        self.batch_output.add(output_ns)
        self.batch_size.add(rows)

    def record_failure(self, reason: str, duration_ns: int) -> None:
        self.fail.add(duration_ns)
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1

    def record_rejection(self, reason: str, duration_ns: int) -> None:
        """A request turned away by its queue: a REJECTED failure, counted by `reason` too."""
        self.record_failure("REJECTED", duration_ns)
        self.rejections[reason] = self.rejections.get(reason, 0) + 1


def quantile_ms(
    counts: list[int], q: float, bounds: tuple[int, ...] = LATENCY_BOUNDS_NS
) -> float | None:
    """The q-quantile in ms of latency-bucket counts (linear within a bucket, as Prometheus'
    histogram_quantile); past the last bound, that bound. None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    lower = 0
    for bound, count in zip(bounds, counts, strict=False):
        if count and running + count >= rank:
            return (lower + (bound - lower) * (rank - running) / count) / 1e6
        running += count
        lower = bound
    return bounds[-1] / 1e6
