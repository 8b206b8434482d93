"""Running a batch on its instance's thread and delivering each request's outcome on the loop.

Shared by every scheduler kind: `resolve` is the one way a request's future gets its outcome
(a client that already gave up is skipped); the executors run on an instance's thread; a
finished batch is described by a `RunningBatch` record and answered as a list of `Outcome`s,
in the order batches were formed when the model asks for `preserve_ordering`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from concurrent.futures import InvalidStateError as FutureInvalidState
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from convoy.runtimes.base import RuntimeInstance
from convoy.types import Request, RequestState, Response

from .assemble import Collation
from .stats import ModelStats


def resolve(request: Request, result: object = None, error: BaseException | None = None) -> bool:
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


@dataclass(slots=True, eq=False)
class RunningBatch:
    """A batch handed to an instance: what its completion (or its timeout) needs to know.
    Never changed once made; not frozen because one is made per batch, and a frozen dataclass
    costs five times as much to build (a NamedTuple, half again as much)."""

    instance: RuntimeInstance
    requests: list[Request]
    rows: int
    #: Why it was dispatched when it was (the `reason` label of the batch metrics).
    reason: str
    dispatched_ns: int
    #: When it was handed to the instance's thread.
    started_ns: int
    #: Its place in the order batches were formed (preserve_ordering, the latency planner).
    sequence: int


#: What one request of a finished batch gets: (request, response, error), a response or an error
#: or neither (a decoupled request answered through its own stream). A plain tuple: one is built
#: per request, and a NamedTuple costs eight times as much to build.
Outcome = tuple[Request, Response | None, BaseException | None]


class RequestsJob(NamedTuple):
    """A per-request runtime's job for its instance's thread."""

    instance: RuntimeInstance
    requests: list[Request]
    loop: asyncio.AbstractEventLoop


def execute_requests(job: RequestsJob) -> tuple[int, list[Any]]:
    """On the instance's thread: a per-request runtime executes the requests themselves;
    (when it started, one result per request)."""
    return time.monotonic_ns(), job.instance.runtime.infer_requests(job.requests, job.loop)


def batch_executor(
    collation: Collation,
) -> Callable[[RunningBatch], tuple[int, dict[str, np.ndarray]]]:
    """The function an instance's thread runs for a merged batch: assemble it (into the
    runtime's own buffers when it has them), run it; (when assembled, outputs)."""
    merge = collation.merge

    def execute(batch: RunningBatch) -> tuple[int, dict[str, np.ndarray]]:
        instance = batch.instance
        inputs = merge(batch.requests, instance.batch_buffers)
        merged = time.monotonic_ns()
        return merged, instance.runtime.infer(inputs)

    return execute


def failed(requests: Iterable[Request], error: BaseException) -> list[Outcome]:
    """Every request of a batch fails with the same error."""
    return [(request, None, error) for request in requests]


def deliver(stats: ModelStats, outcomes: list[Outcome], dispatched_ns: int) -> None:
    """Resolve each request's future and record its queue wait and its latency or failure."""
    # The queue-wait and request-latency histograms (bound once per batch, not per request).
    record_queue_wait = stats.queue.add
    record_latency = stats.success.add
    now = time.monotonic_ns()
    for request, response, error in outcomes:
        request.state = RequestState.FINISHED
        record_queue_wait(dispatched_ns - request.queued_ns)
        if response is None and error is None:
            # Answered through its stream (decoupled): executed without error.
            record_latency(now - request.received_ns)
        elif error is None:
            if resolve(request, response):
                record_latency(now - request.received_ns)
            else:
                stats.record_failure("CANCELED", now - request.received_ns)
        else:
            resolve(request, error=error)
            stats.record_failure("BACKEND", now - request.received_ns)


class Delivery:
    """Delivers finished batches: at once, or (preserve_ordering) in the order they were formed,
    holding a batch that finished early until those formed before it are delivered."""

    def __init__(self, stats: ModelStats, preserve_ordering: bool) -> None:
        self._stats = stats
        self._ordered = preserve_ordering
        self._next = 0
        self._held: dict[int, tuple[list[Outcome], int]] = {}

    def batch_done(self, sequence: int, outcomes: list[Outcome], dispatched_ns: int) -> None:
        """Batch number `sequence` (numbered from 0 as formed) finished with `outcomes`."""
        if not self._ordered:
            deliver(self._stats, outcomes, dispatched_ns)
            return
        held = self._held
        held[sequence] = (outcomes, dispatched_ns)
        while self._next in held:
            deliver(self._stats, *held.pop(self._next))
            self._next += 1

    def flush(self) -> None:
        """Shutting down: deliver what is held behind a batch that never came back, in order."""
        for sequence in sorted(self._held):
            deliver(self._stats, *self._held.pop(sequence))
