"""The scheduler's contract, on a real event loop over fake runtimes on real instance threads.

Every test runs its own loop with `asyncio.run`; waits have a generous deadline as a safety net
and nothing asserts on elapsed time. Control over "busy" comes from gates (a runtime thread
blocked inside `infer` until the test opens it), never from sleeping the test.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_fakes import (
    PATIENCE_S,
    BatchLog,
    EchoRuntime,
    FailingRuntime,
    Gate,
    PerRequestRuntime,
    SlowRuntime,
    assert_served_correctly,
    make_request,
    model_config,
    outcome,
    serve,
    tag_of,
    wait_until,
)

from convoy.batching.stats import ModelStats
from convoy.config import DynamicBatching, QueuePolicy, TimeoutAction
from convoy.errors import (
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InferenceFailed,
    Overloaded,
    Unavailable,
)
from convoy.types import RequestState, Response

# --- property: every request gets exactly one outcome, its own -----------------------------------

CANCEL_HOW = ("scheduler", "future", "both")


@dataclass(frozen=True)
class Arrival:
    gap_us: int
    rows: int
    length: int
    priority: int
    timeout_us: int
    cancel: str | None
    cancel_after_us: int
    marked: bool


@dataclass(frozen=True)
class Scenario:
    max_batch_size: int
    batching: DynamicBatching | None
    instances: int
    work_s: float
    #: How long the batch holding request 1 blocks its instance: a backlog builds behind it.
    hold_us: int
    server_queue_size: int
    #: Close with no grace right after the last arrival instead of waiting for the outcomes.
    close_early: bool
    arrivals: tuple[Arrival, ...]


queue_policies = st.builds(
    QueuePolicy,
    timeout_action=st.sampled_from(TimeoutAction),
    default_timeout_us=st.sampled_from([0, 0, 300, 3000]),
    allow_timeout_override=st.booleans(),
    max_queue_size=st.sampled_from([0, 0, 2, 5]),
)


@st.composite
def scenarios(draw) -> Scenario:
    max_batch_size = draw(st.integers(1, 6))
    levels = 0
    batching = None
    max_rows = max_batch_size
    close_early = draw(st.integers(0, 3)) == 0
    if draw(st.integers(0, 4)):  # mostly dynamic batching, sometimes none
        levels = draw(st.integers(0, 3))
        preferred = draw(st.sets(st.integers(1, max_batch_size), max_size=2))
        batching = DynamicBatching(
            max_queue_delay_us=draw(st.sampled_from([0, 100, 1000, 5000])),
            preferred_batch_sizes=tuple(sorted(preferred)),
            priority_levels=levels,
            default_priority_level=draw(st.integers(1, levels)) if levels else 0,
            default_queue_policy=draw(queue_policies),
            priority_queue_policy=draw(
                st.dictionaries(st.integers(1, max(levels, 1)), queue_policies, max_size=levels)
            ),
            preserve_ordering=draw(st.booleans()),
            latency_first=draw(st.booleans()),
        )
    arrival = st.builds(
        Arrival,
        gap_us=st.sampled_from([0, 0, 100, 500, 2000]),
        rows=st.integers(1, max_rows),
        length=st.integers(1, 3),  # dims [-1]: requests of different lengths never share a batch
        priority=st.integers(0, max(levels, 1)),
        timeout_us=st.sampled_from([0, 0, 0, 200, 1000, 5000]),
        cancel=st.sampled_from([None, None, None, *CANCEL_HOW]),
        cancel_after_us=st.sampled_from([0, 300, 1500, 3000]),
        marked=st.integers(0, 9).map(lambda n: n == 0),
    )
    return Scenario(
        max_batch_size=max_batch_size,
        batching=batching,
        instances=draw(st.integers(1, 3)),
        work_s=draw(st.sampled_from([0.0, 0.0005, 0.002])),
        hold_us=draw(st.sampled_from([0, 2000, 10_000])),
        server_queue_size=draw(st.sampled_from([3, 64])),
        close_early=close_early,
        arrivals=tuple(draw(st.lists(arrival, min_size=1, max_size=20))),
    )


def _policy(scenario: Scenario, level: int) -> QueuePolicy:
    batching = scenario.batching
    if batching is None:
        return QueuePolicy()
    return batching.priority_queue_policy.get(level, batching.default_queue_policy)


def _level(scenario: Scenario, arrival: Arrival) -> int:
    batching = scenario.batching
    if arrival.priority:
        return arrival.priority
    return batching.default_priority_level if batching and batching.priority_levels else 1


def _may_delay(scenario: Scenario) -> bool:
    """Some level's timeout_action is DELAY (timed-out requests then go behind the others)."""
    levels = scenario.batching.priority_levels if scenario.batching else 0
    return any(
        _policy(scenario, level).timeout_action is TimeoutAction.DELAY
        for level in range(1, max(levels, 1) + 1)
    )


async def _run_scenario(scenario: Scenario, per_request: bool = False) -> None:
    config = model_config(scenario.max_batch_size, scenario.batching)
    marked = {tag for tag, a in enumerate(scenario.arrivals, start=1) if a.marked}
    log = BatchLog()
    stats = ModelStats()
    gate = Gate(1)
    runtime_class = PerRequestRuntime if per_request else FailingRuntime
    runtimes = [
        runtime_class(f"i{index}", log, marked, gate, work_s=scenario.work_s)
        for index in range(scenario.instances)
    ]
    loop = asyncio.get_running_loop()
    submitted: dict[int, object] = {}
    rejected: dict[int, ConvoyError] = {}
    #: Tags whose request was cancelled while still queued: they must never reach a runtime.
    left_queue: set[int] = set()
    future_cancelled: set[int] = set()
    timers = []

    async with serve(
        config, runtimes, gates=[gate], max_queue_size=scenario.server_queue_size, stats=stats
    ) as scheduler:
        timers.append(loop.call_later(scenario.hold_us / 1e6, gate.open))

        def cancel(tag: int, request, how: str) -> None:
            if request.state is RequestState.QUEUED:
                left_queue.add(tag)
            if how in ("future", "both") and request.future.cancel():
                future_cancelled.add(tag)
            if how in ("scheduler", "both"):
                scheduler.cancel(request)

        for tag, arrival in enumerate(scenario.arrivals, start=1):
            if arrival.gap_us:
                await asyncio.sleep(arrival.gap_us / 1e6)
            request = make_request(
                tag,
                arrival.rows,
                arrival.length,
                priority=arrival.priority,
                timeout_us=arrival.timeout_us,
            )
            try:
                scheduler.submit(request)
            except ConvoyError as exc:
                rejected[tag] = exc
                continue
            submitted[tag] = request
            if arrival.cancel:
                timers.append(
                    loop.call_later(arrival.cancel_after_us / 1e6, cancel, tag, request, arrival.cancel)
                )
        if scenario.close_early:
            await scheduler.close(grace=0)
            unanswered = sorted(tag for tag, r in submitted.items() if not r.future.done())
            assert not unanswered, f"close() returned leaving requests unanswered: {unanswered}"
        else:
            futures = [request.future for request in submitted.values()]
            if futures:
                _, pending = await asyncio.wait(futures, timeout=PATIENCE_S)
                unanswered = sorted(tag_of(r) for r in submitted.values() if r.future in pending)
                assert not unanswered, f"requests never answered: {unanswered}"
            # Nothing left behind: no queued entry, no executing row (an entry whose future alone
            # was cancelled is only dropped when the dispatcher next reaches it, so not then).
            if not any(a.cancel == "future" for a in scenario.arrivals):
                await wait_until(lambda: scheduler.in_flight == 0)
        for timer in timers:
            timer.cancel()

    batches = log.snapshot()
    seen = log.tags_seen()
    # Each request reaches the runtime at most once, whole and contiguous; batches respect
    # max_batch_size and (without dynamic batching) hold a single request.
    runs: dict[int, int] = {}
    for batch in batches:
        assert batch.shape[0] <= scenario.max_batch_size, batch
        tags = batch.request_tags
        if scenario.batching is None:
            assert len(tags) == 1, batch
        for tag in tags:
            runs[tag] = runs.get(tag, 0) + 1
            assert batch.tags.count(tag) == scenario.arrivals[tag - 1].rows, batch
        # Within a batch: higher priority first, then arrival order (unless DELAY reorders).
        if not _may_delay(scenario):
            order = [(_level(scenario, scenario.arrivals[t - 1]), t) for t in tags]
            assert order == sorted(order), batch
    assert all(count == 1 for count in runs.values()), runs

    successes = 0
    for tag, request in submitted.items():
        arrival = scenario.arrivals[tag - 1]
        future = request.future
        assert future.done()
        if future.cancelled():
            assert tag in future_cancelled
            continue
        error = future.exception()
        if error is None:
            assert tag not in left_queue, f"request {tag} served after it was cancelled"
            assert_served_correctly(request, future.result())
            if per_request:  # a marked request fails alone
                assert tag not in marked, f"marked request {tag} was served"
            else:
                batch_mates = {t for batch in batches if tag in batch.tags for t in batch.tags}
                assert not marked.intersection(batch_mates), f"request {tag} rode a failed batch"
            successes += 1
        elif isinstance(error, InferenceFailed):
            assert "'fake'" in str(error)
            holding = [batch for batch in batches if tag in batch.tags]
            assert len(holding) == 1, f"request {tag} failed without reaching a runtime: {error}"
            assert marked.intersection(holding[0].tags), f"request {tag} failed: {error}"
            if per_request:
                assert tag in marked, f"request {tag} failed with a marked batch mate: {error}"
        elif isinstance(error, DeadlineExceeded):
            policy = _policy(scenario, _level(scenario, arrival))
            assert policy.timeout_action is TimeoutAction.REJECT
            assert policy.default_timeout_us or (arrival.timeout_us and policy.allow_timeout_override), (
                f"request {tag} timed out without a timeout"
            )
            assert tag not in seen, f"request {tag} reached the runtime after timing out"
        elif isinstance(error, Cancelled):
            assert arrival.cancel in ("scheduler", "both")
            assert tag in left_queue
        elif isinstance(error, Unavailable):
            assert scenario.close_early, f"request {tag}: {error!r} without a shutdown"
            assert "'fake' is shutting down" in str(error)
        else:
            raise AssertionError(f"request {tag}: unexpected outcome {error!r}")
    for tag in left_queue:
        assert tag not in seen, f"request {tag} reached the runtime after it left the queue"
    for tag, error in rejected.items():
        assert isinstance(error, Overloaded), f"request {tag} refused with {error!r}"
    assert stats.success.count == successes
    assert stats.failures_by_reason.get("REJECTED", 0) >= len(rejected)


# A dispatcher that spins blocks the loop, which no in-test deadline can interrupt, and hypothesis
# would rerun the hanging example while shrinking: the thread method dumps every stack and ends
# the run instead of hanging it.
@pytest.mark.timeout(120, method="thread")
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenarios())
def test_every_request_gets_exactly_one_outcome_its_own(scenario):
    asyncio.run(_run_scenario(scenario))


@pytest.mark.timeout(120, method="thread")
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenarios())
def test_per_request_runtime_answers_each_request_its_own_outcome(scenario):
    """The same invariants for a runtime that executes request by request (Triton python
    models): no merge or split, and an error fails only its own request."""
    asyncio.run(_run_scenario(scenario, per_request=True))


# --- batch shape and size ------------------------------------------------------------------


def test_batches_never_mix_shapes_or_exceed_max_batch_size():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        config = model_config(4, DynamicBatching(max_queue_delay_us=100_000))
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            shapes = [(1, 2), (2, 3), (3, 2), (1, 3), (2, 2), (3, 3), (1, 1)]
            requests = [
                make_request(tag, rows, length) for tag, (rows, length) in enumerate(shapes, start=1)
            ]
            for request in requests:
                scheduler.submit(request)
            gate.open()
            for request in [blocker, *requests]:
                assert_served_correctly(request, await outcome(request))
        for batch in log.snapshot():
            assert batch.shape[0] <= 4
            lengths = {shapes[t - 1][1] for t in batch.request_tags if t}
            assert len(lengths) <= 1, batch

    asyncio.run(scenario())


def test_without_dynamic_batching_each_batch_holds_one_request():
    async def scenario():
        log = BatchLog()
        stats = ModelStats()
        config = model_config(4, dynamic_batching=None)
        runtimes = [EchoRuntime("i0", log), EchoRuntime("i1", log)]
        async with serve(config, runtimes, stats=stats) as scheduler:
            requests = [make_request(tag, rows=1 + tag % 4) for tag in range(1, 9)]
            for request in requests:  # queued together, before the dispatcher runs
                scheduler.submit(request)
            for request in requests:
                assert_served_correctly(request, await outcome(request))
        assert sorted(len(b.request_tags) for b in log.snapshot()) == [1] * 8
        assert stats.dispatch_reasons == {"unbatched": 8}

    asyncio.run(scenario())


# --- cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", CANCEL_HOW)
def test_request_cancelled_while_queued_never_reaches_the_runtime(how):
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        stats = ModelStats()
        config = model_config(4, DynamicBatching())
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate], stats=stats) as scheduler:
            blocker, doomed, kept = make_request(0), make_request(1), make_request(2)
            scheduler.submit(blocker)
            await gate.wait_entered()
            scheduler.submit(doomed)
            scheduler.submit(kept)
            if how in ("future", "both"):
                doomed.future.cancel()
            if how in ("scheduler", "both"):
                scheduler.cancel(doomed)
            gate.open()
            assert_served_correctly(kept, await outcome(kept))
            if how == "scheduler":
                assert isinstance(await outcome(doomed), Cancelled)
                assert stats.failures_by_reason["CANCELED"] == 1
            else:
                assert doomed.future.cancelled()
        assert 1 not in log.tags_seen()
        assert [b.request_tags for b in log.snapshot()] == [[0], [2]]

    asyncio.run(scenario())


# --- priority ------------------------------------------------------------------------------------


def test_next_batch_takes_higher_priority_requests_first():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        batching = DynamicBatching(priority_levels=2, default_priority_level=2)
        config = model_config(8, batching)
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            low = [make_request(tag, priority=2) for tag in (1, 2, 3)]
            default = make_request(4)  # no priority: the default level, 2
            high = [make_request(tag, priority=1) for tag in (5, 6)]
            for request in [*low, default, *high]:
                scheduler.submit(request)
            gate.open()
            for request in [blocker, *low, default, *high]:
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[0], [5, 6, 1, 2, 3, 4]]

    asyncio.run(scenario())


def test_priority_level_that_does_not_fit_waits_for_the_next_batch():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        batching = DynamicBatching(priority_levels=2, default_priority_level=2)
        config = model_config(2, batching)
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            requests = [make_request(1, priority=2), make_request(2, priority=2)]
            requests += [make_request(3, priority=1), make_request(4, priority=1)]
            for request in requests:
                scheduler.submit(request)
            gate.open()
            for request in requests:
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[0], [3, 4], [1, 2]]

    asyncio.run(scenario())


# --- queue bound -------------------------------------------------------------------------------


@pytest.mark.parametrize("bound_from", ["policy", "server"])
def test_full_queue_rejects_with_overloaded_at_submit(bound_from):
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        stats = ModelStats()
        policy = QueuePolicy(max_queue_size=3 if bound_from == "policy" else 0)
        config = model_config(4, DynamicBatching(default_queue_policy=policy))
        server_bound = 3 if bound_from == "server" else 1000
        async with serve(
            config,
            [SlowRuntime("i0", log, gate)],
            gates=[gate],
            stats=stats,
            max_queue_size=server_bound,
        ) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            queued = [make_request(tag) for tag in (1, 2, 3)]
            for request in queued:
                scheduler.submit(request)
            extra = make_request(4)
            with pytest.raises(Overloaded, match=r"'fake' queue is full"):
                scheduler.submit(extra)
            assert not extra.future.done()
            assert stats.failures_by_reason == {"REJECTED": 1}
            # A cancelled request frees its slot at once.
            scheduler.cancel(queued[0])
            replacement = make_request(5)
            scheduler.submit(replacement)
            gate.open()
            for request in [blocker, *queued[1:], replacement]:
                assert_served_correctly(request, await outcome(request))
        assert 4 not in log.tags_seen()

    asyncio.run(scenario())


def test_queue_bound_is_per_priority_level():
    async def scenario():
        gate = Gate(0)
        batching = DynamicBatching(
            priority_levels=2,
            default_priority_level=2,
            priority_queue_policy={1: QueuePolicy(max_queue_size=1)},
        )
        config = model_config(4, batching)
        async with serve(config, [SlowRuntime("i0", BatchLog(), gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            first = make_request(1, priority=1)
            scheduler.submit(first)
            with pytest.raises(Overloaded):
                scheduler.submit(make_request(2, priority=1))
            others = [make_request(tag, priority=2) for tag in (3, 4, 5)]
            for request in others:
                scheduler.submit(request)
            gate.open()
            for request in [blocker, first, *others]:
                assert_served_correctly(request, await outcome(request))

    asyncio.run(scenario())


def test_delayed_requests_still_count_against_max_queue_size():
    async def scenario():
        gate = Gate(0)
        policy = QueuePolicy(timeout_action=TimeoutAction.DELAY, default_timeout_us=1, max_queue_size=2)
        config = model_config(4, DynamicBatching(default_queue_policy=policy))
        async with serve(config, [SlowRuntime("i0", BatchLog(), gate)], gates=[gate]) as scheduler:
            scheduler.submit(make_request(0))
            await gate.wait_entered()
            scheduler.submit(make_request(1))
            scheduler.submit(make_request(2))
            # Their 1 µs timeouts fire on the next loop iterations: both move to the delayed queue.
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded):
                scheduler.submit(make_request(3))

    asyncio.run(scenario())


# --- timeouts -----------------------------------------------------------------------------------


def test_reject_timeout_delivers_deadline_exceeded_while_instance_is_busy():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        stats = ModelStats()
        policy = QueuePolicy(timeout_action=TimeoutAction.REJECT, allow_timeout_override=True)
        config = model_config(4, DynamicBatching(default_queue_policy=policy))
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate], stats=stats) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            timed = make_request(1, timeout_us=20_000)
            patient = make_request(2)
            scheduler.submit(timed)
            scheduler.submit(patient)
            error = await outcome(timed)
            assert not blocker.future.done()  # still executing: the timeout alone ended it
            assert isinstance(error, DeadlineExceeded)
            assert "'fake'" in str(error)
            assert stats.failures_by_reason == {"REJECTED": 1}
            gate.open()
            assert_served_correctly(patient, await outcome(patient))
        assert 1 not in log.tags_seen()

    asyncio.run(scenario())


def test_timeout_override_is_ignored_unless_the_policy_allows_it():
    async def scenario():
        gate = Gate(0)
        config = model_config(4, DynamicBatching(default_queue_policy=QueuePolicy()))
        async with serve(config, [SlowRuntime("i0", BatchLog(), gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            request = make_request(1, timeout_us=1)
            scheduler.submit(request)
            await asyncio.sleep(0.02)  # far past its 1 µs timeout, which must not apply
            assert not request.future.done()
            gate.open()
            assert_served_correctly(request, await outcome(request))

    asyncio.run(scenario())


def test_delay_timeout_serves_the_request_after_the_others():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        policy = QueuePolicy(timeout_action=TimeoutAction.DELAY, allow_timeout_override=True)
        config = model_config(1, DynamicBatching(default_queue_policy=policy))
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            delayed = make_request(1, timeout_us=1)
            scheduler.submit(delayed)
            # Its 1 µs timeout fires on the next loop iteration; only then do the others arrive.
            await asyncio.sleep(0.01)
            others = [make_request(tag) for tag in (2, 3)]
            for request in others:
                scheduler.submit(request)
            gate.open()
            for request in [blocker, delayed, *others]:
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[0], [2], [3], [1]]

    asyncio.run(scenario())


def test_client_deadline_is_enforced_even_when_the_timeout_action_is_delay():
    async def scenario():
        gate = Gate(0)
        policy = QueuePolicy(timeout_action=TimeoutAction.DELAY, default_timeout_us=1000)
        config = model_config(4, DynamicBatching(default_queue_policy=policy))
        async with serve(config, [SlowRuntime("i0", BatchLog(), gate)], gates=[gate]) as scheduler:
            scheduler.submit(make_request(0))
            await gate.wait_entered()
            request = make_request(1, deadline=time.monotonic() + 0.02)
            scheduler.submit(request)
            assert isinstance(await outcome(request, patience=1.0), DeadlineExceeded)

    asyncio.run(scenario())


# --- deadline-aware admission ------------------------------------------------------------------

#: Each fake batch sleeps this long, so the measured batch cost is at least this.
BATCH_S = 0.05


async def measured_busy_scheduler(scheduler, gate: Gate, queued: int) -> list:
    """Run three ungated batches (the cost model needs them), then hold the instance on a gated
    batch and queue `queued` one-row requests behind it (each allowed 30 s, so all are admitted)."""
    for tag in (100, 101, 102):
        warm = make_request(tag)
        scheduler.submit(warm)
        assert_served_correctly(warm, await outcome(warm))
    scheduler.submit(make_request(0))
    await gate.wait_entered()
    waiting = [make_request(tag, timeout_us=30_000_000) for tag in range(1, 1 + queued)]
    for request in waiting:
        scheduler.submit(request)
    return waiting


@pytest.mark.parametrize("how", ["timeout parameter", "client deadline", "queue policy"])
def test_request_that_cannot_meet_its_deadline_is_rejected_on_arrival(how):
    async def scenario():
        gate = Gate(0)
        stats = ModelStats()
        policy = QueuePolicy(
            timeout_action=TimeoutAction.REJECT,
            allow_timeout_override=True,
            default_timeout_us=60_000 if how == "queue policy" else 0,
        )
        config = model_config(2, DynamicBatching(default_queue_policy=policy))
        runtime = SlowRuntime("i0", BatchLog(), gate, work_s=BATCH_S)
        async with serve(config, [runtime], gates=[gate], stats=stats) as scheduler:
            # 6 rows ahead in batches of 2, plus its own: 4 batches of >= 50 ms > 60 ms.
            waiting = await measured_busy_scheduler(scheduler, gate, queued=6)
            if how == "timeout parameter":
                doomed = make_request(50, timeout_us=60_000)
            elif how == "client deadline":
                doomed = make_request(50, deadline=time.monotonic() + 0.06)
            else:
                doomed = make_request(50)
            with pytest.raises(Overloaded) as rejected:
                scheduler.submit(doomed)
            message = str(rejected.value)
            assert "'fake'" in message and "deadline" in message and "4 batches" in message
            # The client is told to come back once the work ahead has drained.
            assert rejected.value.retry_after >= 4 * BATCH_S
            assert stats.rejections == {"deadline": 1}
            assert scheduler.queued == 6
            gate.open()
            for request in waiting:
                assert_served_correctly(request, await outcome(request))

    asyncio.run(scenario())


def test_request_whose_deadline_can_be_met_is_admitted_behind_the_same_queue():
    async def scenario():
        gate = Gate(0)
        policy = QueuePolicy(timeout_action=TimeoutAction.REJECT, allow_timeout_override=True)
        config = model_config(2, DynamicBatching(default_queue_policy=policy))
        runtime = SlowRuntime("i0", BatchLog(), gate, work_s=BATCH_S)
        async with serve(config, [runtime], gates=[gate]) as scheduler:
            await measured_busy_scheduler(scheduler, gate, queued=6)
            patient = make_request(50, timeout_us=30_000_000)
            scheduler.submit(patient)
            gate.open()
            assert_served_correctly(patient, await outcome(patient))

    asyncio.run(scenario())


def test_a_request_dispatched_at_once_is_admitted_whatever_the_estimate_says():
    async def scenario():
        policy = QueuePolicy(timeout_action=TimeoutAction.REJECT, allow_timeout_override=True)
        config = model_config(2, DynamicBatching(default_queue_policy=policy))
        runtime = SlowRuntime("i0", BatchLog(), Gate(1000), work_s=BATCH_S)
        async with serve(config, [runtime]) as scheduler:
            for tag in (100, 101, 102):  # measured: each batch costs >= BATCH_S
                warm = make_request(tag)
                scheduler.submit(warm)
                assert_served_correctly(warm, await outcome(warm))
            # An idle instance and an empty queue: goes at once, so it is not refused on an
            # estimate (one batch > its 10 ms); its queue timeout still guards the wait.
            hurried = make_request(7, timeout_us=10_000)
            scheduler.submit(hurried)
            assert_served_correctly(hurried, await outcome(hurried))

    asyncio.run(scenario())


def test_higher_priority_requests_are_judged_by_the_work_ahead_of_them_only():
    async def scenario():
        gate = Gate(0)
        policy = QueuePolicy(timeout_action=TimeoutAction.REJECT, allow_timeout_override=True)
        batching = DynamicBatching(
            priority_levels=2, default_priority_level=2, default_queue_policy=policy
        )
        runtime = SlowRuntime("i0", BatchLog(), gate, work_s=BATCH_S)
        async with serve(model_config(2, batching), [runtime], gates=[gate]) as scheduler:
            await measured_busy_scheduler(scheduler, gate, queued=6)  # all at level 2
            # At level 1 nothing is ahead: one batch, well inside 1 s.
            urgent = make_request(50, priority=1, timeout_us=1_000_000)
            scheduler.submit(urgent)
            with pytest.raises(Overloaded):
                scheduler.submit(make_request(51, priority=2, timeout_us=60_000))
            gate.open()
            assert_served_correctly(urgent, await outcome(urgent))

    asyncio.run(scenario())


def test_delay_action_timeouts_and_unmeasured_models_never_reject_on_arrival():
    async def scenario():
        gate = Gate(0)
        delay = QueuePolicy(
            timeout_action=TimeoutAction.DELAY, allow_timeout_override=True, default_timeout_us=1000
        )
        config = model_config(2, DynamicBatching(default_queue_policy=delay))
        runtime = SlowRuntime("i0", BatchLog(), gate, work_s=BATCH_S)
        async with serve(config, [runtime], gates=[gate]) as scheduler:
            await measured_busy_scheduler(scheduler, gate, queued=6)
            late = make_request(50, timeout_us=1000)  # DELAY: goes to the back, still served
            scheduler.submit(late)
            gate.open()
            assert_served_correctly(late, await outcome(late))
        # A fresh scheduler has no cost estimate yet: the queue timer alone judges.
        gate = Gate(0)
        reject = QueuePolicy(timeout_action=TimeoutAction.REJECT, allow_timeout_override=True)
        config = model_config(2, DynamicBatching(default_queue_policy=reject))
        runtime = SlowRuntime("i0", BatchLog(), gate, work_s=BATCH_S)
        async with serve(config, [runtime], gates=[gate]) as scheduler:
            scheduler.submit(make_request(0))
            await gate.wait_entered()
            for tag in range(1, 7):
                scheduler.submit(make_request(tag))
            tight = make_request(50, timeout_us=20_000)
            scheduler.submit(tight)
            assert isinstance(await outcome(tight), DeadlineExceeded)

    asyncio.run(scenario())


# --- when to dispatch ----------------------------------------------------------------------


# Triton's rule (the default): a batch waits up to max_queue_delay for a preferred or the
# maximum size, even while an instance is idle. The delays are long (a minute): a test that
# finished would have waited it out only if the batcher sent too late, never too early.
HOLD_US = 60_000_000


def test_idle_instance_holds_a_lone_request_until_the_batch_fills():
    async def scenario():
        log = BatchLog()
        stats = ModelStats()
        config = model_config(2, DynamicBatching(max_queue_delay_us=HOLD_US))
        async with serve(config, [EchoRuntime("i0", log)], stats=stats) as scheduler:
            first = make_request(1)
            scheduler.submit(first)
            for _ in range(20):  # many loop turns: a latency-first batcher would have sent it
                await asyncio.sleep(0)
            assert not first.future.done() and first.state is RequestState.QUEUED
            second = make_request(2)
            scheduler.submit(second)
            for request in (first, second):
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[1, 2]]
        assert stats.dispatch_reasons == {"full": 1}

    asyncio.run(scenario())


def test_largest_reachable_preferred_size_goes_at_once_the_rest_waits():
    async def scenario():
        log = BatchLog()
        stats = ModelStats()
        config = model_config(
            8, DynamicBatching(max_queue_delay_us=HOLD_US, preferred_batch_sizes=(2, 4))
        )
        async with serve(config, [EchoRuntime("i0", log)], stats=stats) as scheduler:
            requests = [make_request(tag) for tag in range(1, 4)]
            for request in requests:  # queued together: 3 rows reach preferred size 2, not 4
                scheduler.submit(request)
            for request in requests[:2]:
                assert_served_correctly(request, await outcome(request))
            for _ in range(20):
                await asyncio.sleep(0)
            assert requests[2].state is RequestState.QUEUED  # 1 row: no preferred size yet
            last = make_request(4)
            scheduler.submit(last)
            for request in (requests[2], last):
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[1, 2], [3, 4]]
        assert stats.dispatch_reasons == {"preferred_size": 2}

    asyncio.run(scenario())


def test_preferred_size_caps_the_batch_below_max_batch_size():
    async def scenario():
        log = BatchLog()
        config = model_config(8, DynamicBatching(max_queue_delay_us=HOLD_US, preferred_batch_sizes=(3,)))
        async with serve(config, [EchoRuntime("i0", log)]) as scheduler:
            requests = [make_request(tag) for tag in range(1, 7)]
            for request in requests:
                scheduler.submit(request)
            for request in requests:
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[1, 2, 3], [4, 5, 6]]

    asyncio.run(scenario())


def test_lone_request_goes_when_the_delay_expires():
    async def scenario():
        stats = ModelStats()
        config = model_config(8, DynamicBatching(max_queue_delay_us=20_000))
        async with serve(config, [EchoRuntime("i0", BatchLog())], stats=stats) as scheduler:
            request = make_request(1)
            scheduler.submit(request)
            assert_served_correctly(request, await outcome(request))
        assert stats.dispatch_reasons == {"delay_expired": 1}

    asyncio.run(scenario())


def test_without_a_delay_whatever_is_queued_goes_at_once():
    async def scenario():
        log = BatchLog()
        stats = ModelStats()
        config = model_config(8, DynamicBatching())
        async with serve(config, [EchoRuntime("i0", log)], stats=stats) as scheduler:
            requests = [make_request(tag) for tag in range(1, 4)]
            for request in requests:
                scheduler.submit(request)
            for request in requests:
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[1, 2, 3]]
        assert stats.dispatch_reasons == {"delay_expired": 1}

    asyncio.run(scenario())


def test_freed_instance_does_not_cut_the_delay_short():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        stats = ModelStats()
        config = model_config(4, DynamicBatching(max_queue_delay_us=HOLD_US))
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate], stats=stats) as scheduler:
            blockers = [make_request(tag) for tag in range(4)]
            for request in blockers:  # a full batch goes at once and holds the instance
                scheduler.submit(request)
            await gate.wait_entered()
            queued = make_request(10)
            scheduler.submit(queued)
            gate.open()
            for request in blockers:
                assert_served_correctly(request, await outcome(request))
            for _ in range(20):
                await asyncio.sleep(0)
            assert queued.state is RequestState.QUEUED  # the instance is free, the delay is not up
            rest = [make_request(tag) for tag in range(11, 14)]
            for request in rest:
                scheduler.submit(request)
            for request in (queued, *rest):
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[0, 1, 2, 3], [10, 11, 12, 13]]
        assert stats.dispatch_reasons == {"full": 2}

    asyncio.run(scenario())


def test_latency_first_sends_a_lone_request_without_waiting_out_the_delay():
    async def scenario():
        stats = ModelStats()
        config = model_config(8, DynamicBatching(max_queue_delay_us=200_000, latency_first=True))
        async with serve(config, [EchoRuntime("i0", BatchLog())], stats=stats) as scheduler:
            request = make_request(1)
            scheduler.submit(request)
            assert_served_correctly(request, await outcome(request))
        assert stats.dispatch_reasons == {"queue_drained": 1}

    asyncio.run(scenario())


def test_latency_first_freed_instance_takes_everything_queued_in_one_batch():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        stats = ModelStats()
        config = model_config(8, DynamicBatching(max_queue_delay_us=200_000, latency_first=True))
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate], stats=stats) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            queued = [make_request(tag, rows) for tag, rows in ((1, 2), (2, 1), (3, 3))]
            for request in queued:
                scheduler.submit(request)
                await asyncio.sleep(0)  # let the dispatcher see each arrival
            gate.open()
            for request in [blocker, *queued]:
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[0], [1, 2, 3]]
        assert stats.dispatch_reasons == {"queue_drained": 1, "instance_freed": 1}
        assert sorted(stats.batch_stats) == [1, 6]
        assert stats.batch_stats[6].compute_infer.count == 1

    asyncio.run(scenario())


def test_full_batch_goes_at_once_and_the_rest_follows():
    async def scenario():
        log = BatchLog()
        stats = ModelStats()
        config = model_config(3, DynamicBatching(max_queue_delay_us=200_000))
        async with serve(config, [EchoRuntime("i0", log)], stats=stats) as scheduler:
            requests = [make_request(tag) for tag in range(1, 6)]
            for request in requests:  # all queued before the dispatcher runs
                scheduler.submit(request)
            for request in requests:
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[1, 2, 3], [4, 5]]
        assert stats.dispatch_reasons["full"] == 1

    asyncio.run(scenario())


_LARGER_THAN_PREFERRED = """
import asyncio
from scheduler_fakes import BatchLog, EchoRuntime, assert_served_correctly, make_request
from scheduler_fakes import model_config, outcome, serve
from convoy.config import DynamicBatching

async def main():
    config = model_config(4, DynamicBatching(preferred_batch_sizes=(2,)))
    async with serve(config, [EchoRuntime("i0", BatchLog())]) as scheduler:
        request = make_request(1, rows=3)
        scheduler.submit(request)
        assert_served_correctly(request, await outcome(request))

asyncio.run(main())
"""


def test_request_larger_than_the_preferred_sizes_is_still_dispatched():
    # In a child process: the bug spins the loop's own thread, which no deadline inside the
    # test can interrupt. The child needs about a second; the timeout only detects the hang.
    subprocess.run(
        [sys.executable, "-c", _LARGER_THAN_PREFERRED],
        cwd=Path(__file__).parent,
        timeout=10,
        check=True,
        capture_output=True,
    )


# --- failures -----------------------------------------------------------------------------------


def test_runtime_failure_fails_only_that_batch():
    async def scenario():
        log = BatchLog()
        stats = ModelStats()
        config = model_config(2, DynamicBatching())
        runtime = FailingRuntime("i0", log, marked={2})
        async with serve(config, [runtime], stats=stats) as scheduler:
            requests = [make_request(tag) for tag in (1, 2, 3, 4)]
            for request in requests:  # queued together: batches [1, 2] then [3, 4]
                scheduler.submit(request)
            outcomes = [await outcome(request) for request in requests]
            later = make_request(5)
            scheduler.submit(later)
            assert_served_correctly(later, await outcome(later))
        assert [b.request_tags for b in log.snapshot()] == [[1, 2], [3, 4], [5]]
        for error in outcomes[:2]:
            assert isinstance(error, InferenceFailed)
            assert "model 'fake'" in str(error)
            assert "refusing marked requests [2]" in str(error)
        for request, result in zip(requests[2:], outcomes[2:], strict=True):
            assert_served_correctly(request, result)
        assert stats.failures_by_reason == {"BACKEND": 2}
        assert stats.success.count == 3

    asyncio.run(scenario())


# --- ordering -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("preserve_ordering", "expected"), [(True, [1, 2]), (False, [2, 1])])
def test_preserve_ordering_delivers_in_submission_order(preserve_ordering, expected):
    async def scenario():
        log = BatchLog()
        gate = Gate(1)
        stats = ModelStats()
        config = model_config(4, DynamicBatching(preserve_ordering=preserve_ordering))
        runtimes = [SlowRuntime("i0", log, gate), SlowRuntime("i1", log, gate)]
        completed: list[int] = []
        async with serve(config, runtimes, gates=[gate], stats=stats) as scheduler:
            slow, fast = make_request(1), make_request(2)
            slow.future.add_done_callback(lambda _: completed.append(1))
            fast.future.add_done_callback(lambda _: completed.append(2))
            scheduler.submit(slow)
            await gate.wait_entered()
            scheduler.submit(fast)
            await wait_until(lambda: stats.execution_count == 1)  # the fast batch has finished
            if preserve_ordering:
                assert not fast.future.done()
            gate.open()
            for request in (slow, fast):
                assert_served_correctly(request, await outcome(request))
        assert completed == expected
        assert len({b.instance for b in log.snapshot()}) == 2

    asyncio.run(scenario())


def test_preserve_ordering_keeps_queue_time_non_negative():
    async def scenario():
        gate = Gate(1)
        stats = ModelStats()
        config = model_config(4, DynamicBatching(preserve_ordering=True))
        runtimes = [SlowRuntime("i0", BatchLog(), gate), SlowRuntime("i1", BatchLog(), gate)]
        async with serve(config, runtimes, gates=[gate], stats=stats) as scheduler:
            slow = make_request(1)
            scheduler.submit(slow)
            await gate.wait_entered()
            await asyncio.sleep(0.05)  # the second request arrives well after the first left
            fast = make_request(2)
            scheduler.submit(fast)
            await wait_until(lambda: stats.execution_count == 1)
            gate.open()
            for request in (slow, fast):
                assert isinstance(await outcome(request), Response)
        assert stats.queue.count == 2
        assert stats.queue.ns >= 0, f"total queue time {stats.queue.ns} ns"

    asyncio.run(scenario())


# --- shutdown -----------------------------------------------------------------------------------


def test_close_serves_queued_requests_within_grace_then_refuses_new_ones():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        config = model_config(4, DynamicBatching())
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            queued = [make_request(tag) for tag in (1, 2, 3)]
            for request in queued:
                scheduler.submit(request)
            closing = asyncio.create_task(scheduler.close(grace=PATIENCE_S))
            await asyncio.sleep(0)
            with pytest.raises(Unavailable, match="'fake' is not accepting"):
                scheduler.submit(make_request(4))
            gate.open()
            await asyncio.wait_for(closing, PATIENCE_S)
            for request in [blocker, *queued]:
                assert_served_correctly(request, await outcome(request))
            with pytest.raises(Unavailable):
                scheduler.submit(make_request(5))
        assert log.tags_seen() == {0, 1, 2, 3}

    asyncio.run(scenario())


def test_close_without_grace_fails_queued_requests_with_unavailable():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        config = model_config(4, DynamicBatching())
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            queued = [make_request(tag) for tag in (1, 2)]
            for request in queued:
                scheduler.submit(request)
            await scheduler.close(grace=0)
            for request in queued:
                error = await outcome(request)
                assert isinstance(error, Unavailable)
                assert "'fake' is shutting down" in str(error)
            with pytest.raises(Unavailable):
                scheduler.submit(make_request(3))
        assert log.tags_seen() == {0}

    asyncio.run(scenario())


def test_close_without_grace_gives_executing_requests_an_outcome():
    async def scenario():
        gate = Gate(0)
        config = model_config(4, DynamicBatching())
        async with serve(config, [SlowRuntime("i0", BatchLog(), gate)], gates=[gate]) as scheduler:
            executing = make_request(0)
            scheduler.submit(executing)
            await gate.wait_entered()
            await scheduler.close(grace=0)
            assert executing.future.done(), "close() returned leaving an executing request unanswered"
            assert isinstance(executing.future.exception(), ConvoyError)

    asyncio.run(scenario())


def test_close_answers_batches_held_for_preserve_ordering():
    async def scenario():
        gate = Gate(1)
        stats = ModelStats()
        config = model_config(4, DynamicBatching(preserve_ordering=True))
        runtimes = [SlowRuntime("i0", BatchLog(), gate), SlowRuntime("i1", BatchLog(), gate)]
        async with serve(config, runtimes, gates=[gate], stats=stats) as scheduler:
            slow, fast = make_request(1), make_request(2)
            scheduler.submit(slow)
            await gate.wait_entered()
            scheduler.submit(fast)
            await wait_until(lambda: stats.execution_count == 1)  # fast is done, held back
            await scheduler.close(grace=0)
            assert isinstance(slow.future.exception(), Unavailable)
            assert fast.future.done(), "close() returned leaving a held request unanswered"

    asyncio.run(scenario())


def test_batches_are_assembled_into_the_runtimes_own_buffers_reused_between_batches():
    """A runtime that declares batch buffers gets every batch (a lone request too) assembled
    straight into them, so the batch is copied once; reusing them never mixes answers up."""
    from scheduler_fakes import BufferedRuntime

    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        runtime = BufferedRuntime("i0", log, gate)
        config = model_config(8, DynamicBatching(max_queue_delay_us=100_000))
        async with serve(config, [runtime], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            waves = [[make_request(tag, rows=1 + tag % 3, length=2) for tag in range(1, 6)]]
            waves.append([make_request(tag, rows=2, length=2) for tag in range(6, 9)])
            for request in waves[0]:
                scheduler.submit(request)
            gate.open()
            for request in [blocker, *waves[0]]:
                assert_served_correctly(request, await outcome(request))
            for request in waves[1]:
                scheduler.submit(request)
            for request in waves[1]:
                assert_served_correctly(request, await outcome(request))
        assert runtime.assembled_into_own and all(runtime.assembled_into_own)
        assert len(runtime.buffers) == 2  # one per per-row shape, reused batch after batch
        assert len(log.snapshot()) < 1 + len(waves[0]) + len(waves[1])  # requests shared batches

    asyncio.run(scenario())
