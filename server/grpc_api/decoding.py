"""Undecodable gRPC messages answered INVALID_ARGUMENT, for every RPC.

grpc.aio parses a call's message before any handler runs; a parse error there becomes UNKNOWN
"Unexpected <class 'DecodeError'>" with a traceback in the log. This interceptor, outermost of
all, swaps each method's request deserializer for one that returns an `Undecodable` marker
instead of raising, and aborts a call that meets one with INVALID_ARGUMENT naming the message
type, before any other interceptor or the handler sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a call's message became when its bytes did not parse as `message_type`."""

    message_type: str
    detail: str

    @property
    def text(self) -> str:
        return (
            f"Unable to parse request: the message is not a valid {self.message_type} "
            f"protobuf ({self.detail})"
        )


def _type_name(deserializer: Callable) -> str:
    """'inference.ModelInferRequest' from `ModelInferRequest.FromString` (the generated code's
    deserializer is that bound class method)."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or "request"


def _tolerant(deserializer: Callable) -> Callable:
    message_type = _type_name(deserializer)

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, RuntimeWarning, ValueError) as exc:
            return Undecodable(message_type, str(exc) or type(exc).__name__)

    return deserialize


def _unary_request(behaviour: Callable) -> Callable:
    async def handle(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)
        call = behaviour(request, context)
        # This frame must not hold the message: an abort in `behaviour` keeps its traceback
        # (so this frame) alive in a reference cycle, and a rejected 200 MiB message with it.
        del request
        return await call

    return handle


def _unary_request_stream(behaviour: Callable) -> Callable:
    async def handle(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)
        async for response in behaviour(request, context):
            yield response

    return handle


def _checked(requests, context):
    """The stream's messages; the first undecodable one ends the call INVALID_ARGUMENT."""

    async def messages():
        async for message in requests:
            if isinstance(message, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message.text)
            yield message

    return messages()


def _stream_request(behaviour: Callable) -> Callable:
    async def handle(requests, context):
        return await behaviour(_checked(requests, context), context)

    return handle


def _stream_stream(behaviour: Callable) -> Callable:
    async def handle(requests, context):
        async for response in behaviour(_checked(requests, context), context):
            yield response

    return handle


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Install first: the handler the server runs gets the tolerant deserializer and the check."""

    def __init__(self) -> None:
        #: method -> (the handler it was given, the wrapped one): reused while the handler is the
        #: same object (no inner interceptor makes one per call), so most calls build nothing.
        self._wrapped: dict[str, tuple[object, object]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler)
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler):
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary_request(handler.unary_unary), deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _unary_request_stream(handler.unary_stream),
                deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _stream_request(handler.stream_unary), deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            _stream_stream(handler.stream_stream), deserializer, handler.response_serializer
        )
