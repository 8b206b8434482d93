"""Run a `TritonPythonModel` as one instance of Convoy's python backend.

The scheduler's batch arrives as Convoy `Request`s; `execute` gets one pb_utils.InferenceRequest
per request, its tensors the request's own arrays (views of the wire bytes: no merge, no copy),
and must return one InferenceResponse per request. A decoupled model answers through each
request's response sender instead: every response is handed to the event loop
(`call_soon_threadsafe`), goes to the request's `stream` sink, and the final flag resolves the
request's future.

`async def execute` runs on an event loop of the instance's own, on a thread of its own, as
Triton's stub runs it: a decoupled model's coroutines run in the background (execute "returns"
at once, so the next batch starts while earlier ones await: they overlap on one instance); a
model that is not decoupled is awaited before its batch completes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait

from convoy.config import ModelVersionSource
from convoy.errors import InferenceFailed, ModelLoadFailed
from convoy.types import RESCHEDULED, Request, Response, StreamedResponse

from ..base import where_in_model
from ..exit_guard import ModelExitRefused
from . import pb_utils
from .inference import current_scope

log = logging.getLogger("convoy.runtimes.triton_python")

#: The name model code imports this module under.
MODULE_NAME = "triton_python_backend_utils"
#: Seconds close() lets a decoupled model's background coroutines finish before finalize.
BACKGROUND_GRACE_S = 10.0


def install_module() -> None:
    """Make `import triton_python_backend_utils` find Convoy's pb_utils (this process)."""
    sys.modules.setdefault(MODULE_NAME, pb_utils)


def _emit(request: Request, item: StreamedResponse, done: Response) -> None:
    """On the loop: one response of a decoupled request to its sink; the final one resolves it."""
    future = request.future
    if future.done():
        return  # cancelled by its client (or already failed): the stream stopped
    if request.stream is not None:
        request.stream(item)
    if item.final and not future.done():
        future.set_result(done)


def _emit_unary(request: Request, item: StreamedResponse, model: str, version: str) -> None:
    """On the loop: the one response a model that is not decoupled sent with its sender."""
    future = request.future
    if future.done():
        return
    if item.error:
        future.set_exception(InferenceFailed(item.error))
    else:
        future.set_result(Response(item.outputs, model, version, None, item.parameters or None))


class _ModelLoop:
    """The instance's own event loop for `async def` model code, running on a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        #: Background executions (a decoupled model's execute coroutines) not finished yet.
        self.background: set[Future] = set()

    def run(self, awaitable):
        """Run `awaitable` on the loop and wait for its outcome (from another thread)."""
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop).result()

    def start(self, awaitable) -> Future:
        future = asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop)
        self.background.add(future)
        future.add_done_callback(self.background.discard)
        return future

    def close(self, grace: float) -> None:
        wait(list(self.background), grace)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(grace)
        if not self.loop.is_running():
            self.loop.close()


async def _awaited(awaitable):
    return await awaitable


class TritonModelAdapter:
    """One `TritonPythonModel` instance: initialize, execute per-request batches, finalize."""

    def __init__(self, model_class, source: ModelVersionSource, instance_index: int, path) -> None:
        self._model_class = model_class
        self._source = source
        self._index = instance_index
        self._path = path
        config = source.config
        self._name = config.name
        self._decoupled = config.decoupled
        #: This instance, as the BLS deadlock rule knows it.
        self._waiter = f"{config.name}/{source.version}/{instance_index}"
        #: sequence_batching.iterative_sequence: requests may be released with RESCHEDULE.
        self._iterative = bool(config.sequence_batching and config.sequence_batching.iterative)
        self._model = None
        self._model_loop: _ModelLoop | None = None  # for `async def` model code
        self._async = False
        self._done = Response({}, config.name, str(source.version))

    # --- lifetime ---------------------------------------------------------------------------------
    def load(self) -> None:
        config = self._source.config
        kind, device = config.placement(self._index)
        kind_name = "GPU" if kind.value == "KIND_GPU" else "CPU"
        group = config.instance_groups[0].name if config.instance_groups else config.name
        args = {
            "model_config": config.document or json.dumps({"name": config.name}),
            "model_instance_kind": kind_name,
            "model_instance_name": f"{group}_{self._index}",
            "model_instance_device_id": str(device or 0),
            "model_repository": str(self._source.path.parent),
            "model_version": str(self._source.version),
            "model_name": config.name,
        }
        pb_utils._model_dirs[threading.get_ident()] = str(self._source.path)
        model = self._model_class()
        self._async = inspect.iscoroutinefunction(getattr(model, "execute", None))
        initialize = getattr(model, "initialize", None)
        token = pb_utils.enter_scope(pb_utils.Scope(config.name, "initialize", self._waiter))
        try:
            if initialize is not None:
                try:
                    outcome = initialize(args)
                    if inspect.isawaitable(outcome):
                        self._run(outcome)
                except ModelLoadFailed:
                    raise
                except Exception as exc:
                    where = where_in_model(exc, self._path)
                    raise ModelLoadFailed(
                        f"{self._path}: TritonPythonModel.initialize() failed{where}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
            is_ready = getattr(model, "is_ready", None)
            if is_ready is not None:
                ready = is_ready()
                if inspect.isawaitable(ready):
                    ready = self._run(ready)
                if not ready:
                    raise ModelLoadFailed(
                        f"model '{config.name}': is_ready() returned False after initialize"
                    )
        finally:
            pb_utils.leave_scope(token)
        self._model = model

    def _loop(self) -> _ModelLoop:
        if self._model_loop is None:
            self._model_loop = _ModelLoop(f"{self._waiter}-asyncio")
        return self._model_loop

    def _run(self, awaitable):
        """Run model code's awaitable on the instance's loop, in the current scope."""
        scope = current_scope()
        return self._loop().run(_in_scope(scope, awaitable))

    def close(self) -> None:
        model, self._model = self._model, None
        finalize = getattr(model, "finalize", None)
        try:
            if self._model_loop is not None:
                # A decoupled model's coroutines still running finish first (bounded).
                wait(list(self._model_loop.background), BACKGROUND_GRACE_S)
            if finalize is not None:
                token = pb_utils.enter_scope(pb_utils.Scope(self._name, "finalize", self._waiter))
                try:
                    outcome = finalize()
                    if inspect.isawaitable(outcome):
                        self._run(outcome)
                finally:
                    pb_utils.leave_scope(token)
        finally:
            if self._model_loop is not None:
                self._model_loop.close(BACKGROUND_GRACE_S)
                self._model_loop = None
            pb_utils._model_dirs.pop(threading.get_ident(), None)

    # --- execution ---------------------------------------------------------------------------------
    def wrap(self, request: Request, deliver: Callable | None) -> pb_utils.InferenceRequest:
        """The pb_utils view of a Convoy request (its arrays, no copy)."""
        return pb_utils.ServerRequest(
            request, deliver, self._name, self._source.version, self._iterative
        )

    def _scope(self, batch: list[Request], holds_instance: bool = True) -> pb_utils.Scope:
        serving = tuple(request.bls_call for request in batch if request.bls_call)
        return pb_utils.Scope(self._name, "execute", self._waiter if holds_instance else "", serving)

    def execute(self, batch: list[Request], loop: asyncio.AbstractEventLoop) -> list:
        """Per request: its outputs (dict), an exception (its error), or None (a decoupled
        request, answered through its stream)."""
        deliver = None
        if self._decoupled:
            done = self._done

            def deliver(wrapped: pb_utils.InferenceRequest, item: StreamedResponse) -> None:
                loop.call_soon_threadsafe(_emit, wrapped._origin, item, done)

        elif loop is not None:
            # Triton lets a model that is not decoupled answer through the response sender
            # too: exactly one response, with the final flag, and execute() returns None.
            name, version = self._name, self._done.model_version

            def deliver(wrapped: pb_utils.InferenceRequest, item: StreamedResponse) -> None:
                if not item.final:
                    raise pb_utils.TritonModelException(
                        f"model '{name}' is not decoupled: its response sender sends exactly one "
                        "response, with flags=TRITONSERVER_RESPONSE_COMPLETE_FINAL"
                    )
                loop.call_soon_threadsafe(_emit_unary, wrapped._origin, item, name, version)

        requests = [self.wrap(request, deliver) for request in batch]
        if self._async and self._decoupled and not self._iterative and loop is not None:
            return self._start_background(requests, batch)
        token = pb_utils.enter_scope(self._scope(batch))
        try:
            if self._async:
                responses = self._run(self._model.execute(requests))
            else:
                responses = self._model.execute(requests)
        finally:
            pb_utils.leave_scope(token)
            for wrapped in requests:
                wrapped._executing = False  # too late to reschedule now
        rescheduled = [wrapped._rescheduled for wrapped in requests]
        if self._decoupled:
            if responses is not None and any(r is not None for r in responses):
                raise InferenceFailed(
                    f"model '{self._name}' is decoupled: execute() must return None and send "
                    "responses with request.get_response_sender()"
                )
            return [RESCHEDULED if again else None for again in rescheduled]
        if responses is None and all(
            r._sender is not None or again for r, again in zip(requests, rescheduled, strict=True)
        ):
            return [RESCHEDULED if again else None for again in rescheduled]
        if responses is None and any(r._sender is not None for r in requests):
            missing = InferenceFailed(
                f"model '{self._name}': execute() returned None and sent no response for this "
                "request through its response sender"
            )
            return [None if r._sender is not None else missing for r in requests]
        return self.collect(responses, len(batch), rescheduled)

    def _start_background(self, requests: list, batch: list[Request]) -> list:
        """A decoupled `async def execute`: start it on the instance's loop and return at once
        (its responses go through the senders). If it raises, the error is logged with its
        traceback and every request it had not finished gets it as its final response."""
        scope = self._scope(batch, holds_instance=False)
        future = self._loop().start(_in_scope(scope, self._model.execute(requests)))
        name = self._name

        def finished(done: Future) -> None:
            error = None if done.cancelled() else done.exception()
            if error is None:
                return
            log.error("model '%s': execute() raised", name, exc_info=error)
            failure = pb_utils.InferenceResponse(
                error=pb_utils.TritonError(
                    f"model '{name}' failed to execute the request: {type(error).__name__}: {error}"
                )
            )
            for wrapped in requests:
                if not wrapped._final_sent:
                    wrapped._deliver(failure, True)

        future.add_done_callback(finished)
        return [None] * len(batch)

    def warm_up_decoupled(self, request: Request, timeout: float = 60.0) -> None:
        """Run one warm-up request through a decoupled model: its responses are dropped; it
        must send its final flag (within `timeout`) and no error."""
        finished = threading.Event()
        errors: list[str] = []

        def deliver(wrapped: pb_utils.InferenceRequest, item: StreamedResponse) -> None:
            if item.error:
                errors.append(item.error)
            if item.final:
                finished.set()

        token = pb_utils.enter_scope(self._scope([request]))
        try:
            requests = [self.wrap(request, deliver)]
            if self._async:
                self._run(self._model.execute(requests))
            else:
                self._model.execute(requests)
        finally:
            pb_utils.leave_scope(token)
        if not finished.wait(timeout):
            raise InferenceFailed(
                f"model '{self._name}' sent no final flag for its warm-up request within {timeout:.0f} s"
            )
        if errors:
            raise InferenceFailed(f"model '{self._name}' answered its warm-up with: {errors[0]}")

    def collect(self, responses, count: int, rescheduled: list[bool] | None = None) -> list:
        name = self._name
        rescheduled = rescheduled or [False] * count
        if responses is None:
            raise InferenceFailed(
                f"model '{name}': execute() returned None; expected a list of {count} "
                "InferenceResponse (one per request)"
            )
        if not isinstance(responses, list | tuple) or len(responses) != count:
            got = len(responses) if isinstance(responses, list | tuple) else type(responses).__name__
            raise InferenceFailed(
                f"model '{name}': execute() must return one InferenceResponse per request "
                f"({count}), got {got}"
            )
        results: list = []
        for response, again in zip(responses, rescheduled, strict=True):
            if again:
                # Triton: a rescheduled request's place in the list holds None.
                if response is not None:
                    raise InferenceFailed(
                        f"model '{name}': execute() returned a response for a request it "
                        "rescheduled (TRITONSERVER_REQUEST_RELEASE_RESCHEDULE); put None in its place"
                    )
                results.append(RESCHEDULED)
                continue
            if not isinstance(response, pb_utils.InferenceResponse):
                raise InferenceFailed(
                    f"model '{name}': execute() returned {type(response).__name__} where an "
                    "InferenceResponse was expected"
                )
            if response._error is not None:
                results.append(pb_utils.convoy_error(response._error, name))
            else:
                outputs = {t._name: t._array for t in response._tensors}
                if response._parameters:
                    outputs = _WithParameters(outputs, response._parameters)
                results.append(outputs)
        return results


async def _in_scope(scope, awaitable):
    """Await model code with `scope` set (a task on the instance's loop has a context of its own)."""
    token = pb_utils.enter_scope(scope) if scope is not None else None
    try:
        return await awaitable
    except SystemExit as exc:
        # asyncio would re-raise SystemExit out of the instance's loop, ending its thread.
        raise ModelExitRefused(f"sys.exit({exc.code!r})") from None
    finally:
        if token is not None:
            pb_utils.leave_scope(token)


class _WithParameters(dict):
    """Outputs of a response that also carries response parameters."""

    __slots__ = ("parameters",)

    def __init__(self, outputs: dict, parameters: dict) -> None:
        super().__init__(outputs)
        self.parameters = parameters
