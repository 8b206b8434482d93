"""Connection limits for the HTTP front end: uvicorn's httptools protocol with a deadline for the
request head, caps on its size and header count (431), and a cap on open connections past which
a new one is answered 503 at once and closed, with a log line.

Without them one client could make the server buffer a 1 GiB header block, or hold every file
descriptor with connections that never send a byte (new clients then got connection resets).
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from functools import partial

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("convoy.http")

#: File descriptors kept free of client connections (model files, logs, worker pipes).
_RESERVED_FDS = 256
#: Seconds between two "connection limit reached" log lines.
_REFUSAL_LOG_INTERVAL_S = 10.0
#: Seconds a refused connection gets to read its 503 before it is closed, and how many may
#: linger at once (each holds a file descriptor; past it they are closed at once).
_REFUSED_LINGER_S = 1.0
_MAX_LINGERING = 64


def _answer(status: bytes, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open-file limit: %s", exc)
    return soft


def connection_cap(configured: int) -> int:
    """Open connections allowed per front end: `configured`, or (0) what keeps HTTP and gRPC
    together below the open-file limit."""
    if configured > 0:
        return configured
    return max(32, (raise_fd_limit() - _RESERVED_FDS) // 2)


@dataclass(slots=True)
class _Refusals:
    """Connections refused at the cap, logged at most every _REFUSAL_LOG_INTERVAL_S."""

    count: int = 0
    logged_at: float = float("-inf")
    lingering: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int
    max_head_bytes: int
    max_headers: int
    #: Seconds from a connection's opening (or the first byte of a later request) until its
    #: request head must be complete.
    header_timeout: float
    refusals: _Refusals = field(default_factory=_Refusals)

    def protocol(self):
        """The protocol factory for uvicorn.Config(http=...)."""
        return partial(LimitedHttpProtocol, limits=self)

    def note_refused(self) -> None:
        refusals = self.refusals
        refusals.count += 1
        now = time.monotonic()
        if now - refusals.logged_at >= _REFUSAL_LOG_INTERVAL_S:
            refusals.logged_at = now
            log.warning(
                "HTTP connection limit reached (%d open): refusing new connections with 503 "
                "(%d refused so far; --max-connections)",
                self.max_connections,
                refusals.count,
            )


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the request head is over a limit."""


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under ConnectionLimits."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._refused = False
        self._lingering = False
        self._head_pending = True
        #: Bytes received while this request's head is incomplete (all of them head bytes).
        self._head_bytes = 0
        #: The head's size as parsed (URL, header names and values) and its header count.
        self._head_size = 0
        self._header_count = 0
        self._head_timer = None

    # --- the connection cap -------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse()
            return
        self._arm_head_timer()

    def _refuse(self) -> None:
        self._refused = True
        self.connections.discard(self)
        self.limits.note_refused()
        transport = self.transport
        transport.write(_answer(b"503 Service Unavailable", "too many connections; retry later"))
        refusals = self.limits.refusals
        if transport.can_write_eof() and refusals.lingering < _MAX_LINGERING:
            # Half-close and give the client a moment to read the answer: closing at once with
            # its request unread would reset the connection before the 503 arrives.
            refusals.lingering += 1
            self._lingering = True
            transport.write_eof()
            self.loop.call_later(_REFUSED_LINGER_S, transport.close)
        else:
            transport.close()

    # --- the request head ---------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_pending and not self.transport.is_closing():
            log.debug("closing an HTTP connection that sent no complete request head in time")
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self._lingering:
            self._lingering = False
            self.limits.refusals.lingering -= 1
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._head_pending:
            self._head_bytes += len(data)
            if self._head_timer is None:  # the first bytes of a later request's head
                self._arm_head_timer()
        try:
            self.parser.feed_data(data)
            if self._head_pending and self._head_bytes > self.limits.max_head_bytes:
                raise _HeadTooLarge
        except (httptools.HttpParserCallbackError, _HeadTooLarge) as exc:
            if isinstance(exc, _HeadTooLarge) or isinstance(exc.__context__, _HeadTooLarge):
                self._head_too_large()
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _head_too_large(self) -> None:
        limits = self.limits
        message = f"request head exceeds {limits.max_head_bytes} bytes or {limits.max_headers} headers"
        self.transport.write(_answer(b"431 Request Header Fields Too Large", message))
        self.transport.close()
        self._head_pending = False
        self._cancel_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_size > self.limits.max_head_bytes:
            raise _HeadTooLarge
        self._head_pending = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_pending = True
        self._head_bytes = 0
