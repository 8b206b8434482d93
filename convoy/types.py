"""The small typed objects that travel between layers: a request, its outcome, a batch.

A `Request` carries numpy views of the wire bytes and its own future; the scheduler resolves that
future with the request's outputs or an error. The future may be an `asyncio.Future` (HTTP, same
event loop) or a `concurrent.futures.Future` (gRPC handler threads): only ``done``, ``cancelled``,
``set_result``, ``set_exception`` and ``add_done_callback`` are used.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from convoy.errors import Cancelled


class OutcomeFuture(Protocol):
    def done(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class DetachedFuture:
    """The future of a request nobody awaits (a warm-up sample, a request inside an isolated
    worker, whose results travel back another way): never done, outcomes dropped."""

    __slots__ = ()

    def done(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def set_result(self, result: Any) -> None:
        pass

    def set_exception(self, exception: BaseException) -> None:
        pass


class DirectOutcome:
    """A request's future whose outcome goes straight to its owner, with no asyncio future and
    no loop hop: a front end that answers many requests per loop turn (a --workers front end's
    engine side, the native front end). Loop thread only. Subclasses say where an outcome goes
    (`_deliver`); `cancel()` is the client going away while the request runs."""

    __slots__ = ("_callbacks", "_cancelled", "_done", "_error", "_result")

    def __init__(self) -> None:
        self._done = False
        self._cancelled = False
        self._result: Response | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[DirectOutcome], object]] | None = None

    def _deliver(self, result: Response | None, error: BaseException | None) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        """The client cancelled the request (what a running model's is_cancelled() reads)."""
        return self._cancelled

    def cancel(self) -> None:
        if not self._done:
            self._done = self._cancelled = True
            self._deliver(None, Cancelled("request cancelled by the client"))
            self._run_callbacks()

    def result(self) -> Response | None:
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self) -> BaseException | None:
        return self._error

    def set_result(self, result: Response) -> None:
        if self._done:
            return
        self._done, self._result = True, result
        self._deliver(result, None)
        self._run_callbacks()

    def set_exception(self, error: BaseException) -> None:
        if self._done:
            return
        self._done, self._error = True, error
        self._deliver(None, error)
        self._run_callbacks()

    def add_done_callback(self, callback: Callable[[DirectOutcome], object]) -> None:
        if self._done:
            callback(self)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def _run_callbacks(self) -> None:
        if self._callbacks:
            for callback in self._callbacks:
                callback(self)
            self._callbacks = None


class RequestState(enum.IntEnum):
    QUEUED = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(slots=True, eq=False)
class Request:
    """One inference request as the scheduler sees it (protocol already stripped away)."""

    id: str
    inputs: dict[str, np.ndarray]
    #: Names of the outputs to return; empty means every output the model declares.
    requested_outputs: tuple[str, ...]
    #: Rows this request contributes to a batch (its first dimension; 1 for unbatched models).
    rows: int
    future: OutcomeFuture
    #: Priority level, 1 is highest; 0 means the model's default level.
    priority: int = 0
    #: Queue timeout in microseconds from the request's `timeout` parameter; 0 means the policy's.
    timeout_us: int = 0
    #: Absolute deadline on the monotonic clock (seconds), from the client (gRPC deadline), or None.
    deadline: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: Monotonic nanoseconds when the server received the request (stamped by the front end).
    received_ns: int = 0
    #: Who sent it: the API key's name when keys are configured, else None.
    principal: str | None = None
    #: Decoupled models: called on the event loop with each `StreamedResponse` the model sends
    #: (0..N, the last one `final`); set by the front end, None for unary requests. The future
    #: resolves (with an empty Response) at the final flag.
    stream: Callable[[StreamedResponse], None] | None = None
    #: The BLS call this request is (engine/bls.py's token for it), 0 for a client's request:
    #: what a model instance executing it tells the deadlock check when it calls out itself.
    bls_call: int = 0
    #: The caller asked to cancel it (a BLS response iterator's cancel()) while it may already be
    #: executing: the model sees is_cancelled() and may still answer (Triton's request
    #: cancellation), unlike a client that went away, whose future is cancelled.
    cancel_requested: bool = False
    #: Roll-outs: the value of the header the model's roll-out splits traffic by (set by the
    #: front end when the resolved version names one in `split_header`), else None: the engine
    #: then splits by `principal`.
    split_key: str | None = None
    #: A roll-out's paired copy of a client's request (engine/rollout): it waits behind every
    #: priority level, does not count against the levels' queue sizes, and answers the roll-out,
    #: never a client.
    mirror: bool = False
    #: The model version a roll-out routed this request to (engine-owned: cancel finds it here).
    routed_to: Any = None
    # --- owned by the scheduler -------------------------------------------------------------
    state: RequestState = RequestState.QUEUED
    #: When the request entered its queue (monotonic ns).
    queued_ns: int = 0
    #: Index of the priority queue holding it (0 = highest level).
    level: int = 0
    #: Its queue timeout passed under timeout_action DELAY: it now waits behind everything else.
    delayed: bool = False


class Rescheduled:
    """What a per-request runtime returns for a request the model released with RESCHEDULE
    (an iterative sequence): the sequence batcher queues it again for a later batch."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RESCHEDULED"


RESCHEDULED = Rescheduled()


class StageTimes(NamedTuple):
    """When a batch went through each stage (monotonic ns), shared by the batch's requests."""

    dispatched_ns: int
    #: Compute began: merging the requests' inputs into the batch.
    compute_start_ns: int
    #: The runtime's infer call began (inputs merged) and ended.
    infer_start_ns: int
    infer_end_ns: int
    #: Outputs split back into per-request views.
    done_ns: int


class StepTiming(NamedTuple):
    """One ensemble step as it ran (monotonic ns), for the ensemble request's trace."""

    index: int  # type: ignore[assignment]  # a field name that shadows tuple.index, by design
    model: str
    version: str
    submitted_ns: int
    queued_ns: int
    finished_ns: int
    #: The composing model's batch stage times, or None.
    timings: StageTimes | None


@dataclass(frozen=True, slots=True)
class Response:
    """What a request's future resolves to: its outputs (views into the batch's outputs)."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    #: The batch's stage times (for tracing); the request's own queued_ns is on the Request.
    timings: StageTimes | None = None
    #: Response parameters set by the model (Triton's InferenceResponse(parameters=...)).
    parameters: dict[str, Any] | None = None
    #: An ensemble's steps, in the order they finished (empty for other models).
    steps: tuple[StepTiming, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamedResponse:
    """One response of a decoupled model's request: outputs (possibly none), response
    parameters, an error message, and whether it is the request's last."""

    outputs: dict[str, np.ndarray]
    final: bool = False
    #: Non-empty: this response reports an error (the model's message).
    error: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    #: The convoy.errors class name the error maps to ("" for InferenceFailed), so a BLS caller
    #: sees the code the model gave it (Triton's TritonError codes).
    error_kind: str = ""
    #: The error's gRPC status-code name (e.g. "INVALID_ARGUMENT", from the model's error
    #: code); "" means INTERNAL. Ends the stream with it in Triton's triton_grpc_error mode.
    error_status: str = ""


@dataclass(frozen=True, slots=True)
class ModelCall:
    """A request from model code to another model of the same server (Triton's BLS)."""

    model_name: str
    inputs: dict[str, np.ndarray]
    #: Empty: every output the model declares.
    requested_outputs: tuple[str, ...] = ()
    model_version: str = ""
    request_id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    #: Queue timeout in microseconds (0: the model's policy).
    timeout_us: int = 0
    #: The model instance blocked while the call runs ("model/version/index"), "" when none is
    #: (a thread the model started, a coroutine of a decoupled model running in the background).
    waiter: str = ""
    #: The BLS calls that instance is executing now (Request.bls_call of its batch's requests).
    serving: tuple[int, ...] = ()


class ModelCaller(Protocol):
    """Calls another model of this server through its scheduler (so the call batches with
    the rest of its traffic). Methods are coroutines run on the server's event loop; errors are
    raised as ConvoyError."""

    async def infer(self, call: ModelCall) -> Response:
        """One response from a model that is not decoupled."""

    def stream_threadsafe(
        self, call: ModelCall, sink: Callable[[StreamedResponse], None], future: OutcomeFuture
    ) -> Callable[[], None]:
        """From a thread other than the loop's: queue the call; every response goes to `sink` (on
        the loop) as it comes, and `future` resolves after the last (or with the error). A model
        that is not decoupled yields its one response as the final. Returns a function that
        asks for cancellation (Triton's: the model sees is_cancelled() and may still answer)."""

    def submit_threadsafe(self, call: ModelCall, future: OutcomeFuture) -> Callable[[], None]:
        """From a thread other than the loop's: queue the call (its Response or error goes to
        `future`, a concurrent.futures.Future); returns a function that cancels it. Raises
        ConvoyError when the call is refused before queueing. The cheap path for a blocking
        `exec()`: no coroutine, one hop to the loop and one back."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared model input or output."""

    name: str
    datatype: str  # V2 datatype name, e.g. "FP32"
    #: Dims without the batch dimension when the model batches; -1 means variable.
    dims: tuple[int, ...]
    optional: bool = False
    #: Shape the runtime receives instead of `dims` (config `reshape`), or None.
    reshape: tuple[int, ...] | None = None
    #: The tensor's `dims` describe a shape that may carry different rows (ragged batching).
    allow_ragged_batch: bool = False


@dataclass(frozen=True, slots=True)
class ModelServices:
    """What the server lends to model code (the python backend's BLS calls, custom metrics)."""

    #: Calls to the server's other models; None where there is no server to call (a worker
    #: process without a channel back, a unit test).
    caller: ModelCaller | None
    #: The server's event loop (the caller's coroutines run there) and its thread's id.
    loop: Any
    loop_thread_id: int
    #: Custom metric families exported on /metrics (runtimes/custom_metrics.py), or None.
    metrics: Any = None
    #: The model code runs in an isolated worker process of its own (runtimes/isolated.py),
    #: which it may end: the server restarts the worker. False: it shares the server's process.
    isolated: bool = False
