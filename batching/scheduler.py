"""One scheduler per model version: a bounded priority queue drained into micro-batches.

When to dispatch (the batcher's whole policy):
- a batch is only formed when an instance is free; while all are busy, requests accumulate;
- `max_queue_delay` is a ceiling, not a wait: the batch goes at once when it is full, reaches
  the largest preferred size, when no batch is executing (every in-flight request is already
  queued, so closed-loop clients cannot add to it), or when the measured arrival rate says
  nothing more will arrive before the delay runs out;
- otherwise it waits for an arrival, a free instance or the delay, whichever comes first.

Runs entirely on the event loop; `submit` and `cancel` are called on the loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import InvalidStateError as FutureInvalidState

from convoy.config import ModelConfig, QueuePolicy, TimeoutAction
from convoy.errors import (
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    Overloaded,
    Unavailable,
)
from convoy.runtimes.base import RuntimeInstance
from convoy.types import Request, RequestState, Response

from .assemble import batch_key, merge, split
from .queue import PriorityQueue
from .stats import ModelStats

log = logging.getLogger("convoy.batching")

_EWMA_WEIGHT = 0.125


def _resolve(request: Request, result=None, error: BaseException | None = None) -> bool:
    """Set a request's outcome unless its client already gave up; True if delivered."""
    future = request.future
    if future.done():
        return False
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except (asyncio.InvalidStateError, FutureInvalidState):
        return False  # cancelled from another thread between the check and the set
    return True


class Scheduler:
    """Queue + dispatcher for one model version over its runtime instances."""

    def __init__(
        self,
        config: ModelConfig,
        version: str,
        instances: list[RuntimeInstance],
        stats: ModelStats,
        max_queue_size: int,
    ) -> None:
        self.config = config
        self.version = version
        self.stats = stats
        self._instances = instances
        self._idle = list(instances)
        batching = config.dynamic_batching
        self._batched = config.max_batch_size > 0
        self._dynamic = batching is not None
        self._max_rows = config.max_batch_size if self._batched else 1
        self._max_delay_ns = batching.max_queue_delay_us * 1000 if batching else 0
        self._preferred = batching.preferred_batch_sizes if batching else ()
        levels = batching.priority_levels if batching and batching.priority_levels else 1
        self._default_level = (
            batching.default_priority_level if batching and batching.priority_levels else 1
        )
        default_policy = batching.default_queue_policy if batching else QueuePolicy()
        self._policies = [
            (batching.priority_queue_policy.get(level, default_policy) if batching else default_policy)
            for level in range(1, levels + 1)
        ]
        self._queue = PriorityQueue([p.max_queue_size or max_queue_size for p in self._policies])
        self._preserve_ordering = bool(batching and batching.preserve_ordering)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._wakeup: asyncio.Future | None = None
        self._accepting = False
        self._executing_rows = 0
        self._last_arrival_ns = 0
        self._arrival_gap_ns = float(1 << 40)
        self._waited_for_instance = False
        # preserve_ordering: batches deliver in the order they were formed.
        self._next_sequence = 0
        self._deliver_sequence = 0
        self._held: dict[int, list] = {}

    # --- lifetime ---------------------------------------------------------------------------
    async def __aenter__(self) -> Scheduler:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._dispatcher = asyncio.create_task(
            self._dispatch_loop(), name=f"dispatch:{self.config.name}:{self.version}"
        )
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting, let queued and running work finish within `grace`, fail the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace
        while (self._queue.size or self._running) and time.monotonic() < deadline:
            self._wake()
            await asyncio.sleep(0.005)
        for request in self._queue.drain():
            _resolve(request, error=Unavailable(f"model '{self.config.name}' is shutting down"))
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
            self._dispatcher = None
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    # --- entry points (loop thread) -------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._queue.size

    @property
    def in_flight(self) -> int:
        return self._queue.size + self._executing_rows

    def submit(self, request: Request) -> None:
        """Queue a request; its future gets the outcome. Raises when it cannot be queued."""
        now = time.monotonic_ns()
        if not self._accepting:
            raise Unavailable(f"model '{self.config.name}' is not accepting requests")
        if request.rows > self._max_rows and self._batched:
            raise InvalidInput(
                f"batch size {request.rows} exceeds model '{self.config.name}' "
                f"max_batch_size {self._max_rows}"
            )
        level = request.priority or self._default_level
        if not 1 <= level <= self._queue.level_count:
            raise InvalidInput(
                f"parameter 'priority': model '{self.config.name}' has priority levels "
                f"1..{self._queue.level_count}, got {request.priority}"
            )
        request.level = level - 1
        if not self._queue.has_room(request.level):
            self.stats.record_failure("REJECTED", now - (request.received_ns or now))
            raise Overloaded(
                f"model '{self.config.name}' queue is full ({self._queue.depth(request.level)} "
                f"requests at priority {level}); retry later"
            )
        policy = self._policies[request.level]
        timeout_us = policy.default_timeout_us
        if request.timeout_us and policy.allow_timeout_override:
            timeout_us = request.timeout_us
        request.state = RequestState.QUEUED
        request.queued_ns = now
        self._queue.push(request)
        # Arrival-rate estimate for the "will anything else come in time?" decision.
        if self._last_arrival_ns:
            gap = now - self._last_arrival_ns
            self._arrival_gap_ns += (gap - self._arrival_gap_ns) * _EWMA_WEIGHT
        self._last_arrival_ns = now
        expiry = request.deadline
        if timeout_us:
            timeout_at = now / 1e9 + timeout_us / 1e6
            expiry = timeout_at if expiry is None else min(expiry, timeout_at)
            action = policy.timeout_action
        else:
            action = TimeoutAction.REJECT
        if expiry is not None:
            self._loop.call_at(self._loop.time() + (expiry - now / 1e9), self._expire, request, action)
        self._wake()

    def cancel(self, request: Request) -> None:
        """The client went away: drop the request if it is still queued."""
        if request.state is RequestState.QUEUED:
            request.state = RequestState.FINISHED
            self._queue.discard(request)
            self.stats.record_failure("CANCELED", time.monotonic_ns() - request.received_ns)
            _resolve(request, error=Cancelled("request cancelled by the client"))

    def _expire(self, request: Request, action: TimeoutAction) -> None:
        if request.state is not RequestState.QUEUED or request.delayed:
            return
        if request.future.done():
            return  # cancelled; the queue frees its slot when it reaches the entry
        if action is TimeoutAction.DELAY:
            self._queue.delay(request)
            return
        request.state = RequestState.FINISHED
        self._queue.discard(request)
        waited_us = (time.monotonic_ns() - request.queued_ns) // 1000
        self.stats.record_failure("REJECTED", time.monotonic_ns() - request.received_ns)
        _resolve(
            request,
            error=DeadlineExceeded(
                f"request timed out after {waited_us} µs in model '{self.config.name}' queue"
            ),
        )

    # --- dispatching ------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, until_ns: int | None = None) -> None:
        waiter = self._wakeup = self._loop.create_future()
        timer = None
        if until_ns is not None:
            timer = self._loop.call_later(max(until_ns - time.monotonic_ns(), 0) / 1e9, self._wake)
        try:
            await waiter
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def _dispatch_decision(self, oldest: Request, now: int) -> tuple[str | None, int]:
        """(reason to dispatch now or None, batch row limit)."""
        rows = self._queue.rows
        if not self._dynamic:
            return "unbatched", self._max_rows
        if rows >= self._max_rows:
            return "full", self._max_rows
        if self._preferred and rows >= self._preferred[-1]:
            return "preferred_size", self._preferred[-1]
        if self._waited_for_instance:
            return "instance_freed", self._max_rows
        if self._executing_rows == 0:
            return "queue_drained", self._max_rows
        remaining = oldest.queued_ns + self._max_delay_ns - now
        if remaining <= 0:
            return "delay_expired", self._max_rows
        if self._arrival_gap_ns > remaining:
            return "queue_drained", self._max_rows
        return None, self._max_rows

    async def _dispatch_loop(self) -> None:
        queue = self._queue
        while True:
            if not queue.size:
                self._waited_for_instance = False
                await self._wait()
                continue
            if not self._idle:
                self._waited_for_instance = True
                await self._wait()
                continue
            oldest = queue.oldest()
            if oldest is None:
                continue
            now = time.monotonic_ns()
            reason, limit = self._dispatch_decision(oldest, now)
            if reason is None:
                await self._wait(oldest.queued_ns + self._max_delay_ns)
                continue
            self._waited_for_instance = False
            if self._dynamic:
                batch = queue.take(limit, limit, batch_key)
            else:
                batch = queue.take(self._max_rows, 1, batch_key)
            if not batch:
                continue
            instance = self._idle.pop()
            rows = sum(r.rows for r in batch)
            self._executing_rows += rows
            sequence = self._next_sequence
            self._next_sequence += 1
            task = self._loop.create_task(self._execute(instance, batch, rows, reason, now, sequence))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(
        self,
        instance: RuntimeInstance,
        batch: list[Request],
        rows: int,
        reason: str,
        dispatched_ns: int,
        sequence: int,
    ) -> None:
        name = self.config.name
        outcome: list
        try:
            start = time.monotonic_ns()
            inputs = merge(batch)
            merged = time.monotonic_ns()
            outputs = await instance.infer(inputs)
            inferred = time.monotonic_ns()
            parts = split(outputs, batch, self._batched, name)
            done = time.monotonic_ns()
            self.stats.record_batch(
                rows, len(batch), merged - start, inferred - merged, done - inferred, reason
            )
            outcome = [
                (request, Response(part, name, self.version), None)
                for request, part in zip(batch, parts, strict=True)
            ]
        except ConvoyError as exc:
            outcome = [(request, None, exc) for request in batch]
        except Exception as exc:
            log.exception("model '%s' version %s failed a batch of %d rows", name, self.version, rows)
            error = InferenceFailed(
                f"model '{name}' failed to execute the batch: {type(exc).__name__}: {exc}"
            )
            outcome = [(request, None, error) for request in batch]
        finally:
            self._executing_rows -= rows
            self._idle.append(instance)
        if self._preserve_ordering:
            self._held[sequence] = outcome
            while self._deliver_sequence in self._held:
                self._deliver(self._held.pop(self._deliver_sequence), dispatched_ns)
                self._deliver_sequence += 1
        else:
            self._deliver(outcome, dispatched_ns)
        # Woken after delivering: the callbacks of the clients just answered run first, so
        # requests they send straight back join the next batch instead of trailing it.
        self._wake()

    def _deliver(self, outcome: list, dispatched_ns: int) -> None:
        stats = self.stats
        now = time.monotonic_ns()
        for request, response, error in outcome:
            request.state = RequestState.FINISHED
            stats.queue.add(dispatched_ns - request.queued_ns)
            if error is None:
                if _resolve(request, response):
                    stats.success.add(now - request.received_ns)
                else:
                    stats.record_failure("CANCELED", now - request.received_ns)
            else:
                _resolve(request, error=error)
                stats.record_failure("BACKEND", now - request.received_ns)
