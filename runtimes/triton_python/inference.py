"""Requests and responses of triton_python_backend_utils: InferenceRequest (with BLS exec /
async_exec), InferenceResponse, the response sender, and the scope/binding through which model
code reaches the server's services."""

from __future__ import annotations

import contextvars
import json
from dataclasses import dataclass

from convoy.types import ModelCall, StreamedResponse

from .datatypes import (
    TRITONSERVER_REQUEST_FLAG_SEQUENCE_END,
    TRITONSERVER_REQUEST_FLAG_SEQUENCE_START,
    TRITONSERVER_REQUEST_RELEASE_ALL,
    TRITONSERVER_REQUEST_RELEASE_RESCHEDULE,
    TRITONSERVER_RESPONSE_COMPLETE_FINAL,
)
from .errors import TritonError, TritonModelException, error_class
from .tensor import Tensor


# --- the server's services, bound by the adapter -----------------------------------------------
@dataclass(frozen=True, slots=True)
class Scope:
    """Which model code runs on this thread / task (set around initialize, execute, finalize)."""

    model_name: str
    #: "initialize", "execute" or "finalize" (BLS is only allowed in execute, as on Triton).
    phase: str = "execute"
    #: The instance that waits while this code waits ("model/version/index"); "" when none
    #: does (the background coroutines of a decoupled `async def execute`).
    waiter: str = ""
    #: The BLS calls among the requests being executed (Request.bls_call), for the deadlock rule.
    serving: tuple[int, ...] = ()


_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("pb_utils_scope", default=None)


class _Binding:
    """The server's services for this process: set once by the adapter (`bind`)."""

    services = None  # convoy.types.ModelServices-like: caller, loop, metrics


def bind(services) -> None:
    """Hand this module the server's services (caller, loop, custom metrics)."""
    _Binding.services = services


def enter_scope(scope: Scope) -> contextvars.Token:
    return _scope.set(scope)


def leave_scope(token: contextvars.Token) -> None:
    _scope.reset(token)


def current_scope() -> Scope | None:
    return _scope.get()


# --- requests and responses ---------------------------------------------------------------------
def checked_parameters(owner: str, parameters) -> dict:
    """Request / response parameters as Triton takes them: a dict (or its JSON text) of str keys
    and bool, int or str values (what the V2 protocol's parameters can carry)."""
    if parameters is None:
        return {}
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters) if parameters else {}
        except ValueError as exc:
            raise TritonModelException(f"{owner} parameters: not valid JSON ({exc})") from None
    if not isinstance(parameters, dict):
        raise TritonModelException(
            f"{owner} parameters: expected a dict, got {type(parameters).__name__}"
        )
    for key, value in parameters.items():
        if not isinstance(key, str):
            raise TritonModelException(
                f"{owner} parameters: keys must be str, got {type(key).__name__} ({key!r})"
            )
        if not isinstance(value, bool | int | str):
            raise TritonModelException(
                f"{owner} parameters: '{key}' must be a bool, int or str, got "
                f"{type(value).__name__} ({value!r})"
            )
    return dict(parameters)


class InferenceResponse:
    """What `execute` returns per request (or a response sender sends)."""

    __slots__ = ("_error", "_parameters", "_tensors")

    def __init__(self, output_tensors=None, error: TritonError | None = None, parameters=None) -> None:
        tensors = list(output_tensors) if output_tensors is not None else []
        for tensor in tensors:
            if not isinstance(tensor, Tensor):
                raise TritonModelException(
                    f"InferenceResponse output_tensors must hold pb_utils.Tensor, got "
                    f"{type(tensor).__name__}"
                )
        if error is not None and not isinstance(error, TritonError):
            raise TritonModelException("InferenceResponse error must be a pb_utils.TritonError")
        self._tensors = tensors
        self._error = error
        self._parameters = checked_parameters("InferenceResponse", parameters)

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def parameter_dict(self) -> dict:
        return self._parameters


class InferenceResponseSender:
    """Sends a decoupled request's responses as the model produces them (any thread)."""

    def __init__(self, request: InferenceRequest) -> None:
        self._request = request
        self._closed = False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self._closed:
            raise TritonModelException(
                "response sender: the final flag was already sent for this request"
            )
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(
                f"response sender: expected an InferenceResponse or None, got {type(response).__name__}"
            )
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is None and not final:
            raise TritonModelException(
                "response sender: send(None) needs flags=TRITONSERVER_RESPONSE_COMPLETE_FINAL"
            )
        if final:
            self._closed = True
        self._request._deliver(response, final)

    def is_cancelled(self) -> bool:
        return self._request.is_cancelled()


class InferenceRequest:
    """A request: handed to `execute` (one per client request), or built by model code to call
    another model (BLS: `exec`, `async_exec`)."""

    #: Server requests of an iterative-sequence model may be rescheduled while execute() runs.
    _reschedulable = False
    _executing = False

    def __init__(
        self,
        model_name: str = "",
        inputs=None,
        requested_output_names=None,
        request_id: str = "",
        correlation_id=0,
        flags: int = 0,
        timeout: int = 0,
        model_version: int = -1,
        parameters=None,
        preferred_memory=None,
        trace=None,
    ) -> None:
        # Triton's binding takes bytes for the string arguments too (the bls_sync example names
        # the model with an element of a BYTES tensor).
        self.model_name = _text("model_name", model_name)
        self._inputs = list(inputs or [])
        for tensor in self._inputs:
            if not isinstance(tensor, Tensor):
                raise TritonModelException(
                    f"InferenceRequest inputs must hold pb_utils.Tensor, got {type(tensor).__name__}"
                )
        self._requested = [
            _text("requested_output_names", name) for name in requested_output_names or []
        ]
        self._request_id = _text("request_id", request_id)
        self._correlation_id = correlation_id
        self._flags = flags
        if timeout is not None and (not isinstance(timeout, int) or timeout < 0):
            raise TritonModelException("InferenceRequest timeout must be microseconds (int >= 0)")
        self._timeout = timeout or 0
        self.model_version = model_version
        self._parameters = checked_parameters("InferenceRequest", parameters)
        # Server-side requests (handed to execute) only:
        self._origin = None  # the convoy Request
        self._deliver_to = None  # callable(request, StreamedResponse) on any thread
        self._sender: InferenceResponseSender | None = None
        self._final_sent = False
        self._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL

    # -- accessors (Triton's names) --
    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self):
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def requested_output_names(self) -> list[str]:
        return self._requested

    def set_release_flags(self, flags: int) -> None:
        """TRITONSERVER_REQUEST_RELEASE_RESCHEDULE: run this request again in a later batch (a
        model with sequence_batching.iterative_sequence; call it before execute() returns)."""
        if isinstance(flags, bool) or not isinstance(flags, int):
            raise TritonModelException(f"set_release_flags: expected an int, got {flags!r}")
        if flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
            if not self._reschedulable:
                # Triton's text (its core refuses the flag for such a model).
                raise TritonModelException(
                    "Request is released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, while the "
                    "model is not configured to handle such a flag."
                )
            if not self._executing:
                raise TritonModelException(
                    "set_release_flags(TRITONSERVER_REQUEST_RELEASE_RESCHEDULE) must be called "
                    "before execute() returns"
                )
        self._release_flags = flags

    @property
    def _rescheduled(self) -> bool:
        return bool(self._release_flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)

    def get_response_sender(self) -> InferenceResponseSender:
        if self._deliver_to is None:
            raise TritonModelException(
                "get_response_sender() is not available here (model code in an isolated worker "
                "process answers by returning its responses)"
            )
        if self._sender is None:
            self._sender = InferenceResponseSender(self)
        return self._sender

    def is_cancelled(self) -> bool:
        origin = self._origin
        if origin is None:
            return False
        cancelled = getattr(origin, "cancelled", None)
        if cancelled is not None and not hasattr(origin, "future"):
            return bool(cancelled())
        return origin.cancel_requested or origin.future.cancelled()

    def _deliver(self, response: InferenceResponse | None, final: bool) -> None:
        if final:
            self._final_sent = True
        if response is None:
            item = StreamedResponse({}, final=final)
        else:
            error = response.error()
            kind = "" if error is None else error_class(error.code()).__name__
            item = StreamedResponse(
                {t.name(): t.as_numpy() for t in response.output_tensors()},
                final=final,
                error="" if error is None else (error.message() or "model reported an error"),
                parameters=response.parameter_dict(),
                error_kind="" if kind == "InferenceFailed" else kind,
            )
        self._deliver_to(self, item)

    # -- BLS --
    def _call(self) -> ModelCall:
        if not self.model_name:
            raise TritonModelException("InferenceRequest needs model_name to be executed")
        scope = _scope.get()
        if scope is not None and scope.phase != "execute":
            raise TritonModelException(bls.OUTSIDE_EXECUTE)
        version = self.model_version
        return ModelCall(
            model_name=self.model_name,
            inputs={t.name(): t.as_numpy() for t in self._inputs},
            requested_outputs=tuple(self._requested),
            model_version="" if version is None or version < 0 else str(version),
            request_id=self._request_id,
            parameters=self._parameters,
            timeout_us=self._timeout,
            waiter=scope.waiter if scope is not None else "",
            serving=scope.serving if scope is not None else (),
        )

    def exec(self, decoupled: bool = False):
        """Run the request on its model and wait (call it from the model's execution thread,
        never from an event loop). decoupled=True: an iterator over the model's responses as
        they arrive, with `cancel()`."""
        return bls.execute(self._call(), decoupled)

    async def async_exec(self, decoupled: bool = False):
        """`await`-able exec for `async def execute`; decoupled=True: the response iterator,
        once its first response has arrived."""
        return await bls.execute_async(self._call(), decoupled)


class ServerRequest(InferenceRequest):
    """A client's request as `execute` sees it: reads its Convoy request lazily (no copies)."""

    _sender = None
    _final_sent = False
    _release_flags = TRITONSERVER_REQUEST_RELEASE_ALL

    def __init__(
        self, origin, deliver, model_name: str, model_version: int, reschedulable: bool = False
    ) -> None:
        self._reschedulable = reschedulable
        self._executing = True
        self._origin = origin
        self._deliver_to = deliver
        self.model_name = model_name
        self.model_version = model_version

    def inputs(self) -> list[Tensor]:
        tensors = []
        for name, array in self._origin.inputs.items():
            tensor = Tensor.__new__(Tensor)
            tensor._name = name
            tensor._array = array
            tensors.append(tensor)
        return tensors

    def request_id(self) -> str:
        return self._origin.id

    def correlation_id(self):
        parameters = self._origin.parameters
        return parameters.get("sequence_id", 0) if parameters else 0

    def flags(self) -> int:
        parameters = self._origin.parameters
        flags = 0
        if parameters and parameters.get("sequence_start"):
            flags |= TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
        if parameters and parameters.get("sequence_end"):
            flags |= TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
        return flags

    def timeout(self) -> int:
        return self._origin.timeout_us

    def parameters(self) -> str:
        return json.dumps(self._origin.parameters or {})

    def requested_output_names(self) -> list[str]:
        return list(self._origin.requested_outputs)

    @property
    def _parameters(self) -> dict:
        return self._origin.parameters or {}

    @property
    def _timeout(self) -> int:
        return self._origin.timeout_us

    @property
    def _request_id(self) -> str:
        return self._origin.id

    @property
    def _requested(self) -> list[str]:
        return list(self._origin.requested_outputs)

    @property
    def _inputs(self) -> list[Tensor]:
        return self.inputs()


def _text(argument: str, value) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if not isinstance(value, str):
        raise TritonModelException(
            f"InferenceRequest {argument}: expected str (or bytes), got {type(value).__name__}"
        )
    return value


from . import bls  # noqa: E402  (bls reads InferenceResponse from this module)
