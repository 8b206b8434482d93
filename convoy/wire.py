"""The one wire format for every process boundary: front end <-> engine (engine/remote/) and
engine <-> isolated runtime worker (runtimes/isolated_messages.py).

A frame carries any number of typed messages and the raw bytes of their tensors:

    [u32 header bytes][u64 data bytes][msgpack list of messages][tensor bytes back to back]

Messages are msgspec Structs tagged with their kind (no pickle, no positional tuples); a
tensor travels as a `TensorMeta` (name, numpy dtype, shape, offset and size in the frame's data
area) beside its bytes, so the receiver views the bytes without copying (numpy arrays over the
received buffer). BYTES tensors travel length-prefixed, as on the Open Inference Protocol wire.
Errors travel by kind (the class name from convoy/errors.py) with their client-safe message.

A sender adds everything it has for one loop turn to one `FrameWriter`, so many requests (or
many answers) cost one frame and one system call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import numpy as np

from convoy import errors
from convoy.datatypes import deserialize_bytes, element_count, serialize_bytes
from convoy.errors import ConvoyError

if TYPE_CHECKING:
    import io
    import socket

log = logging.getLogger("convoy.wire")

#: (header bytes, data bytes) before every frame.
PREFIX = struct.Struct("<IQ")
#: The dtype a BYTES (numpy object) tensor travels under.
BYTES_DTYPE = "|O"
#: Frames whose tensor bytes are fewer than this are sent as one joined buffer.
_COALESCE_BYTES = 64 * 1024


class TensorMeta(msgspec.Struct, array_like=True, frozen=True):
    name: str
    #: numpy dtype string ("<f4"), or BYTES_DTYPE for length-prefixed BYTES elements.
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    #: The bytes are in the sender's shared-memory arena at `offset` (engine/arena.py), not in
    #: the frame.
    shared: bool = False


class ErrorInfo(msgspec.Struct, array_like=True, frozen=True):
    """An exception by kind: a ConvoyError subclass name keeps its status on the other side;
    anything else travels as INTERNAL with the generic message (the sender logged it)."""

    kind: str
    message: str
    retry_after: float | None = None


def error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, ConvoyError):
        for cls in type(exc).__mro__:
            if getattr(errors, cls.__name__, None) is cls:
                return ErrorInfo(cls.__name__, str(exc), getattr(exc, "retry_after", None))
    return ErrorInfo("", errors.INTERNAL_MESSAGE)


class RemoteInternalError(Exception):
    """An unexpected failure on the other side of a process boundary (its log has the
    traceback); INTERNAL on the wire."""


def rebuild_error(info: ErrorInfo) -> BaseException:
    cls = getattr(errors, info.kind, None) if info.kind else None
    if isinstance(cls, type) and issubclass(cls, errors.Overloaded):
        return cls(info.message, retry_after=info.retry_after or 1.0)
    if isinstance(cls, type) and issubclass(cls, ConvoyError):
        return cls(info.message)
    return RemoteInternalError(info.message)


def decoder(message_type: Any) -> msgspec.msgpack.Decoder[list[Any]]:
    """A decoder for a frame's header: a list of `message_type` (usually a tagged Union)."""
    return msgspec.msgpack.Decoder(list[message_type], dec_hook=_dec_hook)


def _enc_hook(value: object) -> str:
    # Paths (in configs and settings) travel as strings.
    if hasattr(value, "__fspath__"):
        return str(value)
    raise NotImplementedError(f"{type(value).__name__} cannot travel between processes")


def _dec_hook(kind: type, value: Any) -> Any:
    from pathlib import Path

    if kind is Path:
        return Path(value)
    raise NotImplementedError(f"{kind} cannot be decoded")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


# --- building and reading frames ----------------------------------------------------------------
class TensorArena(Protocol):
    """Shared memory a writer may place large tensors in (engine/arena.py's Arena)."""

    threshold: int

    def place(self, array: np.ndarray) -> int | None: ...


class FrameWriter:
    """Collects messages and their tensors' bytes until `take()` turns them into one frame."""

    __slots__ = ("_buffers", "_messages", "_size")

    def __init__(self) -> None:
        self._messages: list[object] = []
        self._buffers: list[bytes | memoryview] = []
        self._size = 0

    def __bool__(self) -> bool:
        return bool(self._messages)

    def tensors(
        self, arrays: dict[str, np.ndarray], arena: TensorArena | None = None
    ) -> list[TensorMeta]:
        """Queue the arrays' bytes; the metas to put in the message that carries them. With an
        `arena` (engine/arena.py), large numeric tensors are copied there instead when it has
        room."""
        metas = []
        data: bytes | memoryview
        for name, array in arrays.items():
            if arena is not None and array.nbytes >= arena.threshold and array.dtype.kind != "O":
                offset = arena.place(array)
                if offset is not None:
                    dtype = array.dtype.str if array.dtype.kind != "V" else array.dtype.name
                    metas.append(TensorMeta(name, dtype, array.shape, offset, array.nbytes, True))
                    continue
            if array.dtype.kind == "O":
                data = serialize_bytes(array)
                dtype = BYTES_DTYPE
                nbytes = len(data)
            else:
                if not array.flags.c_contiguous:
                    array = np.ascontiguousarray(array)
                dtype, nbytes = array.dtype.str, array.nbytes
                if array.dtype.kind == "V":
                    # Named extension dtypes (ml_dtypes' bfloat16) have no type code and no
                    # buffer format: they travel by name, as bytes.
                    dtype, data = array.dtype.name, array.reshape(-1).view(np.uint8).data
                else:
                    data = array.data if nbytes else b""
            metas.append(TensorMeta(name, dtype, array.shape, self._size, nbytes))
            if nbytes:
                self._buffers.append(data)
                self._size += nbytes
        return metas

    def add(self, message: object) -> None:
        self._messages.append(message)

    def take(self) -> list[bytes | memoryview]:
        """The frame's buffers (prefix, header, tensor bytes); the writer is empty again. A
        small frame is one buffer (one copy of a few KiB costs less than an iovec per tensor);
        a large one leaves the tensors' memory where it is."""
        header = _ENCODER.encode(self._messages)
        frame: list[bytes | memoryview] = [PREFIX.pack(len(header), self._size), header, *self._buffers]
        if self._size < _COALESCE_BYTES:
            frame = [b"".join(frame)]
        self._messages, self._buffers, self._size = [], [], 0
        return frame


def read_tensors(
    metas: list[TensorMeta], data: memoryview, shared: memoryview | None = None
) -> dict[str, np.ndarray]:
    """Arrays viewing the frame's data, or the sender's arena (`shared`) for tensors placed
    there (read-only views, as the front ends' decoders give)."""
    arrays = {}
    for meta in metas:
        end = meta.offset + meta.nbytes
        if meta.shared:
            if shared is None or end > len(shared):
                raise errors.InvalidInput(f"tensor '{meta.name}' is not in the sender's arena")
            dtype = _dtype(meta.dtype)
            count = meta.nbytes // dtype.itemsize if dtype.itemsize else 0
            arrays[meta.name] = np.frombuffer(shared, dtype, count, meta.offset).reshape(meta.shape)
            continue
        if end > len(data):
            raise errors.InvalidInput(f"tensor '{meta.name}' runs past the end of its frame")
        if meta.dtype == BYTES_DTYPE:
            count = element_count(meta.shape)
            array = deserialize_bytes(data[meta.offset : end], count, meta.name)
            arrays[meta.name] = array.reshape(meta.shape)
        else:
            dtype = _dtype(meta.dtype)
            count = meta.nbytes // dtype.itemsize if dtype.itemsize else 0
            array = np.frombuffer(data, dtype, count, meta.offset)
            arrays[meta.name] = array.reshape(meta.shape)
    return arrays


@functools.cache
def _dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # bfloat16 and friends are named, not coded, dtypes

        dtype: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
        return dtype


# --- frames over a blocking socket (isolated runtime workers) ---------------------------------------
def send_frame(sock: socket.socket, writer: FrameWriter) -> None:
    """Send the writer's frame whole (partial sends of large payloads resumed)."""
    parts = [part for part in writer.take() if len(part)]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = memoryview(parts[0])[sent:]


def receive_frame(reader: io.BufferedIOBase, message_type: Any) -> tuple[list[Any], memoryview]:
    """(messages, data) of the next frame from a binary file over a socket; EOFError when the
    other end closed. The data is one buffer read straight from the socket."""
    prefix = reader.read(PREFIX.size)
    if len(prefix) != PREFIX.size:
        raise EOFError("channel closed")
    header_bytes, data_bytes = PREFIX.unpack(prefix)
    buffer = bytearray(header_bytes + data_bytes)
    if buffer and reader.readinto(buffer) != len(buffer):
        raise EOFError("channel closed")
    view = memoryview(buffer)
    return _decoders(message_type).decode(view[:header_bytes]), view[header_bytes:]


@functools.cache
def _decoders(message_type: Any) -> msgspec.msgpack.Decoder[list[Any]]:
    return decoder(message_type)


# --- an asyncio stream of frames ------------------------------------------------------------------
#: Receive buffers start this large; a bigger frame gets a buffer of its own size.
_RECEIVE_BYTES = 64 * 1024
#: Unsent bytes past which a link reports itself congested (the peer is not reading).
CONGESTED_BYTES = 256 * 1024 * 1024


class Link(asyncio.BufferedProtocol):
    """One end of a stream socket carrying frames, driven by the event loop.

    `writer()` gives the frame being built for this loop turn; it is sent once the turn ends,
    whatever was added to it. Every frame received goes to `on_frame(messages, data)`; tensors
    may view `data`, so a receive buffer that handed out a frame is never written again."""

    def __init__(
        self,
        message_type: Any,
        on_frame: Callable[[list[Any], memoryview], None],
        on_lost: Callable[[Exception | None], None],
    ) -> None:
        self._decoder = decoder(message_type)
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._writer = FrameWriter()
        self._flush_pending = False
        self._buffer = bytearray(_RECEIVE_BYTES)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # first byte not yet received
        self._handed_out = False
        self.closed = False

    # --- sending ------------------------------------------------------------------------------
    def writer(self) -> FrameWriter:
        """The frame for this loop turn (sent when the turn ends)."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)
        return self._writer

    def send(self, message: object) -> None:
        self.writer().add(message)

    @property
    def congested(self) -> bool:
        transport = self._transport
        return transport is not None and transport.get_write_buffer_size() > CONGESTED_BYTES

    def _flush(self) -> None:
        self._flush_pending = False
        if not self._writer or self._transport is None or self.closed:
            return
        self._transport.writelines(self._writer.take())

    def close(self) -> None:
        if self._flush_pending:
            self._flush()
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # --- asyncio.BufferedProtocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream socket's transport; uvloop's is not an asyncio.Transport subclass.
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._handed_out or len(self._buffer) - self._end < 4096:
            self._renew(_RECEIVE_BYTES)
        return memoryview(self._buffer)[self._end :]

    def _renew(self, capacity: int) -> None:
        """A fresh buffer holding the unparsed tail (earlier frames may still be viewed)."""
        tail = self._buffer[self._start : self._end]
        buffer = bytearray(max(capacity, len(tail) + 4096))
        buffer[: len(tail)] = tail
        self._buffer, self._start, self._end, self._handed_out = buffer, 0, len(tail), False

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        buffer = self._buffer
        view = memoryview(buffer)
        while self._end - self._start >= PREFIX.size:
            header_bytes, data_bytes = PREFIX.unpack_from(buffer, self._start)
            begin = self._start + PREFIX.size
            end = begin + header_bytes + data_bytes
            if end > self._end:
                if end - self._start > len(buffer):
                    self._renew(end - self._start)  # one buffer the frame's size
                return
            try:
                messages = self._decoder.decode(view[begin : begin + header_bytes])
            except msgspec.DecodeError:
                log.exception("undecodable frame; closing the link")
                self.close()
                return
            self._start = end
            self._handed_out = True
            try:
                self._on_frame(messages, view[begin + header_bytes : end])
            except Exception:
                log.exception("handling a frame failed")

    def eof_received(self) -> bool:
        return False


def encode(value: object) -> bytes:
    """One value (a Struct, config or settings) as msgpack, as frames carry them."""
    return _ENCODER.encode(value)


def decode(data: bytes, kind: Any) -> Any:
    return msgspec.msgpack.decode(data, type=kind, dec_hook=_dec_hook)
