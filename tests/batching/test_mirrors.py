"""A roll-out's mirrored requests (Request.mirror) in the scheduler: they run behind every
priority level, take no level's queue room, and are answered like any request; showback counts
them apart. Real asyncio and real runtime threads (scheduler_fakes)."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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

from convoy.batching.usage import UsageMeter
from convoy.config import DynamicBatching, QueuePolicy
from convoy.errors import Overloaded


def _mirror(tag: int):
    request = make_request(tag)
    request.mirror = True
    return request


def test_mirrors_wait_behind_every_priority_level():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        batching = DynamicBatching(priority_levels=3, default_priority_level=2)
        config = model_config(8, batching)
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            mirrors = [_mirror(tag) for tag in (1, 2)]
            for request in mirrors:
                scheduler.submit(request)
            lowest = make_request(3, priority=3)
            highest = make_request(4, priority=1)
            scheduler.submit(lowest)
            scheduler.submit(highest)
            gate.open()
            for request in [blocker, *mirrors, lowest, highest]:
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[0], [4, 3, 1, 2]]

    asyncio.run(scenario())


def test_a_batch_fills_with_clients_first_and_mirrors_only_in_the_room_left():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        config = model_config(3, DynamicBatching())
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            queued = [_mirror(1), _mirror(2), make_request(3), make_request(4), _mirror(5)]
            for request in queued:
                scheduler.submit(request)
            gate.open()
            for request in [blocker, *queued]:
                assert_served_correctly(request, await outcome(request))
        assert [b.request_tags for b in log.snapshot()] == [[0], [3, 4, 1], [2, 5]]

    asyncio.run(scenario())


def test_mirrors_take_no_room_from_a_full_level():
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        config = model_config(8, DynamicBatching(default_queue_policy=QueuePolicy(max_queue_size=2)))
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            mirrors = [_mirror(tag) for tag in range(10, 15)]
            for request in mirrors:
                scheduler.submit(request)  # past the level's bound: mirrors are not counted
            clients = [make_request(1), make_request(2)]
            for request in clients:
                scheduler.submit(request)
            refused = make_request(3)
            try:
                scheduler.submit(refused)
                raise AssertionError("a third client request fit a level of two")
            except Overloaded:
                pass
            assert scheduler.queue_depths == (2,)
            gate.open()
            for request in [blocker, *mirrors, *clients]:
                assert_served_correctly(request, await outcome(request))

    asyncio.run(scenario())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.booleans(), min_size=1, max_size=24), max_batch=st.integers(1, 6))
def test_every_request_mirrored_or_not_gets_its_own_answer_and_clients_go_first(kinds, max_batch):
    async def scenario():
        log = BatchLog()
        gate = Gate(0)
        config = model_config(max_batch, DynamicBatching())
        async with serve(config, [SlowRuntime("i0", log, gate)], gates=[gate]) as scheduler:
            blocker = make_request(0)
            scheduler.submit(blocker)
            await gate.wait_entered()
            requests = []
            for tag, mirrored in enumerate(kinds, start=1):
                request = _mirror(tag) if mirrored else make_request(tag)
                requests.append(request)
                scheduler.submit(request)
            gate.open()
            for request in [blocker, *requests]:
                assert_served_correctly(request, await outcome(request))
        order = [tag for batch in log.snapshot()[1:] for tag in batch.request_tags]
        clients = [tag for tag, mirrored in enumerate(kinds, start=1) if not mirrored]
        mirrored = [tag for tag, mirrored in enumerate(kinds, start=1) if mirrored]
        # Everything queued while the instance was busy: every client before any mirror.
        assert order == clients + mirrored

    asyncio.run(scenario())


def test_showback_counts_mirrors_apart_under_the_callers_key():
    async def scenario():
        log = BatchLog()
        usage = UsageMeter()
        config = model_config(8, DynamicBatching())
        async with serve(config, [SlowRuntime("i0", log)], usage=usage) as scheduler:
            client = make_request(1)
            client.principal = "team-a"
            mirror = _mirror(2)
            mirror.principal = "team-a"
            scheduler.submit(client)
            assert_served_correctly(client, await outcome(client))
            scheduler.submit(mirror)
            assert_served_correctly(mirror, await outcome(mirror))
        served = usage.snapshot()[("team-a", "fake", "1")]
        shadow = usage.snapshot(shadow=True)[("team-a", "fake", "1")]
        assert (served.requests, shadow.requests) == (1, 1)
        assert shadow.compute_ns > 0

    asyncio.run(scenario())
