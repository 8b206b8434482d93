"""One scheduler per model version: a bounded priority queue drained into micro-batches.

When to dispatch (the batcher's whole policy):
- a batch is only formed when an instance is free; while all are busy, requests accumulate;
- by default, Triton's rule: the batch goes at once when the queue fills the largest preferred
  size it can (without preferred sizes: max_batch_size); otherwise it waits, even while an
  instance is idle, until its oldest request has waited `max_queue_delay` (0: at once);
- latency-first (parameter batch_dispatch: latency_first, and every latency objective):
  `max_queue_delay` is a ceiling, not a wait: the batch goes at once when it is full, reaches
  the largest preferred size, when no batch is executing (every in-flight request is already
  queued, so closed-loop clients cannot add to it), or when the measured arrival rate says
  nothing more will arrive before the delay runs out; otherwise it waits for an arrival, a
  free instance or the delay, whichever comes first;
- with a latency objective (parameter latency_slo_ms), its planner (batching/slo.py) sets the
  batch row limit and an earlier latest dispatch, and refuses on arrival what would miss it.

Runs entirely on the event loop, without a task of its own: a dispatch attempt runs when a
request arrives, when a batch finishes (an instance frees) and when a delay timer fires. A batch
is handed to its instance's thread and answers through a loop callback: no task or future per
batch, which is most of what a batch of one used to cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import InvalidStateError as FutureInvalidState

import numpy as np

from convoy.config import ModelConfig, QueuePolicy, TimeoutAction
from convoy.errors import (
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InferenceFailed,
    InstanceExited,
    InvalidInput,
    Overloaded,
    Unavailable,
)
from convoy.outputs import select_outputs
from convoy.runtimes.base import RuntimeInstance
from convoy.types import Request, RequestState, Response, StageTimes

from .assemble import Collation, collation_for
from .queue import PriorityQueue
from .slo import LatencyPlanner, PlanState
from .stats import ModelStats
from .usage import UsageMeter

log = logging.getLogger("convoy.batching")

_EWMA_WEIGHT = 0.125
#: Batches measured before the completion estimate is trusted for deadline-aware admission.
_ESTIMATE_AFTER_BATCHES = 3


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


def _execute_requests(job) -> tuple[int, list]:
    """On the instance's thread: a per-request runtime executes the requests themselves."""
    instance, batch, loop = job
    return time.monotonic_ns(), instance.runtime.infer_requests(batch, loop)


def _execute(
    job: tuple[RuntimeInstance, list[Request], Collation],
) -> tuple[int, dict[str, np.ndarray]]:
    """On the instance's thread: assemble the batch, run it; (when assembled, outputs)."""
    instance, batch, collation = job
    inputs = collation.merge(batch, instance.batch_buffers)
    merged = time.monotonic_ns()
    return merged, instance.runtime.infer(inputs)


class Scheduler:
    """Queue + dispatcher for one model version over its runtime instances."""

    def __init__(
        self,
        config: ModelConfig,
        version: str,
        instances: list[RuntimeInstance],
        stats: ModelStats,
        max_queue_size: int,
        execution_timeout: float = 0.0,
        replace_instance: Callable[[RuntimeInstance], Awaitable[RuntimeInstance]] | None = None,
        usage: UsageMeter | None = None,
        on_available_change: Callable[[], None] | None = None,
    ) -> None:
        """`execution_timeout` (seconds, 0 = none): a batch still running after it fails its
        requests, and its instance (whose thread is stuck) is swapped for a fresh one made by
        `replace_instance`; the model reports unready while it has no working instance."""
        self.config = config
        self.version = version
        self.stats = stats
        self._instances = list(instances)
        self._idle = list(instances)
        self._execution_timeout = execution_timeout
        #: Showback (per-principal usage), when API keys are configured.
        self._usage = usage
        self._replace_instance = replace_instance
        #: Told when `available` may have changed (an instance lost or replaced).
        self._on_available_change = on_available_change
        #: Instances being replaced after a hung batch (their threads are abandoned) or a fatal
        #: runtime error.
        self.replacing = 0
        self._replacements: set[asyncio.Task] = set()
        #: Busy instances to retire when their batch returns (a fatal error took their process).
        self._retiring: set[RuntimeInstance] = set()
        #: Why the model is unready while it has no working instance.
        self.restart_reason = ""
        batching = config.dynamic_batching
        self._batched = config.max_batch_size > 0
        #: The runtime takes the requests themselves (a Triton python model): no merge/split.
        self._per_request = bool(instances) and instances[0].executes_requests
        self._dynamic = batching is not None
        #: Send a batch as soon as waiting cannot grow it (batch_dispatch: latency_first, and
        #: latency objectives); otherwise Triton's rule (see _triton_decision).
        self._latency_first = bool(batching and (batching.latency_first or config.latency_slo_ms))
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
        #: Which requests share a batch, how it is merged and split (dense, ragged, padded).
        self._collation = collation_for(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_ns = 0
        self._dispatch_pending = False
        self._accepting = False
        self._closed = False
        self._executing_rows = 0
        self._last_arrival_ns = 0
        self._arrival_gap_ns = float(1 << 40)
        self._waited_for_instance = False
        #: Execution time of one batch (EWMA, ns) and how many batches it has seen: the cost
        #: model behind deadline-aware admission and Retry-After.
        self._batch_ns = 0.0
        self._batches_measured = 0
        #: Batch sizing and admission for the latency objective (parameter latency_slo_ms).
        self._slo: LatencyPlanner | None = None
        if config.latency_slo_ms and self._dynamic:
            self._slo = LatencyPlanner(config.latency_slo_ms, self._max_rows, self._preferred)
        # preserve_ordering: batches deliver in the order they were formed.
        self._next_sequence = 0
        self._deliver_sequence = 0
        self._held: dict[int, tuple[list, int]] = {}
        #: Batches on their instances, by sequence number (to answer them if shutdown cannot wait).
        self._executing: dict[int, list[Request]] = {}

    # --- lifetime ---------------------------------------------------------------------------
    async def __aenter__(self) -> Scheduler:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting, let queued and running work finish within `grace`, fail the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace
        while (self._queue.size or self._executing_rows) and time.monotonic() < deadline:
            self._dispatch()
            await asyncio.sleep(0.005)
        shutting_down = Unavailable(f"model '{self.config.name}' is shutting down")
        for request in self._queue.drain():
            _resolve(request, error=shutting_down)
        # Batches still on their instances after the grace period: answer their requests now;
        # a late result is dropped (`_finished` after close only frees the instance).
        self._closed = True
        for batch in self._executing.values():
            for request in batch:
                request.state = RequestState.FINISHED
                _resolve(request, error=shutting_down)
        # preserve_ordering: finished batches held behind one that never came back go out now.
        for sequence in sorted(self._held):
            self._deliver(*self._held.pop(sequence))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._replacements):
            task.cancel()
        await asyncio.gather(*self._replacements, return_exceptions=True)

    # --- entry points (loop thread) -------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._queue.size

    @property
    def in_flight(self) -> int:
        return self._queue.size + self._executing_rows

    @property
    def queue_depths(self) -> tuple[int, ...]:
        """Requests waiting at each priority level (index 0 is level 1), for the metrics."""
        queue = self._queue
        return tuple(queue.depth(level) for level in range(queue.level_count))

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
        self._collation.admit(request)
        if request.mirror:
            self._queue_mirror(request, now)
            return
        level = request.priority or self._default_level
        if not 1 <= level <= self._queue.level_count:
            raise InvalidInput(
                f"parameter 'priority': model '{self.config.name}' has priority levels "
                f"1..{self._queue.level_count}, got {request.priority}"
            )
        request.level = level - 1
        if not self._queue.has_room(request.level):
            self.stats.record_rejection("queue_full", now - (request.received_ns or now))
            if self._usage is not None:
                self._usage.record_rejection(self.config.name, self.version, request)
            raise Overloaded(
                f"model '{self.config.name}' queue is full ({self._queue.depth(request.level)} "
                f"requests at priority {level}); retry later",
                retry_after=self._completion_estimate(request)[0] or 1.0,
            )
        policy = self._policies[request.level]
        timeout_us = policy.default_timeout_us
        if request.timeout_us and policy.allow_timeout_override:
            timeout_us = request.timeout_us
        # Deadline-aware admission: a request that cannot finish before its deadline, given the
        # work queued ahead of it and the measured batch cost, is turned away now, not after it
        # waited. The estimate is optimistic (a batch in flight counts as done), so only a
        # request that is sure to miss is rejected; the queue timers still enforce the rest.
        deadline = request.deadline
        if timeout_us and policy.timeout_action is TimeoutAction.REJECT:
            timeout_at = now / 1e9 + timeout_us / 1e6
            if deadline is None or timeout_at < deadline:
                deadline = timeout_at
        # A request that would be dispatched at once (an instance idles, nothing is queued)
        # is always admitted: the estimate then is one batch's measured cost, and a noisy
        # one (a loaded host stretches it) refusing such requests would stop the measurements
        # that could correct it: no goodput while capacity is free.
        waits = not self._idle or self._queue.size > 0
        if deadline is not None and waits and self._batches_measured >= _ESTIMATE_AFTER_BATCHES:
            expected, batches = self._completion_estimate(request)
            left = deadline - now / 1e9
            if expected > left:
                self.stats.record_rejection("deadline", now - (request.received_ns or now))
                if self._usage is not None:
                    self._usage.record_rejection(self.config.name, self.version, request)
                raise Overloaded(
                    f"model '{self.config.name}' cannot meet the request's deadline: "
                    f"{max(left, 0) * 1000:.1f} ms left, about {expected * 1000:.1f} ms of work "
                    f"until its batch completes ({batches} batches of ~"
                    f"{self._batch_ns / 1e6:.1f} ms at priority {level} and above); retry later",
                    retry_after=expected,
                )
        if self._slo is not None:
            self._admit_within_objective(request, level, now)
        request.state = RequestState.QUEUED
        request.queued_ns = now
        self._queue.push(request)
        # Arrival-rate estimate for the "will anything else come in time?" decision.
        if self._last_arrival_ns:
            gap = now - self._last_arrival_ns
            self._arrival_gap_ns += (gap - self._arrival_gap_ns) * _EWMA_WEIGHT
        self._last_arrival_ns = now
        # The queue policy's timeout acts as the policy says (REJECT or DELAY); the client's own
        # deadline always rejects.
        if timeout_us or request.deadline is not None:
            to_loop_time = self._loop.time() - now / 1e9
            if timeout_us:
                timeout_at = now / 1e9 + timeout_us / 1e6
                self._loop.call_at(
                    to_loop_time + timeout_at, self._expire, request, policy.timeout_action
                )
            if request.deadline is not None:
                self._loop.call_at(
                    to_loop_time + request.deadline, self._expire, request, TimeoutAction.REJECT
                )
        if self._idle:
            # On the next loop turn: requests arriving in the same turn share the batch.
            self._dispatch_soon()
        else:
            self._waited_for_instance = True

    def _queue_mirror(self, request: Request, now: int) -> None:
        """A roll-out's mirrored request: behind every priority level, outside their queue
        sizes and admission checks (the roll-out bounds its mirrors and drops what its budget
        cannot carry), so it never takes a client's place or slot."""
        request.level = self._queue.level_count - 1
        request.state = RequestState.QUEUED
        request.queued_ns = now
        self._queue.push(request)
        if self._idle:
            self._dispatch_soon()
        else:
            self._waited_for_instance = True

    def _admit_within_objective(self, request: Request, level: int, now: int) -> None:
        """Refuse a request the latency objective predicts it would miss (see batching/slo.py)."""
        age = now - (request.received_ns or now)
        verdict = self._slo.admission(
            self._queue.rows_through(request.level),
            request.rows,
            age,
            len(self._idle),
            len(self._instances),
            now,
        )
        if verdict.admitted:
            return
        self.stats.record_rejection("latency_slo", age)
        if self._usage is not None:
            self._usage.record_rejection(self.config.name, self.version, request)
        objective_ms = self._slo.objective_ns / 1e6
        raise Overloaded(
            f"model '{self.config.name}' cannot answer within its latency objective "
            f"(latency_slo_ms {objective_ms:g}): about {verdict.completion_ns / 1e6:.1f} ms of work "
            f"until its batch completes ({verdict.batches} batches at priority {level} and above), "
            f"{max(verdict.budget_ns, 0) / 1e6:.1f} ms allowed; retry later",
            retry_after=max(verdict.completion_ns - verdict.budget_ns, 1e6) / 1e9,
        )

    @property
    def batch_size_limit(self) -> int:
        """Rows a batch may hold under sustained load: the latency objective's planned size,
        or max_batch_size without one."""
        if self._slo is None:
            return self._max_rows
        return self._slo.planned_size(len(self._instances))

    @property
    def padding_tokens(self) -> tuple[int, int] | None:
        """Padded batching: (real, pad) tokens of the batches executed so far; None without."""
        tokens = getattr(self._collation, "tokens", None)
        return None if tokens is None else (tokens[0], tokens[1])

    @property
    def latency_plan(self) -> PlanState | None:
        """The latency objective's learned cost line and current plan; None without one."""
        if self._slo is None:
            return None
        return self._slo.state(len(self._instances))

    def _completion_estimate(self, request: Request) -> tuple[float, int]:
        """(seconds until a request arriving now would have its batch done, batches counted):
        the rows queued at its priority and above, packed into batches, run on the instances
        in parallel waves at the measured batch cost. (0, 0) before any batch was measured."""
        if not self._batches_measured:
            return 0.0, 0
        queue = self._queue
        if self._dynamic:
            rows = queue.rows_through(request.level) + request.rows
            batches = -(-rows // self._max_rows)
        else:
            batches = 1 + sum(queue.depth(level) for level in range(request.level + 1))
        waves = -(-batches // max(len(self._instances), 1))
        return waves * self._batch_ns / 1e9, batches

    def cancel(self, request: Request) -> None:
        """The client went away: drop the request if it is still queued."""
        if request.state is RequestState.QUEUED:
            request.state = RequestState.FINISHED
            self._queue.discard(request)
            self.stats.record_failure("CANCELED", time.monotonic_ns() - request.received_ns)
            _resolve(request, error=Cancelled("request cancelled by the client"))

    def _expire(self, request: Request, action: TimeoutAction) -> None:
        if request.state is not RequestState.QUEUED:
            return
        if request.future.done():
            return  # cancelled; the queue frees its slot when it reaches the entry
        if action is TimeoutAction.DELAY:
            if not request.delayed:
                self._queue.delay(request)
            return
        request.state = RequestState.FINISHED
        self._queue.discard(request)
        waited_us = (time.monotonic_ns() - request.queued_ns) // 1000
        self.stats.record_rejection("timeout", time.monotonic_ns() - request.received_ns)
        if self._usage is not None:
            self._usage.record_rejection(self.config.name, self.version, request)
        _resolve(
            request,
            error=DeadlineExceeded(
                f"request timed out after {waited_us} µs in model '{self.config.name}' queue"
            ),
        )

    # --- dispatching ------------------------------------------------------------------------
    def _dispatch_decision(self, oldest: Request, now: int) -> tuple[str | None, int]:
        """(reason to dispatch now or None, batch row limit)."""
        rows = self._queue.rows
        if not self._dynamic:
            return "unbatched", self._max_rows
        limit = self._max_rows
        if self._slo is not None:
            waited = now - (oldest.received_ns or oldest.queued_ns)
            limit = self._slo.batch_limit(waited, len(self._instances))
        if not self._latency_first:
            return self._triton_decision(oldest, rows, limit, now)
        if rows >= limit:
            return "full", limit
        if self._preferred and rows >= self._preferred[-1]:
            return "preferred_size", self._preferred[-1]
        if self._waited_for_instance:
            return "instance_freed", limit
        if self._executing_rows == 0:
            return "queue_drained", limit
        # Padded batching: the batch may be full by tokens (rows x padded length) before it is
        # by rows; waiting longer would not let it grow.
        budget = self._collation.budget
        if (
            budget is not None
            and budget.max_cost
            and self._queue.fills_budget(oldest, self._collation.key, budget)
        ):
            return "full", limit
        remaining = self._dispatch_by_ns(oldest) - now
        if remaining <= 0:
            return "delay_expired", limit
        if self._arrival_gap_ns > remaining:
            return "queue_drained", limit
        return None, limit

    def _triton_decision(self, oldest: Request, rows: int, limit: int, now: int):
        """Triton's dynamic batcher: the largest preferred size the queue can fill goes at once;
        otherwise the batch waits, idle instance or not, until max_queue_delay has passed for
        its oldest request (with no delay, what is queued goes now). Without preferred sizes
        the batch goes once it reaches max_batch_size."""
        preferred = self._preferred
        if not preferred and rows >= limit:
            return "full", limit
        if preferred:
            if rows >= preferred[-1]:
                return "preferred_size", preferred[-1]
            reachable = [size for size in preferred if size <= rows]
            if reachable:
                return "preferred_size", reachable[-1]
        budget = self._collation.budget
        if (
            budget is not None
            and budget.max_cost
            and self._queue.fills_budget(oldest, self._collation.key, budget)
        ):
            return "full", limit
        if self._dispatch_by_ns(oldest) <= now:
            return "delay_expired", limit
        return None, limit

    def _dispatch_by_ns(self, oldest: Request) -> int:
        """When the batch `oldest` heads must go at the latest: max_queue_delay after it was
        queued, earlier when the latency objective needs it."""
        by = oldest.queued_ns + self._max_delay_ns
        if self._slo is not None:
            arrived = oldest.received_ns or oldest.queued_ns
            by = min(by, self._slo.dispatch_by_ns(arrived, len(self._instances)))
        return by

    def _dispatch(self) -> None:
        """Start as many batches as there are free instances and reasons to go now."""
        queue = self._queue
        while queue.size and self._idle:
            oldest = queue.oldest()
            if oldest is None:
                break
            now = time.monotonic_ns()
            reason, limit = self._dispatch_decision(oldest, now)
            if reason is None:
                self._arm_timer(self._dispatch_by_ns(oldest))
                return
            if self._dynamic:
                # A request larger than the preferred size still goes (alone if it must).
                limit = max(limit, oldest.rows)
                batch = queue.take(limit, limit, self._collation.key, budget=self._collation.budget)
            else:
                batch = queue.take(self._max_rows, 1, self._collation.key)
            if not batch:
                break  # nothing live fits (cannot happen while `oldest` fits): never spin
            self._waited_for_instance = False
            self._start(batch, reason, now)
        if queue.size and not self._idle:
            self._waited_for_instance = True

    def _dispatch_soon(self) -> None:
        """Dispatch on the next loop turn, after the callbacks already queued (clients just
        answered, resubmitting) have run, so their requests join the next batch."""
        if not self._dispatch_pending:
            self._dispatch_pending = True
            self._loop.call_soon(self._deferred_dispatch)

    def _deferred_dispatch(self) -> None:
        self._dispatch_pending = False
        self._dispatch()

    def _arm_timer(self, at_ns: int) -> None:
        if self._timer is not None:
            if self._timer_at_ns <= at_ns:
                return
            self._timer.cancel()
        self._timer_at_ns = at_ns
        self._timer = self._loop.call_later(max(at_ns - time.monotonic_ns(), 0) / 1e9, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _start(self, batch: list[Request], reason: str, dispatched_ns: int) -> None:
        instance = self._idle.pop()
        rows = 0
        for request in batch:
            rows += request.rows
        self._executing_rows += rows
        sequence = self._next_sequence
        self._next_sequence += 1
        context = (instance, batch, rows, reason, dispatched_ns, sequence)
        self._executing[sequence] = batch
        if self._slo is not None:
            self._slo.started(sequence, rows, time.monotonic_ns())
        if self._execution_timeout:
            self._loop.call_later(self._execution_timeout, self._timed_out, context)
        # Assembled on the instance's thread (off the loop), into the runtime's own buffers
        # when it has them: the batch is copied once, where the runtime reads it. A runtime
        # that executes requests (Triton python models) gets them as they are.
        if self._per_request:
            job = (instance, batch, self._loop)
            instance.run(self._finished, (context, time.monotonic_ns()), _execute_requests, job)
            return
        instance.run(
            self._finished,
            (context, time.monotonic_ns()),
            _execute,
            (instance, batch, self._collation),
        )

    def _finished(self, context, start: int, result, error) -> None:
        """A batch came back from its instance (on the loop): split, record, deliver."""
        instance, batch, rows, _, _, sequence = context
        merged, outputs = result if result is not None else (start, None)
        if sequence not in self._executing:
            return  # it timed out: its requests were answered and the instance replaced
        if error is not None and instance.is_fatal(error):
            self._fatal(context, error)
            return
        name = self.config.name
        inferred = time.monotonic_ns()
        try:
            if error is not None:
                raise error
            if self._per_request:
                outcome = self._request_outcome(context, start, merged, inferred, outputs)
            else:
                outcome = self._split_outcome(context, start, merged, inferred, outputs)
        except ConvoyError as exc:
            log.error(
                "model '%s' version %s failed a batch of %d rows: %s", name, self.version, rows, exc
            )
            outcome = [(request, None, exc) for request in batch]
        except Exception as exc:
            log.error(
                "model '%s' version %s failed a batch of %d rows", name, self.version, rows, exc_info=exc
            )
            failure = InferenceFailed(
                f"model '{name}' failed to execute the batch: {type(exc).__name__}: {exc}"
            )
            outcome = [(request, None, failure) for request in batch]
        self._settle(context, start, inferred, outcome)

    def _split_outcome(self, context, start: int, merged: int, inferred: int, outputs) -> list:
        """Each request's rows of the batch's outputs, and the batch recorded."""
        batch = context[1]
        name = self.config.name
        parts = self._collation.split(outputs, batch, self._batched)
        timings = self._record(context, start, merged, inferred)
        return [
            (request, None, part)
            if isinstance(part, ConvoyError)
            else (request, Response(part, name, self.version, timings), None)
            for request, part in zip(batch, parts, strict=True)
        ]

    def _record(self, context, start: int, merged: int, inferred: int) -> StageTimes:
        """Record a batch that executed (statistics, the batch-cost estimate); its stage times."""
        _, batch, rows, reason, dispatched_ns, _ = context
        done = time.monotonic_ns()
        self.stats.record_batch(
            rows, len(batch), merged - start, inferred - merged, done - inferred, reason
        )
        tokens = self._collation.batch_tokens(batch)
        if tokens is not None:
            self.stats.record_tokens(*tokens)
        if self._batches_measured:
            self._batch_ns += (done - start - self._batch_ns) * _EWMA_WEIGHT
        else:
            self._batch_ns = float(done - start)
        self._batches_measured += 1
        if self._slo is not None:
            arrived = min(request.received_ns or request.queued_ns for request in batch)
            sequence = context[5]
            self._slo.observe(sequence, rows, done - start, done, done - arrived)
        return StageTimes(dispatched_ns, start, merged, inferred, done)

    def _request_outcome(self, context, start: int, merged: int, inferred: int, results) -> list:
        """A per-request runtime's results: each request's outputs, its own error, or None
        (a decoupled request: its stream resolves its future at the final flag)."""
        batch = context[1]
        name = self.config.name
        timings = self._record(context, start, merged, inferred)
        outcome = []
        for request, result in zip(batch, results, strict=True):
            if result is None:
                outcome.append((request, None, None))
            elif isinstance(result, BaseException):
                if not isinstance(result, ConvoyError):
                    result = InferenceFailed(f"model '{name}': {type(result).__name__}: {result}")
                outcome.append((request, None, result))
            else:
                parameters = getattr(result, "parameters", None)
                selected = select_outputs(result, request.requested_outputs, self.config)
                if isinstance(selected, ConvoyError):
                    outcome.append((request, None, selected))
                    continue
                outcome.append(
                    (request, Response(selected, name, self.version, timings, parameters), None)
                )
        return outcome

    def _settle(self, context, start: int, inferred: int, outcome: list) -> None:
        """Account for a finished batch, free its instance and deliver its outcome."""
        instance, batch, rows, _, dispatched_ns, sequence = context
        name = self.config.name
        if self._usage is not None:
            failed = outcome[0][2] is not None if outcome else False
            self._usage.record_batch(
                name, self.version, batch, rows, inferred - start, dispatched_ns, failed
            )
        self._executing_rows -= rows
        if self._retiring and instance in self._retiring:
            self._retiring.discard(instance)
            self._retire(instance)
        else:
            self._idle.append(instance)
        del self._executing[sequence]
        if self._slo is not None:
            self._slo.ended(sequence, backlog=self._queue.size > 0)
        if self._closed:
            return
        if self._preserve_ordering:
            self._held[sequence] = (outcome, dispatched_ns)
            while self._deliver_sequence in self._held:
                self._deliver(*self._held.pop(self._deliver_sequence))
                self._deliver_sequence += 1
        else:
            self._deliver(outcome, dispatched_ns)
        if self._queue.size:
            self._dispatch_soon()

    def _timed_out(self, context) -> None:
        """A batch outlived the execution timeout: fail its requests, replace its instance."""
        instance, batch, rows, _, dispatched_ns, sequence = context
        if sequence not in self._executing:
            return  # finished in time
        del self._executing[sequence]
        if self._slo is not None:
            self._slo.ended(sequence, backlog=self._queue.size > 0)
        self._executing_rows -= rows
        self._instances.remove(instance)
        name = self.config.name
        log.error(
            "model '%s' version %s: a batch of %d rows ran past the %.3f s execution timeout on "
            "%s; replacing the instance",
            name,
            self.version,
            rows,
            self._execution_timeout,
            instance.name,
        )
        failure = InferenceFailed(
            f"model '{name}' did not finish the batch within its execution timeout "
            f"({self._execution_timeout * 1000:.0f} ms); the instance is being restarted"
        )
        self._fail_batch(batch, sequence, dispatched_ns, failure)
        self.restart_reason = "restarting an instance after a hung batch"
        instance.abandon()
        self._start_replacement(instance, close_lost=False)

    def _fail_batch(self, batch, sequence: int, dispatched_ns: int, failure: Exception) -> None:
        outcome = [(request, None, failure) for request in batch]
        if self._usage is not None:
            busy_ns = time.monotonic_ns() - dispatched_ns
            rows = sum(request.rows for request in batch)
            self._usage.record_batch(
                self.config.name, self.version, batch, rows, busy_ns, dispatched_ns, True
            )
        if self._preserve_ordering:
            self._held[sequence] = (outcome, dispatched_ns)
            while self._deliver_sequence in self._held:
                self._deliver(*self._held.pop(self._deliver_sequence))
                self._deliver_sequence += 1
        else:
            self._deliver(outcome, dispatched_ns)

    def _fatal(self, context, error: BaseException) -> None:
        """The runtime cannot be trusted after this batch's error (its worker process died, its
        CUDA context is poisoned): fail the batch and replace the instance. In-process
        instances share the server's process (and device contexts), so all of them are
        replaced; an isolated instance only takes itself down. The model is unready until a
        fresh instance is up; queued requests wait for it (bounded by their queue timeouts)."""
        instance, batch, rows, _, dispatched_ns, sequence = context
        del self._executing[sequence]
        if self._slo is not None:
            self._slo.ended(sequence, backlog=self._queue.size > 0)
        self._executing_rows -= rows
        name = self.config.name
        log.error(
            "model '%s' version %s: fatal error on %s (%s: %s); replacing %s",
            name,
            self.version,
            instance.name,
            type(error).__name__,
            error,
            "its worker"
            if instance.isolated
            else "it"
            if isinstance(error, InstanceExited)
            else "every instance",
        )
        failure = error
        if not isinstance(error, ConvoyError):
            failure = InferenceFailed(
                f"model '{name}' hit a fatal error ({type(error).__name__}: {error}); reloading it"
            )
        self._fail_batch(batch, sequence, dispatched_ns, failure)
        self.restart_reason = f"reloading after a fatal error: {failure}"
        # A model that tried to end the process (InstanceExited) damaged nothing but itself.
        alone = instance.isolated or isinstance(error, InstanceExited)
        lost = [instance] if alone else list(self._instances)
        for each in lost:
            if each is instance or each in self._idle:
                if each in self._idle:
                    self._idle.remove(each)
                self._retire(each)
            else:
                self._instances.remove(each)
                self._retiring.add(each)  # busy: retired when its batch returns

    def _retire(self, instance: RuntimeInstance) -> None:
        """Take `instance` out of service, close it and start a fresh one in its place."""
        if instance in self._instances:
            self._instances.remove(instance)
        self._start_replacement(instance, close_lost=True)

    def _start_replacement(self, lost: RuntimeInstance, close_lost: bool) -> None:
        self._available_changed()  # `lost` has left self._instances
        if self._closed:
            if close_lost:
                task = self._loop.create_task(lost.close())
                self._replacements.add(task)
                task.add_done_callback(self._replacements.discard)
            return
        if self._replace_instance is None:
            return
        self.replacing += 1
        task = self._loop.create_task(self._replace(lost, close_lost))
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

    async def _replace(self, lost: RuntimeInstance, close_lost: bool = False) -> None:
        if close_lost:
            try:
                await lost.close()
            except Exception:
                log.warning("model '%s': closing instance %s failed", self.config.name, lost.name)
        try:
            fresh = await self._replace_instance(lost)
        except Exception:
            self.replacing -= 1
            log.exception("model '%s': replacing instance %s failed", self.config.name, lost.name)
            if not self._instances and not self.replacing:
                # Nothing will come to serve the queue: answer it now rather than at its timeouts.
                gone = Unavailable(f"model '{self.config.name}' could not restart its instances")
                for request in self._queue.drain():
                    request.state = RequestState.FINISHED
                    _resolve(request, error=gone)
            return
        self.replacing -= 1
        if self._closed:
            await fresh.close()
            return
        self._instances.append(fresh)
        self._idle.append(fresh)
        self._available_changed()
        log.info("model '%s': instance %s replaced", self.config.name, lost.name)
        if self._queue.size:
            self._dispatch_soon()

    def _available_changed(self) -> None:
        if self._on_available_change is not None:
            self._on_available_change()

    @property
    def available(self) -> bool:
        """At least one working instance (none while every instance is being replaced)."""
        return bool(self._instances)

    @property
    def instances(self) -> list[RuntimeInstance]:
        return list(self._instances)

    def _deliver(self, outcome: list, dispatched_ns: int) -> None:
        stats = self.stats
        # The queue-wait and request-latency histograms (bound once per batch, not per request).
        record_queue_wait = stats.queue.add
        record_latency = stats.success.add
        now = time.monotonic_ns()
        for request, response, error in outcome:
            request.state = RequestState.FINISHED
            record_queue_wait(dispatched_ns - request.queued_ns)
            if response is None and error is None:
                # Answered through its stream (decoupled): executed without error.
                record_latency(now - request.received_ns)
            elif error is None:
                if _resolve(request, response):
                    record_latency(now - request.received_ns)
                else:
                    stats.record_failure("CANCELED", now - request.received_ns)
            else:
                _resolve(request, error=error)
                stats.record_failure("BACKEND", now - request.received_ns)
