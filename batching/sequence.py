"""The sequence batcher: requests that belong together (a correlation ID) reach one slot in order.

A model with `sequence_batching` gets this scheduler instead of the dynamic batcher. Each
sequence is bound, at its START, to one runtime instance (a *lane*) and one of its slots; while
every slot is taken, new sequences wait in a backlog. A sequence has at most one request
executing, so its requests run in the order they arrived.

- `direct`: a lane has `max_batch_size` slots and a sequence's rows are always at its slot's
  index in the batch (rows of slots with nothing to run are padding with READY = false), so a
  model may keep state per slot.
- `oldest`: a lane holds up to `max_candidate_sequences` sequences and each batch takes the
  ready sequences whose next request is oldest, up to `max_batch_size`.

The control inputs the config asks for (START, END, READY, CORRID) and the implicit state
(`sequence_batching.state`) are added to each batch here; the runtime sees them as ordinary
inputs. A sequence idle for `max_sequence_idle_microseconds` is released; its next request is
an error that says so. Everything runs on the event loop.

Iterative sequences (`iterative_sequence: true`, Triton's request rescheduling): a request is a
whole sequence (one without a correlation ID gets one, and START); the model (a TritonPythonModel,
executing requests one by one) releases it with RESCHEDULE to have it run again in a later batch,
with no START or END, beside new requests (continuous batching); released without, it ends its
sequence.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convoy.config import ModelConfig, SequenceBatching
from convoy.errors import (
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidConfig,
    InvalidInput,
    Overloaded,
    Unavailable,
)
from convoy.outputs import select_outputs
from convoy.runtimes.base import RuntimeInstance
from convoy.types import RESCHEDULED, Request, RequestState, Response, StageTimes

from .admission import refuse
from .assemble import batch_key
from .completion import Outcome, RequestsJob, deliver, execute_requests, resolve
from .instances import InstancePool, ReplaceInstance
from .sequence_assemble import Member, assemble, split_outputs
from .stats import ModelStats
from .usage import UsageMeter

log = logging.getLogger("convoy.batching.sequence")

#: Correlation IDs of released sequences remembered to explain their next request.
_REMEMBER_RELEASED = 65536
_MAX_UINT64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SequenceFlags:
    """What a request says about its sequence (from its `sequence_*` parameters)."""

    correlation_id: int | str
    start: bool
    end: bool


def sequence_flags(model: str, parameters: dict[str, Any]) -> SequenceFlags:
    """Validate the request parameters `sequence_id`, `sequence_start`, `sequence_end` (the one
    place they are checked; both front ends decode them into Request.parameters)."""
    value = parameters.get("sequence_id")
    if isinstance(value, bool) or value is None or value == 0 or value == "":
        raise InvalidInput(
            f"inference request to model '{model}' must specify a non-zero or non-empty correlation ID"
        )
    if isinstance(value, int):
        if not 0 < value <= _MAX_UINT64:
            raise InvalidInput(
                f"parameter 'sequence_id': expected an unsigned 64-bit integer or a string, got {value}"
            )
    elif not isinstance(value, str):
        raise InvalidInput(
            f"parameter 'sequence_id': expected an unsigned 64-bit integer or a string, "
            f"got {type(value).__name__}"
        )
    flags = []
    for name in ("sequence_start", "sequence_end"):
        flag = parameters.get(name, False)
        if not isinstance(flag, bool):
            raise InvalidInput(f"parameter '{name}': expected a boolean, got {flag!r}")
        flags.append(flag)
    return SequenceFlags(value, flags[0], flags[1])


#: A sequence's key: (its correlation ID's type name, the ID), so 1 and "1" are two sequences.
_SequenceKey = tuple[str, int | str]


@dataclass(slots=True, eq=False)
class _Queued:
    request: Request
    start: bool
    end: bool


@dataclass(slots=True, eq=False)
class Sequence:
    """One live sequence: its lane and slot, its queued requests, its implicit state."""

    correlation_id: int | str
    pending: deque[_Queued] = field(default_factory=deque)
    lane: _Lane | None = None
    slot: int = -1
    running: bool = False
    #: False once an END is queued: only a new START may follow.
    open: bool = True
    #: Its START request was withdrawn (cancelled, timed out) before it ran: the next request
    #: to arrive starts it.
    start_pending: bool = False
    #: Loop time of the last arrival or completion (for the idle timeout).
    last_active: float = 0.0
    state: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Lane:
    """A runtime instance and the sequences bound to its slots."""

    instance: RuntimeInstance
    slots: list[Sequence | None]
    busy: bool = False
    #: Its instance failed fatally and a fresh one is being made (busy meanwhile); stays set
    #: when none could be made.
    replacing: bool = False


class SequenceScheduler:
    """Scheduler for a model with `sequence_batching` (a batching.protocol.ModelScheduler)."""

    def __init__(
        self,
        config: ModelConfig,
        version: str,
        instances: list[RuntimeInstance],
        stats: ModelStats,
        max_queue_size: int,
        usage: UsageMeter | None = None,
        replace_instance: ReplaceInstance | None = None,
        on_available_change: Callable[[], None] | None = None,
        **_not_supported: object,
    ) -> None:
        """After a fatal runtime error (a lost worker process, a poisoned CUDA context) the
        lane's instance is swapped for one made by `replace_instance`; its sequences keep their
        slots and their implicit state (kept here), while state the model kept itself is lost.
        `_not_supported`: the dynamic scheduler's execution_timeout (a hung batch is not cut
        short here)."""
        assert config.sequence_batching is not None
        self.config = config
        self.version = version
        self.stats = stats
        self._usage = usage
        self._pool = InstancePool(
            config.name,
            instances,
            replace_instance,
            on_available_change,
            replaced=self._instance_replaced,
            unreplaced=self._instance_unreplaced,
        )
        self._policy: SequenceBatching = config.sequence_batching
        self._batched = config.max_batch_size > 0
        self._max_rows = config.max_batch_size if self._batched else 1
        self._direct = self._policy.strategy == "direct"
        if self._direct:
            slots = self._max_rows
        else:
            slots = self._policy.max_candidate_sequences or self._max_rows
        self._lanes = [_Lane(instance, [None] * slots) for instance in instances]
        self._max_queue_size = max_queue_size
        self._sequences: dict[_SequenceKey, Sequence] = {}
        self._backlog: deque[Sequence] = deque()
        self._released: OrderedDict[_SequenceKey, str] = OrderedDict()
        self._where: dict[Request, Sequence] = {}
        self._queued = 0
        self._executing_rows = 0
        self._idle_s = self._policy.max_sequence_idle_us / 1e6
        self._delay_ns = self._policy.max_queue_delay_us * 1000
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._dispatch_pending = False
        self._accepting = False
        self._closed = False
        #: Iterative sequences: requests execute one by one and may come back (RESCHEDULED).
        self._iterative = self._policy.iterative
        if self._iterative and not (instances and instances[0].executes_requests):
            raise InvalidConfig(
                f"model '{config.name}': sequence_batching.iterative_sequence: needs a "
                "TritonPythonModel (it reschedules requests with request.set_release_flags); "
                "Convoy's `Model` executes merged batches"
            )
        self._auto_ids = itertools.count(1)
        #: Iterative sequences: each running request's own inputs (without control inputs).
        self._client_inputs: dict[Request, dict[str, np.ndarray]] = {}

    # --- lifetime ---------------------------------------------------------------------------
    async def __aenter__(self) -> SequenceScheduler:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._arm_sweeper()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting, let queued and running work finish within `grace`, fail the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace
        while (self._queued or self._executing_rows) and time.monotonic() < deadline:
            self._dispatch_all()
            await asyncio.sleep(0.005)
        self._closed = True
        shutting_down = Unavailable(f"model '{self.config.name}' is shutting down")
        for sequence in list(self._sequences.values()):
            while sequence.pending:
                queued = sequence.pending.popleft()
                queued.request.state = RequestState.FINISHED
                resolve(queued.request, error=shutting_down)
        self._queued = 0
        self._where.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for timer in self._timers.values():
            timer.cancel()
        await self._pool.close()

    @property
    def available(self) -> bool:
        """At least one lane has a working instance."""
        return self._pool.available

    @property
    def restart_reason(self) -> str:
        """Why the model is unready while it has no working instance."""
        return self._pool.restart_reason

    @property
    def instances(self) -> list[RuntimeInstance]:
        return self._pool.instances

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return self._queued + self._executing_rows

    @property
    def queue_depths(self) -> tuple[int, ...]:
        return (self._queued,)

    @property
    def active_sequences(self) -> int:
        return len(self._sequences)

    # --- entry points (loop thread) -------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request behind the earlier ones of its sequence. Raises when it cannot."""
        name = self.config.name
        if not self._accepting:
            raise Unavailable(f"model '{name}' is not accepting requests")
        if self._iterative and not request.parameters.get("sequence_id"):
            # Triton's iterative sequencer: a request without a correlation ID starts a
            # sequence of its own.
            request.parameters["sequence_id"] = self._auto_id()
            request.parameters["sequence_start"] = True
        flags = sequence_flags(name, request.parameters)
        if self._batched and request.rows != 1:
            raise InvalidInput(
                f"inference request to model '{name}' must specify batch-size 1 due to "
                f"requirements of sequence batcher (got {request.rows})"
            )
        key = (type(flags.correlation_id).__name__, flags.correlation_id)
        corrid = self._policy.control("CORRID")
        if corrid is not None:
            wants_string = corrid.datatype == "BYTES"
            if wants_string != isinstance(flags.correlation_id, str):
                raise InvalidInput(
                    f"parameter 'sequence_id': model '{name}' expects "
                    f"{'a string' if wants_string else 'an unsigned integer'} correlation ID, "
                    f"got {flags.correlation_id!r}"
                )
        if self._queued >= self._max_queue_size:
            refuse(
                self.stats, self._usage, name, self.version, request, "queue_full", time.monotonic_ns()
            )
            raise Overloaded(
                f"model '{name}' queue is full ({self._queued} sequence requests); retry later"
            )
        sequence = self._sequences.get(key)
        if (sequence is None or not sequence.open) and not flags.start:
            raise InvalidInput(self._not_started(key, flags.correlation_id))
        if sequence is None:
            self._released.pop(key, None)
            sequence = Sequence(flags.correlation_id)
            self._sequences[key] = sequence
            self._bind(sequence)
        sequence.open = not flags.end
        start = flags.start or sequence.start_pending
        sequence.start_pending = False
        now = time.monotonic_ns()
        request.state = RequestState.QUEUED
        request.queued_ns = now
        sequence.pending.append(_Queued(request, start, flags.end))
        assert self._loop is not None  # set by __aenter__; submit refuses before it
        sequence.last_active = self._loop.time()
        self._where[request] = sequence
        self._queued += 1
        if request.deadline is not None:
            self._loop.call_at(self._loop.time() - now / 1e9 + request.deadline, self._expire, request)
        self._dispatch_soon()

    def _auto_id(self) -> int:
        while True:
            value = next(self._auto_ids)
            if ("int", value) not in self._sequences:
                return value

    def _not_started(self, key: _SequenceKey, correlation_id: int | str) -> str:
        released = self._released.get(key)
        if released:
            return released
        return (
            f"inference request for sequence {correlation_id} to model '{self.config.name}' "
            "must specify the START flag on the first request of the sequence"
        )

    def cancel(self, request: Request) -> None:
        """The client went away: drop the request if it has not started executing."""
        if request.state is RequestState.QUEUED:
            self._withdraw(request, Cancelled("request cancelled by the client"), "CANCELED")

    def _expire(self, request: Request) -> None:
        if request.state is RequestState.QUEUED:
            waited_us = (time.monotonic_ns() - request.queued_ns) // 1000
            self._withdraw(
                request,
                DeadlineExceeded(
                    f"request timed out after {waited_us} µs in model '{self.config.name}' queue"
                ),
                "REJECTED",
            )

    def _withdraw(self, request: Request, error: ConvoyError, reason: str) -> None:
        """Take a queued request out of its sequence without disturbing the sequence: a START
        it carried moves to the next request, an END it carried is undone."""
        sequence = self._where.pop(request, None)
        request.state = RequestState.FINISHED
        self._client_inputs.pop(request, None)
        if sequence is not None:
            items = list(sequence.pending)
            index = next(i for i, q in enumerate(items) if q.request is request)
            removed = items.pop(index)
            if removed.start:
                if index < len(items):
                    items[index].start = True
                else:  # the next request to arrive starts the sequence instead
                    sequence.start_pending = True
            if removed.end and index == len(items):
                sequence.open = True
            sequence.pending = deque(items)
            self._queued -= 1
        self.stats.record_failure(reason, time.monotonic_ns() - request.received_ns)
        resolve(request, error=error)

    # --- slots --------------------------------------------------------------------------------
    def _bind(self, sequence: Sequence) -> None:
        """Give a new sequence a free slot on the lane with the fewest sequences, or queue it."""
        best = None
        free_slots = 0
        for lane in self._lanes:
            free = lane.slots.count(None)
            if free > free_slots:
                best, free_slots = lane, free
        if best is None:
            self._backlog.append(sequence)
            return
        slot = best.slots.index(None)
        best.slots[slot] = sequence
        sequence.lane, sequence.slot = best, slot

    def _release(self, sequence: Sequence, remember: str) -> None:
        key = (type(sequence.correlation_id).__name__, sequence.correlation_id)
        if self._sequences.get(key) is sequence:
            del self._sequences[key]
        if remember:
            self._released[key] = remember
            if len(self._released) > _REMEMBER_RELEASED:
                self._released.popitem(last=False)
        lane = sequence.lane
        if lane is None:
            if sequence in self._backlog:
                self._backlog.remove(sequence)
            return
        lane.slots[sequence.slot] = None
        sequence.lane = None
        while self._backlog and None in lane.slots:
            waiting = self._backlog.popleft()
            slot = lane.slots.index(None)
            lane.slots[slot] = waiting
            waiting.lane, waiting.slot = lane, slot
        self._dispatch_soon()

    def _arm_sweeper(self) -> None:
        interval = min(max(self._idle_s / 4, 0.01), 1.0)
        assert self._loop is not None  # set by __aenter__, which arms the first sweep
        self._sweeper = self._loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Release sequences idle (nothing queued or running) for longer than the timeout."""
        if self._closed:
            return
        assert self._loop is not None  # a sweep is armed after __aenter__
        now = self._loop.time()
        for sequence in list(self._sequences.values()):
            if sequence.pending or sequence.running:
                continue
            if now - sequence.last_active > self._idle_s:
                log.info(
                    "model '%s': sequence %s released after %.0f µs idle",
                    self.config.name,
                    sequence.correlation_id,
                    self._policy.max_sequence_idle_us,
                )
                self._release(
                    sequence,
                    remember=(
                        f"sequence {sequence.correlation_id} of model '{self.config.name}' was "
                        "released after being idle for more than "
                        f"{self._policy.max_sequence_idle_us} µs "
                        "(max_sequence_idle_microseconds); start it again with sequence_start"
                    ),
                )
        self._arm_sweeper()

    # --- dispatching ------------------------------------------------------------------------
    def _dispatch_soon(self) -> None:
        if not self._dispatch_pending and self._loop is not None:
            self._dispatch_pending = True
            self._loop.call_soon(self._dispatch_all)

    def _dispatch_all(self) -> None:
        self._dispatch_pending = False
        if self._closed:
            return
        for lane in self._lanes:
            if not lane.busy:
                self._dispatch(lane)

    def _ready(self, lane: _Lane) -> list[Sequence]:
        """Sequences of the lane with a request to run now. A request whose caller gave up
        without telling the scheduler (its future cancelled elsewhere) leaves here, before it
        can change the sequence's state."""
        ready = []
        for sequence in lane.slots:
            if sequence is None or sequence.running:
                continue
            while sequence.pending and sequence.pending[0].request.future.done():
                abandoned = sequence.pending[0].request
                self._withdraw(abandoned, Cancelled("request cancelled by the client"), "CANCELED")
            if sequence.pending:
                ready.append(sequence)
        return ready

    def _dispatch(self, lane: _Lane) -> None:
        ready = self._ready(lane)
        if not ready:
            return
        now = time.monotonic_ns()
        oldest_ns = min(s.pending[0].request.queued_ns for s in ready)
        waited = now - oldest_ns
        if self._direct:
            occupied = sum(1 for s in lane.slots if s is not None)
            utilization = len(ready) / max(occupied, 1)
            enough = len(ready) == occupied or utilization >= self._policy.minimum_slot_utilization
            if self._delay_ns and not enough and waited < self._delay_ns:
                self._wait(lane, oldest_ns + self._delay_ns - now)
                return
            reason = "full" if len(ready) == occupied else "delay_expired"
            ready.sort(key=lambda s: s.slot)
            first = batch_key(ready[0].pending[0].request)
            chosen = [s for s in ready if batch_key(s.pending[0].request) == first]
        else:
            ready.sort(key=lambda s: s.pending[0].request.queued_ns)
            first = batch_key(ready[0].pending[0].request)
            chosen = [s for s in ready if batch_key(s.pending[0].request) == first]
            chosen = chosen[: self._max_rows]
            preferred = self._policy.preferred_batch_sizes
            # Sequences of this lane whose next request is still with the client: while any
            # is, waiting (up to the delay) may fill the batch; once none is, nothing more can.
            outstanding = sum(1 for q in lane.slots if q is not None and not q.pending)
            if len(chosen) >= self._max_rows:
                reason = "full"
            elif preferred and len(chosen) >= preferred[-1]:
                reason = "preferred_size"
            elif not self._delay_ns or not outstanding:
                reason = "queue_drained"
            elif waited >= self._delay_ns:
                reason = "delay_expired"
            else:
                self._wait(lane, oldest_ns + self._delay_ns - now)
                return
        self._start(lane, chosen, reason, now)

    def _wait(self, lane: _Lane, delay_ns: int) -> None:
        index = self._lanes.index(lane)
        if index in self._timers:
            return

        def fire() -> None:
            self._timers.pop(index, None)
            if not lane.busy and not self._closed:
                self._dispatch(lane)

        assert self._loop is not None  # set by __aenter__: dispatch follows a submit
        self._timers[index] = self._loop.call_later(max(delay_ns, 0) / 1e9, fire)

    def _start(self, lane: _Lane, chosen: list[Sequence], reason: str, dispatched_ns: int) -> None:
        rows_of = []
        items = []
        for sequence in chosen:
            queued = sequence.pending.popleft()
            self._where.pop(queued.request, None)
            queued.request.state = RequestState.RUNNING
            sequence.running = True
            items.append((sequence, queued))
        self._queued -= len(items)
        if self._direct and self._batched:
            rows = max(s.slot for s in chosen) + 1
            rows_of = [s.slot for s in chosen]
        else:
            rows = len(items)
            rows_of = list(range(rows))
        self._executing_rows += len(items)
        lane.busy = True
        start = time.monotonic_ns()
        if self._iterative:
            self._start_requests(lane, items, reason, dispatched_ns, start)
            return
        members = [
            Member(q.request.inputs, row, q.start, q.end, s.correlation_id, s.state)
            for (s, q), row in zip(items, rows_of, strict=True)
        ]
        try:
            inputs = assemble(self._policy, self._batched, rows, members)
        except Exception as exc:
            self._finished(lane, items, rows_of, reason, dispatched_ns, start, start, None, exc)
            return
        context = (lane, items, rows_of, reason, dispatched_ns, start, time.monotonic_ns())
        lane.instance.submit(self._finished, context, inputs)

    def _finished(
        self,
        lane: _Lane,
        items: list[tuple[Sequence, _Queued]],
        rows_of: list[int],
        reason: str,
        dispatched_ns: int,
        start: int,
        merged: int,
        outputs: dict[str, np.ndarray] | None,
        error: BaseException | None,
    ) -> None:
        """A batch came back (on the loop): keep states, answer requests, advance sequences."""
        inferred = time.monotonic_ns()
        if error is not None and lane.instance.is_fatal(error) and not self._closed:
            self._replace(lane, error)  # the lane stays busy until its new instance is up
        else:
            lane.busy = False
        self._executing_rows -= len(items)
        name = self.config.name
        answers: list[dict[str, np.ndarray]] = []
        timings: StageTimes | None = None
        try:
            if error is not None:
                raise error
            assert outputs is not None  # the runtime's outputs, as it raised no error
            parts = split_outputs(self._policy, self._batched, name, outputs, rows_of)
            for (sequence, _queued), (answer, states) in zip(items, parts, strict=True):
                sequence.state.update(states)
                answers.append(answer)
            done = time.monotonic_ns()
            timings = StageTimes(dispatched_ns, start, merged, inferred, done)
            self.stats.record_batch(
                len(items), len(items), merged - start, inferred - merged, done - inferred, reason
            )
            failure = None
        except ConvoyError as exc:
            failure = exc
        except Exception as exc:
            log.error("model '%s' version %s failed a batch", name, self.version, exc_info=exc)
            failure = InferenceFailed(
                f"model '{name}' failed to execute the batch: {type(exc).__name__}: {exc}"
            )
        if self._usage is not None:
            self._usage.record_batch(
                name,
                self.version,
                [queued.request for _, queued in items],
                len(items),
                inferred - start,
                dispatched_ns,
                failure is not None,
            )
        if failure is None:
            outcomes: list[Outcome] = [
                (queued.request, Response(answer, name, self.version, timings), None)
                for (_, queued), answer in zip(items, answers, strict=True)
            ]
        else:
            outcomes = [(queued.request, None, failure) for _, queued in items]
        deliver(self.stats, outcomes, dispatched_ns)
        assert self._loop is not None  # set by __aenter__: a batch comes from submitted requests
        loop_now = self._loop.time()
        for sequence, queued in items:
            sequence.running = False
            sequence.last_active = loop_now
            if queued.end and not sequence.pending:
                self._release(sequence, remember="")
        if self._closed:
            return
        self._dispatch_all()

    # --- iterative sequences -------------------------------------------------------------------
    def _start_requests(
        self,
        lane: _Lane,
        items: list[tuple[Sequence, _Queued]],
        reason: str,
        dispatched_ns: int,
        start: int,
    ) -> None:
        """Hand the chosen requests themselves to the instance (iterative sequences): each with
        its sequence flags (and control inputs, when the config asks for them) for this run."""
        batch = []
        for sequence, queued in items:
            request = queued.request
            own = self._client_inputs.setdefault(request, request.inputs)
            request.parameters["sequence_start"] = queued.start
            request.parameters["sequence_end"] = queued.end
            if self._policy.controls:
                member = Member(own, 0, queued.start, queued.end, sequence.correlation_id, {})
                request.inputs = assemble(self._policy, self._batched, 1, [member])
            batch.append(request)
        context = (lane, items, reason, dispatched_ns, start)
        assert self._loop is not None  # set by __aenter__: a batch comes from submitted requests
        job = RequestsJob(lane.instance, batch, self._loop)
        lane.instance.run(self._finished_requests, context, execute_requests, job)

    def _finished_requests(
        self,
        lane: _Lane,
        items: list[tuple[Sequence, _Queued]],
        reason: str,
        dispatched_ns: int,
        start: int,
        result: tuple[int, list[Any]] | None,
        error: BaseException | None,
    ) -> None:
        """An iterative batch came back: rescheduled requests queue again at the head of their
        sequence; the others are answered and end their sequence."""
        inferred = time.monotonic_ns()
        if error is not None and lane.instance.is_fatal(error) and not self._closed:
            self._replace(lane, error)
        else:
            lane.busy = False
        self._executing_rows -= len(items)
        name = self.config.name
        # Per request: its result (outputs, an error, RESCHEDULED or None), or the batch's error.
        outcomes: list[Any] = []
        timings: StageTimes | None
        if error is None:
            assert result is not None  # (when started, results), as the batch raised no error
            merged, results = result
            done = time.monotonic_ns()
            timings = StageTimes(dispatched_ns, start, merged, inferred, done)
            self.stats.record_batch(
                len(items), len(items), merged - start, inferred - merged, done - inferred, reason
            )
            outcomes = list(results)
        else:
            if not isinstance(error, ConvoyError):
                log.error("model '%s' version %s failed a batch", name, self.version, exc_info=error)
                error = InferenceFailed(
                    f"model '{name}' failed to execute the batch: {type(error).__name__}: {error}"
                )
            outcomes = [error] * len(items)
            timings = None
        now = time.monotonic_ns()
        assert self._loop is not None  # set by __aenter__: a batch comes from submitted requests
        loop_now = self._loop.time()
        answered: list[Outcome] = []
        ended: list[Sequence] = []
        for (sequence, queued), outcome in zip(items, outcomes, strict=True):
            request = queued.request
            sequence.running = False
            sequence.last_active = loop_now
            if outcome is RESCHEDULED and not request.future.done():
                request.state = RequestState.QUEUED
                request.queued_ns = now
                sequence.pending.appendleft(_Queued(request, False, False))
                self._where[request] = sequence
                self._queued += 1
                continue
            self._client_inputs.pop(request, None)
            answered.append(self._request_outcome(request, outcome, timings))
            # Released without RESCHEDULE: the sequence is over (Triton sends it END).
            if not sequence.pending:
                ended.append(sequence)
        deliver(self.stats, answered, dispatched_ns)
        for sequence in ended:
            self._release(sequence, remember="")
        if self._closed:
            return
        self._dispatch_all()

    def _request_outcome(self, request: Request, result: Any, timings: StageTimes | None) -> Outcome:
        """What an iterative request gets from its result: its outputs, its error, or neither
        (answered through its stream, or its client left before it was rescheduled)."""
        if result is None or result is RESCHEDULED:
            return (request, None, None)
        name = self.config.name
        if isinstance(result, BaseException):
            if not isinstance(result, ConvoyError):
                result = InferenceFailed(f"model '{name}': {type(result).__name__}: {result}")
            return (request, None, result)
        selected = select_outputs(result, request.requested_outputs, self.config)
        if isinstance(selected, ConvoyError):
            return (request, None, selected)
        parameters = getattr(result, "parameters", None)
        return (request, Response(selected, name, self.version, timings, parameters), None)

    def _replace(self, lane: _Lane, error: BaseException) -> None:
        name = self.config.name
        log.error(
            "model '%s' version %s: fatal error on %s (%s: %s); replacing it",
            name,
            self.version,
            lane.instance.name,
            type(error).__name__,
            error,
        )
        lane.replacing = True
        self._pool.restart_reason = f"restarting an instance after a fatal error: {error}"
        self._pool.retire(lane.instance)

    def _lane_of(self, instance: RuntimeInstance) -> _Lane:
        return next(lane for lane in self._lanes if lane.instance is instance)

    def _instance_replaced(self, lost: RuntimeInstance, fresh: RuntimeInstance) -> None:
        lane = self._lane_of(lost)
        lane.instance = fresh
        lane.replacing = lane.busy = False
        if not any(other.replacing for other in self._lanes):
            self._pool.restart_reason = ""
        self._dispatch_all()

    def _instance_unreplaced(self, lost: RuntimeInstance) -> None:
        """Nothing will serve the lane: answer what waits on it now."""
        lane = self._lane_of(lost)
        gone = Unavailable(f"model '{self.config.name}' could not restart an instance")
        for sequence in lane.slots:
            while sequence is not None and sequence.pending:
                queued = sequence.pending.popleft()
                self._where.pop(queued.request, None)
                self._queued -= 1
                queued.request.state = RequestState.FINISHED
                resolve(queued.request, error=gone)
