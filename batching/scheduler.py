"""One scheduler per model version: a bounded priority queue drained into micro-batches.

The dynamic batcher, put together from one module per concern:
- admission (batching/admission.py): whether an arriving request joins the queue or is refused
  now (queue bounds, deadline-aware admission, the latency objective), robust to a noisy cost
  estimate;
- the queue (batching/queue.py): one bounded FIFO per priority level;
- dispatch (batching/dispatch.py): whether the batch at the head of the queue goes now, by
  Triton's rule or latency-first; a batch is only formed when an instance is free, so while all
  are busy requests accumulate;
- instances (batching/instances.py): the free instances, and replacing one lost to a fatal
  error or a batch past the execution timeout;
- completion (batching/completion.py): running a batch on its instance's thread and delivering
  each request's outcome (in formation order with preserve_ordering).

Runs entirely on the event loop, without a task of its own: a dispatch attempt runs when a
request arrives, when a batch finishes (an instance frees) and when a delay timer fires. A batch
is handed to its instance's thread and answers through a loop callback: no task or future per
batch, which is most of what a batch of one used to cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from convoy.config import ModelConfig, QueuePolicy, TimeoutAction
from convoy.errors import (
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InferenceFailed,
    InstanceExited,
    InvalidInput,
    Unavailable,
)
from convoy.outputs import select_outputs
from convoy.runtimes.base import RuntimeInstance
from convoy.types import Request, RequestState, Response, StageTimes

from .admission import AdmissionPolicy
from .assemble import collation_for
from .completion import (
    Delivery,
    Outcome,
    RequestsJob,
    RunningBatch,
    batch_executor,
    execute_requests,
    failed,
    resolve,
)
from .dispatch import DispatchRule
from .instances import InstancePool, ReplaceInstance
from .queue import PriorityQueue
from .slo import LatencyPlanner, PlanState
from .stats import ModelStats
from .usage import UsageMeter

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("convoy.batching")


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
        replace_instance: ReplaceInstance | None = None,
        usage: UsageMeter | None = None,
        on_available_change: Callable[[], None] | None = None,
    ) -> None:
        """`execution_timeout` (seconds, 0 = none): a batch still running after it fails its
        requests, and its instance (whose thread is stuck) is swapped for a fresh one made by
        `replace_instance`; the model reports unready while it has no working instance."""
        self.config = config
        self.version = version
        self.stats = stats
        self._execution_timeout = execution_timeout
        #: Showback (per-principal usage), when API keys are configured.
        self._usage = usage
        self._pool = InstancePool(
            config.name,
            instances,
            replace_instance,
            on_available_change,
            replaced=self._instance_replaced,
            unreplaced=self._instance_unreplaced,
        )
        batching = config.dynamic_batching
        self._batched = config.max_batch_size > 0
        #: The runtime takes the requests themselves (a Triton python model): no merge/split.
        self._per_request = bool(instances) and instances[0].executes_requests
        self._max_rows = config.max_batch_size if self._batched else 1
        levels = batching.priority_levels if batching and batching.priority_levels else 1
        self._default_level = (
            batching.default_priority_level if batching and batching.priority_levels else 1
        )
        default_policy = batching.default_queue_policy if batching else QueuePolicy()
        policies = [
            (batching.priority_queue_policy.get(level, default_policy) if batching else default_policy)
            for level in range(1, levels + 1)
        ]
        self._queue = PriorityQueue([p.max_queue_size or max_queue_size for p in policies])
        #: Which requests share a batch, how it is merged and split (dense, ragged, padded).
        self._collation = collation_for(config)
        self._execute = batch_executor(self._collation)
        #: Batch sizing and admission for the latency objective (parameter latency_slo_ms).
        self._slo: LatencyPlanner | None = None
        if config.latency_slo_ms and batching is not None:
            self._slo = LatencyPlanner(
                config.latency_slo_ms, self._max_rows, batching.preferred_batch_sizes
            )
        self._rule = DispatchRule(config, self._collation, self._slo)
        #: Only latency-first dispatch reads the arrival rate (so only it is told of arrivals).
        self._tracks_arrivals = self._rule.latency_first
        self._admission = AdmissionPolicy(
            config.name,
            version,
            self._queue,
            self._pool,
            policies,
            stats,
            usage,
            self._max_rows,
            self._rule.dynamic,
            self._slo,
        )
        #: The batch-cost estimate admission judges deadlines by (fed by every batch measured).
        self._estimate = self._admission.estimate
        self._delivery = Delivery(stats, bool(batching and batching.preserve_ordering))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_ns = 0
        self._dispatch_pending = False
        self._accepting = False
        self._closed = False
        self._executing_rows = 0
        self._waited_for_instance = False
        self._next_sequence = 0
        #: Batches on their instances, by sequence number (to answer them if shutdown cannot wait).
        self._executing: dict[int, list[Request]] = {}

    # --- lifetime ---------------------------------------------------------------------------
    async def __aenter__(self) -> Scheduler:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
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
            resolve(request, error=shutting_down)
        # Batches still on their instances after the grace period: answer their requests now;
        # a late result is dropped (`_finished` after close only frees the instance).
        self._closed = True
        for batch in self._executing.values():
            for request in batch:
                request.state = RequestState.FINISHED
                resolve(request, error=shutting_down)
        # preserve_ordering: finished batches held behind one that never came back go out now.
        self._delivery.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._pool.close()

    # --- state ------------------------------------------------------------------------------------
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

    @property
    def available(self) -> bool:
        """At least one working instance (none while every instance is being replaced)."""
        return self._pool.available

    @property
    def restart_reason(self) -> str:
        """Why the model is unready while it has no working instance."""
        return self._pool.restart_reason

    @property
    def instances(self) -> list[RuntimeInstance]:
        return self._pool.instances

    @property
    def batch_size_limit(self) -> int:
        """Rows a batch may hold under sustained load: the latency objective's planned size,
        or max_batch_size without one."""
        if self._slo is None:
            return self._max_rows
        return self._slo.planned_size(self._pool.count)

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
        return self._slo.state(self._pool.count)

    # --- entry points (loop thread) -------------------------------------------------------------
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
        timeout_us = self._admission.admit(request, now)
        request.state = RequestState.QUEUED
        request.queued_ns = now
        self._queue.push(request)
        if self._tracks_arrivals:
            self._rule.arrived(now)
        # The queue policy's timeout acts as the policy says (REJECT or DELAY); the client's own
        # deadline always rejects.
        if timeout_us or request.deadline is not None:
            assert self._loop is not None  # set by __aenter__; submit refuses before it
            to_loop_time = self._loop.time() - now / 1e9
            if timeout_us:
                action = self._admission.policies[request.level].timeout_action
                timeout_at = now / 1e9 + timeout_us / 1e6
                self._loop.call_at(to_loop_time + timeout_at, self._expire, request, action)
            if request.deadline is not None:
                self._loop.call_at(
                    to_loop_time + request.deadline, self._expire, request, TimeoutAction.REJECT
                )
        if self._pool.free:
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
        if self._pool.free:
            self._dispatch_soon()
        else:
            self._waited_for_instance = True

    def cancel(self, request: Request) -> None:
        """The client went away: drop the request if it is still queued."""
        if request.state is RequestState.QUEUED:
            request.state = RequestState.FINISHED
            self._queue.discard(request)
            self.stats.record_failure("CANCELED", time.monotonic_ns() - request.received_ns)
            resolve(request, error=Cancelled("request cancelled by the client"))

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
        resolve(
            request,
            error=DeadlineExceeded(
                f"request timed out after {waited_us} µs in model '{self.config.name}' queue"
            ),
        )

    # --- dispatching ------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Start as many batches as there are free instances and reasons to go now."""
        queue = self._queue
        pool = self._pool
        rule = self._rule
        while queue.size and pool.free:
            oldest = queue.oldest()
            if oldest is None:
                break
            now = time.monotonic_ns()
            reason, limit = rule.decide(
                queue, oldest, now, self._executing_rows, self._waited_for_instance, pool.count
            )
            if reason is None:
                self._arm_timer(rule.dispatch_by_ns(oldest, pool.count))
                return
            if rule.dynamic:
                # A request larger than the preferred size still goes (alone if it must).
                limit = max(limit, oldest.rows)
                batch = queue.take(limit, limit, self._collation.key, budget=self._collation.budget)
            else:
                batch = queue.take(self._max_rows, 1, self._collation.key)
            if not batch:
                break  # nothing live fits (cannot happen while `oldest` fits): never spin
            self._waited_for_instance = False
            self._start(batch, reason, now)
        if queue.size and not pool.free:
            self._waited_for_instance = True

    def _dispatch_soon(self) -> None:
        """Dispatch on the next loop turn, after the callbacks already queued (clients just
        answered, resubmitting) have run, so their requests join the next batch."""
        if not self._dispatch_pending:
            self._dispatch_pending = True
            assert self._loop is not None  # set by __aenter__: dispatch follows a submit
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
        assert self._loop is not None  # set by __aenter__: dispatch follows a submit
        self._timer = self._loop.call_later(max(at_ns - time.monotonic_ns(), 0) / 1e9, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _start(self, batch: list[Request], reason: str, dispatched_ns: int) -> None:
        instance = self._pool.acquire()
        rows = 0
        for request in batch:
            rows += request.rows
        self._executing_rows += rows
        sequence = self._next_sequence
        self._next_sequence += 1
        self._executing[sequence] = batch
        started = time.monotonic_ns()
        running = RunningBatch(instance, batch, rows, reason, dispatched_ns, started, sequence)
        assert self._loop is not None  # set by __aenter__: a batch comes from submitted requests
        if self._slo is not None:
            self._slo.started(sequence, rows, started)
        if self._execution_timeout:
            self._loop.call_later(self._execution_timeout, self._timed_out, running)
        # Assembled on the instance's thread (off the loop), into the runtime's own buffers
        # when it has them: the batch is copied once, where the runtime reads it. A runtime
        # that executes requests (Triton python models) gets them as they are.
        if self._per_request:
            job = RequestsJob(instance, batch, self._loop)
            instance.run(self._finished, (running,), execute_requests, job)
        else:
            instance.run(self._finished, (running,), self._execute, running)

    # --- completion -------------------------------------------------------------------------------
    def _finished(
        self, batch: RunningBatch, result: tuple[int, Any] | None, error: BaseException | None
    ) -> None:
        """A batch came back from its instance (on the loop): split, record, deliver. `result`:
        (when assembled, the outputs), or with `_per_request` (when started, each request's)."""
        start = batch.started_ns
        merged, outputs = result if result is not None else (start, None)
        if batch.sequence not in self._executing:
            return  # it timed out: its requests were answered and the instance replaced
        if error is not None and batch.instance.is_fatal(error):
            self._fatal(batch, error)
            return
        name = self.config.name
        inferred = time.monotonic_ns()
        try:
            if error is not None:
                raise error
            assert outputs is not None  # the batch function returned, as it raised no error
            if self._per_request:
                outcomes = self._request_outcomes(batch, merged, inferred, outputs)
            else:
                outcomes = self._split_outcomes(batch, merged, inferred, outputs)
        except ConvoyError as exc:
            log.error(
                "model '%s' version %s failed a batch of %d rows: %s",
                name,
                self.version,
                batch.rows,
                exc,
            )
            outcomes = failed(batch.requests, exc)
        except Exception as exc:
            log.error(
                "model '%s' version %s failed a batch of %d rows",
                name,
                self.version,
                batch.rows,
                exc_info=exc,
            )
            failure = InferenceFailed(
                f"model '{name}' failed to execute the batch: {type(exc).__name__}: {exc}"
            )
            outcomes = failed(batch.requests, failure)
        self._settle(batch, inferred, outcomes)

    def _split_outcomes(
        self, batch: RunningBatch, merged: int, inferred: int, outputs: dict[str, np.ndarray]
    ) -> list[Outcome]:
        """Each request's rows of the batch's outputs, and the batch recorded."""
        name = self.config.name
        parts = self._collation.split(outputs, batch.requests, self._batched)
        timings = self._record(batch, merged, inferred)
        return [
            (request, None, part)
            if isinstance(part, ConvoyError)
            else (request, Response(part, name, self.version, timings), None)
            for request, part in zip(batch.requests, parts, strict=True)
        ]

    def _record(self, batch: RunningBatch, merged: int, inferred: int) -> StageTimes:
        """Record a batch that executed (statistics, the cost estimates); its stage times."""
        start = batch.started_ns
        requests = batch.requests
        done = time.monotonic_ns()
        self.stats.record_batch(
            batch.rows, len(requests), merged - start, inferred - merged, done - inferred, batch.reason
        )
        tokens = self._collation.batch_tokens(requests)
        if tokens is not None:
            self.stats.record_tokens(*tokens)
        self._estimate.observe(done - start)
        if self._slo is not None:
            arrived = min(request.received_ns or request.queued_ns for request in requests)
            self._slo.observe(batch.sequence, batch.rows, done - start, done, done - arrived)
        return StageTimes(batch.dispatched_ns, start, merged, inferred, done)

    def _request_outcomes(
        self, batch: RunningBatch, merged: int, inferred: int, results: list[Any]
    ) -> list[Outcome]:
        """A per-request runtime's results: each request's outputs, its own error, or neither
        (a decoupled request: its stream resolves its future at the final flag)."""
        name = self.config.name
        timings = self._record(batch, merged, inferred)
        outcomes: list[Outcome] = []
        for request, result in zip(batch.requests, results, strict=True):
            if result is None:
                outcomes.append((request, None, None))
            elif isinstance(result, BaseException):
                if not isinstance(result, ConvoyError):
                    result = InferenceFailed(f"model '{name}': {type(result).__name__}: {result}")
                outcomes.append((request, None, result))
            else:
                parameters = getattr(result, "parameters", None)
                selected = select_outputs(result, request.requested_outputs, self.config)
                if isinstance(selected, ConvoyError):
                    outcomes.append((request, None, selected))
                    continue
                response = Response(selected, name, self.version, timings, parameters)
                outcomes.append((request, response, None))
        return outcomes

    def _settle(self, batch: RunningBatch, inferred: int, outcomes: list[Outcome]) -> None:
        """Account for a finished batch, free its instance and deliver its outcomes."""
        if self._usage is not None:
            batch_failed = outcomes[0][2] is not None if outcomes else False
            self._usage.record_batch(
                self.config.name,
                self.version,
                batch.requests,
                batch.rows,
                inferred - batch.started_ns,
                batch.dispatched_ns,
                batch_failed,
            )
        self._executing_rows -= batch.rows
        self._pool.release(batch.instance)
        del self._executing[batch.sequence]
        if self._slo is not None:
            self._slo.ended(batch.sequence, backlog=self._queue.size > 0)
        if self._closed:
            return
        self._delivery.batch_done(batch.sequence, outcomes, batch.dispatched_ns)
        if self._queue.size:
            self._dispatch_soon()

    def _end_lost_batch(self, batch: RunningBatch, failure: BaseException) -> None:
        """A batch that will not complete (its instance hung or failed fatally): fail its
        requests, in their turn with preserve_ordering."""
        del self._executing[batch.sequence]
        if self._slo is not None:
            self._slo.ended(batch.sequence, backlog=self._queue.size > 0)
        self._executing_rows -= batch.rows
        if self._usage is not None:
            busy_ns = time.monotonic_ns() - batch.dispatched_ns
            self._usage.record_batch(
                self.config.name,
                self.version,
                batch.requests,
                batch.rows,
                busy_ns,
                batch.dispatched_ns,
                True,
            )
        self._delivery.batch_done(batch.sequence, failed(batch.requests, failure), batch.dispatched_ns)

    # --- losing instances -------------------------------------------------------------------------
    def _timed_out(self, batch: RunningBatch) -> None:
        """A batch outlived the execution timeout: fail its requests, replace its instance."""
        if batch.sequence not in self._executing:
            return  # finished in time
        name = self.config.name
        instance = batch.instance
        log.error(
            "model '%s' version %s: a batch of %d rows ran past the %.3f s execution timeout on "
            "%s; replacing the instance",
            name,
            self.version,
            batch.rows,
            self._execution_timeout,
            instance.name,
        )
        failure = InferenceFailed(
            f"model '{name}' did not finish the batch within its execution timeout "
            f"({self._execution_timeout * 1000:.0f} ms); the instance is being restarted"
        )
        self._end_lost_batch(batch, failure)
        self._pool.restart_reason = "restarting an instance after a hung batch"
        self._pool.abandon(instance)

    def _fatal(self, batch: RunningBatch, error: BaseException) -> None:
        """The runtime cannot be trusted after this batch's error (its worker process died, its
        CUDA context is poisoned): fail the batch and replace the instance. In-process
        instances share the server's process (and device contexts), so all of them are
        replaced; an isolated instance only takes itself down. The model is unready until a
        fresh instance is up; queued requests wait for it (bounded by their queue timeouts)."""
        instance = batch.instance
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
        self._end_lost_batch(batch, failure)
        self._pool.restart_reason = f"reloading after a fatal error: {failure}"
        # A model that tried to end the process (InstanceExited) damaged nothing but itself.
        alone = instance.isolated or isinstance(error, InstanceExited)
        self._pool.lose_after_fatal(instance, alone)

    def _instance_replaced(self, lost: RuntimeInstance, fresh: RuntimeInstance) -> None:
        if self._queue.size:
            self._dispatch_soon()

    def _instance_unreplaced(self, lost: RuntimeInstance) -> None:
        if self._pool.available or self._pool.replacing:
            return
        # Nothing will come to serve the queue: answer it now rather than at its timeouts.
        gone = Unavailable(f"model '{self.config.name}' could not restart its instances")
        for request in self._queue.drain():
            request.state = RequestState.FINISHED
            resolve(request, error=gone)
