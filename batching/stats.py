"""Per model-version counters behind the statistics API (and, later, the Prometheus metrics).

Durations are cumulative nanoseconds, as Triton's ModelStatistics reports them. Everything here
is updated on the event loop thread only, so plain ints suffice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
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

    def record_failure(self, reason: str, duration_ns: int) -> None:
        self.fail.add(duration_ns)
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1
