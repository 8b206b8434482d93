"""Admission: whether a request arriving at the dynamic batcher joins its queue or is refused now.

Three rules, in order, each refusing with `Overloaded` (RESOURCE_EXHAUSTED / 429, with a
Retry-After) and counting the rejection by reason:
- `queue_full`: its priority level's queue is at its bound (queue policy max_queue_size, else
  the server's --max-queue-size);
- `deadline`: with work queued ahead, it is sure to miss its deadline: the client's deadline if
  its batch cannot complete in time, the queue policy's REJECT timeout if the work queued ahead
  of it alone outlasts it (the timeout bounds waiting in the queue, not execution);
- `latency_slo`: the latency objective's planner (batching/slo.py) predicts it would miss it.

An estimate never refuses a request that would be dispatched at once (an instance idles and
nothing is queued): refusing it would also stop the measurements that could correct a wrong
estimate, and a noisy one (a loaded host stretching a few batches) would then refuse every
request while capacity is free. Once admitted, a request's queue timeout is enforced by what it
actually waits (the scheduler's timers), never by a prediction.
"""

from __future__ import annotations

import statistics

from convoy.config import QueuePolicy, TimeoutAction
from convoy.errors import Overloaded
from convoy.types import Request

from .instances import InstancePool
from .queue import PriorityQueue
from .slo import LatencyPlanner
from .stats import ModelStats
from .usage import UsageMeter

#: Batches measured before the cost estimate is trusted to refuse a request.
ESTIMATE_AFTER_BATCHES = 3
#: Weight of a new sample in the running estimate (EWMA).
ESTIMATE_WEIGHT = 0.125
#: A sample above this multiple of the estimate counts as this multiple: one slow batch (a
#: stall, a loaded host) moves the estimate by at most ESTIMATE_WEIGHT x (MAX_RISE - 1).
MAX_RISE = 2.0


class CostEstimate:
    """One batch's execution cost (ns), robust to noisy samples: the median of the first
    ESTIMATE_AFTER_BATCHES batches (a slow first batch, still warming up, does not set it),
    then an EWMA whose rises are bounded (MAX_RISE); falls are followed in full, so a wrong
    estimate errs towards admitting."""

    __slots__ = ("_warmup", "batches", "ns")

    def __init__(self) -> None:
        #: Batches measured so far.
        self.batches = 0
        #: The estimate (0 until a batch was measured).
        self.ns = 0.0
        self._warmup: list[float] = []

    @property
    def trusted(self) -> bool:
        """Enough batches measured to refuse requests on the estimate."""
        return self.batches >= ESTIMATE_AFTER_BATCHES

    def observe(self, cost_ns: float) -> None:
        self.batches += 1
        if self.batches <= ESTIMATE_AFTER_BATCHES:
            self._warmup.append(cost_ns)
            self.ns = statistics.median(self._warmup)
            if self.batches == ESTIMATE_AFTER_BATCHES:
                self._warmup = []
            return
        self.ns += (min(cost_ns, self.ns * MAX_RISE) - self.ns) * ESTIMATE_WEIGHT


def refuse(
    stats: ModelStats,
    usage: UsageMeter | None,
    model: str,
    version: str,
    request: Request,
    reason: str,
    now: int,
) -> None:
    """Count a request turned away at submit (statistics by `reason`, the caller's usage)."""
    stats.record_rejection(reason, now - (request.received_ns or now))
    if usage is not None:
        usage.record_rejection(model, version, request)


class AdmissionPolicy:
    """The dynamic batcher's admission rules over its queue (see the module docstring)."""

    def __init__(
        self,
        model: str,
        version: str,
        queue: PriorityQueue,
        pool: InstancePool,
        policies: list[QueuePolicy],
        stats: ModelStats,
        usage: UsageMeter | None,
        max_rows: int,
        dynamic: bool,
        planner: LatencyPlanner | None,
    ) -> None:
        """`pool`: the instances the queue drains into (how many work, how many are free);
        `policies[i]`: the queue policy of priority level i + 1; `max_rows`: rows a batch
        holds; `dynamic`: batches merge requests (else one request a batch); `planner`: the
        latency objective's, or None."""
        self.model = model
        self.version = version
        self.policies = policies
        self.estimate = CostEstimate()
        self._queue = queue
        self._pool = pool
        self._stats = stats
        self._usage = usage
        self._max_rows = max_rows
        self._dynamic = dynamic
        self._planner = planner

    def admit(self, request: Request, now: int) -> int:
        """Admit `request` (its `level` set) arriving at `now` (monotonic ns), or raise
        Overloaded. Returns its queue timeout (µs, 0: none)."""
        queue = self._queue
        level = request.level
        if not queue.has_room(level):
            self._refuse(request, "queue_full", now)
            raise Overloaded(
                f"model '{self.model}' queue is full ({queue.depth(level)} requests at "
                f"priority {level + 1}); retry later",
                retry_after=self.completion_estimate(request)[0] or 1.0,
            )
        policy = self.policies[level]
        timeout_us = policy.default_timeout_us
        if request.timeout_us and policy.allow_timeout_override:
            timeout_us = request.timeout_us
        if queue.size or not self._pool.free:
            # Dispatched at once otherwise: never refused on an estimate (see the module).
            if (timeout_us or request.deadline is not None) and self.estimate.trusted:
                rejecting = policy.timeout_action is TimeoutAction.REJECT
                self._meet_deadline(request, now, timeout_us if rejecting else 0)
            if self._planner is not None:
                self._within_objective(request, now)
        return timeout_us

    def completion_estimate(self, request: Request) -> tuple[float, int]:
        """(seconds until a request arriving now would have its batch done, batches counted):
        the rows queued at its priority and above, packed into batches, run on the instances
        in parallel waves at the estimated batch cost; a batch in flight counts as done, so
        the estimate is a lower bound. (0, 0) before any batch was measured."""
        if not self.estimate.batches:
            return 0.0, 0
        queue = self._queue
        if self._dynamic:
            rows = queue.rows_through(request.level) + request.rows
            batches = -(-rows // self._max_rows)
        else:
            batches = 1 + sum(queue.depth(level) for level in range(request.level + 1))
        waves = -(-batches // max(self._pool.count, 1))
        return waves * self.estimate.ns / 1e9, batches

    def _meet_deadline(self, request: Request, now: int, timeout_us: int) -> None:
        """Refuse a request sure to miss its client deadline (its batch cannot complete in
        time) or its REJECT queue timeout (the waves of batches ahead of its own outlast it)."""
        expected, batches = self.completion_estimate(request)
        batch_s = self.estimate.ns / 1e9
        waited = expected - batch_s  # the waves before its own
        now_s = now / 1e9
        if request.deadline is not None and expected > request.deadline - now_s:
            left = request.deadline - now_s
            work = f"about {expected * 1000:.1f} ms of work until its batch completes"
        elif timeout_us and waited > timeout_us / 1e6:
            left = timeout_us / 1e6
            work = f"about {waited * 1000:.1f} ms of queued work ahead of it (its queue timeout)"
        else:
            return
        self._refuse(request, "deadline", now)
        raise Overloaded(
            f"model '{self.model}' cannot meet the request's deadline: "
            f"{max(left, 0) * 1000:.1f} ms left, {work} ({batches} batches of ~"
            f"{batch_s * 1000:.1f} ms at priority {request.level + 1} and above); retry later",
            retry_after=expected,
        )

    def _within_objective(self, request: Request, now: int) -> None:
        """Refuse a request the latency objective predicts it would miss (see batching/slo.py)."""
        planner = self._planner
        assert planner is not None
        age = now - (request.received_ns or now)
        verdict = planner.admission(
            self._queue.rows_through(request.level),
            request.rows,
            age,
            len(self._pool.free),
            self._pool.count,
            now,
        )
        if verdict.admitted:
            return
        self._refuse(request, "latency_slo", now)
        raise Overloaded(
            f"model '{self.model}' cannot answer within its latency objective "
            f"(latency_slo_ms {planner.objective_ns / 1e6:g}): about "
            f"{verdict.completion_ns / 1e6:.1f} ms of work until its batch completes "
            f"({verdict.batches} batches at priority {request.level + 1} and above), "
            f"{max(verdict.budget_ns, 0) / 1e6:.1f} ms allowed; retry later",
            retry_after=max(verdict.completion_ns - verdict.budget_ns, 1e6) / 1e9,
        )

    def _refuse(self, request: Request, reason: str, now: int) -> None:
        refuse(self._stats, self._usage, self.model, self.version, request, reason, now)
