"""What a roll-out measures and decides: paired comparison per output kind, the A/B tests (against
scipy), the agreement timeline, the mirror budget, and the gate's decisions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convoy.engine.rollout.budget import BURST_S, MirrorBudget
from convoy.engine.rollout.compare import compare_pair
from convoy.engine.rollout.controller import Rollout
from convoy.engine.rollout.gates import P99_SLACK_MS, decide
from convoy.engine.rollout.routing import split_point
from convoy.engine.rollout.spec import OutputCompare, parse_spec
from convoy.engine.rollout.stats import (
    TIMELINE_POINTS,
    StepStats,
    Timeline,
    binomial_tail,
    mann_whitney,
    two_proportions,
)
from convoy.types import Request, StageTimes

MS = 1_000_000


# --- comparison -----------------------------------------------------------------------------------
def _one(rule, datatype, stable, candidate, batched=True):
    verdict = compare_pair({"Y": rule}, {"Y": datatype}, {"Y": stable}, {"Y": candidate}, batched)
    return verdict.outputs[0], verdict.agrees


def test_integers_and_strings_agree_only_when_equal():
    rule = OutputCompare("exact")
    same, agrees = _one(rule, "INT64", np.array([[1, 2]]), np.array([[1, 2]]))
    assert agrees and same.max_abs is None
    _, agrees = _one(rule, "INT64", np.array([[1, 2]]), np.array([[1, 3]]))
    assert not agrees
    words = np.array([[b"a", b"b"]], dtype=object)
    _, agrees = _one(rule, "BYTES", words, np.array([[b"a", b"b"]], dtype=object))
    assert agrees
    _, agrees = _one(rule, "BYTES", words, np.array([[b"a", b"c"]], dtype=object))
    assert not agrees


def test_floats_agree_within_tolerance_and_report_their_errors():
    rule = OutputCompare("float", atol=1e-5, rtol=1e-4)
    stable = np.array([[1.0, 2.0, -3.0]], dtype=np.float32)
    near, agrees = _one(rule, "FP32", stable, stable + np.float32(1e-6))
    assert agrees and near.max_abs == pytest.approx(1e-6, rel=0.2) and near.cosine == pytest.approx(1.0)
    far, agrees = _one(rule, "FP32", stable, stable + np.float32([0, 0, 0.5]))
    assert not agrees
    assert far.max_abs == pytest.approx(0.5)
    assert far.max_rel == pytest.approx(0.5 / 3.0, rel=1e-3)
    nan = np.array([[np.nan, 1.0]], dtype=np.float32)
    _, agrees = _one(rule, "FP32", nan, nan.copy())
    assert agrees  # NaN where stable has NaN is the same answer


def test_logits_agree_on_the_top_class_and_measure_top_k_overlap():
    rule = OutputCompare("logits", top_k=2)
    stable = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.1]], dtype=np.float32)
    shuffled_tail = np.array([[0.2, 0.8, 0.6], [0.6, 0.3, 0.1]], dtype=np.float32)
    verdict, agrees = _one(rule, "FP32", stable, shuffled_tail)
    assert agrees and verdict.top1 == 1.0 and verdict.topk == 1.0
    flipped = np.array([[0.1, 0.4, 0.5], [0.7, 0.2, 0.1]], dtype=np.float32)
    verdict, agrees = _one(rule, "FP32", stable, flipped)
    assert not agrees and verdict.top1 == 0.5 and verdict.topk == 1.0


def test_embeddings_agree_on_cosine_similarity_per_row():
    rule = OutputCompare("embedding", min_cosine=0.99)
    stable = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    scaled = stable * 3  # same direction: cosine 1 although every value differs
    verdict, agrees = _one(rule, "FP32", stable, scaled)
    assert agrees and verdict.cosine == pytest.approx(1.0)
    turned = np.array([[1.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    verdict, agrees = _one(rule, "FP32", stable, turned)
    assert not agrees and verdict.cosine == pytest.approx(2**-0.5)


def test_a_missing_output_or_a_different_shape_disagrees():
    verdict = compare_pair(
        {},
        {"A": "FP32", "B": "FP32"},
        {"A": np.zeros((1, 2)), "B": np.zeros((1, 2))},
        {"A": np.zeros((1, 3))},
        True,
    )
    assert not verdict.agrees
    notes = {o.name: o.note for o in verdict.outputs}
    assert notes == {"A": "shape [1, 3] vs stable [1, 2]", "B": "missing from candidate"}


# --- the A/B tests --------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=8, max_size=80),
    st.lists(st.integers(0, 30), min_size=8, max_size=80),
)
def test_mann_whitney_matches_scipy(x, y):
    scipy_stats = pytest.importorskip("scipy.stats")
    u, p = mann_whitney(x, y)
    expected = scipy_stats.mannwhitneyu(
        x, y, alternative="two-sided", method="asymptotic", use_continuity=True
    )
    assert u == pytest.approx(expected.statistic)
    if np.isnan(expected.pvalue):  # every value tied
        assert p == 1.0
    else:
        assert p == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-12)


def test_two_proportions_matches_the_textbook_z_test():
    z, p = two_proportions(30, 1000, 10, 1000)
    pooled = 40 / 2000
    expected = (0.03 - 0.01) / np.sqrt(pooled * (1 - pooled) * (2 / 1000))
    assert z == pytest.approx(expected)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert p == pytest.approx(2 * scipy_stats.norm.sf(abs(expected)))
    assert two_proportions(0, 100, 0, 100) == (0.0, 1.0)


# --- agreement over time --------------------------------------------------------------------------
def test_the_timeline_stays_bounded_by_doubling_its_buckets():
    timeline = Timeline(width_s=1.0)
    for second in range(3 * TIMELINE_POINTS):
        timeline.add(second + 0.5, second % 3 != 0)
    points = timeline.describe()
    assert len(points) <= TIMELINE_POINTS
    assert sum(p["pairs"] for p in points) == 3 * TIMELINE_POINTS
    assert timeline.width_s == 4.0


# --- the mirror budget ----------------------------------------------------------------------------
def _times(start_ns: int, compute_ns: int) -> StageTimes:
    return StageTimes(start_ns, start_ns, start_ns, start_ns + compute_ns, start_ns + compute_ns)


def test_the_budget_stops_mirrors_once_their_share_of_instance_time_is_spent():
    now = 0
    budget = MirrorBudget(share=0.25, instances=1, max_queue=1000, now_ns=now)
    assert budget.capacity_ns == pytest.approx(0.25 * BURST_S * 1e9)
    # Mirrors go while the bucket holds anything; each 10 ms batch is paid when it returns.
    admitted = 0
    while not budget.admit(now):
        admitted += 1
        budget.finished(_times(now, 10 * MS), now)
    assert admitted == -(-budget.capacity_ns // (10 * MS))
    assert budget.admit(now) == "budget"
    # A 0.25 share refills 10 ms of compute in 40 ms of wall time.
    deficit = -budget.tokens_ns
    now += int(deficit / 0.25) + 1
    assert budget.admit(now) == ""


def test_the_queue_bound_drops_mirrors_before_the_time_share_does():
    budget = MirrorBudget(share=1.0, instances=1, max_queue=2, now_ns=0)
    assert [budget.admit(0), budget.admit(0), budget.admit(0)] == ["", "", "queue"]
    budget.finished(None, 0)
    assert budget.admit(0) == ""


def test_a_batch_is_charged_once_however_many_mirrors_rode_in_it():
    budget = MirrorBudget(share=0.5, instances=2, max_queue=10, now_ns=0)
    batch = _times(0, 100 * MS)
    for _ in range(3):
        assert budget.admit(0) == ""
    for _ in range(3):
        budget.finished(batch, 0)
    assert budget.tokens_ns == pytest.approx(budget.capacity_ns - 100 * MS)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 80)), max_size=60), st.integers(1, 8))
def test_the_budget_never_holds_more_than_its_queue_bound(events, bound):
    budget = MirrorBudget(share=0.3, instances=2, max_queue=bound, now_ns=0)
    now = 0
    out = 0
    for advance_ms, compute_ms in events:
        now += advance_ms * MS
        if not budget.admit(now):
            out += 1
        if out and compute_ms % 3 == 0:
            out -= 1
            budget.finished(_times(now, compute_ms * MS), now)
        assert 0 <= budget.in_flight == out <= bound
        assert budget.tokens_ns <= budget.capacity_ns


# --- the gate -------------------------------------------------------------------------------------
def _stats(stable_ms, candidate_ms, pairs=0, agreeing=0, errors=0, shadow=True):
    stats = StepStats()
    for value in stable_ms:
        stats.stable_served.success(int(value * MS))
    window = stats.candidate_mirrored if shadow else stats.candidate_served
    for value in candidate_ms:
        window.success(int(value * MS))
    for _ in range(errors):
        window.failure()
    stats.pairs.pairs, stats.pairs.agree = pairs, agreeing
    return stats


SPEC = parse_spec(
    {
        "stable": 1,
        "candidate": 2,
        "steps": ["shadow", 10, 100],
        "bake_seconds": 5,
        "guards": {"min_samples": 50},
    }
)


def test_a_step_bakes_then_advances_when_every_guard_holds():
    stats = _stats([2.0] * 100, [2.1] * 100, pairs=100, agreeing=100)
    assert decide(SPEC, 0, 1.0, stats).action == "bake"
    decision = decide(SPEC, 0, 5.0, stats)
    assert decision.action == "advance" and "next 10%" in decision.reason


def test_disagreement_rolls_back_at_once_even_while_baking():
    stats = _stats([2.0] * 100, [2.0] * 100, pairs=100, agreeing=90)
    decision = decide(SPEC, 0, 0.5, stats)
    assert decision.action == "rollback" and "agreement" in decision.reason


def test_a_slower_candidate_rolls_back_on_the_latency_guard():
    stats = _stats([2.0] * 100, [30.0] * 100, pairs=100, agreeing=100)
    decision = decide(SPEC, 0, 0.5, stats)
    assert decision.action == "rollback" and decision.reason.startswith("guard broken: latency")


def test_latency_within_the_slack_is_noise_not_a_breach():
    stats = _stats([0.2] * 100, [0.2 + P99_SLACK_MS * 0.9] * 100, pairs=100, agreeing=100)
    assert decide(SPEC, 0, 5.0, stats).action == "advance"


def test_more_errors_than_allowed_roll_back_and_a_few_more_wait_for_evidence():
    stats = _stats([2.0] * 100, [2.0] * 80, pairs=100, agreeing=100, errors=20)
    decision = decide(SPEC, 0, 0.5, stats)
    assert decision.action == "rollback" and "error_rate" in decision.reason
    stats = _stats([2.0] * 100, [2.0] * 97, pairs=100, agreeing=100, errors=3)
    assert decide(SPEC, 0, 10.0, stats).action == "wait"


def test_too_few_samples_wait_and_decide_nothing():
    stats = _stats([2.0] * 100, [30.0] * 10, pairs=10, agreeing=0)
    decision = decide(SPEC, 0, 100.0, stats)
    assert decision.action == "wait" and "agreement 10/50" in decision.reason


def test_the_last_step_promotes_and_without_auto_promote_waits_for_the_operator():
    stats = _stats([], [2.0] * 100, pairs=100, agreeing=100, shadow=False)
    for value in [2.0] * 100:  # at 100% stable serves nobody: its mirrored copies count
        stats.stable_mirrored.success(int(value * MS))
    assert decide(SPEC, 2, 5.0, stats).action == "promote"
    manual = parse_spec(SPEC.document | {"auto_promote": False})
    assert decide(manual, 2, 5.0, stats).action == "ready"


def test_ab_names_the_faster_arm_the_winner_or_keeps_collecting():
    spec = parse_spec(
        {
            "stable": 1,
            "candidate": 2,
            "mode": "ab",
            "steps": [50],
            "bake_seconds": 5,
            "guards": {"min_samples": 50, "max_p99_ratio": None},
        }
    )
    rng = np.random.default_rng(1)
    faster = _stats(rng.normal(10, 1, 300), rng.normal(8, 1, 300), shadow=False)
    decision = decide(spec, 0, 5.0, faster)
    assert decision.action == "promote" and decision.test["winner"] == "candidate"
    slower = _stats(rng.normal(8, 1, 300), rng.normal(10, 1, 300), shadow=False)
    decision = decide(spec, 0, 5.0, slower)
    assert decision.action == "rollback" and decision.test["winner"] == "stable"
    alike = _stats(rng.normal(10, 1, 300), rng.normal(10, 1, 300), shadow=False)
    assert decide(spec, 0, 5.0, alike).action in ("wait", "promote", "rollback")
    tie = _stats([10.0] * 300, [10.0] * 300, shadow=False)
    assert decide(spec, 0, 5.0, tie).action == "wait"
    decision = decide(spec, 0, 50.0, tie)  # ten bake times: on_tie (stable) wins
    assert decision.action == "rollback" and "no significant difference" in decision.reason


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3000), st.integers(1, 3000), st.floats(0.0005, 0.5))
def test_binomial_tail_matches_scipy(k, n, p):
    scipy_stats = pytest.importorskip("scipy.stats")
    k = min(k, n + 1)
    expected = scipy_stats.binom.sf(k - 1, n, p)
    # Exact where the counts are small; the normal approximation elsewhere is within 0.01.
    assert binomial_tail(k, n, p) == pytest.approx(expected, abs=0.01)


def test_a_p99_over_the_limit_by_a_few_stalls_waits_for_evidence_instead_of_rolling_back():
    # 3 stalls in 200 candidate requests: its p99 is over the limit, but 1.5% over is chance.
    candidate = [2.0] * 197 + [50.0] * 3
    stats = _stats([2.0] * 200, candidate, pairs=200, agreeing=200)
    decision = decide(SPEC, 0, 10.0, stats)
    assert decision.action == "wait" and "latency out of limit, not yet significant" in decision.reason
    # 10 in 200 (5%) is beyond chance: rolled back.
    stats = _stats([2.0] * 200, [2.0] * 190 + [50.0] * 10, pairs=200, agreeing=200)
    assert decide(SPEC, 0, 10.0, stats).action == "rollback"


def test_one_disagreeing_pair_in_a_hundred_is_not_yet_evidence_against_99_percent():
    stats = _stats([2.0] * 100, [2.0] * 100, pairs=100, agreeing=98)
    assert decide(SPEC, 0, 10.0, stats).action == "wait"
    stats = _stats([2.0] * 100, [2.0] * 100, pairs=100, agreeing=94)
    assert decide(SPEC, 0, 0.5, stats).action == "rollback"


# --- the split -------------------------------------------------------------------------------------
def _rollout(steps) -> Rollout:
    spec = parse_spec({"stable": 1, "candidate": 2, "steps": steps})
    return Rollout("m", spec, {}, {}, True, lambda version: None, lambda rollout: None)


def _caller(principal=None, split_key=None) -> Request:
    return Request("r", {}, (), 1, None, principal=principal, split_key=split_key)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40, unique=True))
def test_a_caller_only_ever_moves_from_stable_to_the_candidate_as_its_share_grows(keys):
    rollout = _rollout([10, 50, 90])
    arms = []
    for index in range(3):
        rollout.step_index = index
        rollout._set_weight()
        arms.append({key for key in keys if rollout._in_candidate_arm(_caller(principal=key))})
        # The same caller, the same arm, however often it asks.
        assert arms[-1] == {key for key in keys if rollout._in_candidate_arm(_caller(principal=key))}
    assert arms[0] <= arms[1] <= arms[2]


def test_the_split_header_decides_before_the_api_key_and_callers_with_neither_split_by_count():
    rollout = _rollout([50])
    by_header = {rollout._in_candidate_arm(_caller("key", f"user-{n}")) for n in range(64)}
    assert by_header == {True, False}  # the header's values spread callers of one key
    assert len({rollout._in_candidate_arm(_caller("key")) for _ in range(20)}) == 1
    keyless = [rollout._in_candidate_arm(_caller()) for _ in range(100)]
    assert sum(keyless) == 50


def test_callers_split_in_proportion_to_the_weight():
    points = [split_point("m:1:2", f"user-{n}") for n in range(20_000)]
    for weight in (0.01, 0.1, 0.5):
        share = sum(p < weight for p in points) / len(points)
        assert abs(share - weight) < 0.01
    # Another roll-out of the model reshuffles who goes first.
    other = [split_point("m:2:3", f"user-{n}") for n in range(200)]
    assert other != points[:200]
