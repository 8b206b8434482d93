"""Admission under noisy cost estimates: a wrong estimate never refuses requests while capacity
is free, and one slow batch cannot take the estimate over.

The scheduler tests run real `Scheduler`s over fake runtimes (tests/batching/scheduler_fakes.py)
whose batches cost what each test scripts; the estimate's own rules are tested on
`CostEstimate` directly.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from scheduler_fakes import (
    BatchLog,
    Gate,
    SlowRuntime,
    assert_served_correctly,
    make_request,
    model_config,
    outcome,
    serve,
)

from convoy.batching.admission import ESTIMATE_AFTER_BATCHES, MAX_RISE, CostEstimate
from convoy.batching.slo import PLAN_AFTER_BATCHES
from convoy.config import DynamicBatching, ModelConfig, QueuePolicy, TimeoutAction

MS = 1_000_000


class ScriptedRuntime(SlowRuntime):
    """Each batch costs the next of `costs_s` (slept on its thread after its gates), then 0."""

    def __init__(self, name: str, costs_s: list[float], *gates: Gate) -> None:
        super().__init__(name, BatchLog(), *gates)
        self.costs_s = list(costs_s)

    def work(self, tags: tuple[int, ...]) -> None:
        super().work(tags)
        if self.costs_s:
            time.sleep(self.costs_s.pop(0))


def rejecting_config(max_batch_size: int = 2) -> ModelConfig:
    policy = QueuePolicy(timeout_action=TimeoutAction.REJECT, allow_timeout_override=True)
    return model_config(max_batch_size, DynamicBatching(default_queue_policy=policy))


async def warm_up(scheduler, batches: int) -> None:
    for tag in range(100, 100 + batches):
        warm = make_request(tag)
        scheduler.submit(warm)
        assert_served_correctly(warm, await outcome(warm))


# --- the estimate ---------------------------------------------------------------------------


def test_a_slow_first_batch_does_not_set_the_estimate():
    estimate = CostEstimate()
    for cost in (400 * MS, 1 * MS, 1 * MS):
        estimate.observe(cost)
    assert estimate.trusted
    assert estimate.ns == 1 * MS


def test_the_estimate_is_not_trusted_before_enough_batches():
    estimate = CostEstimate()
    for _ in range(ESTIMATE_AFTER_BATCHES - 1):
        estimate.observe(5 * MS)
        assert not estimate.trusted
    assert estimate.ns == 5 * MS  # still reported (Retry-After), just never refused on


def test_one_slow_batch_raises_the_estimate_by_a_bounded_amount():
    estimate = CostEstimate()
    for _ in range(ESTIMATE_AFTER_BATCHES):
        estimate.observe(10 * MS)
    estimate.observe(10_000 * MS)  # a stall
    assert 10 * MS < estimate.ns <= 10 * MS * MAX_RISE
    assert estimate.ns <= 12 * MS


def test_a_sustained_slowdown_is_followed_and_a_speedup_at_once():
    estimate = CostEstimate()
    for _ in range(ESTIMATE_AFTER_BATCHES):
        estimate.observe(10 * MS)
    for _ in range(60):
        estimate.observe(40 * MS)
    assert estimate.ns == pytest.approx(40 * MS, rel=0.05)
    for _ in range(60):
        estimate.observe(5 * MS)
    assert estimate.ns == pytest.approx(5 * MS, rel=0.05)


# --- the scheduler --------------------------------------------------------------------------


def test_slow_first_batches_do_not_refuse_requests_with_ample_deadlines():
    async def scenario():
        gate = Gate(0)
        # The first batch is slow (warming up, a loaded host), the rest cost next to nothing.
        runtime = ScriptedRuntime("i0", [0.6], gate)
        async with serve(rejecting_config(1), [runtime], gates=[gate]) as scheduler:
            await warm_up(scheduler, ESTIMATE_AFTER_BATCHES)
            scheduler.submit(make_request(0))
            await gate.wait_entered()
            ahead = [make_request(tag, timeout_us=30_000_000) for tag in (1, 2)]
            for request in ahead:
                scheduler.submit(request)
            # Three one-row batches of ~0 ms until its own completes: 800 ms is ample (an
            # estimate the slow batch had set would count over 1.3 s).
            hurried = make_request(7, deadline=time.monotonic() + 0.8)
            scheduler.submit(hurried)
            gate.open()
            for request in [*ahead, hurried]:
                assert_served_correctly(request, await outcome(request))

    asyncio.run(scenario())


def test_queue_timeout_counts_the_work_queued_ahead_not_the_batch_in_flight():
    async def scenario():
        gate = Gate(0)
        # Measured batches of 250 ms; the one held at the gate then returns at once.
        runtime = ScriptedRuntime("i0", [0.25] * ESTIMATE_AFTER_BATCHES, gate)
        async with serve(rejecting_config(), [runtime], gates=[gate]) as scheduler:
            await warm_up(scheduler, ESTIMATE_AFTER_BATCHES)
            scheduler.submit(make_request(0))
            await gate.wait_entered()
            # Nothing is queued ahead of it: its 150 ms queue timeout (shorter than one measured
            # batch) is for its actual wait to judge, which ends when the instance frees.
            waiting = make_request(1, timeout_us=150_000)
            scheduler.submit(waiting)
            gate.open()
            assert_served_correctly(waiting, await outcome(waiting))

    asyncio.run(scenario())


def test_idle_capacity_admits_requests_a_latency_objective_estimate_would_refuse():
    async def scenario():
        base = rejecting_config(4)
        config = ModelConfig(
            name=base.name,
            backend=base.backend,
            max_batch_size=base.max_batch_size,
            inputs=base.inputs,
            outputs=base.outputs,
            dynamic_batching=base.dynamic_batching,
            latency_slo_ms=40.0,
        )
        # The batches the planner learns from cost 60 ms (a loaded host); later ones ~0.
        runtime = ScriptedRuntime("i0", [0.06] * PLAN_AFTER_BATCHES)
        async with serve(config, [runtime]) as scheduler:
            await warm_up(scheduler, PLAN_AFTER_BATCHES)
            # An idle instance and an empty queue: it goes at once, so it is not refused on
            # the estimate, and the batches it runs correct the estimate.
            for tag in range(1, 6):
                request = make_request(tag)
                scheduler.submit(request)
                assert_served_correctly(request, await outcome(request))

    asyncio.run(scenario())
