"""One roll-out of a model: where each request naming no version goes, the mirrored copies and
their pairing, and the state machine the gates drive.

Routing (engine loop, per request): while the roll-out runs, a caller is put in the candidate's
arm when a hash of its split key (the chosen header's value, else its API key name) falls under
the step's candidate share, so one caller sees one arm and, as the share grows, callers only
ever move from stable to the candidate; callers with neither are split by count. A request is
mirrored to the other arm (in a shadow step: stable's to the candidate, `mirror.sample_rate` of
them; in weighted steps `compare.sample_rate` of the candidate's to stable, so the candidate runs
only its own traffic) when that arm's budget allows: the copy runs
behind every priority level, and its outcome only ever reaches this roll-out. The client's
request keeps its own future (wrapped here to note the outcome and add the response parameter
`convoy_rollout_arm`); nothing about it waits on the mirror.

States: running -> (ready: every step passed, auto_promote off) -> promoted | rolled_back |
aborted; promoted -> reverted (abort while the previous stable is still kept).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from convoy.errors import Cancelled
from convoy.types import Request

from .budget import MirrorBudget
from .compare import compare_pair
from .gates import Decision, decide
from .routing import MirrorOutcome, Pair, RolloutRoute, RoutedOutcome, Share, split_point
from .spec import OutputCompare, RolloutSpec, Step
from .stats import ArmHistograms, StepStats, Timeline

if TYPE_CHECKING:
    from convoy.types import Response

    from ..repository import ModelVersion

log = logging.getLogger("convoy.rollout")

RUNNING = ("running", "ready")
#: History entries kept (each transition adds one; a week of steps is far fewer).
HISTORY = 1000


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Rollout:
    """One roll-out: routing, mirrors and pairs (loop thread), the gate's decisions (`tick`)."""

    def __init__(
        self,
        model: str,
        spec: RolloutSpec,
        rules: dict[str, OutputCompare],
        datatypes: dict[str, str],
        batched: bool,
        lookup: Callable[[int], ModelVersion | None],
        on_change: Callable[[Rollout], None],
        on_disagreement: Callable[..., None] | None = None,
    ) -> None:
        """`lookup(version)`: the model version as the repository holds it now (or None);
        `on_change`: called after every transition (persist, republish the model table);
        `on_disagreement(rollout, pair, verdict, stable_response, candidate_response)`: a
        disagreeing pair chosen for the payload log."""
        self.model = model
        self.spec = spec
        self.rules = rules
        self.datatypes = datatypes
        self.batched = batched
        # A roll-out's spec names both versions (RolloutManager loads them before it starts one
        # and restores it from a state record that has them).
        self.stable: int = spec.stable  # type: ignore[assignment]
        self.candidate: int = spec.candidate  # type: ignore[assignment]
        self._lookup = lookup
        self._on_change = on_change
        self._on_disagreement = on_disagreement
        self.state = "running"
        self.reason = ""
        self.step_index = 0
        self.generation = 0
        self.started_at = _now_iso()
        self.started_s = time.monotonic()
        self.step_started_s = self.started_s
        self.finished_at = ""
        self.finished_s: float | None = None
        #: After promotion: the version that was stable, kept loaded until `previous_until_s`.
        self.previous: int | None = None
        self.previous_until_s: float | None = None
        #: A rolled-back (or aborted) candidate is kept loaded for inspection until cleared.
        self.candidate_released = False
        self.stats = StepStats()
        self.totals = StepStats()
        self.histograms = ArmHistograms()
        self.timeline = Timeline()
        self.history: list[dict[str, Any]] = []
        #: Each finished step: its label, the decision that ended it, what it measured.
        self.step_results: list[dict[str, Any]] = []
        self.decision: Decision | None = None
        self.route = RolloutRoute(self)
        self._salt = f"{model}:{self.stable}:{self.candidate}"
        self._keyless = Share(0.0)
        self._mirror_share = Share(spec.mirror.sample_rate)
        self._compare_share = Share(spec.compare.sample_rate)
        self._log_share = Share(spec.compare.log_disagreements)
        self._budgets: dict[int, MirrorBudget] = {}
        self._weight = 0.0
        self._set_weight()

    # --- lookups -----------------------------------------------------------------------------------
    def entry(self, version: int) -> ModelVersion | None:
        return self._lookup(version)

    @property
    def step(self) -> Step:
        return self.spec.steps[self.step_index]

    @property
    def weight(self) -> float:
        """The candidate's share of client traffic now (0..1)."""
        return self._weight

    def _set_weight(self) -> None:
        self._weight = self.step.candidate_percent / 100.0 if self.state in RUNNING else 0.0
        self._keyless = Share(self._weight)

    @property
    def serving_version(self) -> int:
        """Where requests naming no version go when the roll-out does not split them."""
        if self.state == "promoted":
            return self.candidate
        return self.stable

    def held_versions(self) -> set[int]:
        """The versions this roll-out keeps loaded whatever the version policy says."""
        held = {self.serving_version}
        if self.state in RUNNING:
            held |= {self.stable, self.candidate}
        elif self.state in ("rolled_back", "aborted") and not self.candidate_released:
            held.add(self.candidate)  # kept for inspection (requests naming it still work)
        elif self.state == "promoted" and self.previous is not None:
            held.add(self.previous)  # kept for an instant revert
        elif self.state == "reverted":
            held.add(self.stable)
        return held

    # --- routing (loop thread) ---------------------------------------------------------------------
    def submit(self, request: Request, queue: Callable[[Any, Request], None]) -> None:
        """Route a client's request naming no version, with its mirror when one is due."""
        stable = self.entry(self.stable)
        candidate = self.entry(self.candidate)
        if self.state not in RUNNING or candidate is None or stable is None:
            target = self.entry(self.serving_version) or stable
            request.routed_to = target
            queue(target, request)
            return
        shadow = self.step.shadow
        to_candidate = not shadow and self._in_candidate_arm(request)
        primary, other = (candidate, stable) if to_candidate else (stable, candidate)
        arm = "candidate" if to_candidate else "stable"
        other_arm = "stable" if to_candidate else "candidate"
        start = time.monotonic_ns()
        pair = None
        mirror = None
        # Shadow: stable's requests are copied to the candidate. Weighted steps: the requests
        # the candidate answered are copied to stable, never the other way, so the candidate
        # runs exactly its own traffic and its latency is its own.
        wanted = self._mirror_share.take() if shadow else to_candidate and self._compare_share.take()
        if wanted and other.ready and other.scheduler is not None:
            reason = self._budget(other).admit(start)
            if reason:
                self._count_drop(reason)
            else:
                # The copy's own arrays: a --workers front end reuses the shared memory of large
                # inputs once the client's request is answered, before the mirror may run.
                inputs = {name: np.array(array) for name, array in request.inputs.items()}
                pair = Pair(self, to_candidate, self.generation, request.id, inputs)
                outcome = MirrorOutcome(self, other_arm, other.version, start, self.generation, pair)
                mirror = Request(
                    id=request.id,
                    inputs=inputs,
                    requested_outputs=request.requested_outputs,
                    rows=request.rows,
                    future=outcome,
                    parameters=dict(request.parameters),
                    received_ns=start,
                    principal=request.principal,
                    mirror=True,
                )
        request.future = RoutedOutcome(request.future, self, arm, start, self.generation, pair)
        request.routed_to = primary
        queue(primary, request)
        if mirror is not None:
            self.stats.mirrors.sent += 1
            self.totals.mirrors.sent += 1
            try:
                assert other.scheduler is not None  # checked above, when the mirror was made
                other.scheduler.submit(mirror)
            except Exception as exc:  # refused (shutting down, unready): a failed mirror
                mirror.future.set_exception(exc)

    def _in_candidate_arm(self, request: Request) -> bool:
        weight = self._weight
        if weight >= 1.0:
            return True
        key = request.split_key or request.principal
        if key is None:
            return self._keyless.take()
        return split_point(self._salt, key) < weight

    def _budget(self, entry: ModelVersion) -> MirrorBudget:
        budget = self._budgets.get(entry.version)
        if budget is None:
            config = entry.config
            instances = max(config.instance_count, 1)
            queue = self.spec.mirror.max_queue or 2 * instances * max(config.max_batch_size, 1)
            budget = MirrorBudget(self.spec.mirror.budget, instances, queue, time.monotonic_ns())
            self._budgets[entry.version] = budget
        return budget

    def _count_drop(self, reason: str) -> None:
        for counts in (self.stats.mirrors, self.totals.mirrors):
            if reason == "queue":
                counts.dropped_queue += 1
            else:
                counts.dropped_budget += 1

    # --- outcomes (loop thread) ----------------------------------------------------------------------
    def served(
        self,
        arm: str,
        start_ns: int,
        generation: int,
        response: Response | None,
        error: BaseException | None,
        pair: Pair | None,
    ) -> None:
        """A client's request routed by this roll-out was answered."""
        if isinstance(error, Cancelled):
            if pair is not None:
                pair.primary_done(None, error)
            return
        now = time.monotonic_ns()
        windows = [self.totals.window(arm, False)]
        if generation == self.generation:
            windows.append(self.stats.window(arm, False))
        if error is None:
            latency = now - start_ns
            self.histograms.of(arm, False).add(latency)
            for window in windows:
                window.success(latency)
        else:
            for window in windows:
                window.failure()
        if pair is not None:
            pair.primary_done(response, error)

    def mirrored(
        self, outcome: MirrorOutcome, response: Response | None, error: BaseException | None
    ) -> None:
        """A mirrored request came back."""
        now = time.monotonic_ns()
        budget = self._budgets.get(outcome.version)
        if budget is not None:
            budget.finished(response.timings if response is not None else None, now)
        current = outcome.generation == self.generation
        counts = [self.totals.mirrors] + ([self.stats.mirrors] if current else [])
        windows = [self.totals.window(outcome.arm, True)]
        if current:
            windows.append(self.stats.window(outcome.arm, True))
        if error is None:
            latency = now - outcome.start_ns
            self.histograms.of(outcome.arm, True).add(latency)
            for window in windows:
                window.success(latency)
            for c in counts:
                c.completed += 1
        elif not isinstance(error, Cancelled):
            for window in windows:
                window.failure()
            for c in counts:
                c.failed += 1
        outcome.pair.mirror_done(response, error)

    def paired(self, pair: Pair) -> None:
        """Both sides answered: compare them (when both succeeded)."""
        primary, mirror = pair.primary, pair.mirror
        assert primary is not None and mirror is not None  # called once both sides answered
        if primary[1] is not None or mirror[1] is not None:
            current = pair.generation == self.generation
            for counts in [self.totals.mirrors] + ([self.stats.mirrors] if current else []):
                counts.unpaired += 1
            return
        if pair.candidate_first:
            candidate, stable = primary[0], mirror[0]
        else:
            stable, candidate = primary[0], mirror[0]
        # No error on either side: both answered with a response.
        assert stable is not None and candidate is not None
        verdict = compare_pair(
            self.rules, self.datatypes, stable.outputs, candidate.outputs, self.batched
        )
        self.totals.pairs.add(verdict)
        if pair.generation == self.generation:
            self.stats.pairs.add(verdict)
        self.timeline.add(time.monotonic() - self.started_s, verdict.agrees)
        if not verdict.agrees and self._on_disagreement is not None and self._log_share.take():
            self._on_disagreement(self, pair, verdict, stable, candidate)

    # --- the gate (loop thread, every check interval) -----------------------------------------------
    def tick(self, now_s: float | None = None) -> None:
        now_s = time.monotonic() if now_s is None else now_s
        if self.state == "promoted":
            if (
                self.previous is not None
                and self.previous_until_s is not None
                and now_s >= self.previous_until_s
            ):
                self._record("release", f"version {self.previous} (stable before promotion) released")
                self.previous = None
                self.previous_until_s = None
                self._on_change(self)
            return
        if self.state not in RUNNING:
            return
        if self.entry(self.candidate) is None:
            self.finish("aborted", f"candidate version {self.candidate} is no longer loaded")
            return
        if self.entry(self.stable) is None:
            self.finish("aborted", f"stable version {self.stable} is no longer loaded")
            return
        decision = decide(self.spec, self.step_index, now_s - self.step_started_s, self.stats)
        self.decision = decision
        if decision.action == "rollback":
            self.finish("rolled_back", decision.reason, decision)
        elif decision.action == "advance":
            self._end_step(decision)
            self.step_index += 1
            self._begin_step(now_s)
            self._record("advance", decision.reason, decision)
            log.info("roll-out of '%s': %s", self.model, decision.reason)
            self._on_change(self)
        elif decision.action == "promote":
            self.promote(decision.reason, decision)
        elif decision.action == "ready" and self.state != "ready":
            self.state = "ready"
            self._record("ready", decision.reason, decision)
            self._on_change(self)

    def _begin_step(self, now_s: float) -> None:
        self.generation += 1
        self.stats = StepStats()
        self.step_started_s = now_s
        self._set_weight()

    def _end_step(self, decision: Decision | None) -> None:
        self.step_results.append(
            {
                "step": self.step_index,
                "label": self.step.label,
                "seconds": round(time.monotonic() - self.step_started_s, 3),
                "decision": _decision(decision),
                "measured": self.stats.describe(),
            }
        )

    def promote(self, reason: str, decision: Decision | None = None) -> None:
        """The candidate becomes stable; the old stable stays loaded `keep_previous_seconds`."""
        self._end_step(decision)
        self.state = "promoted"
        self.reason = reason
        self.previous = self.stable
        self.previous_until_s = time.monotonic() + self.spec.keep_previous_seconds
        self._set_weight()
        self._stamp_finished()
        self._record("promote", reason, decision)
        log.info("roll-out of '%s': version %d promoted (%s)", self.model, self.candidate, reason)
        self._on_change(self)

    def finish(self, state: str, reason: str, decision: Decision | None = None) -> None:
        """Roll back (a guard broke) or abort: the candidate gets no traffic and no mirrors,
        and stays loaded for inspection."""
        if self.state in RUNNING:
            self._end_step(decision)
        self.state = state
        self.reason = reason
        self._set_weight()
        self._stamp_finished()
        self._record("rollback" if state == "rolled_back" else state, reason, decision)
        log.warning("roll-out of '%s': %s: %s", self.model, state.replace("_", " "), reason)
        self._on_change(self)

    def revert(self, reason: str) -> None:
        """After promotion, while the previous stable is still loaded: back to it."""
        self.state = "reverted"
        self.reason = reason
        self.previous_until_s = None
        self._record("revert", reason)
        log.warning("roll-out of '%s': reverted to version %d: %s", self.model, self.stable, reason)
        self._on_change(self)

    def release_candidate(self, reason: str) -> None:
        self.candidate_released = True
        self._record("release", reason)
        self._on_change(self)

    def _stamp_finished(self) -> None:
        self.finished_at = _now_iso()
        self.finished_s = time.monotonic()

    def _record(self, action: str, reason: str, decision: Decision | None = None) -> None:
        entry = {
            "time": _now_iso(),
            "t_s": round(time.monotonic() - self.started_s, 3),
            "step": self.step_index,
            "label": self.step.label,
            "action": action,
            "reason": reason,
        }
        if decision is not None:
            entry["checks"] = [c.describe() for c in decision.checks]
            if decision.test is not None:
                entry["test"] = decision.test
        self.history.append(entry)
        del self.history[:-HISTORY]

    # --- what status and the report show ---------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        step = self.step
        return {
            "model": self.model,
            "state": self.state,
            "reason": self.reason,
            "mode": self.spec.mode,
            "stable": self.stable,
            "candidate": self.candidate,
            "serving_version": self.serving_version,
            "candidate_weight": self.weight,
            "split": {"header": self.spec.split_header} if self.spec.split_header else {"api_key": True},
            "step": {
                "index": self.step_index,
                "label": step.label,
                "of": len(self.spec.steps),
                "candidate_percent": step.candidate_percent if self.state in RUNNING else 0.0,
                "bake_seconds": step.bake_seconds,
                "elapsed_s": round(now - self.step_started_s, 3) if self.state in RUNNING else None,
            },
            "decision": _decision(self.decision) if self.state in RUNNING else None,
            "current": self.stats.describe() if self.state in RUNNING else None,
            "totals": self.totals.describe(),
            "previous": self.previous,
            "previous_kept_s": None
            if self.previous_until_s is None
            else round(max(self.previous_until_s - now, 0.0), 1),
            "started_at": self.started_at,
            "finished_at": self.finished_at or None,
            "history": list(self.history),
        }


def _decision(decision: Decision | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    out: dict[str, Any] = {
        "action": decision.action,
        "reason": decision.reason,
        "checks": [c.describe() for c in decision.checks],
    }
    if decision.test is not None:
        out["test"] = decision.test
    return out
