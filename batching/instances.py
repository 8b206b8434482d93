"""A model version's runtime instances: which are free, and replacing one that was lost.

Shared by the dynamic batcher (which takes a free instance for each batch) and the sequence
batcher (whose lanes each hold one instance). An instance is lost after a fatal runtime error
(its worker process died, its CUDA context is poisoned) or a batch that outlived the execution
timeout (its thread is abandoned); the pool takes it out of service, closes it when it can, and
makes a fresh one with the repository's factory. The model is available while at least one
instance works.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from convoy.runtimes.base import RuntimeInstance

log = logging.getLogger("convoy.batching")

#: Makes a fresh instance in place of a lost one (the repository's factory).
ReplaceInstance = Callable[[RuntimeInstance], Awaitable[RuntimeInstance]]


class InstancePool:
    """The working instances of one model version, the free ones, and their replacements."""

    def __init__(
        self,
        model: str,
        instances: list[RuntimeInstance],
        replace_instance: ReplaceInstance | None = None,
        on_available_change: Callable[[], None] | None = None,
        replaced: Callable[[RuntimeInstance, RuntimeInstance], None] | None = None,
        unreplaced: Callable[[RuntimeInstance], None] | None = None,
    ) -> None:
        """`on_available_change`: told when `available` may have changed; `replaced(lost,
        fresh)`: a fresh instance is in service (and free); `unreplaced(lost)`: none could be
        made (or there is no factory)."""
        self.model = model
        #: Instances being replaced now.
        self.replacing = 0
        #: Why the model is unready while it has no working instance.
        self.restart_reason = ""
        self._working = list(instances)
        #: The working instances with nothing to run, taken by `acquire` (a plain list: the
        #: dynamic batcher checks it on every request). Read it, never change it.
        self.free = list(instances)
        #: Busy instances to retire when their batch returns.
        self._retiring: set[RuntimeInstance] = set()
        self._replace_instance = replace_instance
        self._on_available_change = on_available_change
        self._replaced = replaced
        self._unreplaced = unreplaced
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- state ------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """At least one working instance (none while every instance is being replaced)."""
        return bool(self._working)

    @property
    def instances(self) -> list[RuntimeInstance]:
        """The working instances."""
        return list(self._working)

    @property
    def count(self) -> int:
        return len(self._working)

    # --- the dynamic batcher takes and returns instances ---------------------------------------
    def acquire(self) -> RuntimeInstance:
        """A free instance, now busy (there must be one: see `free`)."""
        return self.free.pop()

    def release(self, instance: RuntimeInstance) -> None:
        """`instance`'s batch returned: it is free again, or retired if it was marked."""
        if self._retiring and instance in self._retiring:
            self._retiring.discard(instance)
            self.retire(instance)
        else:
            self.free.append(instance)

    # --- losing instances -------------------------------------------------------------------------
    def retire(self, instance: RuntimeInstance) -> None:
        """Take a non-busy `instance` out of service, close it and start a fresh one."""
        if instance in self.free:
            self.free.remove(instance)
        if instance in self._working:
            self._working.remove(instance)
        self._start_replacement(instance, close_lost=True)

    def retire_when_free(self, instance: RuntimeInstance) -> None:
        """Take a busy `instance` out of service now; it is retired when its batch returns."""
        self._working.remove(instance)
        self._retiring.add(instance)

    def abandon(self, instance: RuntimeInstance) -> None:
        """A busy `instance` is stuck in a batch: give up on its thread (without closing the
        runtime, which would wait behind that batch) and start a fresh one."""
        self._working.remove(instance)
        instance.abandon()
        self._start_replacement(instance, close_lost=False)

    def lose_after_fatal(self, instance: RuntimeInstance, alone: bool) -> None:
        """`instance` (just back from a batch) failed fatally: retire it, and unless its failure
        is its own (`alone`: an isolated worker, a model that tried to exit) every instance
        sharing its process and device contexts too, the busy ones when their batch returns."""
        lost = [instance] if alone else list(self._working)
        for each in lost:
            if each is instance or each in self.free:
                self.retire(each)
            else:
                self.retire_when_free(each)

    def _start_replacement(self, lost: RuntimeInstance, close_lost: bool) -> None:
        self._available_changed()  # `lost` has left the working instances
        if self._closed:
            if close_lost:
                self._own(lost.close())
            return
        self.replacing += 1
        self._own(self._replace(lost, close_lost))

    async def _replace(self, lost: RuntimeInstance, close_lost: bool) -> None:
        if close_lost:
            try:
                await lost.close()
            except Exception:
                log.warning("model '%s': closing instance %s failed", self.model, lost.name)
        fresh = None
        try:
            if self._replace_instance is not None:
                fresh = await self._replace_instance(lost)
        except Exception:
            log.exception("model '%s': replacing instance %s failed", self.model, lost.name)
        finally:
            self.replacing -= 1
        if fresh is None:
            if self._unreplaced is not None and not self._closed:
                self._unreplaced(lost)
            return
        if self._closed:
            await fresh.close()
            return
        self._working.append(fresh)
        self.free.append(fresh)
        log.info("model '%s': instance %s replaced", self.model, lost.name)
        if self._replaced is not None:
            self._replaced(lost, fresh)
        self._available_changed()

    def _own(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _available_changed(self) -> None:
        if self._on_available_change is not None:
            self._on_available_change()

    async def close(self) -> None:
        """No more replacements: cancel those under way (a late fresh instance is closed)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
