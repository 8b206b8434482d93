"""Triton's `triton_python_backend_utils`, written for Convoy from its documented behaviour.

Model code imports it as `import triton_python_backend_utils as pb_utils`; Convoy puts this
module in `sys.modules` under that name before importing a model.py (in the server and in
isolated worker processes). Tensors are numpy arrays (BYTES as `np.object_` of `bytes`) viewing
the request's data; nothing is copied on the way to `execute`.

The server's services (BLS calls, custom metrics) reach this module through `bind` (called by
the adapter when a model loads); which model is executing comes from a context variable the
adapter sets around `initialize` / `execute`, so a BLS call knows its callers (the cycle rule).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from convoy.datatypes import serialize_bytes
from convoy.errors import (
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Unavailable,
    Unsupported,
)
from convoy.types import ModelCall, StreamedResponse

# --- flags ----------------------------------------------------------------------------------------
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

# --- datatypes (TRITONSERVER_DataType values) ---------------------------------------------------
TRITONSERVER_TYPE_INVALID = 0
TRITONSERVER_TYPE_BOOL = 1
TRITONSERVER_TYPE_UINT8 = 2
TRITONSERVER_TYPE_UINT16 = 3
TRITONSERVER_TYPE_UINT32 = 4
TRITONSERVER_TYPE_UINT64 = 5
TRITONSERVER_TYPE_INT8 = 6
TRITONSERVER_TYPE_INT16 = 7
TRITONSERVER_TYPE_INT32 = 8
TRITONSERVER_TYPE_INT64 = 9
TRITONSERVER_TYPE_FP16 = 10
TRITONSERVER_TYPE_FP32 = 11
TRITONSERVER_TYPE_FP64 = 12
TRITONSERVER_TYPE_BYTES = 13
TRITONSERVER_TYPE_BF16 = 14

_TYPE_NUMPY: dict[int, type] = {
    TRITONSERVER_TYPE_BOOL: np.bool_,
    TRITONSERVER_TYPE_UINT8: np.uint8,
    TRITONSERVER_TYPE_UINT16: np.uint16,
    TRITONSERVER_TYPE_UINT32: np.uint32,
    TRITONSERVER_TYPE_UINT64: np.uint64,
    TRITONSERVER_TYPE_INT8: np.int8,
    TRITONSERVER_TYPE_INT16: np.int16,
    TRITONSERVER_TYPE_INT32: np.int32,
    TRITONSERVER_TYPE_INT64: np.int64,
    TRITONSERVER_TYPE_FP16: np.float16,
    TRITONSERVER_TYPE_FP32: np.float32,
    TRITONSERVER_TYPE_FP64: np.float64,
    TRITONSERVER_TYPE_BYTES: np.object_,
}
_NUMPY_TYPE = {np.dtype(t): code for code, t in _TYPE_NUMPY.items()}
_NUMPY_TYPE[np.dtype(np.bytes_)] = TRITONSERVER_TYPE_BYTES
_CONFIG_NAMES = {
    "TYPE_BOOL": TRITONSERVER_TYPE_BOOL,
    "TYPE_UINT8": TRITONSERVER_TYPE_UINT8,
    "TYPE_UINT16": TRITONSERVER_TYPE_UINT16,
    "TYPE_UINT32": TRITONSERVER_TYPE_UINT32,
    "TYPE_UINT64": TRITONSERVER_TYPE_UINT64,
    "TYPE_INT8": TRITONSERVER_TYPE_INT8,
    "TYPE_INT16": TRITONSERVER_TYPE_INT16,
    "TYPE_INT32": TRITONSERVER_TYPE_INT32,
    "TYPE_INT64": TRITONSERVER_TYPE_INT64,
    "TYPE_FP16": TRITONSERVER_TYPE_FP16,
    "TYPE_FP32": TRITONSERVER_TYPE_FP32,
    "TYPE_FP64": TRITONSERVER_TYPE_FP64,
    "TYPE_STRING": TRITONSERVER_TYPE_BYTES,
    "TYPE_BF16": TRITONSERVER_TYPE_BF16,
}


def triton_string_to_numpy(triton_type_string: str):
    """'TYPE_FP32' -> np.float32 (TYPE_STRING -> np.object_)."""
    code = _CONFIG_NAMES.get(triton_type_string)
    if code is None or code not in _TYPE_NUMPY:
        raise TritonModelException(f"unsupported data type '{triton_type_string}'")
    return _TYPE_NUMPY[code]


def triton_to_numpy_type(data_type: int):
    return _TYPE_NUMPY.get(data_type)


def numpy_to_triton_type(data_type) -> int | None:
    try:
        return _NUMPY_TYPE.get(np.dtype(data_type))
    except TypeError:
        return None


def serialize_byte_tensor(input_tensor: np.ndarray) -> np.ndarray | None:
    """BYTES elements, length-prefixed and concatenated in row-major order, as a uint8 array."""
    if input_tensor.size == 0:
        return np.empty([0], dtype=np.uint8)
    array = np.asarray(input_tensor, dtype=object)
    encoded = np.empty(array.shape, dtype=object)
    for index, value in np.ndenumerate(array):
        encoded[index] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return np.frombuffer(serialize_bytes(encoded), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor) -> np.ndarray:
    """The inverse of serialize_byte_tensor: a 1-D np.object_ array of bytes."""
    buffer = encoded_tensor.tobytes() if isinstance(encoded_tensor, np.ndarray) else encoded_tensor
    elements = []
    offset = 0
    view = memoryview(buffer)
    while offset < len(view):
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    result = np.empty(len(elements), dtype=object)
    result[:] = elements
    return result


# --- errors -----------------------------------------------------------------------------------------
class TritonError:
    """An error a model reports in a response (not raised)."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = str(message)
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class TritonModelException(Exception):
    """Raised by this module's calls (Triton raises it for misuse of its API)."""

    def message(self) -> str:
        return str(self)


_ERROR_CODES: tuple[tuple[type[ConvoyError], int], ...] = (
    (InvalidInput, TritonError.INVALID_ARG),
    (ModelNotFound, TritonError.NOT_FOUND),
    (Unavailable, TritonError.UNAVAILABLE),
    (Unsupported, TritonError.UNSUPPORTED),
    (Cancelled, TritonError.CANCELLED),
    (DeadlineExceeded, TritonError.UNAVAILABLE),
)


def error_of(exc: BaseException) -> TritonError:
    """The TritonError a BLS response carries for a Convoy error."""
    for cls, code in _ERROR_CODES:
        if isinstance(exc, cls):
            return TritonError(str(exc), code)
    return TritonError(str(exc), TritonError.INTERNAL)


def convoy_error(error: TritonError, model: str) -> ConvoyError:
    """The Convoy error a client gets for a response's TritonError (status by its code)."""
    message = error.message()
    for cls, code in _ERROR_CODES:
        if code == error.code() and cls is not DeadlineExceeded:
            return cls(message)
    from convoy.errors import InferenceFailed

    return InferenceFailed(message or f"model '{model}' reported an error")


# --- tensors ----------------------------------------------------------------------------------------
class Tensor:
    """A named tensor: a numpy array (BYTES as np.object_) on the CPU."""

    __slots__ = ("_array", "_name")

    def __init__(self, name: str, data) -> None:
        if not isinstance(name, str):
            raise TritonModelException(f"Tensor name must be a string, got {type(name).__name__}")
        array = data if type(data) is np.ndarray else np.asarray(data)
        if array.dtype not in _NUMPY_TYPE:
            if array.dtype.kind in "SU":
                array = array.astype(object)
            elif array.dtype.kind != "V":  # V: bfloat16 and the like travel as raw bits
                raise TritonModelException(
                    f"tensor '{name}': numpy dtype {array.dtype} has no Triton datatype"
                )
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def triton_dtype(self) -> int:
        code = numpy_to_triton_type(self._array.dtype)
        return TRITONSERVER_TYPE_BF16 if code is None else code

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self):
        if self._array.dtype == object:
            raise TritonModelException(f"tensor '{self._name}': BYTES tensors have no DLPack form")
        return self._array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, capsule) -> Tensor:
        """A Tensor from an object with `__dlpack__` (torch, cupy, numpy) or a DLPack capsule;
        device tensors are copied to the host."""
        if hasattr(capsule, "__dlpack__"):
            holder = capsule
            if getattr(capsule, "device", None) is not None and hasattr(capsule, "cpu"):
                holder = capsule.cpu()  # torch on a GPU: Convoy's tensors live on the host
            return Tensor(name, np.from_dlpack(holder))
        try:
            import torch.utils.dlpack

            return Tensor(name, torch.utils.dlpack.from_dlpack(capsule).cpu().numpy())
        except ImportError:
            raise TritonModelException(
                "Tensor.from_dlpack needs an object with __dlpack__ (a raw capsule needs torch)"
            ) from None

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={self.shape()}, dtype={self._array.dtype})"


# --- the server's services, bound by the adapter -----------------------------------------------
@dataclass(frozen=True, slots=True)
class Scope:
    """Which model is executing on this thread / task (set around initialize and execute)."""

    model_name: str
    #: Models waiting on the current execution (the batch's requests' callers + this model).
    callers: tuple[str, ...]


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


def _services():
    services = _Binding.services
    if services is None or services.caller is None:
        raise TritonModelException(
            "BLS calls are not available here (model code in an isolated worker process, or "
            "outside a server)"
        )
    return services


# --- requests and responses ---------------------------------------------------------------------
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
        if isinstance(parameters, str):
            parameters = json.loads(parameters) if parameters else {}
        self._parameters = dict(parameters or {})

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
        self.model_name = model_name
        self._inputs = list(inputs or [])
        for tensor in self._inputs:
            if not isinstance(tensor, Tensor):
                raise TritonModelException(
                    f"InferenceRequest inputs must hold pb_utils.Tensor, got {type(tensor).__name__}"
                )
        self._requested = list(requested_output_names or [])
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        if timeout is not None and (not isinstance(timeout, int) or timeout < 0):
            raise TritonModelException("InferenceRequest timeout must be microseconds (int >= 0)")
        self._timeout = timeout or 0
        self.model_version = model_version
        if isinstance(parameters, str):
            parameters = json.loads(parameters) if parameters else {}
        self._parameters = dict(parameters or {})
        # Server-side requests (handed to execute) only:
        self._origin = None  # the convoy Request
        self._deliver_to = None  # callable(request, StreamedResponse) on any thread
        self._sender: InferenceResponseSender | None = None

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
        if flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
            raise TritonModelException(
                "request rescheduling (TRITONSERVER_REQUEST_RELEASE_RESCHEDULE) is not supported"
            )

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
        return origin.future.cancelled()

    def _deliver(self, response: InferenceResponse | None, final: bool) -> None:
        if response is None:
            item = StreamedResponse({}, final=final)
        else:
            error = response.error()
            item = StreamedResponse(
                {t.name(): t.as_numpy() for t in response.output_tensors()},
                final=final,
                error="" if error is None else (error.message() or "model reported an error"),
                parameters=response.parameter_dict(),
            )
        self._deliver_to(self, item)

    # -- BLS --
    def _call(self) -> ModelCall:
        if not self.model_name:
            raise TritonModelException("InferenceRequest needs model_name to be executed")
        scope = _scope.get()
        version = self.model_version
        return ModelCall(
            model_name=self.model_name,
            inputs={t.name(): t.as_numpy() for t in self._inputs},
            requested_outputs=tuple(self._requested),
            model_version="" if version is None or version < 0 else str(version),
            request_id=self._request_id,
            parameters=self._parameters,
            timeout_us=self._timeout,
            callers=scope.callers if scope is not None else (),
        )

    def exec(self, decoupled: bool = False):
        """Run the request on its model and wait (call it from the model's execution thread,
        never from an event loop). decoupled=True: an iterator over the model's responses."""
        services = _services()
        if threading.get_ident() == services.loop_thread_id:
            raise TritonModelException(
                "InferenceRequest.exec() called on the server's event loop would block it; "
                "use `await request.async_exec()`"
            )
        call = self._call()
        wait = self._timeout / 1e6 if self._timeout else None
        if decoupled:
            if services.loop is None:  # a worker process: the caller says why it cannot stream
                return iter(
                    [
                        InferenceResponse(
                            error=TritonError(
                                "decoupled BLS calls (exec(decoupled=True)) are not available to "
                                "a model in an isolated worker process",
                                TritonError.UNSUPPORTED,
                            )
                        )
                    ]
                )
            return _stream(services, call, wait)
        future = Future()
        try:
            cancel = services.caller.submit_threadsafe(call, future)
            response = future.result(wait)
        except FutureTimeout:
            cancel()
            return InferenceResponse(
                error=TritonError(
                    f"BLS request to '{call.model_name}' timed out", TritonError.UNAVAILABLE
                )
            )
        except ConvoyError as exc:
            return InferenceResponse(error=error_of(exc))
        if call.requested_outputs:
            outputs = response.outputs
            return InferenceResponse(
                [Tensor(n, outputs[n]) for n in call.requested_outputs if n in outputs],
                parameters=response.parameters,
            )
        return _from_response(response)

    async def async_exec(self, decoupled: bool = False):
        """`await`-able exec for `async def execute`; decoupled=True: an iterator over the
        responses (all of them received by the time the await returns)."""
        services = _services()
        call = self._call()
        if decoupled:
            return await _async_stream(services, call)
        if services.loop is None:  # a worker process: the caller runs here
            wrapped = asyncio.ensure_future(services.caller.infer(call))
        else:
            future = asyncio.run_coroutine_threadsafe(services.caller.infer(call), services.loop)
            wrapped = asyncio.wrap_future(future)
        try:
            if self._timeout:
                return _from_response(await asyncio.wait_for(wrapped, self._timeout / 1e6))
            return _from_response(await wrapped)
        except TimeoutError:
            return InferenceResponse(
                error=TritonError(
                    f"BLS request to '{call.model_name}' timed out", TritonError.UNAVAILABLE
                )
            )
        except ConvoyError as exc:
            return InferenceResponse(error=error_of(exc))


class ServerRequest(InferenceRequest):
    """A client's request as `execute` sees it: reads its Convoy request lazily (no copies)."""

    _sender = None

    def __init__(self, origin, deliver, model_name: str, model_version: int) -> None:
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


def _from_response(response) -> InferenceResponse:
    tensors = [Tensor(name, array) for name, array in response.outputs.items()]
    return InferenceResponse(tensors, parameters=response.parameters)


def _from_streamed(item: StreamedResponse) -> InferenceResponse:
    tensors = [Tensor(name, array) for name, array in item.outputs.items()]
    error = TritonError(item.error) if item.error else None
    return InferenceResponse(tensors, error=error, parameters=item.parameters)


_END = object()


def _stream(services, call: ModelCall, wait: float | None) -> Iterator[InferenceResponse]:
    """Responses of a decoupled BLS call as an iterator; the last one is empty with the final
    flag when the model sent its final flag without a response (as Triton's iterator does)."""
    import queue

    # Unbounded on purpose: the producer is the event loop, which must not block; the model
    # under call bounds how many responses a request gets.
    items: queue.SimpleQueue = queue.SimpleQueue()

    async def run() -> None:
        try:
            await services.caller.infer_stream(call, items.put)
        except ConvoyError as exc:
            items.put(exc)
        items.put(_END)

    future = asyncio.run_coroutine_threadsafe(run(), services.loop)
    while True:
        try:
            item = items.get(timeout=wait)
        except queue.Empty:
            future.cancel()
            yield InferenceResponse(
                error=TritonError(
                    f"BLS request to '{call.model_name}' timed out", TritonError.UNAVAILABLE
                )
            )
            return
        if item is _END:
            return
        if isinstance(item, ConvoyError):
            yield InferenceResponse(error=error_of(item))
            continue
        yield _from_streamed(item)


async def _async_stream(services, call: ModelCall) -> Iterator[InferenceResponse]:
    """A decoupled BLS call from `async def execute`: awaits every response (without blocking
    the model's loop), then iterates over them, as Triton's awaited iterator does."""
    collected: list[InferenceResponse] = []
    if services.loop is None:  # a worker process: the caller says why it cannot stream
        try:
            await services.caller.infer_stream(call, collected.append)
        except ConvoyError as exc:
            return iter([InferenceResponse(error=error_of(exc))])

    def sink(item: StreamedResponse) -> None:  # on the server's loop
        collected.append(_from_streamed(item))

    future = asyncio.run_coroutine_threadsafe(services.caller.infer_stream(call, sink), services.loop)
    try:
        await asyncio.wrap_future(future)
    except ConvoyError as exc:
        collected.append(InferenceResponse(error=error_of(exc)))
    return iter(collected)


# --- helpers ------------------------------------------------------------------------------------------
def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    origin = inference_request._origin
    if origin is not None:  # a request handed to execute: look its array up by name
        array = origin.inputs.get(name)
        if array is None:
            return None
        tensor = Tensor.__new__(Tensor)
        tensor._name = name
        tensor._array = array
        return tensor
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    for item in model_config.get("input", []):
        if item.get("name") == name:
            return item
    return None


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    for item in model_config.get("output", []):
        if item.get("name") == name:
            return item
    return None


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    policy = model_config.get("model_transaction_policy") or {}
    return bool(policy.get("decoupled", False))


def get_model_dir() -> str:
    """The version folder of the model executing now (where its model.py lives)."""
    scope = _scope.get()
    directory = getattr(scope, "model_dir", None) if scope is not None else None
    if directory is None:
        directory = _model_dirs.get(threading.get_ident())
    if directory is None:
        raise TritonModelException("get_model_dir() is only available inside a model")
    return directory


#: thread id -> version folder of the model instance owning that thread.
_model_dirs: dict[int, str] = {}


# --- logging ----------------------------------------------------------------------------------------
class Logger:
    """Triton's model logger, writing to Convoy's log (logger `convoy.model`)."""

    class LogLevel:
        INFO = logging.INFO
        WARNING = logging.WARNING
        ERROR = logging.ERROR
        VERBOSE = logging.DEBUG

    _log = logging.getLogger("convoy.model")

    @classmethod
    def log(cls, message: str, level: int = logging.INFO) -> None:
        cls._log.log(level, "%s", message)

    @classmethod
    def log_info(cls, message: str) -> None:
        cls._log.info("%s", message)

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls._log.warning("%s", message)

    @classmethod
    def log_error(cls, message: str) -> None:
        cls._log.error("%s", message)

    @classmethod
    def log_verbose(cls, message: str) -> None:
        cls._log.debug("%s", message)


# --- custom metrics -----------------------------------------------------------------------------------
class MetricFamily:
    """A custom metric family exported on the server's /metrics."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"

    def __init__(self, name: str, description: str, kind: str) -> None:
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise TritonModelException(
                f"MetricFamily kind must be COUNTER, GAUGE or HISTOGRAM, got {kind!r}"
            )
        services = _Binding.services
        registry = getattr(services, "metrics", None)
        if registry is None:
            raise TritonModelException("custom metrics are not available outside a server")
        self._family = registry.family(name, description, kind)
        self.name = name
        self.kind = kind

    def Metric(self, labels: dict | None = None, buckets=None) -> Metric:
        return Metric(self._family.child(labels or {}, buckets))


class Metric:
    """One labelled series of a MetricFamily."""

    def __init__(self, series) -> None:
        self._series = series

    def increment(self, value: float) -> None:
        self._series.increment(value)

    def set(self, value: float) -> None:
        self._series.set(value)

    def observe(self, value: float) -> None:
        self._series.observe(value)

    def value(self) -> float:
        return self._series.value()


# --- auto_complete_config ------------------------------------------------------------------------------
class ModelConfig:
    """What `auto_complete_config` receives: the model's config as a dict, and setters."""

    def __init__(self, model_config: dict) -> None:
        self._config = model_config

    def as_dict(self) -> dict:
        return self._config

    def max_batch_size(self) -> int:
        return int(self._config.get("max_batch_size", 0))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 0:
            raise TritonModelException("set_max_batch_size: expected an integer >= 0")
        current = int(self._config.get("max_batch_size", 0))
        if current and current != max_batch_size:
            raise TritonModelException(
                f"set_max_batch_size: config.pbtxt sets max_batch_size {current}; cannot change it "
                f"to {max_batch_size}"
            )
        self._config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        self._config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        unknown = set(transaction_policy_dict) - {"decoupled"}
        if unknown:
            raise TritonModelException(
                f"set_model_transaction_policy: unknown keys {sorted(unknown)}; expected 'decoupled'"
            )
        policy = self._config.setdefault("model_transaction_policy", {})
        policy["decoupled"] = bool(transaction_policy_dict.get("decoupled", False))

    def add_input(self, input: dict) -> None:
        self._add("input", input)

    def add_output(self, output: dict) -> None:
        self._add("output", output)

    def add_model_warmup(self, model_warmup: dict) -> None:
        self._config.setdefault("model_warmup", []).append(model_warmup)

    def _add(self, kind: str, tensor: dict) -> None:
        if not isinstance(tensor, dict) or "name" not in tensor:
            raise TritonModelException(f"add_{kind}: expected a dict with at least 'name'")
        unknown = set(tensor) - {"name", "data_type", "dims", "optional", "reshape"}
        if unknown:
            raise TritonModelException(f"add_{kind} '{tensor['name']}': unknown keys {sorted(unknown)}")
        entries = self._config.setdefault(kind, [])
        for existing in entries:
            if existing.get("name") != tensor["name"]:
                continue
            # Already declared (config.pbtxt): what the model says must agree with it.
            for key in ("data_type", "dims"):
                if key in tensor and key in existing and _same(existing[key], tensor[key]) is False:
                    raise TritonModelException(
                        f"add_{kind} '{tensor['name']}': {key} {tensor[key]} conflicts with "
                        f"{existing[key]} in config.pbtxt"
                    )
                if key in tensor and key not in existing:
                    existing[key] = tensor[key]
            return
        if "data_type" not in tensor or "dims" not in tensor:
            raise TritonModelException(f"add_{kind} '{tensor['name']}': needs data_type and dims")
        entries.append(dict(tensor))


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list | tuple):
        return [int(x) for x in a] == [int(x) for x in b]
    return a == b
