"""The instance pool on its own: free instances, retiring, replacing a lost one, closing.

Real `RuntimeInstance`s over the echo fake; the replacement factory is a coroutine the test
controls (it can fail, or wait on an event)."""

from __future__ import annotations

import asyncio

from scheduler_fakes import BatchLog, EchoRuntime, wait_until

from convoy.batching.instances import InstancePool
from convoy.runtimes.base import RuntimeInstance


class Recorder:
    """The pool's callbacks and factory, recording what happened."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.made: list[RuntimeInstance] = []
        self.replaced: list[tuple[str, str]] = []
        self.unreplaced: list[str] = []
        self.changes = 0
        self.release = asyncio.Event()
        self.release.set()
        #: Set once the pool asked for a fresh instance (the lost one is closed by then).
        self.asked = asyncio.Event()

    async def make(self, lost: RuntimeInstance) -> RuntimeInstance:
        self.asked.set()
        await self.release.wait()
        if self.fail:
            raise RuntimeError("no capacity for a fresh instance")
        fresh = instance(f"{lost.name}-fresh")
        self.made.append(fresh)
        return fresh

    def pool(self, instances: list[RuntimeInstance]) -> InstancePool:
        return InstancePool(
            "fake",
            instances,
            self.make,
            self.changed,
            replaced=lambda lost, fresh: self.replaced.append((lost.name, fresh.name)),
            unreplaced=lambda lost: self.unreplaced.append(lost.name),
        )

    def changed(self) -> None:
        self.changes += 1


def instance(name: str) -> RuntimeInstance:
    return RuntimeInstance(EchoRuntime(name, BatchLog()), name)


async def close_all(*instances: RuntimeInstance) -> None:
    for each in instances:
        await each.close()


def test_acquired_instances_are_busy_until_released():
    async def scenario():
        a, b = instance("a"), instance("b")
        pool = Recorder().pool([a, b])
        assert (len(pool.free), pool.count, pool.available) == (2, 2, True)
        first = pool.acquire()
        second = pool.acquire()
        assert {first, second} == {a, b} and len(pool.free) == 0
        pool.release(first)
        assert len(pool.free) == 1 and pool.acquire() is first
        await pool.close()
        await close_all(a, b)

    asyncio.run(scenario())


def test_a_retired_instance_is_closed_and_replaced_by_a_free_fresh_one():
    async def scenario():
        a = instance("a")
        recorder = Recorder()
        recorder.release.clear()
        pool = recorder.pool([a])
        pool.retire(pool.acquire())
        # While it is being replaced the model has no working instance.
        assert not pool.available and pool.replacing == 1 and recorder.changes == 1
        recorder.release.set()
        await wait_until(lambda: pool.available)
        (fresh,) = recorder.made
        assert pool.instances == [fresh] and len(pool.free) == 1 and pool.replacing == 0
        assert recorder.replaced == [("a", "a-fresh")] and recorder.changes == 2
        await pool.close()
        await close_all(fresh)

    asyncio.run(scenario())


def test_a_busy_instance_marked_for_retirement_is_replaced_when_its_batch_returns():
    async def scenario():
        a, b = instance("a"), instance("b")
        recorder = Recorder()
        pool = recorder.pool([a, b])
        failed, busy = pool.acquire(), pool.acquire()
        pool.lose_after_fatal(failed, alone=False)  # in-process: every instance goes
        assert not pool.available and pool.replacing == 1  # the busy one waits for its batch
        pool.release(busy)
        assert pool.replacing == 2
        await wait_until(lambda: pool.count == 2)
        assert {lost for lost, _ in recorder.replaced} == {"a", "b"}
        await pool.close()
        await close_all(*recorder.made)

    asyncio.run(scenario())


def test_an_isolated_failure_takes_only_its_own_instance():
    async def scenario():
        a, b = instance("a"), instance("b")
        recorder = Recorder()
        pool = recorder.pool([a, b])
        failed = pool.acquire()
        pool.lose_after_fatal(failed, alone=True)
        assert pool.available and pool.count == 1
        await wait_until(lambda: pool.count == 2)
        assert [lost for lost, _ in recorder.replaced] == [failed.name]
        await pool.close()
        await close_all(*pool.instances)

    asyncio.run(scenario())


def test_a_failed_replacement_is_reported_and_leaves_the_model_unavailable():
    async def scenario():
        a = instance("a")
        recorder = Recorder(fail=True)
        pool = recorder.pool([a])
        pool.retire(pool.acquire())
        await wait_until(lambda: recorder.unreplaced)
        assert recorder.unreplaced == ["a"] and not pool.available and pool.replacing == 0
        await pool.close()

    asyncio.run(scenario())


def test_close_cancels_a_replacement_under_way():
    async def scenario():
        a = instance("a")
        recorder = Recorder()
        recorder.release.clear()  # the factory never finishes on its own
        pool = recorder.pool([a])
        pool.retire(pool.acquire())
        await asyncio.wait_for(recorder.asked.wait(), 5)
        await asyncio.wait_for(pool.close(), 5)
        assert not recorder.made and not recorder.replaced and not recorder.unreplaced

    asyncio.run(scenario())
