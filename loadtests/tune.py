"""`convoy tune`: search a model's batching and instance settings for the most throughput within
a p99 objective, measuring each candidate on the server with the capacity runner.

The search (after Triton Model Analyzer's automatic search: max_batch_size in powers of two,
instance counts, dynamic batching on) runs in phases from the model's current config:

    baseline   the config as it is served
    batch      max_batch_size 1, 2, 4, ... at the baseline's instance count
    instances  instance counts 1, 2, ... at the best max_batch_size
    delay      max_queue_delay_microseconds around the best
    preferred  preferred_batch_size [max] and [max/2, max] around the best

A phase stops early once a candidate breaks the objective at its lowest load, or when
throughput has not grown by GAIN over the phase's best for PATIENCE candidates in a row. Each
candidate is measured with a short concurrency ramp (1, 2, 4, ... users, from half the best
candidate's users) that stops the same way, or steps down when its first level breaks the
objective; its figure is the ramp's highest throughput within the objective.

The search and the choice are pure functions of the trials so far; only `run_tune` touches the
server (through `ModelControl`) and the load generator (lazily: it imports locust).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from .capacity import Slo, StepRow, client_bound_steps

if TYPE_CHECKING:  # runner and users import locust, which monkey-patches the process
    from .stats import RequestRecorder
    from .tune_config import ModelControl
    from .users import Target

#: Throughput must grow by this fraction to count as growth (Model Analyzer's early exit: 5%).
GAIN = 0.05
#: Candidates in a row without growth before a phase stops.
PATIENCE = 2
#: Levels in a row without growth before a ramp stops (each level doubles the users).
RAMP_PATIENCE = 1
PHASES = ("baseline", "batch", "instances", "delay", "preferred")


@dataclass(frozen=True)
class Candidate:
    """The settings one trial loads; everything else in the config stays as it was."""

    max_batch_size: int
    instance_count: int
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    #: False only for a baseline whose config has no dynamic_batching section.
    dynamic_batching: bool = True

    @property
    def behaviour(self) -> tuple:
        """What the server does differently: with batches of one, queue delay, preferred sizes
        and dynamic batching itself change nothing, so such candidates are measured once."""
        if self.max_batch_size <= 1:
            return (self.max_batch_size, self.instance_count)
        return (
            self.max_batch_size,
            self.instance_count,
            self.max_queue_delay_us if self.dynamic_batching else None,
            self.preferred_batch_sizes if self.dynamic_batching else (),
        )

    @property
    def label(self) -> str:
        text = f"batch {self.max_batch_size}, {self.instance_count} inst"
        if not self.dynamic_batching:
            return text + ", no dynamic batching"
        text += f", delay {self.max_queue_delay_us} µs"
        if self.preferred_batch_sizes:
            text += f", preferred {list(self.preferred_batch_sizes)}"
        return text


@dataclass(frozen=True)
class SearchSpace:
    """The values the search may try."""

    max_batch_sizes: tuple[int, ...]
    instance_counts: tuple[int, ...]
    queue_delays_us: tuple[int, ...] = (100, 500, 1000, 2000)

    @classmethod
    def of(
        cls, baseline: Candidate, max_batch_size: int, max_instances: int, min_batch: int = 1
    ) -> SearchSpace:
        """Powers of two from `min_batch` (a request's rows) up to `max_batch_size`; a model that
        does not batch (max_batch_size 0) keeps 0 and only its instance count is searched."""
        if baseline.max_batch_size == 0:
            sizes: tuple[int, ...] = ()
        else:
            sizes = tuple(
                2**k for k in range(max_batch_size.bit_length()) if min_batch <= 2**k <= max_batch_size
            )
        return cls(sizes, tuple(range(1, max_instances + 1)))

    @property
    def most_candidates(self) -> int:
        """An upper bound on the trials of one search (baseline, sweeps, delay and preferred)."""
        return 1 + len(self.max_batch_sizes) + len(self.instance_counts) + len(self.queue_delays_us) + 2


@dataclass(frozen=True)
class Trial:
    """One candidate as measured: its ramp and the figure taken from it."""

    index: int
    phase: str
    candidate: Candidate
    #: One StepRow per concurrency level of the ramp, in order.
    levels: tuple[StepRow, ...] = ()
    #: Why the candidate could not be measured (its load failed), or None.
    error: str | None = None
    elapsed_s: float = 0.0

    @property
    def point(self) -> StepRow | None:
        """The level that stands for the candidate: its highest throughput within the objective,
        or (none within it) its lowest p99."""
        ok = [row for row in self.levels if row.meets_slo]
        if ok:
            return max(ok, key=lambda row: row.throughput_rps)
        measured = [row for row in self.levels if row.p99_ms is not None]
        return min(measured, key=lambda row: row.p99_ms) if measured else None

    @property
    def meets_slo(self) -> bool:
        return self.error is None and any(row.meets_slo for row in self.levels)

    @property
    def throughput_rps(self) -> float:
        point = self.point
        return point.throughput_rps if point is not None else 0.0

    @property
    def p99_ms(self) -> float | None:
        point = self.point
        return point.p99_ms if point is not None else None

    @property
    def client_bound(self) -> bool:
        point = self.point
        return point is not None and point.step in client_bound_steps(list(self.levels))


# --- the concurrency ramp of one candidate ----------------------------------------------------------
def next_users(levels: list[StepRow], start: int, max_users: int) -> int | None:
    """The next concurrency to measure, or None when the ramp is done.

    Up from `start` by doubling until a level breaks the objective, throughput stops growing
    (RAMP_PATIENCE), the load generator saturates or `max_users` would be passed. While no level
    met the objective it steps down instead (a quarter of the lowest users so far) to one user,
    and measures one user twice before giving up: a short window's p99 is a handful of requests.
    """
    if not levels:
        return min(start, max_users)
    if not any(row.meets_slo for row in levels):
        lowest = min(row.users for row in levels)
        if lowest > 1:
            return max(1, lowest // 4)
        return 1 if sum(row.users == 1 for row in levels) < 2 else None
    last = levels[-1]
    if not last.meets_slo or last.step in client_bound_steps(levels):
        return None
    upward = sorted((row for row in levels if row.users <= last.users), key=lambda row: row.users)
    if _stalled([row.throughput_rps for row in upward]) >= RAMP_PATIENCE:
        return None
    following = last.users * 2
    if following > max_users or any(row.users == following for row in levels):
        return None
    return following


def ramp_start(trials: list[Trial]) -> int:
    """Start a ramp at half the users of the best trial so far: the levels below it are known to
    be far from a better candidate's limit."""
    best = best_trial(trials)
    point = best.point if best is not None else None
    return max(1, point.users // 2) if point is not None else 1


# --- the search -------------------------------------------------------------------------------------
def best_trial(trials: list[Trial]) -> Trial | None:
    """Highest throughput within the objective; None when no trial met it."""
    meeting = [t for t in trials if t.meets_slo]
    return max(meeting, key=lambda t: t.throughput_rps) if meeting else None


def closest_trial(trials: list[Trial]) -> Trial | None:
    """With no trial within the objective: the one whose p99 came nearest to it."""
    measured = [t for t in trials if t.error is None and t.p99_ms is not None]
    return min(measured, key=lambda t: t.p99_ms) if measured else None


def _phase_done(trials: list[Trial]) -> bool:
    """A phase stops once its newest trial broke the objective, or PATIENCE trials in a row
    did not beat the phase's best by GAIN."""
    if not trials:
        return False
    if not trials[-1].meets_slo:
        return True
    return _stalled([t.throughput_rps for t in trials]) >= PATIENCE


def _stalled(throughputs: list[float]) -> int:
    """How many of the last values in a row did not beat the best before them by GAIN."""
    best, stalled = 0.0, 0
    for value in throughputs:
        if value > best * (1 + GAIN):
            best, stalled = value, 0
        else:
            stalled += 1
    return stalled


def _phase_candidates(phase: str, base: Candidate, space: SearchSpace) -> list[Candidate]:
    batching = base.max_batch_size > 0
    if phase == "batch":
        return [Candidate(size, base.instance_count, 0, (), True) for size in space.max_batch_sizes]
    if phase == "instances":
        return [replace(base, instance_count=count) for count in space.instance_counts]
    if phase == "delay" and batching and base.dynamic_batching:
        return [replace(base, max_queue_delay_us=delay) for delay in space.queue_delays_us]
    if phase == "preferred" and batching and base.dynamic_batching:
        top = base.max_batch_size
        options = [(top,), (top // 2, top)] if top >= 2 else [(top,)]
        return [replace(base, preferred_batch_sizes=sizes) for sizes in options]
    return []


def propose(
    trials: list[Trial], baseline: Candidate, space: SearchSpace
) -> tuple[str, Candidate] | None:
    """The next (phase, candidate) to measure given every trial so far, or None: the search is
    done. Deterministic, and never proposes a candidate that behaves like one already measured."""
    if not trials:
        return "baseline", baseline
    seen = {t.candidate.behaviour for t in trials}
    for phase in PHASES[1:]:
        in_phase = [t for t in trials if t.phase == phase]
        earlier = [t for t in trials if PHASES.index(t.phase) < PHASES.index(phase)]
        base = _base_for(earlier, baseline)
        if _phase_done(in_phase):
            continue
        if phase == "batch" and not space.max_batch_sizes:
            continue
        for candidate in _phase_candidates(phase, base, space):
            if candidate.behaviour not in seen:
                return phase, candidate
    return None


def _base_for(trials: list[Trial], baseline: Candidate) -> Candidate:
    """What a phase varies from: the best candidate so far (else the closest, else the baseline),
    with dynamic batching switched on where the model batches."""
    chosen = best_trial(trials) or closest_trial(trials)
    base = chosen.candidate if chosen is not None else baseline
    if base.max_batch_size > 0 and not base.dynamic_batching:
        base = replace(base, dynamic_batching=True)
    return base


# --- the choice -------------------------------------------------------------------------------------
def pareto_frontier(trials: list[Trial]) -> list[Trial]:
    """Trials no other trial beats on both throughput (higher) and p99 (lower), by p99."""
    measured = [t for t in trials if t.error is None and t.p99_ms is not None]
    frontier = []
    for trial in measured:
        dominated = any(
            other.throughput_rps >= trial.throughput_rps
            and other.p99_ms <= trial.p99_ms
            and (other.throughput_rps > trial.throughput_rps or other.p99_ms < trial.p99_ms)
            for other in measured
        )
        if not dominated:
            frontier.append(trial)
    return sorted(frontier, key=lambda t: (t.p99_ms, -t.throughput_rps))


@dataclass(frozen=True)
class Choice:
    """The answer: the best trial (None if none met the objective), the closest one otherwise,
    and one sentence per trial saying why it was or was not chosen."""

    best: Trial | None
    closest: Trial | None
    frontier: tuple[int, ...]
    reasons: dict[int, str] = field(default_factory=dict)
    summary: str = ""


def choose(trials: list[Trial], slo: Slo) -> Choice:
    best = best_trial(trials)
    closest = None if best is not None else closest_trial(trials)
    frontier = tuple(t.index for t in pareto_frontier(trials))
    reasons = {}
    for trial in trials:
        reasons[trial.index] = _reason(trial, best, closest, frontier, slo)
    if best is not None:
        summary = (
            f"best: {best.candidate.label}: {best.throughput_rps:,.0f} req/s at p99 "
            f"{best.p99_ms:.2f} ms with {best.point.users} users (objective p99 <= {slo.p99_ms:g} ms)"
        )
        if best.client_bound:
            summary += "; the load generator was the limit there, so the server may do better"
    elif closest is not None:
        summary = (
            f"no candidate met p99 <= {slo.p99_ms:g} ms; closest: {closest.candidate.label} at "
            f"p99 {closest.p99_ms:.2f} ms ({closest.throughput_rps:,.0f} req/s). No config written"
        )
    else:
        summary = f"no candidate could be measured against p99 <= {slo.p99_ms:g} ms. No config written"
    return Choice(best, closest, frontier, reasons, summary)


def _reason(
    trial: Trial, best: Trial | None, closest: Trial | None, frontier: tuple[int, ...], slo: Slo
) -> str:
    if trial.error is not None:
        return f"not measured: {trial.error}"
    on_frontier = " (on the frontier)" if trial.index in frontier else ""
    if best is not None and trial.index == best.index:
        return "chosen: the highest throughput within the objective"
    if not trial.meets_slo:
        point = trial.point
        if point is None:
            return "no successful requests"
        if point.p99_ms is not None and point.p99_ms > slo.p99_ms:
            text = f"p99 {point.p99_ms:.2f} ms over {slo.p99_ms:g} ms even at {point.users} users"
        else:
            text = f"too many failed requests ({point.error_rate + point.rejection_rate:.2%})"
        if closest is not None and trial.index == closest.index:
            text += "; the closest to the objective"
        return text + on_frontier
    share = trial.throughput_rps / best.throughput_rps if best and best.throughput_rps else 0.0
    return f"within the objective, {share:.0%} of the best's throughput{on_frontier}"


# --- the run ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TunePlan:
    """How the search is bounded and how each level of a ramp is measured."""

    protocol: str
    budget_s: float
    level_duration_s: float
    level_warmup_s: float
    max_users: int
    max_requests: int | None
    max_candidates: int | None = None

    @property
    def level_cost_s(self) -> float:
        return self.level_duration_s + self.level_warmup_s


class TuneProgress(Protocol):
    """What the CLI shows while the search runs."""

    def candidate_started(self, index: int, phase: str, candidate: Candidate, left_s: float) -> None: ...

    def level_started(self, users: int) -> None: ...

    def tick(self, recorder: RequestRecorder, fraction: float) -> None: ...

    def candidate_done(self, trial: Trial) -> None: ...


#: Measures one ramp level: (users, step number) -> its row.
LevelMeter = Callable[[int, int], StepRow]


def load_meter(
    target: Target,
    plan: TunePlan,
    slo: Slo,
    metrics_url: str | None,
    progress: TuneProgress | None = None,
) -> LevelMeter:
    """Ramp levels measured by the capacity runner: closed-loop checked users for
    `level_duration_s` after `level_warmup_s`, the server's metrics scraped around them."""
    from .runner import LoadPlan, run_load

    def measure(users: int, step: int) -> StepRow:
        if progress is not None:
            progress.level_started(users)
        result = run_load(
            target,
            LoadPlan(
                (plan.protocol,), users, plan.level_duration_s, plan.max_requests, plan.level_warmup_s
            ),
            metrics_url,
            on_tick=progress.tick if progress is not None else None,
        )
        return StepRow.of(step, result, slo)

    return measure


def run_tune(
    control: ModelControl,
    measure: LevelMeter,
    baseline: Candidate,
    space: SearchSpace,
    plan: TunePlan,
    progress: TuneProgress | None = None,
    clock: Callable[[], float] = time.monotonic,
    into: list[Trial] | None = None,
) -> list[Trial]:
    """Measure candidates until the search is done or the budget is spent. No candidate starts
    with less than two ramp levels of budget left, and no level with less than one (the
    baseline always gets one). The model is left loaded with the last candidate: the caller
    restores or applies a config."""
    end = clock() + plan.budget_s
    # `into`: the caller's list, so the trials measured so far survive an interruption.
    trials: list[Trial] = into if into is not None else []
    while plan.max_candidates is None or len(trials) < plan.max_candidates:
        proposal = propose(trials, baseline, space)
        if proposal is None or (trials and end - clock() < 2 * plan.level_cost_s):
            break
        phase, candidate = proposal
        index = len(trials) + 1
        if progress is not None:
            progress.candidate_started(index, phase, candidate, max(0.0, end - clock()))
        started = clock()
        error = None if phase == "baseline" else control.apply(candidate)
        levels: list[StepRow] = []
        start = ramp_start(trials)
        while error is None:
            users = next_users(levels, start, plan.max_users)
            if users is None or (levels and end - clock() < plan.level_cost_s):
                break
            levels.append(measure(users, len(levels) + 1))
        trial = Trial(index, phase, candidate, tuple(levels), error, clock() - started)
        trials.append(trial)
        if progress is not None:
            progress.candidate_done(trial)
    return trials
