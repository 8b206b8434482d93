"""The access log (`--access-log`): one line per inference request, written off the event loop.

With API keys on, each line names the caller by its key's name (never the key itself).

The request path only stamps a tuple into a bounded queue; the log's own thread formats and
writes it. Each front end gets a thin wrapper, installed only when the log is on, so a server
without it pays nothing: an ASGI middleware for HTTP, a server interceptor for gRPC.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections import deque

import grpc

from convoy.auth import Keyring
from convoy.logs import make_formatter
from convoy.server.grpc_api.interceptors import authorization

log = logging.getLogger("convoy.access")

_STOP = object()
_GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
_GRPC_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


class AccessLog:
    """protocol, model, version, status, duration (µs), request id and caller (API key name, "-"
    without keys) of each inference request, to standard error ("-") or a file. `start` and
    `close` bound its writer thread."""

    def __init__(self, destination: str, log_format: str, capacity: int = 65536) -> None:
        if destination == "-":
            self.handler: logging.Handler = logging.StreamHandler(sys.stderr)
        else:
            self.handler = logging.FileHandler(destination)
        self.handler.setFormatter(make_formatter(log_format))
        self._capacity = capacity
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: Lines dropped because the writer fell `capacity` lines behind (never blocks the loop).
        self.dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_lines, name="convoy-access-log", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        self.handler.close()

    def write(
        self,
        protocol: str,
        model: str,
        version: str,
        status: str,
        duration_us: int,
        request_id: str,
        principal: str | None = None,
    ) -> None:
        """Queue one line (loop thread; no formatting or I/O here)."""
        if self._queue.qsize() >= self._capacity:
            self.dropped += 1
            return
        self._queue.put(
            (time.time(), protocol, model, version, status, duration_us, request_id, principal)
        )

    def _write_lines(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            created, protocol, model, version, status, duration_us, request_id, principal = item
            record = logging.LogRecord(
                log.name,
                logging.INFO,
                __file__,
                0,
                "%s %s %s %s %dus %s",
                (protocol, model, version or "-", status, duration_us, principal or "-"),
                None,
            )
            record.created = created
            record.msecs = (created - int(created)) * 1000
            record.request_id = request_id
            record.fields = {
                "protocol": protocol,
                "model": model,
                "version": version,
                "status": status,
                "duration_us": duration_us,
                "principal": principal,
            }
            try:
                self.handler.handle(record)
            except Exception:  # a full disk must not kill the writer; logging reports it
                self.handler.handleError(record)


def _model_and_version(path: str) -> tuple[str, str]:
    """(model, version) from /v2/models/{model}[/versions/{version}]/infer."""
    parts = path.strip("/").split("/")
    model = parts[2] if len(parts) > 2 else ""
    version = parts[4] if len(parts) > 5 and parts[3] == "versions" else ""
    return model, version


class AccessLogMiddleware:
    """ASGI wrapper around the HTTP front end: logs every `.../infer` request."""

    def __init__(self, app, access_log: AccessLog) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/infer"):
            return await self.app(scope, receive, send)
        started = time.monotonic_ns()
        status = 0

        async def noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            model, version = _model_and_version(scope["path"])
            # The front end notes the version it served and the request id once it knows them.
            entry = scope.get("convoy.entry")
            if entry is not None:
                # The version that answered (a roll-out's arm), else the one resolved.
                version = scope.get("convoy.served_version") or str(entry.version)
            self.access_log.write(
                "http",
                model,
                version,
                str(status) if status else "-",
                (time.monotonic_ns() - started) // 1000,
                scope.get("convoy.request_id", ""),
                scope.get("convoy.principal"),
            )


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """gRPC server interceptor: logs every ModelInfer call and every ModelStreamInfer response.
    With `keys`, it names the caller from the call's metadata (a failed check logs "-")."""

    def __init__(self, access_log: AccessLog, keys: Keyring | None = None) -> None:
        self.access_log = access_log
        self.keys = keys

    def _principal(self, context) -> str | None:
        if self.keys is None:
            return None
        key = self.keys.identify(authorization(context))
        return None if key is None else key.name

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method == _GRPC_INFER:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if method == _GRPC_STREAM:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, behavior):
        write = self.access_log.write

        async def model_infer(request, context):
            started = time.monotonic_ns()
            status = "OK"
            version = request.model_version
            try:
                response = await behavior(request, context)
                version = response.model_version or version
                return response
            except BaseException:
                code = context.code()
                status = code.name if isinstance(code, grpc.StatusCode) else "CANCELLED"
                raise
            finally:
                write(
                    "grpc",
                    request.model_name,
                    version,
                    status,
                    (time.monotonic_ns() - started) // 1000,
                    request.id,
                    self._principal(context),
                )

        return model_infer

    def _stream(self, behavior):
        write = self.access_log.write

        async def model_stream_infer(request_iterator, context):
            # Arrival times by request id, oldest first: responses may come out of order.
            arrivals: dict[str, deque[int]] = {}
            principal = self._principal(context)

            async def stamped():
                async for message in request_iterator:
                    arrivals.setdefault(message.id, deque()).append(time.monotonic_ns())
                    yield message

            async for response in behavior(stamped(), context):
                answer = response.infer_response
                waiting = arrivals.get(answer.id)
                started = waiting.popleft() if waiting else time.monotonic_ns()
                if waiting is not None and not waiting:
                    del arrivals[answer.id]
                write(
                    "grpc-stream",
                    answer.model_name,
                    answer.model_version,
                    "ERROR" if response.error_message else "OK",
                    (time.monotonic_ns() - started) // 1000,
                    answer.id,
                    principal,
                )
                yield response

        return model_stream_infer
