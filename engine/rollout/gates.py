"""The gate: what a roll-out does next, from its step's measurements. Pure functions (no clock, no
I/O), so every rule is tested on its own.

Guards, each over the current step's samples (a new step starts with empty windows):
- latency: candidate p99 <= max_p99_ratio x stable p99 + p99_slack_ms;
- error rate: candidate error rate - stable error rate <= max_error_rate_delta;
- agreement: agreeing pairs / compared pairs >= min_agreement.
Each needs `min_samples` behind it (candidate requests, stable requests, pairs) before it can hold
or break. The windows compared: the candidate's mirrored requests in a shadow step (it serves no
client there), the requests it served otherwise; stable's served requests, or at a 100% step
(where it serves none) its mirrored ones.

Decision: any guard broken -> roll back, at once. Before the bake time has passed -> bake. A guard
still short of samples -> wait (and roll back once max_step_seconds passes, when set). Every guard
holding after the bake time -> the next step, or on the last one promotion (an A/B step first
needs its test to name a winner).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import RolloutSpec, Step
from .stats import ArmWindow, StepStats, mann_whitney, two_proportions

#: Latency differences below this are scheduling noise, not a slower candidate (ms).
P99_SLACK_MS = 1.0


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

    def describe(self) -> dict:
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
    test: dict | None = None


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
        samples = min(len(stable.latencies.values), len(candidate.latencies.values))
        stable_p99 = stable.latencies.quantile_ms(0.99)
        candidate_p99 = candidate.latencies.quantile_ms(0.99)
        if samples < needed or stable_p99 is None or candidate_p99 is None:
            checks.append(
                GuardCheck("latency", None, candidate_p99, None, samples, needed, "collecting latencies")
            )
        else:
            limit = guards.max_p99_ratio * stable_p99 + P99_SLACK_MS
            holds = candidate_p99 <= limit
            checks.append(
                GuardCheck(
                    "latency",
                    holds,
                    candidate_p99,
                    limit,
                    samples,
                    needed,
                    f"candidate p99 {candidate_p99:.2f} ms vs stable p99 {stable_p99:.2f} ms "
                    f"(limit {guards.max_p99_ratio:g} x stable + {P99_SLACK_MS:g} ms = {limit:.2f} ms)",
                )
            )
    if guards.max_error_rate_delta is not None:
        samples = min(stable.requests, candidate.requests)
        if samples < needed:
            checks.append(
                GuardCheck("error_rate", None, None, None, samples, needed, "collecting outcomes")
            )
        else:
            delta = candidate.error_rate - stable.error_rate
            holds = delta <= guards.max_error_rate_delta
            checks.append(
                GuardCheck(
                    "error_rate",
                    holds,
                    delta,
                    guards.max_error_rate_delta,
                    samples,
                    needed,
                    f"candidate error rate {candidate.error_rate:.4f} ({candidate.errors}/"
                    f"{candidate.requests}) vs stable {stable.error_rate:.4f} ({stable.errors}/"
                    f"{stable.requests}); delta {delta:+.4f}, limit {guards.max_error_rate_delta:g}",
                )
            )
    if guards.min_agreement is not None:
        pairs = stats.pairs
        if pairs.pairs < needed:
            checks.append(
                GuardCheck(
                    "agreement", None, pairs.agreement, None, pairs.pairs, needed, "collecting pairs"
                )
            )
        else:
            holds = pairs.agreement >= guards.min_agreement
            worst = _worst_output(stats)
            checks.append(
                GuardCheck(
                    "agreement",
                    holds,
                    pairs.agreement,
                    guards.min_agreement,
                    pairs.pairs,
                    needed,
                    f"{pairs.agree} of {pairs.pairs} pairs agree ({pairs.agreement:.4f}, needs "
                    f">= {guards.min_agreement:g}){worst}",
                )
            )
    return tuple(checks)


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
        waiting = ", ".join(f"{c.name} {c.samples}/{c.needed}" for c in short)
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


def _ab_decision(spec: RolloutSpec, step: Step, elapsed_s: float, stats: StepStats, checks) -> Decision:
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
