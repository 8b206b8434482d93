"""Model code calling other models of this server (Triton's BLS), through their schedulers.

A call becomes an ordinary `Request` submitted through `InferenceService.submit` (the path both
front ends use), so it batches with the model's other traffic, counts in its statistics and
honours its queue policy. Inputs are checked against the callee's declared inputs here, as a
front end's codec would.

Deadlock rule (`BlsWaits`): a model instance that makes a BLS call waits, holding the instance,
until the call is answered. A call is refused, with InvalidInput, only when it could never be
answered: when every instance of the model it calls is held by a call that (directly or through
other models' instances) waits for this one. Instances that are free, or busy with work that
does not wait on this call, will take the call sooner or later, so a model may call itself or
call back its caller as long as an instance is left to do it (recursion bounded by the instance
count), whatever the shape of the call graph. Calls with a timeout cannot block forever and are
never refused for this. Calls made where no instance waits (threads the model started, the
background coroutines of a decoupled `async def execute`) are not tracked.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from convoy.datatypes import NUMPY_DTYPE
from convoy.errors import InvalidInput, Unavailable
from convoy.types import ModelCall, OutcomeFuture, Request, Response, StreamedResponse

if TYPE_CHECKING:
    import concurrent.futures

    from convoy.config import ModelConfig
    from convoy.engine.repository import ModelRepository, ModelVersion


class _Submitter(Protocol):
    """Where a call's request goes: the server's InferenceService, or `_SchedulerSubmit`."""

    def submit(self, entry: ModelVersion, request: Request, /) -> None: ...


@dataclass(slots=True)
class _Call:
    caller: str  # the waiting instance ("model/version/index")
    callee: str  # the model version called ("model/version")
    bounded: bool  # it has a timeout: it cannot wait forever


class BlsWaits:
    """Which model instances wait on which BLS calls, and whether a new call could ever be
    answered (the deadlock rule above). Thread-safe: calls begin on model threads."""

    def __init__(self, instance_count: Callable[[str], int]) -> None:
        #: "model/version" -> how many working instances it has.
        self._instance_count = instance_count
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        #: waiting instance -> the calls it waits on.
        self._waiting: dict[str, set[int]] = {}
        #: call -> the instance executing it (learned when that instance calls out itself).
        self._running_on: dict[int, str] = {}

    def begin(self, token: int, call: ModelCall, callee: str) -> None:
        """Record that `call.waiter` waits on `token` (a call to `callee`); raises InvalidInput
        when no instance of `callee` could ever run it."""
        if not call.waiter:
            return
        with self._lock:
            for served in call.serving:
                if served in self._calls:
                    self._running_on[served] = call.waiter
            self._calls[token] = _Call(call.waiter, callee, call.timeout_us > 0)
            self._waiting.setdefault(call.waiter, set()).add(token)
            if call.waiter in self._answerable():
                return
            self._forget(token)
            count = self._instance_count(callee)
        caller_model = call.waiter.rsplit("/", 2)[0]
        callee_model = callee.rsplit("/", 1)[0]
        raise InvalidInput(
            f"BLS call from model '{caller_model}' to model '{callee_model}' refused: it could "
            f"never run, since every instance of '{callee_model}' ({count}) is held by a BLS call "
            "waiting for this one (a deadlock); give it more instances (instance_group count), "
            "bound the recursion, or set a timeout on the request"
        )

    def end(self, token: int) -> None:
        with self._lock:
            self._forget(token)

    def _forget(self, token: int) -> None:
        call = self._calls.pop(token, None)
        self._running_on.pop(token, None)
        if call is not None:
            waits = self._waiting.get(call.caller)
            if waits is not None:
                waits.discard(token)
                if not waits:
                    del self._waiting[call.caller]

    def _answerable(self) -> set[str]:
        """The waiting instances whose calls will all be answered: grown from nothing until it
        stops changing (a call is answerable when it has a timeout, when the instance running it
        is not waiting or is answerable, or, still queued, when its model has an instance that is
        not stuck)."""
        waiting = set(self._waiting)
        answerable: set[str] = set()

        def call_ok(token: int) -> bool:
            call = self._calls[token]
            if call.bounded:
                return True
            runner = self._running_on.get(token)
            if runner is not None:
                return runner not in waiting or runner in answerable
            stuck = sum(1 for other in waiting - answerable if other.rsplit("/", 1)[0] == call.callee)
            return self._instance_count(call.callee) > stuck

        grew = True
        while grew:
            grew = False
            for instance in waiting - answerable:
                if all(call_ok(token) for token in self._waiting[instance]):
                    answerable.add(instance)
                    grew = True
        return answerable


class LocalModelCaller:
    """`convoy.types.ModelCaller` over this process's repository and InferenceService."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository
        #: The InferenceService, once the server built it (before that, calls go straight to
        #: the callee's scheduler).
        self.service: _Submitter | None = None
        #: The server's event loop (set with the repository's services).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waits = BlsWaits(self._instance_count)
        self._tokens = itertools.count(1)

    def _instance_count(self, model_version: str) -> int:
        name, _, version = model_version.rpartition("/")
        try:
            entry = self._repository.get(name, version)
        except Exception:
            return 0  # unloaded meanwhile: nothing will run the call
        scheduler = entry.scheduler
        if scheduler is not None:
            return len(scheduler.instances)
        return entry.config.instance_count

    def _request(
        self,
        call: ModelCall,
        future: OutcomeFuture,
        stream: Callable[[StreamedResponse], None] | None,
    ) -> tuple[_Submitter, ModelVersion, Request]:
        service: _Submitter = self.service or _SchedulerSubmit()
        entry = self._repository.get(call.model_name, call.model_version)
        config = entry.config
        if config.decoupled and stream is None:
            raise InvalidInput(
                f"model '{config.name}' is decoupled: call it with exec(decoupled=True) / "
                "async_exec(decoupled=True)"
            )
        rows = _check_inputs(config, call.inputs)
        declared = {s.name for s in config.outputs}
        for name in call.requested_outputs:
            if declared and name not in declared:
                raise InvalidInput(
                    f"requested output '{name}' is not an output of model '{config.name}'; "
                    f"expected one of {sorted(declared)}"
                )
        token = next(self._tokens)
        self.waits.begin(token, call, f"{config.name}/{entry.version}")
        request = Request(
            id=call.request_id,
            inputs=call.inputs,
            requested_outputs=call.requested_outputs,
            rows=rows,
            future=future,
            timeout_us=call.timeout_us,
            parameters=dict(call.parameters),
            received_ns=time.monotonic_ns(),
            stream=stream,
            bls_call=token,
        )
        # A concurrent future (ModelCaller's callers) or infer's asyncio future: both have it.
        future.add_done_callback(lambda _: self.waits.end(token))  # type: ignore[attr-defined]
        return service, entry, request

    def _canceller(self, entry: ModelVersion, request: Request) -> Callable[[], None]:
        """Cancel `request` from any thread: a queued one is dropped (answered Cancelled); a
        running one sees is_cancelled(). Its wait no longer counts either way."""
        loop = self.loop
        assert loop is not None  # set in services(), before model code gets this caller

        def on_loop() -> None:
            request.cancel_requested = True
            if entry.scheduler is not None:
                entry.scheduler.cancel(request)

        def cancel() -> None:
            self.waits.end(request.bls_call)
            loop.call_soon_threadsafe(on_loop)

        return cancel

    def submit_threadsafe(self, call: ModelCall, future: OutcomeFuture) -> Callable[[], None]:
        service, entry, request = self._request(call, future, None)
        assert self.loop is not None  # set in services(), before model code gets this caller
        self.loop.call_soon_threadsafe(service.submit, entry, request)
        return self._canceller(entry, request)

    def stream_threadsafe(
        self, call: ModelCall, sink: Callable[[StreamedResponse], None], future: OutcomeFuture
    ) -> Callable[[], None]:
        entry = self._repository.get(call.model_name, call.model_version)
        decoupled = entry.config.decoupled
        service, entry, request = self._request(call, future, sink if decoupled else None)
        if not decoupled:
            # A model that is not decoupled: its one response is the final one. (Callbacks run
            # in the order added, so this comes before whatever the caller adds.)
            names = call.requested_outputs

            def one(done: concurrent.futures.Future[Response]) -> None:
                if not done.cancelled() and done.exception() is None:
                    response = _requested(done.result(), names)
                    sink(StreamedResponse(response.outputs, True, "", response.parameters or {}))

            future.add_done_callback(one)  # type: ignore[attr-defined]  # a concurrent future
        assert self.loop is not None  # set in services(), before model code gets this caller
        self.loop.call_soon_threadsafe(service.submit, entry, request)
        return self._canceller(entry, request)

    async def infer(self, call: ModelCall) -> Response:
        future = asyncio.get_running_loop().create_future()
        service, entry, request = self._request(call, future, None)
        service.submit(entry, request)
        try:
            response = await future
        except asyncio.CancelledError:
            if entry.scheduler is not None:
                entry.scheduler.cancel(request)
            raise
        return _requested(response, call.requested_outputs)


class _SchedulerSubmit:
    """Before the server's InferenceService exists (models warming up at start-up), calls go
    straight to the callee's scheduler; a callee still loading answers Unavailable."""

    @staticmethod
    def submit(entry: ModelVersion, request: Request) -> None:
        try:
            if entry.scheduler is None:
                raise Unavailable(f"model '{entry.config.name}' is not ready")
            entry.scheduler.submit(request)
        except Unavailable as exc:
            request.future.set_exception(exc)
        except Exception as exc:
            if not request.future.done():
                request.future.set_exception(exc)


def _requested(response: Response, names: tuple[str, ...]) -> Response:
    if not names:
        return response
    outputs = {n: response.outputs[n] for n in names if n in response.outputs}
    return Response(outputs, response.model_name, response.model_version, None, response.parameters)


def _check_inputs(config: ModelConfig, inputs: dict[str, np.ndarray]) -> int:
    """The rows the call carries; raises InvalidInput for what a front end would refuse."""
    rows = 1
    batched = config.max_batch_size > 0
    for name, array in inputs.items():
        spec = config.input(name)
        if spec is None:
            expected = ", ".join(f"'{s.name}'" for s in config.inputs)
            raise InvalidInput(
                f"unexpected input '{name}' for model '{config.name}'; expected inputs: {expected}"
            )
        wanted = NUMPY_DTYPE[spec.datatype]
        if (spec.datatype == "BYTES") != (array.dtype == object) or (
            spec.datatype != "BYTES" and array.dtype != wanted
        ):
            raise InvalidInput(
                f"input '{name}' of model '{config.name}': expected {spec.datatype}, got numpy "
                f"{array.dtype}"
            )
        shape = array.shape[1:] if batched else array.shape
        dims = spec.reshape if spec.reshape is not None and not batched else spec.dims
        if len(shape) != len(spec.dims) or any(
            d != -1 and d != s for s, d in zip(shape, spec.dims, strict=True)
        ):
            expected_shape = [-1, *spec.dims] if batched else list(dims)
            raise InvalidInput(
                f"input '{name}' of model '{config.name}': expected shape {expected_shape}, got "
                f"{list(array.shape)}"
            )
        if batched:
            if not array.ndim or array.shape[0] < 1:
                raise InvalidInput(f"input '{name}': batch dimension must be >= 1")
            if array.shape[0] > config.max_batch_size:
                raise InvalidInput(
                    f"input '{name}': batch size {array.shape[0]} exceeds max_batch_size "
                    f"{config.max_batch_size} of model '{config.name}'"
                )
            rows = array.shape[0]
    missing = [s.name for s in config.inputs if not s.optional and s.name not in inputs]
    if missing:
        raise InvalidInput(f"model '{config.name}' needs input(s) {missing}")
    if batched and len({a.shape[0] for a in inputs.values()}) > 1:
        raise InvalidInput(f"model '{config.name}': inputs disagree on the batch size")
    return rows
