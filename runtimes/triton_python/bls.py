"""BLS from model code: `InferenceRequest.exec()` / `async_exec()` and the response iterator of
a decoupled call, over the server's ModelCaller (engine/bls.py in the server's process, the
worker's channel under process isolation)."""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from convoy import errors
from convoy.errors import ConvoyError
from convoy.types import ModelCall, StreamedResponse

from .errors import TritonError, TritonModelException, code_of, error_of
from .tensor import Tensor

#: Triton's text for a BLS call outside `execute` (its stub raises it from initialize/finalize).
OUTSIDE_EXECUTE = "BLS is only supported during the 'execute' function."

_END = object()


def services():
    from .inference import _Binding

    bound = _Binding.services
    if bound is None or bound.caller is None:
        raise TritonModelException(
            "BLS calls are not available here (model code in an isolated worker process, or "
            "outside a server)"
        )
    return bound


def timed_out(model_name: str):
    from .inference import InferenceResponse

    return InferenceResponse(
        error=TritonError(f"BLS request to '{model_name}' timed out", TritonError.UNAVAILABLE)
    )


def failed(exc: ConvoyError):
    from .inference import InferenceResponse

    return InferenceResponse(error=error_of(exc))


def from_response(response, requested: tuple[str, ...] = ()):
    from .inference import InferenceResponse

    outputs = response.outputs
    names = [n for n in requested if n in outputs] if requested else list(outputs)
    return InferenceResponse([Tensor(n, outputs[n]) for n in names], parameters=response.parameters)


def from_streamed(item: StreamedResponse):
    from .inference import InferenceResponse

    tensors = [Tensor(name, array) for name, array in item.outputs.items()]
    error = None
    if item.error:
        kind = getattr(errors, item.error_kind, None) if item.error_kind else None
        code = code_of(kind(item.error)) if isinstance(kind, type) else TritonError.INTERNAL
        error = TritonError(item.error, code)
    return InferenceResponse(tensors, error=error, parameters=item.parameters)


def execute(call: ModelCall, decoupled: bool):
    """`exec()`: the one response, or for decoupled=True a ResponseIterator."""
    bound = services()
    if threading.get_ident() == bound.loop_thread_id:
        raise TritonModelException(
            "InferenceRequest.exec() called on the server's event loop would block it; "
            "use `await request.async_exec()`"
        )
    wait = call.timeout_us / 1e6 if call.timeout_us else None
    if decoupled:
        return ResponseIterator.open(bound, call, wait)
    future: Future = Future()
    try:
        cancel = bound.caller.submit_threadsafe(call, future)
    except ConvoyError as exc:
        return failed(exc)
    try:
        response = future.result(wait)
    except FutureTimeout:
        cancel()
        return timed_out(call.model_name)
    except ConvoyError as exc:
        return failed(exc)
    return from_response(response, call.requested_outputs)


async def execute_async(call: ModelCall, decoupled: bool):
    """`await async_exec()`: the one response, or for decoupled=True a ResponseIterator once
    the first response (or the end) has arrived, without blocking the model's event loop."""
    bound = services()
    if decoupled:
        iterator = ResponseIterator.open(bound, call, call.timeout_us / 1e6 or None)
        await asyncio.get_running_loop().run_in_executor(None, iterator.wait_first)
        return iterator
    if bound.loop is None:  # a worker process: the caller runs here
        wrapped = asyncio.ensure_future(bound.caller.infer(call))
    else:
        future = asyncio.run_coroutine_threadsafe(bound.caller.infer(call), bound.loop)
        wrapped = asyncio.wrap_future(future)
    try:
        if call.timeout_us:
            return from_response(await asyncio.wait_for(wrapped, call.timeout_us / 1e6))
        return from_response(await wrapped)
    except TimeoutError:
        return timed_out(call.model_name)
    except ConvoyError as exc:
        return failed(exc)


class ResponseIterator:
    """The responses of a decoupled BLS call as they arrive (Triton's ResponseIterator). A final
    flag sent without a response arrives as a last empty response; an error (the call refused,
    dropped, timed out) as a response with that error. `cancel()` asks the called model to stop:
    a call still queued is dropped (its response: error CANCELLED), a running one sees
    `request.is_cancelled()` and answers as it decides; iterate on to its last response."""

    def __init__(self, wait: float | None, model: str) -> None:
        # Unbounded on purpose: the producer is the event loop, which must not block; the model
        # under call bounds how many responses a request gets.
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._wait = wait
        self._model = model
        self._cancel = None
        self._first = None
        self._finished = False

    @classmethod
    def open(cls, bound, call: ModelCall, wait: float | None) -> ResponseIterator:
        iterator = cls(wait, call.model_name)
        if bound.loop is None:  # a worker process: the caller says why it cannot stream
            iterator._items.put(
                failed(
                    errors.Unsupported(
                        "decoupled BLS calls (exec(decoupled=True)) are not available to a "
                        "model in an isolated worker process"
                    )
                )
            )
            iterator._items.put(_END)
            return iterator
        future: Future = Future()
        try:
            iterator._cancel = bound.caller.stream_threadsafe(
                call, lambda item: iterator._items.put(from_streamed(item)), future
            )
        except ConvoyError as exc:
            iterator._items.put(failed(exc))
            iterator._items.put(_END)
            return iterator
        future.add_done_callback(iterator._done)
        return iterator

    def _done(self, future: Future) -> None:
        if not future.cancelled():
            error = future.exception()
            if isinstance(error, ConvoyError):
                self._items.put(failed(error))
        self._items.put(_END)

    def wait_first(self) -> None:
        """Block until the first response (or the end) is there (async_exec's executor)."""
        if self._first is None:
            self._first = self._take()

    def _take(self):
        try:
            return self._items.get(timeout=self._wait)
        except queue.Empty:
            self.cancel()
            return _TimedOut(self._model)

    def __iter__(self) -> ResponseIterator:
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        item, self._first = (self._first, None) if self._first is not None else (self._take(), None)
        if isinstance(item, _TimedOut):
            self._finished = True
            return timed_out(item.model)
        if item is _END:
            self._finished = True
            raise StopIteration
        return item

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel()


class _TimedOut:
    __slots__ = ("model",)

    def __init__(self, model: str) -> None:
        self.model = model
