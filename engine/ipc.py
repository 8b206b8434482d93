"""The wire between --workers front-end processes and the engine process (ZeroMQ).

A message is one frame, `kind` (one byte) followed by a pickled header, plus one more frame per
large tensor. Tensors under ZERO_COPY_BYTES ride inside the header (a copy of a few hundred bytes
costs less than a frame: every frame is a zmq call); larger ones go as their own frames, sent
from and received into memory without a copy (numpy views of the zmq frames). Both ends are
Convoy processes of one user on a socket in a private (0700) directory, so pickle is safe here.

Worker -> engine:  HELLO, UP (serving), INFER, CANCEL, CALL (control plane), ACK (a catalog), LOG.
Engine -> worker:  CATALOG (models as the front ends see them), RESULT, ERROR, REPLY, LOG.
"""

from __future__ import annotations

import asyncio
import logging
import pickle

import numpy as np
import zmq

from convoy import errors
from convoy.datatypes import deserialize_bytes, element_count, serialize_bytes
from convoy.errors import ConvoyError
from convoy.types import Request, Response, StageTimes

log = logging.getLogger("convoy.workers")

HELLO = b"H"
UP = b"U"
INFER = b"I"
CANCEL = b"C"
CALL = b"Q"
ACK = b"K"
LOG = b"L"
CATALOG = b"S"
RESULT = b"R"
ERROR = b"E"
REPLY = b"A"

_OBJECT = "|O"
#: Tensors at least this large travel as frames of their own, without a copy.
ZERO_COPY_BYTES = 64 * 1024


def message(kind: bytes, header, frames=()) -> list:
    """The frames of one message: kind + pickled header, then any tensor frames."""
    return [kind + pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL), *frames]


def parse(frames) -> tuple[bytes, object, list]:
    """(kind, header, tensor frames) of a received message (zmq Frames or bytes)."""
    first = frames[0]
    buffer = first.buffer if hasattr(first, "buffer") else memoryview(first)
    return bytes(buffer[:1]), pickle.loads(buffer[1:]), frames[1:]


def _pack_tensors(arrays: dict[str, np.ndarray]) -> tuple[list, list]:
    """(descriptions, frames): each array as (name, dtype, shape, inline bytes or None), the
    large ones' memory as frames (BYTES elements length-prefixed as on the protocol wire)."""
    described = []
    frames = []
    for name, array in arrays.items():
        if array.dtype.kind == "O":
            dtype, data = _OBJECT, serialize_bytes(array)
            size = len(data)
        else:
            array = np.ascontiguousarray(array)
            dtype, data, size = array.dtype.str, array, array.nbytes
        if size >= ZERO_COPY_BYTES:
            described.append((name, dtype, array.shape, None))
            frames.append(data.data if isinstance(data, np.ndarray) else data)
        else:
            inline = data.tobytes() if isinstance(data, np.ndarray) else data
            described.append((name, dtype, array.shape, inline))
    return described, frames


def _unpack_tensors(described, frames) -> dict[str, np.ndarray]:
    """Arrays viewing the header's bytes or the received frames (read-only, as the protocol
    front ends give them)."""
    arrays = {}
    large = iter(frames)
    for name, dtype, shape, inline in described:
        if inline is None:
            frame = next(large)
            inline = frame.buffer if hasattr(frame, "buffer") else frame
        if dtype == _OBJECT:
            arrays[name] = deserialize_bytes(inline, element_count(shape), name).reshape(shape)
        else:
            arrays[name] = np.frombuffer(inline, dtype=np.dtype(dtype)).reshape(shape)
    return arrays


# --- requests (worker -> engine) -------------------------------------------------------------------
def encode_infer(call_id: int, model: str, version: int, request: Request) -> list:
    described, frames = _pack_tensors(request.inputs)
    header = (
        call_id,
        model,
        version,
        request.id,
        request.requested_outputs,
        request.rows,
        request.priority,
        request.timeout_us,
        # CLOCK_MONOTONIC is one clock for every process on the host: both stay comparable.
        request.deadline,
        request.parameters,
        request.received_ns,
        request.principal,
        described,
    )
    return message(INFER, header, frames)


def decode_infer(header, frames, future) -> tuple[int, str, int, Request]:
    """(call id, model, version, Request) from an INFER message."""
    (call_id, model, version, request_id, requested, rows, priority, timeout_us, deadline,
     parameters, received_ns, principal, described) = header  # fmt: skip
    request = Request(
        id=request_id,
        inputs=_unpack_tensors(described, frames),
        requested_outputs=requested,
        rows=rows,
        future=future,
        priority=priority,
        timeout_us=timeout_us,
        deadline=deadline,
        parameters=parameters,
        received_ns=received_ns,
        principal=principal,
    )
    return call_id, model, version, request


# --- outcomes (engine -> worker) -------------------------------------------------------------------
def encode_result(call_id: int, response: Response, outputs: dict[str, np.ndarray]) -> list:
    described, frames = _pack_tensors(outputs)
    timings = tuple(response.timings) if response.timings is not None else None
    header = (call_id, response.model_name, response.model_version, timings, described)
    return message(RESULT, header, frames)


def decode_result(header, frames) -> tuple[int, Response]:
    call_id, model, version, timings, described = header
    outputs = _unpack_tensors(described, frames)
    stage_times = StageTimes(*timings) if timings is not None else None
    return call_id, Response(outputs, model, version, stage_times)


def encode_error(call_id: int, exc: BaseException) -> list:
    """(call id, error class name, message, retry hint): a ConvoyError keeps its class (hence
    its status) and an Overloaded its Retry-After; anything else was logged by the engine and
    travels as INTERNAL without details."""
    if isinstance(exc, ConvoyError):
        for cls in type(exc).__mro__:
            if getattr(errors, cls.__name__, None) is cls:
                retry_after = getattr(exc, "retry_after", None)
                return message(ERROR, (call_id, cls.__name__, str(exc), retry_after))
    return message(ERROR, (call_id, "", errors.INTERNAL_MESSAGE, None))


def rebuild_error(name: str, message: str, retry_after: float | None = None) -> BaseException:
    cls = getattr(errors, name, None) if name else None
    if isinstance(cls, type) and issubclass(cls, errors.Overloaded) and retry_after is not None:
        return cls(message, retry_after=retry_after)
    if isinstance(cls, type) and issubclass(cls, ConvoyError):
        return cls(message)
    return RemoteInternalError(message)


class RemoteInternalError(Exception):
    """An unexpected failure in the engine (its log has the traceback); INTERNAL on the wire."""


class Channel:
    """A zmq socket driven by the event loop without a task or a future per message: sends never
    block (NOBLOCK), and every message received goes to `on_message(frames)` on the loop thread.

    zmq's file descriptor is edge-triggered and any socket operation may consume the edge, so
    after each send the socket is asked whether input is waiting."""

    def __init__(self, sock: zmq.Socket, on_message, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._on_message = on_message
        self._loop = loop
        self._fd = sock.getsockopt(zmq.FD)
        self._drain_pending = False
        self.closed = False
        loop.add_reader(self._fd, self._drain)

    def send(self, frames: list) -> None:
        """Queue a message; raises zmq.Again when the peer is over its high-water mark."""
        self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        if not self._drain_pending and self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain_pending = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_pending = False
        if self.closed:
            return
        sock = self._sock
        for _ in range(_DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._on_message(frames)
            except Exception:
                log.exception("IPC message handling failed")
            if self.closed:
                return
        # More may be waiting: give the loop's other callbacks a turn first.
        self._drain_pending = True
        self._loop.call_soon(self._drain)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._fd)
            self._sock.close(linger=0)


#: Messages handled per loop turn before yielding to other callbacks.
_DRAIN_BATCH = 256


def new_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = context.socket(kind)
    # Bounded, but far above what the clients of one worker can have in flight.
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    return sock
