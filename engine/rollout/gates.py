"""The gate: what a roll-out does next, from its step's measurements. Pure functions (no clock, no
I/O), so every rule is tested on its own.

Guards, each over the current step's samples (a new step starts with empty windows):
- latency: candidate p99 <= max_p99_ratio x stable p99 + p99_slack_ms;
- error rate: candidate error rate - stable error rate <= max_error_rate_delta;
- agreement: agreeing pairs / compared pairs >= min_agreement.
Each needs `min_samples` behind it (candidate requests, stable requests, pairs) before it can hold
or break, and breaks only on evidence (BREACH_ALPHA): more than 1% of the candidate's requests over
the latency limit, its error rate above stable's by more than the delta, or more disagreeing pairs
than 1 - min_agreement allows, each beyond chance by a one-sided test. Out of limit without that
evidence, the step neither breaks nor advances: it waits for samples. The windows compared: the
candidate's mirrored requests in a shadow step (it serves no client there), the requests it
served otherwise; stable's served requests, or at a 100% step
(where it serves none) its mirrored ones.

Decision: any guard broken -> roll back, at once. Before the bake time has passed -> bake. A guard
still short of samples -> wait (and roll back once max_step_seconds passes, when set). Every guard
holding after the bake time -> the next step, or on the last one promotion (an A/B step first
needs its test to name a winner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .spec import Guards, RolloutSpec, Step
from .stats import ArmWindow, StepStats, binomial_tail, mann_whitney, rate_excess, two_proportions

#: Latency differences below this are scheduling noise, not a slower candidate (ms).
P99_SLACK_MS = 1.0
#: A guard breaks only on evidence: the chance of measuring what was measured if the guard in
#: fact held must be below this (a one-sided test); until then an out-of-limit step waits. Small,
#: because the gate looks again every check interval (repeated looks at 0.01 broke a good
#: candidate on a busy 2-core host) and a host's stalls hit requests in bunches.
BREACH_ALPHA = 0.001


@dataclass(frozen=True, slots=True)
class GuardCheck:
    name: str
    #: True: holds; False: broken; None: not enough samples yet.
    holds: bool | None
    value: float | None
    limit: float | None
    samples: int
    needed: int
    detail: str

    def describe(self) -> dict[str, Any]:
        return {
            "guard": self.name,
            "holds": self.holds,
            "value": self.value,
            "limit": self.limit,
            "samples": self.samples,
            "needed": self.needed,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    #: bake | wait | advance | promote | ready (passed; waits for a manual promote) | rollback
    action: str
    reason: str
    checks: tuple[GuardCheck, ...] = ()
    #: The A/B test's figures, when one ran.
    test: dict[str, Any] | None = None


def reference_windows(stats: StepStats, step: Step) -> tuple[ArmWindow, ArmWindow]:
    """(stable's window, the candidate's window) the guards compare in this step."""
    stable = stats.stable_mirrored if step.candidate_percent >= 100 else stats.stable_served
    return stable, stats.candidate_window(step.shadow)


def check_guards(spec: RolloutSpec, stats: StepStats, step: Step) -> tuple[GuardCheck, ...]:
    guards = spec.guards
    needed = guards.min_samples
    stable, candidate = reference_windows(stats, step)
    checks = []
    if guards.max_p99_ratio is not None:
        checks.append(_latency(guards, stable, candidate, needed))
    if guards.max_error_rate_delta is not None:
        checks.append(_error_rate(guards, stable, candidate, needed))
    if guards.min_agreement is not None:
        checks.append(_agreement(guards, stats, needed))
    return tuple(checks)


def _verdict(within: bool, evidence: float) -> bool | None:
    """Holds when the measurement is within the limit, breaks when it is not and the evidence
    says so (p < BREACH_ALPHA), else undecided (more samples needed)."""
    if within:
        return True
    return False if evidence < BREACH_ALPHA else None


def _latency(guards: Guards, stable: ArmWindow, candidate: ArmWindow, needed: int) -> GuardCheck:
    assert guards.max_p99_ratio is not None  # check_guards checks a guard only when it is on
    samples = min(len(stable.latencies.values), len(candidate.latencies.values))
    stable_p99 = stable.latencies.quantile_ms(0.99)
    candidate_p99 = candidate.latencies.quantile_ms(0.99)
    if samples < needed or stable_p99 is None or candidate_p99 is None:
        return GuardCheck("latency", None, candidate_p99, None, samples, needed, "collecting latencies")
    limit = guards.max_p99_ratio * stable_p99 + P99_SLACK_MS
    values = candidate.latencies.values
    over = int(np.count_nonzero(np.asarray(values, dtype=np.float64) > limit * 1e6))
    # The candidate's p99 is over the limit exactly when more than 1% of its requests are: a
    # breach needs that excess to be beyond chance.
    evidence = binomial_tail(over, len(values), 0.01)
    holds = _verdict(candidate_p99 <= limit, evidence)
    detail = (
        f"candidate p99 {candidate_p99:.2f} ms vs stable p99 {stable_p99:.2f} ms (limit "
        f"{guards.max_p99_ratio:g} x stable + {P99_SLACK_MS:g} ms = {limit:.2f} ms; {over} of "
        f"{len(values)} candidate requests over it, p = {evidence:.2g})"
    )
    return GuardCheck("latency", holds, candidate_p99, limit, samples, needed, detail)


def _error_rate(guards: Guards, stable: ArmWindow, candidate: ArmWindow, needed: int) -> GuardCheck:
    assert guards.max_error_rate_delta is not None  # check_guards checks a guard only when it is on
    samples = min(stable.requests, candidate.requests)
    if samples < needed:
        return GuardCheck("error_rate", None, None, None, samples, needed, "collecting outcomes")
    limit = guards.max_error_rate_delta
    # min_samples is at least 1, so both arms have requests (and error rates) here.
    assert candidate.error_rate is not None and stable.error_rate is not None
    delta = candidate.error_rate - stable.error_rate
    evidence = rate_excess(candidate.errors, candidate.requests, stable.errors, stable.requests, limit)
    holds = _verdict(delta <= limit, evidence)
    detail = (
        f"candidate error rate {candidate.error_rate:.4f} ({candidate.errors}/{candidate.requests}) "
        f"vs stable {stable.error_rate:.4f} ({stable.errors}/{stable.requests}); delta "
        f"{delta:+.4f}, limit {limit:g}, p = {evidence:.2g}"
    )
    return GuardCheck("error_rate", holds, delta, limit, samples, needed, detail)


def _agreement(guards: Guards, stats: StepStats, needed: int) -> GuardCheck:
    assert guards.min_agreement is not None  # check_guards checks a guard only when it is on
    pairs = stats.pairs
    if pairs.pairs < needed:
        return GuardCheck(
            "agreement", None, pairs.agreement, None, pairs.pairs, needed, "collecting pairs"
        )
    limit = guards.min_agreement
    assert pairs.agreement is not None  # min_samples is at least 1: there are pairs
    evidence = binomial_tail(pairs.pairs - pairs.agree, pairs.pairs, 1 - limit)
    holds = _verdict(pairs.agreement >= limit, evidence)
    detail = (
        f"{pairs.agree} of {pairs.pairs} pairs agree ({pairs.agreement:.4f}, needs >= {limit:g}; "
        f"p = {evidence:.2g}){_worst_output(stats)}"
    )
    return GuardCheck("agreement", holds, pairs.agreement, limit, pairs.pairs, needed, detail)


def _worst_output(stats: StepStats) -> str:
    worst = None
    for name, totals in stats.pairs.outputs.items():
        if totals.pairs and (worst is None or totals.agree / totals.pairs < worst[1]):
            worst = (name, totals.agree / totals.pairs, totals)
    if worst is None or worst[1] >= 1.0:
        return ""
    name, rate, totals = worst
    extra = f", max abs error {totals.max_abs:.3g}" if totals.max_abs is not None else ""
    return f"; output '{name}' agrees in {rate:.4f}{extra}"


def decide(spec: RolloutSpec, step_index: int, elapsed_s: float, stats: StepStats) -> Decision:
    """What the roll-out does next, `elapsed_s` into step `step_index`."""
    step = spec.steps[step_index]
    checks = check_guards(spec, stats, step)
    broken = [c for c in checks if c.holds is False]
    if broken:
        return Decision(
            "rollback",
            "guard broken: " + "; ".join(f"{c.name}: {c.detail}" for c in broken),
            checks,
        )
    if elapsed_s < step.bake_seconds:
        return Decision("bake", f"baking ({elapsed_s:.1f} of {step.bake_seconds:g} s)", checks)
    short = [c for c in checks if c.holds is None]
    if short:
        waiting = ", ".join(
            f"{c.name} {c.samples}/{c.needed}"
            if c.samples < c.needed
            else f"{c.name} out of limit, not yet significant"
            for c in short
        )
        if spec.max_step_seconds and elapsed_s >= spec.max_step_seconds:
            return Decision(
                "rollback",
                f"not enough samples within max_step_seconds {spec.max_step_seconds:g}: {waiting}",
                checks,
            )
        return Decision("wait", f"waiting for samples: {waiting}", checks)
    last = step_index == len(spec.steps) - 1
    if spec.mode == "ab" and not step.shadow:
        return _ab_decision(spec, step, elapsed_s, stats, checks)
    if not last:
        following = spec.steps[step_index + 1]
        return Decision("advance", f"guards held for {step.label}; next {following.label}", checks)
    if not spec.auto_promote:
        return Decision("ready", "every step passed; waiting for `convoy rollout promote`", checks)
    return Decision("promote", f"every step passed (last: {step.label})", checks)


def _ab_decision(
    spec: RolloutSpec,
    step: Step,
    elapsed_s: float,
    stats: StepStats,
    checks: tuple[GuardCheck, ...],
) -> Decision:
    ab = spec.ab
    stable, candidate = stats.stable_served, stats.candidate_served
    if ab.metric == "latency":
        cand = np.asarray(candidate.latencies.values, dtype=np.float64)
        stab = np.asarray(stable.latencies.values, dtype=np.float64)
        u, p = mann_whitney(cand, stab)
        # U of the candidate below half of n1 x n2: its latencies tend to be the smaller.
        candidate_better = u < cand.size * stab.size / 2.0
        test = {
            "test": "mann_whitney_u",
            "metric": "latency",
            "u": u,
            "p_value": p,
            "alpha": ab.alpha,
            "candidate_median_ms": float(np.median(cand)) / 1e6 if cand.size else None,
            "stable_median_ms": float(np.median(stab)) / 1e6 if stab.size else None,
            "candidate_samples": int(cand.size),
            "stable_samples": int(stab.size),
        }
    else:
        z, p = two_proportions(candidate.errors, candidate.requests, stable.errors, stable.requests)
        candidate_better = z < 0
        test = {
            "test": "two_proportion_z",
            "metric": "error_rate",
            "z": z,
            "p_value": p,
            "alpha": ab.alpha,
            "candidate_error_rate": candidate.error_rate,
            "stable_error_rate": stable.error_rate,
            "candidate_samples": candidate.requests,
            "stable_samples": stable.requests,
        }
    figures = f"{test['test']} on {ab.metric}: p = {p:.4g} (alpha {ab.alpha:g})"
    if p < ab.alpha:
        winner = "candidate" if candidate_better else "stable"
        test["winner"] = winner
        if winner == "stable":
            return Decision("rollback", f"A/B: stable wins, {figures}", checks, test)
        if not spec.auto_promote:
            return Decision(
                "ready", f"A/B: candidate wins, {figures}; waiting for promote", checks, test
            )
        return Decision("promote", f"A/B: candidate wins, {figures}", checks, test)
    limit = ab.max_seconds or 10 * step.bake_seconds
    if elapsed_s < limit:
        return Decision("wait", f"A/B: no significant difference yet, {figures}", checks, test)
    test["winner"] = ab.on_tie
    tie = f"A/B: no significant difference after {limit:g} s ({figures}); on_tie {ab.on_tie}"
    if ab.on_tie == "stable":
        return Decision("rollback", tie, checks, test)
    if not spec.auto_promote:
        return Decision("ready", tie + "; waiting for promote", checks, test)
    return Decision("promote", tie, checks, test)
