"""Counting what a load step did, from locust's request events.

Locust rounds response times to whole milliseconds in its own statistics; an inference server
answers in a few, so latencies go into a log-bucketed histogram with 1% resolution instead.
Only requests that complete inside the measurement window count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import failure_kind

#: Bucket i holds latencies in [BASE_MS * GROWTH**i, BASE_MS * GROWTH**(i+1)).
BASE_MS = 0.001
GROWTH = 1.01
_LOG_GROWTH = math.log(GROWTH)


class LatencyHistogram:
    """Latencies in milliseconds, log-bucketed (1% relative error); mergeable, JSON-able."""

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total_ms = 0.0
        self.max_ms = 0.0

    def add(self, ms: float) -> None:
        index = int(math.log(max(ms, BASE_MS) / BASE_MS) / _LOG_GROWTH)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        self.total_ms += ms
        self.max_ms = max(self.max_ms, ms)

    def merge(self, other: LatencyHistogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.total_ms += other.total_ms
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100): the middle of the bucket holding that rank."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                middle = BASE_MS * GROWTH ** (index + 0.5)
                return min(middle, self.max_ms)
        return self.max_ms

    @property
    def mean_ms(self) -> float | None:
        return self.total_ms / self.count if self.count else None


@dataclass
class Outcomes:
    """Request counts by outcome, and the latency of the successful ones."""

    ok: int = 0
    rejected: int = 0
    mismatch: int = 0
    error: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def requests(self) -> int:
        return self.ok + self.rejected + self.mismatch + self.error

    def add(self, kind: str, response_time_ms: float) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if kind == "ok":
            self.latency.add(response_time_ms)


class RequestRecorder:
    """A locust `request` event listener: per-window outcome counts, split by protocol.

    `completed` counts every request event (window or not), so a step can tell when its
    request budget has been used up and answered.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.completed = 0
        self.window_open = False
        self.window_start = 0.0
        self.window_end = 0.0
        self.total = Outcomes()
        #: (request_type, name) -> outcomes; request_type is the protocol, name the model.
        self.by_request: dict[tuple[str, str], Outcomes] = {}
        #: failure message -> count, for the report (first 20 distinct messages).
        self.failure_messages: dict[str, int] = {}

    def open_window(self) -> None:
        self.window_start = self._clock()
        self.window_open = True

    def close_window(self) -> None:
        self.window_end = self._clock()
        self.window_open = False

    @property
    def elapsed_s(self) -> float:
        end = self._clock() if self.window_open else self.window_end
        return max(end - self.window_start, 1e-9)

    def on_request(
        self,
        request_type: str,
        name: str,
        response_time: float,
        exception: BaseException | None = None,
        **_: object,
    ) -> None:
        self.completed += 1
        if not self.window_open:
            return
        kind = failure_kind(exception)
        self.total.add(kind, response_time)
        self.by_request.setdefault((request_type, name), Outcomes()).add(kind, response_time)
        if exception is not None:
            message = f"{type(exception).__name__}: {exception}"[:300]
            if message in self.failure_messages or len(self.failure_messages) < 20:
                self.failure_messages[message] = self.failure_messages.get(message, 0) + 1


@dataclass(frozen=True)
class LoadSummary:
    """The numbers a step reports about its own requests (client side)."""

    requests: int
    successes: int
    rejections: int
    mismatches: int
    errors: int
    elapsed_s: float
    throughput_rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None

    @property
    def error_rate(self) -> float:
        return (self.errors + self.mismatches) / self.requests if self.requests else 0.0

    @property
    def rejection_rate(self) -> float:
        return self.rejections / self.requests if self.requests else 0.0

    @classmethod
    def of(cls, outcomes: Outcomes, elapsed_s: float) -> LoadSummary:
        latency = outcomes.latency
        return cls(
            requests=outcomes.requests,
            successes=outcomes.ok,
            rejections=outcomes.rejected,
            mismatches=outcomes.mismatch,
            errors=outcomes.error,
            elapsed_s=elapsed_s,
            throughput_rps=outcomes.ok / elapsed_s,
            p50_ms=latency.percentile(50),
            p90_ms=latency.percentile(90),
            p99_ms=latency.percentile(99),
            mean_ms=latency.mean_ms,
            max_ms=latency.max_ms if latency.count else None,
        )
