"""The dynamic batcher's dispatch decision: whether the batch at the head of the queue goes now.

Asked whenever an instance is free and something is queued (see batching/scheduler.py for when
that is). Two rules:
- Triton's (the default): the largest preferred size the queue can fill goes at once (without
  preferred sizes: max_batch_size); otherwise the batch waits, even while an instance is idle,
  until its oldest request has waited `max_queue_delay` (0: at once);
- latency-first (parameter batch_dispatch: latency_first, and every latency objective):
  `max_queue_delay` is a ceiling, not a wait: the batch goes at once when it is full, reaches
  the largest preferred size, when an instance freed up while requests waited for one, when no
  batch is executing (every in-flight request is already queued, so closed-loop clients cannot
  add to it), or when the measured arrival rate says nothing more will arrive before the delay
  runs out.
With a latency objective, its planner (batching/slo.py) sets the batch row limit and an earlier
latest dispatch.
"""

from __future__ import annotations

from convoy.config import ModelConfig
from convoy.types import Request

from .assemble import Collation
from .queue import PriorityQueue
from .slo import LatencyPlanner

#: Weight of a new inter-arrival gap in the arrival-rate estimate (EWMA).
ARRIVAL_WEIGHT = 0.125


class DispatchRule:
    """When one model's next batch goes, and how many rows it may take."""

    def __init__(
        self, config: ModelConfig, collation: Collation, planner: LatencyPlanner | None = None
    ) -> None:
        batching = config.dynamic_batching
        #: Batches merge queued requests (dynamic_batching); else each request goes alone.
        self.dynamic = batching is not None
        self.latency_first = bool(batching and (batching.latency_first or config.latency_slo_ms))
        self.max_rows = config.max_batch_size if config.max_batch_size > 0 else 1
        self.max_delay_ns = batching.max_queue_delay_us * 1000 if batching else 0
        self.preferred = batching.preferred_batch_sizes if batching else ()
        self._key = collation.key
        #: Padded batching's token ceiling, or None (no ceiling: the batch is full by rows only).
        budget = collation.budget
        self._budget = budget if budget is not None and budget.max_cost else None
        self._planner = planner
        self._last_arrival_ns = 0
        #: Inter-arrival gap (EWMA, ns); "never" until two requests arrived.
        self._arrival_gap_ns = float(1 << 40)

    def arrived(self, now: int) -> None:
        """A request was queued at `now` (the arrival-rate estimate latency-first reads)."""
        if self._last_arrival_ns:
            gap = now - self._last_arrival_ns
            self._arrival_gap_ns += (gap - self._arrival_gap_ns) * ARRIVAL_WEIGHT
        self._last_arrival_ns = now

    def decide(
        self,
        queue: PriorityQueue,
        oldest: Request,
        now: int,
        executing_rows: int,
        waited_for_instance: bool,
        instances: int,
    ) -> tuple[str | None, int]:
        """(why the batch headed by `oldest` goes now, or None to wait; its row limit).
        `executing_rows`: rows on the instances now; `waited_for_instance`: requests waited
        for the instance that just freed up; `instances`: working instances."""
        if not self.dynamic:
            return "unbatched", self.max_rows
        rows = queue.rows
        limit = self.max_rows
        if self._planner is not None:
            waited = now - (oldest.received_ns or oldest.queued_ns)
            limit = self._planner.batch_limit(waited, instances)
        if not self.latency_first:
            return self._triton(queue, oldest, rows, limit, now, instances)
        if rows >= limit:
            return "full", limit
        if self.preferred and rows >= self.preferred[-1]:
            return "preferred_size", self.preferred[-1]
        if waited_for_instance:
            return "instance_freed", limit
        if executing_rows == 0:
            return "queue_drained", limit
        if self._budget is not None and queue.fills_budget(oldest, self._key, self._budget):
            return "full", limit  # padded: full by tokens (rows x padded length) before by rows
        remaining = self.dispatch_by_ns(oldest, instances) - now
        if remaining <= 0:
            return "delay_expired", limit
        if self._arrival_gap_ns > remaining:
            return "queue_drained", limit
        return None, limit

    def _triton(
        self, queue: PriorityQueue, oldest: Request, rows: int, limit: int, now: int, instances: int
    ) -> tuple[str | None, int]:
        """Triton's dynamic batcher (see the module docstring)."""
        preferred = self.preferred
        if not preferred and rows >= limit:
            return "full", limit
        if preferred:
            if rows >= preferred[-1]:
                return "preferred_size", preferred[-1]
            reachable = [size for size in preferred if size <= rows]
            if reachable:
                return "preferred_size", reachable[-1]
        if self._budget is not None and queue.fills_budget(oldest, self._key, self._budget):
            return "full", limit  # padded: full by tokens (rows x padded length) before by rows
        if self.dispatch_by_ns(oldest, instances) <= now:
            return "delay_expired", limit
        return None, limit

    def dispatch_by_ns(self, oldest: Request, instances: int) -> int:
        """When the batch `oldest` heads must go at the latest: max_queue_delay after it was
        queued, earlier when the latency objective needs it."""
        by = oldest.queued_ns + self.max_delay_ns
        if self._planner is not None:
            arrived = oldest.received_ns or oldest.queued_ns
            by = min(by, self._planner.dispatch_by_ns(arrived, instances))
        return by
