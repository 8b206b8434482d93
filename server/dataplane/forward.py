"""Requests the native front end forwards whole, answered by the Python front end's own code:

- HTTP: the ASGI application (routes, API-key and access-log middleware) run on the request
  the native side read, its `send` messages turned into answers (head, body parts);
- gRPC: the servicer behind the same interceptor chain the grpc.aio server runs (undecodable
  messages, access log, API keys), through a ServicerContext for the native transport;
- one ModelStreamInfer message the native path left alone: decoded and served by the
  servicer's inference code, each of its responses one message on the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from convoy.auth import Keyring
from convoy.errors import ConvoyError, InvalidInput, status_of
from convoy.protos import grpc_service_pb2 as pb
from convoy.protos import grpc_service_pb2_grpc as pb_grpc
from convoy.server.grpc_api.decoding import Undecodable
from convoy.server.grpc_api.decoupled import FINAL_FLAG, StreamFailure
from convoy.server.grpc_api.handlers import GRPC_ERROR_HEADER, GrpcFrontend
from convoy.server.grpc_api.interceptors import _KEY
from convoy.server.observability.access_log import AccessLog
from convoy.server.observability.tracing import TRACEPARENT

from .calls import FAILURE, FINISHED, HTTP_BODY, HTTP_HEAD, MESSAGE, failure

log = logging.getLogger("convoy.native")

SERVICE = "/inference.GRPCInferenceService/"


class _Aborted(Exception):
    """Raised by NativeServicerContext.abort: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailers = trailers


@dataclass(frozen=True, slots=True)
class _CallDetails:
    """grpc.HandlerCallDetails for a forwarded call."""

    method: str
    invocation_metadata: tuple


class NativeServicerContext(grpc.aio.ServicerContext):
    """One forwarded unary call's context: its metadata and deadline from the native side; an
    abort ends the call with its status. Streaming and compression controls do not apply (the
    native transport serves streams itself)."""

    def __init__(self, metadata: tuple, deadline_ns: int | None, peer: str = "") -> None:
        self._metadata = metadata
        self._deadline_ns = deadline_ns
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailers: tuple = ()

    # --- what the handlers and interceptors use ---------------------------------------------
    async def abort(self, code, details="", trailing_metadata=()):
        self._code, self._details = code, details
        raise _Aborted(code, details, tuple(trailing_metadata or ()))

    async def abort_with_status(self, status):
        await self.abort(status.code, status.details, status.trailing_metadata)

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self):
        if self._deadline_ns is None:
            return None
        return max((self._deadline_ns - time.monotonic_ns()) / 1e9, 0.0)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details) -> None:
        self._details = details

    def set_trailing_metadata(self, trailing_metadata) -> None:
        self._trailers = tuple(trailing_metadata)

    def trailing_metadata(self):
        return self._trailers

    def peer(self) -> str:
        return self._peer

    # --- not part of a unary call on the native transport ------------------------------------
    async def read(self):
        raise RuntimeError("a forwarded unary call has no request stream")

    async def write(self, message) -> None:
        raise RuntimeError("a forwarded unary call has no response stream")

    async def send_initial_metadata(self, initial_metadata) -> None:
        pass

    def set_compression(self, compression) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass

    def peer_identities(self):
        return None

    def peer_identity_key(self):
        return None

    def auth_context(self):
        return {}


class _Collector:
    """Receives the generated code's method handlers (what a grpc server would register)."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler


class GrpcForwarder:
    """Serves forwarded gRPC calls with the servicer behind its interceptor chain."""

    def __init__(
        self,
        servicer: GrpcFrontend,
        interceptors: list,
        answer: Callable[[tuple], None],
        keys: Keyring | None,
        access_log: AccessLog | None,
    ) -> None:
        self.servicer = servicer
        self.interceptors = interceptors
        self.answer = answer
        self.keys = keys
        self.access_log = access_log
        collector = _Collector()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, collector)
        self._handlers = collector.handlers
        #: method -> the handler after the interceptors: built on first use, reused while no
        #: interceptor returns a new one per call.
        self._chains: dict[str, grpc.RpcMethodHandler] = {}

    async def _handler(self, details: _CallDetails):
        async def innermost(call_details):
            return self._handlers.get(call_details.method)

        continuation = innermost
        for interceptor in reversed(self.interceptors):
            continuation = _bind(interceptor, continuation)
        return await continuation(details)

    async def serve_unary(self, slot: int, method: str, metadata: list, message, deadline_ns) -> None:
        """One forwarded unary call: its response bytes, or its status."""
        details = _CallDetails(SERVICE + method, tuple(metadata))
        context = NativeServicerContext(details.invocation_metadata, deadline_ns)
        try:
            handler = await self._handler(details)
            if handler is None or handler.unary_unary is None:
                raise _Aborted(grpc.StatusCode.UNIMPLEMENTED, "Method not found!", ())
            request = handler.request_deserializer(message)
            del message
            response = await handler.unary_unary(request, context)
            self.answer((slot, MESSAGE, handler.response_serializer(response)))
        except _Aborted as aborted:
            self.answer(_status_answer(slot, aborted))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("forwarded gRPC call %s failed", method, exc_info=exc)
            self.answer(failure(slot, exc))

    async def serve_stream_message(self, slot: int, metadata: list, message: bytes, deadline_ns) -> None:
        """One ModelStreamInfer message the native path left alone: its responses (one, or a
        decoupled model's many) as stream messages, then the slot's end."""
        metadata = dict(metadata)
        traceparent = metadata.get(TRACEPARENT)
        grpc_errors = metadata.get(GRPC_ERROR_HEADER) == "true"
        started = time.monotonic_ns()
        try:
            parsed = pb.ModelInferRequest.FromString(message)
        except (DecodeError, RuntimeWarning, ValueError) as exc:
            text = Undecodable("inference.ModelInferRequest", str(exc) or type(exc).__name__).text
            self.answer(failure(slot, InvalidInput(text), fatal=True))
            return
        del message
        principal = None

        def put(item) -> None:
            """One response (or StreamFailure) of this message onto the stream."""
            code = ""
            if type(item) is StreamFailure:
                code, item = item
            self._log_stream(item, started, principal)
            if code and grpc_errors:
                # Triton's triton_grpc_error mode: the stream ends with the error's status.
                status = grpc.StatusCode[code]
                self.answer((slot, FAILURE, status.value[0], 500, item.error_message, None, True))
            else:
                self.answer((slot, MESSAGE, item.SerializeToString()))

        try:
            if self.keys is not None:
                try:
                    key = self.keys.authorize(metadata.get("authorization"))
                except ConvoyError as exc:
                    self.answer(failure(slot, exc, fatal=True))
                    return
                key.require(parsed.model_name)
                principal = key.name
                _KEY.set(key)
            deadline = None if deadline_ns is None else deadline_ns / 1e9
            response = await self.servicer._infer(parsed, deadline, traceparent, principal, put)
            if response is not None:
                # A model that is not decoupled answers once: its last response.
                response.parameters[FINAL_FLAG].bool_param = True
                put(pb.ModelStreamInferResponse(infer_response=response))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            put(StreamFailure(status_of(exc)[0], self.servicer._stream_error(parsed, exc)))
        self.answer((slot, FINISHED))

    def _log_stream(self, response, started: int, principal) -> None:
        if self.access_log is None:
            return
        answer = response.infer_response
        self.access_log.write(
            "grpc-stream",
            answer.model_name,
            answer.model_version,
            "ERROR" if response.error_message else "OK",
            (time.monotonic_ns() - started) // 1000,
            answer.id,
            principal,
        )


def _bind(interceptor, continuation):
    async def call(details):
        return await interceptor.intercept_service(continuation, details)

    return call


def _status_answer(slot: int, aborted: _Aborted) -> tuple:
    code = aborted.code if isinstance(aborted.code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    retry = None
    for key, value in aborted.trailers:
        if key == "grpc-retry-pushback-ms":
            retry = int(value)
    http = 429 if code is grpc.StatusCode.RESOURCE_EXHAUSTED else 500
    return (slot, FAILURE, code.value[0], http, aborted.details, retry, False)


class HttpForwarder:
    """Runs the ASGI application on forwarded HTTP requests."""

    def __init__(self, app, answer: Callable[[tuple], None]) -> None:
        self.app = app
        self.answer = answer
        #: Disconnect events of requests in progress, by slot.
        self.pending: dict[int, asyncio.Event] = {}

    def cancel(self, slot: int) -> bool:
        event = self.pending.get(slot)
        if event is None:
            return False
        event.set()
        return True

    async def serve(self, item: tuple) -> None:
        _, slot, method, raw_path, query, headers, body, client, server, scheme = item
        disconnected = asyncio.Event()
        self.pending[slot] = disconnected
        path = urllib.parse.unquote(raw_path.decode("ascii", "replace"))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": scheme,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": client,
            "server": server,
            "state": {},
        }
        body_sent = False
        head: tuple | None = None
        sent = finished = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message) -> None:
            nonlocal head, sent, finished
            if finished:
                return
            kind = message["type"]
            if kind == "http.response.start":
                head = (message["status"], list(message.get("headers", ())))
            elif kind == "http.response.body":
                chunk = message.get("body", b"")
                more = bool(message.get("more_body", False))
                if head is not None:
                    status, response_headers = head
                    head = None
                    self.answer((slot, HTTP_HEAD, status, response_headers, chunk, more))
                else:
                    self.answer((slot, HTTP_BODY, chunk, more))
                sent = True
                finished = not more

        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("HTTP %s %s failed", method, path, exc_info=exc)
        finally:
            self.pending.pop(slot, None)
            # The app returned without a complete response: end what was begun.
            if head is not None:
                self.answer((slot, HTTP_HEAD, head[0], head[1], b"", False))
            elif sent and not finished:
                self.answer((slot, HTTP_BODY, b"", False))
            elif not sent:
                self.answer(failure(slot, RuntimeError("the HTTP application sent no response")))
