"""Showback in the scheduler: each caller is charged its requests, rows, queue time and its
rows' share of every batch it rode in; requests without a principal are not metered."""

from __future__ import annotations

import asyncio

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

from convoy.batching.stats import ModelStats
from convoy.batching.usage import UsageMeter
from convoy.config import DynamicBatching
from convoy.errors import Overloaded

WORK_S = 0.03


def test_two_keys_sharing_a_batch_split_its_compute_time_by_rows():
    async def scenario():
        gate = Gate(0)
        meter = UsageMeter()
        stats = ModelStats()
        log = BatchLog()
        config = model_config(8, DynamicBatching(max_queue_delay_us=100_000))
        runtime = SlowRuntime("i0", log, gate, work_s=WORK_S)
        async with serve(config, [runtime], gates=[gate], stats=stats, usage=meter) as scheduler:
            blocker = make_request(0)  # anonymous: never metered
            scheduler.submit(blocker)
            await gate.wait_entered()
            alice = make_request(1, rows=1)
            alice.principal = "alice"
            bob = make_request(2, rows=3)
            bob.principal = "bob"
            scheduler.submit(alice)
            scheduler.submit(bob)
            gate.open()
            for request in (blocker, alice, bob):
                assert_served_correctly(request, await outcome(request))
        # alice and bob rode in the same batch of 4 rows.
        assert [b.request_tags for b in log.snapshot()] == [[0], [1, 2]]
        usage = meter.snapshot()
        assert set(usage) == {("alice", "fake", "1"), ("bob", "fake", "1")}
        a, b = usage[("alice", "fake", "1")], usage[("bob", "fake", "1")]
        assert (a.requests, a.rows, b.requests, b.rows) == (1, 1, 1, 3)
        assert a.failures == b.failures == a.rejections == b.rejections == 0
        # The shared batch's compute split 1:3 (integer ns), and at least the work it did.
        assert a.compute_ns >= WORK_S * 1e9 / 4
        assert abs(b.compute_ns - 3 * a.compute_ns) <= 3
        # Both waited behind the blocker for about the same time.
        assert a.queue_ns > 0 and b.queue_ns > 0

    asyncio.run(scenario())


def test_rejections_and_failures_are_charged_to_their_key():
    async def scenario():
        gate = Gate(0)
        meter = UsageMeter()
        config = model_config(8, DynamicBatching())
        runtime = SlowRuntime("i0", BatchLog(), gate)
        async with serve(config, [runtime], gates=[gate], max_queue_size=1, usage=meter) as scheduler:
            scheduler.submit(make_request(0))
            await gate.wait_entered()
            queued = make_request(1)
            queued.principal = "carol"
            scheduler.submit(queued)
            turned_away = make_request(2)
            turned_away.principal = "carol"
            try:
                scheduler.submit(turned_away)
            except Overloaded:
                pass
            else:
                raise AssertionError("the 1-deep queue should have been full")
            gate.open()
            assert_served_correctly(queued, await outcome(queued))
        carol = meter.snapshot()[("carol", "fake", "1")]
        assert (carol.requests, carol.rows, carol.rejections) == (2, 1, 1)

    asyncio.run(scenario())
