"""Ensembles (`platform: "ensemble"`): a graph of composing models served as one model.

`EnsembleScheduler` is an ensemble version's scheduler (its graph checked and ordered by
engine/ensemble_plan.py at load): the front ends submit to it like to any model, and it submits
each step to its composing model through the same path (the Engine's submit), as soon as the
step's inputs exist, so independent branches run at once and every composing model batches
ensemble and direct traffic together. Tensors pass from step to step as the arrays the composing
model returned (no copy); an error or a cancellation ends the request and stops its remaining
steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from convoy.batching import completion
from convoy.batching.stats import ModelStats
from convoy.config import EnsembleStep, ModelConfig
from convoy.datatypes import NUMPY_DTYPE
from convoy.engine.ensemble_plan import EnsemblePlan
from convoy.errors import (
    Cancelled,
    ConvoyError,
    InferenceFailed,
    InvalidInput,
    Overloaded,
    Unavailable,
)
from convoy.types import Request, RequestState, Response, StepTiming, TensorSpec

if TYPE_CHECKING:
    from convoy.engine.repository import ModelVersion
    from convoy.runtimes.base import RuntimeInstance


@dataclass(slots=True, eq=False)
class _Run:
    """One ensemble request in progress."""

    request: Request
    tensors: dict[str, np.ndarray]
    #: Tensors each step still waits for.
    waiting: list[int]
    #: Steps submitted and not finished: step index -> (entry, step request).
    running: dict[int, tuple[ModelVersion, Request]] = field(default_factory=dict)
    finished_steps: int = 0
    done: bool = False
    timings: list[StepTiming] = field(default_factory=list)


class EnsembleScheduler:
    """The scheduler of an ensemble version (a batching.protocol.ModelScheduler)."""

    def __init__(
        self,
        config: ModelConfig,
        version: str,
        plan: EnsemblePlan,
        resolve: Callable[[str, str], ModelVersion],
        submit: Callable[[ModelVersion, Request], None],
        stats: ModelStats,
        max_runs: int,
        step_limit: int = 0,
    ) -> None:
        """`resolve(model, version)`: the composing model version to use now (raises when it is
        not ready); `submit(entry, request)`: the engine's submit path; `max_runs`: ensemble
        requests in progress at once (more are turned away); `step_limit`: requests in flight at
        each step across all ensemble requests (max_inflight_requests; 0 = no limit): a step at
        the limit holds the next request's launch until one of its own finishes (backpressure)."""
        self.config = config
        self.version = version
        self.stats = stats
        self.plan = plan
        self._resolve = resolve
        self._submit = submit
        self._max_runs = max_runs
        self._step_limit = step_limit
        self._step_inflight = [0] * len(plan.steps)
        self._step_waiting: list[deque[_Run]] = [deque() for _ in plan.steps]
        self._runs: dict[Request, _Run] = {}
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: While `close` waits for the runs in progress: resolved when the last one ends.
        self._drained: asyncio.Future[None] | None = None

    async def __aenter__(self) -> EnsembleScheduler:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        return self

    async def close(self, grace: float = 30.0) -> None:
        self._accepting = False
        if self._runs:
            self._drained = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained, grace)
        for run in list(self._runs.values()):
            self._fail(run, Unavailable(f"model '{self.config.name}' is shutting down"))

    # --- state the repository reads -------------------------------------------------------------
    def _unready(self) -> str:
        for planned in self.plan.steps:
            step = planned.step
            try:
                self._resolve(step.model_name, _version(step))
            except ConvoyError as exc:
                return f"composing model '{step.model_name}' (step[{planned.index}]) is not ready: {exc}"
        return ""

    @property
    def available(self) -> bool:
        return not self._unready()

    @property
    def restart_reason(self) -> str:
        return self._unready()

    @property
    def instances(self) -> list[RuntimeInstance]:
        return []

    @property
    def queued(self) -> int:
        """Step launches held back by max_inflight_requests."""
        return sum(len(waiting) for waiting in self._step_waiting)

    @property
    def in_flight(self) -> int:
        return len(self._runs)

    @property
    def queue_depths(self) -> tuple[int, ...]:
        return (self.queued,)

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        name = self.config.name
        if not self._accepting:
            raise Unavailable(f"model '{name}' is not accepting requests")
        if len(self._runs) >= self._max_runs:
            now = time.monotonic_ns()
            self.stats.record_rejection("queue_full", now - (request.received_ns or now))
            raise Overloaded(
                f"ensemble '{name}' has {len(self._runs)} requests in progress "
                "(the server's --max-queue-size); retry later"
            )
        request.state = RequestState.RUNNING
        request.queued_ns = time.monotonic_ns()
        waiting = [len(p.reads) for p in self.plan.steps]
        run = _Run(request, dict(request.inputs), waiting)
        self._runs[request] = run
        # Every ensemble input is known now (an optional one the request left out: absent).
        for spec in self.config.inputs:
            self._arrived(run, spec.name, launch=False)
        # The caller gives up (cancels its future): stop the remaining steps.
        future = request.future
        if isinstance(future, asyncio.Future):
            future.add_done_callback(lambda _future: self._abandon(run))  # runs on the loop
        else:
            loop = self._loop
            assert loop is not None  # set in __aenter__, with _accepting
            # A DirectOutcome or concurrent future: OutcomeFuture does not declare the method.
            future.add_done_callback(lambda _future: loop.call_soon_threadsafe(self._abandon, run))  # type: ignore[attr-defined]
        for index, count in enumerate(run.waiting):
            if run.done:
                break
            if count == 0:
                self._launch(run, index)

    def cancel(self, request: Request) -> None:
        run = self._runs.get(request)
        if run is not None:
            self._fail(run, Cancelled("request cancelled by the client"), reason="CANCELED")

    def _abandon(self, run: _Run) -> None:
        if not run.done:
            self._fail(run, Cancelled("request cancelled by the client"), reason="CANCELED")

    def _arrived(self, run: _Run, tensor: str, launch: bool = True) -> None:
        for index in self.plan.readers.get(tensor, ()):
            run.waiting[index] -= 1
            if launch and run.waiting[index] == 0 and not run.done:
                self._launch(run, index)

    def _launch(self, run: _Run, index: int) -> None:
        if self._step_limit and self._step_inflight[index] >= self._step_limit:
            self._step_waiting[index].append(run)  # launched when one of the step's finishes
            return
        planned = self.plan.steps[index]
        step = planned.step
        label = f"ensemble '{self.config.name}' step[{index}] (model '{step.model_name}')"
        try:
            entry = self._resolve(step.model_name, _version(step))
            model: ModelConfig = entry.config
            inputs = {}
            for input_name, tensor in step.input_map.items():
                array = run.tensors.get(tensor)
                if array is None:
                    continue  # an optional input the request left out
                spec = model.input(input_name)
                # Planned against the model at load; a model reloaded without the input fails
                # in _conform (caught below).
                inputs[input_name] = _conform(array, spec, model, f"{label}: input '{input_name}'")  # type: ignore[arg-type]
            rows = 1
            if model.max_batch_size > 0 and inputs:
                rows = next(iter(inputs.values())).shape[0]
        except ConvoyError as exc:
            self._fail(run, _prefixed(exc, label))
            return
        except Exception as exc:
            self._fail(run, InferenceFailed(f"{label}: {type(exc).__name__}: {exc}"))
            return
        parent = run.request
        assert self._loop is not None  # set in __aenter__, before any request is accepted
        future = self._loop.create_future()
        step_request = Request(
            id=parent.id,
            inputs=inputs,
            requested_outputs=tuple(step.output_map),
            rows=rows,
            future=future,
            timeout_us=parent.timeout_us,
            deadline=parent.deadline,
            parameters=parent.parameters,
            received_ns=time.monotonic_ns(),
            principal=parent.principal,
        )
        run.running[index] = (entry, step_request)
        self._step_inflight[index] += 1
        future.add_done_callback(lambda f: self._step_done(run, index, entry, step_request, f))
        self._submit(entry, step_request)

    def _step_done(
        self,
        run: _Run,
        index: int,
        entry: ModelVersion,
        step_request: Request,
        future: asyncio.Future[Response],
    ) -> None:
        self._step_inflight[index] -= 1
        try:
            self._advance(run, index, entry, step_request, future)
        finally:
            waiting = self._step_waiting[index]
            while waiting and self._step_inflight[index] < self._step_limit:
                held = waiting.popleft()
                if not held.done:
                    self._launch(held, index)

    def _advance(
        self,
        run: _Run,
        index: int,
        entry: ModelVersion,
        step_request: Request,
        future: asyncio.Future[Response],
    ) -> None:
        """A step finished: keep its outputs, start the steps they complete (or end the run)."""
        run.running.pop(index, None)
        if run.done:
            return
        step = self.plan.steps[index].step
        label = f"ensemble '{self.config.name}' step[{index}] (model '{step.model_name}')"
        if future.cancelled():
            self._fail(run, Cancelled(f"{label}: cancelled"), reason="CANCELED")
            return
        error = future.exception()
        if error is not None:
            self._fail(run, _prefixed(error, label))
            return
        response: Response = future.result()
        model: ModelConfig = entry.config
        run.timings.append(
            StepTiming(
                index,
                model.name,
                str(entry.version),
                step_request.received_ns,
                step_request.queued_ns,
                time.monotonic_ns(),
                response.timings,
            )
        )
        for output_name, tensor in step.output_map.items():
            array = response.outputs.get(output_name)
            if array is None:
                self._fail(run, InferenceFailed(f"{label}: did not produce output '{output_name}'"))
                return
            spec = model.output(output_name)
            # Planned against the model at load; a model reloaded since without the output
            # fails here (the ignores).
            wanted = NUMPY_DTYPE[spec.datatype]  # type: ignore[union-attr]
            if spec.datatype != "BYTES" and array.dtype != wanted:  # type: ignore[union-attr]
                array = array.astype(wanted)
            run.tensors[tensor] = array
        run.finished_steps += 1
        if run.finished_steps == len(self.plan.steps):
            self._succeed(run)
            return
        for tensor in step.output_map.values():
            self._arrived(run, tensor)
            if run.done:
                return

    def _succeed(self, run: _Run) -> None:
        run.done = True
        request = run.request
        self._forget(request)
        request.state = RequestState.FINISHED
        outputs = {spec.name: run.tensors[spec.name] for spec in self.config.outputs}
        response = Response(outputs, self.config.name, self.version, None, steps=tuple(run.timings))
        now = time.monotonic_ns()
        stats = self.stats
        rows = request.rows
        if completion.resolve(request, response):
            stats.success.add(now - request.received_ns)
            # Queue time of an ensemble request: its steps' waits (as Triton counts it; and
            # perf_analyzer finds a model's served version by its queue count growing).
            stats.queue.add(sum(t.timings.dispatched_ns - t.queued_ns for t in run.timings if t.timings))
            stats.inference_count += rows
            stats.execution_count += 1
            stats.last_inference_ms = time.time_ns() // 1_000_000
        else:
            stats.record_failure("CANCELED", now - request.received_ns)

    def _forget(self, request: Request) -> None:
        """The run of `request` has ended; the last one to end wakes a waiting `close`."""
        self._runs.pop(request, None)
        drained = self._drained
        if drained is not None and not self._runs and not drained.done():
            drained.set_result(None)

    def _fail(self, run: _Run, error: BaseException, reason: str = "BACKEND") -> None:
        if run.done:
            return
        run.done = True
        request = run.request
        self._forget(request)
        request.state = RequestState.FINISHED
        # Stop what is still running: queued steps leave their queues; an executing step
        # finishes and its answer is dropped.
        for entry, step_request in list(run.running.values()):
            scheduler = entry.scheduler
            if scheduler is not None:
                scheduler.cancel(step_request)
            if not step_request.future.done():
                step_request.future.cancel()  # type: ignore[attr-defined]  # _launch's asyncio future
        run.running.clear()
        self.stats.record_failure(reason, time.monotonic_ns() - request.received_ns)
        completion.resolve(request, None, error)


def _version(step: EnsembleStep) -> str:
    return "" if step.model_version == -1 else str(step.model_version)


def _prefixed(error: BaseException, label: str) -> ConvoyError:
    """The step's error as the ensemble's: same kind (so the same status), saying where."""
    if isinstance(error, ConvoyError):
        try:
            wrapped = type(error)(f"{label}: {error}")
        except TypeError:
            wrapped = InferenceFailed(f"{label}: {error}")
        if isinstance(error, Overloaded):
            # An Overloaded, or the InferenceFailed fallback, which carries it all the same.
            wrapped.retry_after = error.retry_after  # type: ignore[attr-defined]
        return wrapped
    return InferenceFailed(f"{label}: {type(error).__name__}: {error}")


def _conform(array: np.ndarray, spec: TensorSpec, model: ModelConfig, label: str) -> np.ndarray:
    """Check a tensor handed between steps against the input it feeds; apply its reshape."""
    batching = model.max_batch_size > 0
    shape = array.shape[1:] if batching else array.shape
    if len(shape) != len(spec.dims) or not all(
        d == -1 or d == s for s, d in zip(shape, spec.dims, strict=True)
    ):
        expected = [-1, *spec.dims] if batching else list(spec.dims)
        raise InvalidInput(f"{label}: expected shape {expected}, got {list(array.shape)}")
    if batching and array.shape[0] > model.max_batch_size:
        raise InvalidInput(
            f"{label}: batch size {array.shape[0]} exceeds max_batch_size {model.max_batch_size}"
        )
    wanted = NUMPY_DTYPE[spec.datatype]
    if spec.datatype != "BYTES" and array.dtype != wanted:
        raise InvalidInput(f"{label}: expected {spec.datatype}, got numpy {array.dtype}")
    if spec.reshape is not None:
        array = array.reshape((array.shape[0], *spec.reshape) if batching else spec.reshape)
    return array
