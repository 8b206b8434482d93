"""Latency objectives: a model's batch cost curve, learned as it serves, and the planner that
sizes batches and admits requests so that request latency stays inside the objective.

The objective (`parameters { key: "latency_slo_ms" }`) is a p99 target for request latency
from arrival: queue wait plus batch compute. The planner
- learns what a batch of each size costs (`CostCurve`: a size's running mean once it has run a
  few times, a fixed + per-row least-squares line for the others, the largest measured size's
  cost per row above it), plus the turnaround between back-to-back batches;
- plans a batch size for sustained load (`planned_size`): the largest whose cost leaves room
  for a request arriving just after a dispatch to wait for the batch running ahead of it and
  still ride the next one (with k instances it waits about 1/k of a batch);
- limits each batch (`batch_limit`): the largest size whose predicted compute fits what is left
  of the oldest request's budget, capped by the planned size, preferred sizes kept when they
  fit;
- refuses on arrival (`admission`) a request whose predicted completion (the work queued ahead
  of it in batches of the planned size, over the instances, after the earliest instance frees)
  would overshoot;
- corrects itself (`observe`): the curve follows each size's running mean, and admission works
  to a share of the objective (AIMD: cut multiplicatively when a batch delivers a request past
  the objective, grown additively while batches finish well inside it), which covers the tail a
  mean cannot predict. Batch sizes are planned against the whole objective: shrinking batches
  because requests were late would cut throughput just when the queue is longest.

Pure bookkeeping on the event loop: no clock of its own (callers pass monotonic ns), no tasks.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass

#: Weight of a new observation in a batch size's running mean.
_EWMA_WEIGHT = 0.125
#: Batches of one size measured before its own mean is trusted over the fitted line.
TRUSTED_AFTER = 8
#: One batch's cost counts as at most this many times its size's mean.
OUTLIER_RATIO = 2.0
#: Weight of a new turnaround in its running mean, and the most one counts (share of objective).
_TURNAROUND_WEIGHT = 1 / 32
_TURNAROUND_MAX = 0.1
#: Batches measured before the planner limits batches or refuses anything.
PLAN_AFTER_BATCHES = 3
#: The admission share of the objective: where it starts (15% of the objective kept for the
#: noise a running mean does not predict: thread wake-ups, loop turns), its floor, its cut on an
#: overshoot, its growth step.
HEADROOM_START = 0.85
HEADROOM_FLOOR = 0.5
HEADROOM_CUT = 0.85
HEADROOM_STEP = 0.005
#: A batch whose compute took this many times its predicted cost stalled (the host descheduled
#: its thread): requests late because of it are not blamed on admission.
STALL_RATIO = 2.0
#: A batch whose slowest request finished within this share of the objective is "well inside"
#: it and lets the admission share grow back.
WELL_INSIDE = 0.75


class CostCurve:
    """What a batch costs (ns, dispatch to outputs back) by its rows, learned per model.

    A size seen a few times is predicted by its own running mean; another size between sizes
    seen by a straight line (fixed + per-row cost) fitted over them; a size above every size seen by the
    largest one's cost scaled by rows: an over-estimate, so the planner grows into larger
    batches as it measures them rather than overshooting. Predictions never decrease with size.
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max(max_rows, 1)
        self._mean = [0.0] * (self.max_rows + 1)
        self._count = [0] * (self.max_rows + 1)
        self._seen: list[int] = []
        self.batches = 0
        #: Predicted cost of 0..max_rows rows (index 0 unused), monotone; rebuilt when stale.
        self._table: list[float] = []
        self._stale = True

    def observe(self, rows: int, cost_ns: float) -> None:
        rows = min(max(rows, 1), self.max_rows)
        count = self._count[rows]
        if count:
            # A stall (the host descheduled the thread) moves the mean by a bounded step: the
            # curve is what compute costs; the admission share absorbs the tail.
            cost_ns = min(cost_ns, OUTLIER_RATIO * self._mean[rows])
            weight = max(1.0 / (count + 1), _EWMA_WEIGHT)  # a plain mean over the first few
            self._mean[rows] += (cost_ns - self._mean[rows]) * weight
        else:
            self._mean[rows] = float(cost_ns)
            self._seen.append(rows)
        self._count[rows] += 1
        self.batches += 1
        self._stale = True

    def measured(self, rows: int) -> float | None:
        """The running mean for exactly this size, if a batch of it has run."""
        if 1 <= rows <= self.max_rows and self._count[rows]:
            return self._mean[rows]
        return None

    def fit(self) -> tuple[float, float]:
        """(fixed ns, per-row ns) by least squares over the sizes seen a few times (all sizes
        seen while fewer than two are), each size's mean weighted by how often it ran, up to
        16; both clamped at >= 0. (0, 0) before any batch."""
        if not self._seen:
            return 0.0, 0.0
        if len(self._seen) == 1:
            rows = self._seen[0]
            return 0.0, self._mean[rows] / rows
        points = [rows for rows in self._seen if self._count[rows] >= TRUSTED_AFTER]
        if len(points) < 2:
            points = self._seen
        sw = sx = sy = sxx = sxy = 0.0
        for rows in points:
            w = float(min(self._count[rows], 16))
            y = self._mean[rows]
            sw += w
            sx += w * rows
            sy += w * y
            sxx += w * rows * rows
            sxy += w * rows * y
        denominator = sw * sxx - sx * sx
        if denominator <= 0:
            return sy / sw, 0.0
        per_row = max((sw * sxy - sx * sy) / denominator, 0.0)
        fixed = max((sy - per_row * sx) / sw, 0.0)
        return fixed, per_row

    def table(self) -> list[float]:
        """Predicted cost (ns) of 0..max_rows rows, never decreasing with size."""
        if self._stale:
            self._table = self._build()
            self._stale = False
        return self._table

    def _build(self) -> list[float]:
        fixed, per_row = self.fit()
        largest = max(self._seen, default=0)
        table = [0.0] * (self.max_rows + 1)
        running = 0.0
        for rows in range(1, self.max_rows + 1):
            if self._count[rows] >= TRUSTED_AFTER or (len(self._seen) == 1 and self._count[rows]):
                estimate = self._mean[rows]
            elif len(self._seen) == 1 and rows < largest:
                estimate = self._mean[largest]  # one size known: as costly as it below it
            else:
                estimate = fixed + per_row * rows
                if rows > largest and largest:
                    # Above every size measured: as costly per row as the largest one (an
                    # upper bound for a fixed + per-row cost), unless the line says more.
                    estimate = max(estimate, self._mean[largest] * rows / largest)
            running = max(running, estimate)
            table[rows] = running
        return table

    def cost_ns(self, rows: int) -> float:
        return self.table()[min(max(rows, 1), self.max_rows)]

    def largest_within(self, budget_ns: float, cap: int) -> int:
        """The largest size <= cap predicted to cost at most `budget_ns`; 0 if none."""
        table = self.table()
        return min(bisect_right(table, budget_ns, 1, self.max_rows + 1) - 1, cap)


@dataclass(frozen=True, slots=True)
class Admission:
    """The planner's verdict on a request arriving now."""

    admitted: bool
    #: Predicted ns from now until the request's batch completes (0 before the curve is known).
    completion_ns: float
    #: Batches counted ahead of and including its own.
    batches: int
    #: Its budget left (ns): the admission share of the objective less its age.
    budget_ns: float


@dataclass(frozen=True, slots=True)
class PlanState:
    """What the planner has learned and decided, for metrics."""

    objective_s: float
    #: The AIMD share of the objective admission works to.
    admission_share: float
    planned_batch_size: int
    #: The fitted cost line: per batch and per row (seconds).
    fixed_s: float
    per_row_s: float


class LatencyPlanner:
    """Sizes batches and admits requests for one model's latency objective (see the module)."""

    def __init__(
        self,
        objective_ms: float,
        max_rows: int,
        preferred_batch_sizes: tuple[int, ...] = (),
    ) -> None:
        self.objective_ns = objective_ms * 1e6
        self.max_rows = max(max_rows, 1)
        self.preferred = tuple(sorted(s for s in preferred_batch_sizes if s <= self.max_rows))
        self.curve = CostCurve(self.max_rows)
        #: The share of the objective admission works to (AIMD).
        self.headroom = HEADROOM_START
        self._last_cut_ns = 0
        #: Batches on instances: sequence -> (dispatched ns, rows).
        self._running: dict[int, tuple[int, int]] = {}
        #: When each running batch's outputs came back (its instance's thread), once known.
        self._done: dict[int, int] = {}
        #: Outputs-back times of batches that ended with work queued: the next batch started
        #: measures the turnaround (delivering, forming and handing over the next batch).
        self._backlogged: deque[int] = deque(maxlen=64)
        #: Per-batch turnaround between back-to-back batches (EWMA, ns): the instance is not
        #: computing then, but a queued request still waits through it.
        self.turnaround_ns = 0.0

    @property
    def ready(self) -> bool:
        """Enough batches measured to plan with; until then batches go at max size and
        nothing is refused."""
        return self.curve.batches >= PLAN_AFTER_BATCHES

    @property
    def budget_ns(self) -> float:
        """What admission allows a request: the objective times the AIMD share."""
        return self.objective_ns * self.headroom

    def batch_ns(self, rows: int) -> float:
        """What a batch of `rows` holds up its instance: its compute plus the turnaround."""
        return self.curve.cost_ns(rows) + self.turnaround_ns

    def _largest_within(self, budget_ns: float, cap: int) -> int:
        return self.curve.largest_within(budget_ns - self.turnaround_ns, cap)

    def planned_size(self, instances: int) -> int:
        """The batch size for sustained load: the largest whose cost c leaves a request arriving
        just after a dispatch room to wait c / k (k instances) and then ride a batch of its own."""
        if not self.ready:
            return self.max_rows
        k = max(instances, 1)
        size = self._largest_within(self.objective_ns * k / (k + 1), self.max_rows)
        return self._preferred_within(max(size, 1))

    def batch_limit(self, waited_ns: float, instances: int) -> int:
        """Rows the next batch may hold when its oldest request has waited `waited_ns`: the
        largest size whose predicted compute fits the rest of its budget, at most the planned
        size. When nothing fits (that request is late whatever happens) the planned size, which
        keeps throughput for the requests behind it."""
        planned = self.planned_size(instances)
        if not self.ready:
            return planned
        size = self._largest_within(self.objective_ns - waited_ns, planned)
        if size < 1:
            return planned
        return self._preferred_within(size)

    def _preferred_within(self, size: int) -> int:
        """The largest preferred batch size not above `size`, or `size` when none is."""
        if self.preferred and size >= self.preferred[0]:
            return self.preferred[bisect_right(self.preferred, size) - 1]
        return size

    def dispatch_by_ns(self, arrived_ns: int, instances: int) -> int:
        """The latest moment a batch holding a request that arrived at `arrived_ns` can start
        and still finish a planned-size batch inside the budget."""
        if not self.ready:
            return arrived_ns + int(self.objective_ns)
        cost = self.batch_ns(self.planned_size(instances))
        return arrived_ns + int(self.objective_ns - cost)

    def admission(
        self, rows_ahead: int, rows: int, age_ns: float, idle: int, instances: int, now_ns: int
    ) -> Admission:
        """Would a request of `rows` rows, `age_ns` old, queued behind `rows_ahead` rows, finish
        inside the budget? Counts the earliest busy instance's remaining time when none is idle
        (`idle`), then the queue in planned-size batches run `instances` at a time."""
        budget = self.budget_ns - age_ns
        if not self.ready:
            return Admission(True, 0.0, 0, budget)
        k = max(instances, 1)
        size = self.planned_size(k)
        total = rows_ahead + rows
        batches = -(-total // size)
        waves = -(-batches // k)
        # Each wave costs a planned-size batch, except a lone batch that starts at once: one
        # that waits is filled up to the planned size by the requests arriving meanwhile.
        last_wave_rows = size
        if waves == 1 and batches <= idle:
            last_wave_rows = total - (batches - 1) * size
        completion = (waves - 1) * self.batch_ns(size) + self.batch_ns(last_wave_rows)
        if not idle:
            completion += self._earliest_free_ns(now_ns)
        return Admission(completion <= budget, completion, batches, budget)

    def state(self, instances: int) -> PlanState:
        fixed, per_row = self.curve.fit()
        return PlanState(
            self.objective_ns / 1e9,
            self.headroom,
            self.planned_size(instances),
            fixed / 1e9,
            per_row / 1e9,
        )

    def _earliest_free_ns(self, now_ns: int) -> float:
        """Predicted ns until the first running batch finishes (0 when none runs or one is
        already past its predicted cost)."""
        earliest = math.inf
        for started, rows in self._running.values():
            earliest = min(earliest, started + self.batch_ns(rows) - now_ns)
        return max(earliest, 0.0) if earliest != math.inf else 0.0

    # --- the scheduler reports ------------------------------------------------------------
    def started(self, sequence: int, rows: int, now_ns: int) -> None:
        self._running[sequence] = (now_ns, rows)
        if self._backlogged:
            limit = self.objective_ns * _TURNAROUND_MAX
            gap = min(max(now_ns - self._backlogged.popleft(), 0), limit)
            self.turnaround_ns += (gap - self.turnaround_ns) * _TURNAROUND_WEIGHT

    def ended(self, sequence: int, backlog: bool) -> None:
        """A batch left its instance, whatever its outcome; `backlog`: requests were queued
        then, so the next batch to start follows it back to back."""
        self._running.pop(sequence, None)
        done = self._done.pop(sequence, None)
        if backlog and done is not None:
            self._backlogged.append(done)

    def observe(
        self,
        sequence: int,
        rows: int,
        cost_ns: float,
        done_ns: int,
        worst_latency_ns: float,
    ) -> None:
        """A batch executed: learn its cost; adjust the admission share by how late its slowest
        request (arrival to outputs) was."""
        stalled = self.ready and cost_ns > STALL_RATIO * self.curve.cost_ns(rows)
        self.curve.observe(rows, cost_ns)
        if sequence in self._running:
            self._done[sequence] = done_ns
        if stalled:
            # Its own requests were late because of the stall, not of admission. The requests
            # queued behind it are not excused: a host that stalls needs more room.
            pass
        elif worst_latency_ns > self.objective_ns:
            # One cut per episode: a batch whose oldest request was admitted before the last cut
            # (or stall) was late for the same cause.
            if done_ns - worst_latency_ns >= self._last_cut_ns:
                self.headroom = max(self.headroom * HEADROOM_CUT, HEADROOM_FLOOR)
                self._last_cut_ns = done_ns
        elif worst_latency_ns <= WELL_INSIDE * self.objective_ns:
            self.headroom = min(self.headroom + HEADROOM_STEP, 1.0)
