"""API keys on the gRPC port, in one place: a server interceptor that checks each call's key
against what the method touches (a model, the management API, nothing) before the handler
runs, and hands the key to the handler through `current_key()`. Installed only when keys are
configured, so an open server pays nothing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from convoy.auth import ApiKey, Keyring
from convoy.errors import ConvoyError, status_of

_KEY: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("convoy_api_key", default=None)


def current_key() -> ApiKey | None:
    """The key of the call being handled (None when the server runs without keys)."""
    return _KEY.get()


def authorization(context_or_details) -> str | None:
    """The call's `authorization` metadata (tritonclient's headers={...} sends it), or None."""
    metadata = (
        context_or_details.invocation_metadata()
        if callable(getattr(context_or_details, "invocation_metadata", None))
        else context_or_details.invocation_metadata
    )
    for key, value in metadata or ():
        if key == "authorization":
            return value
    return None


@dataclass(frozen=True, slots=True)
class Rule:
    """What a method needs: a key in scope for `model(request)` (None: any valid key), the
    management scope, or (health) a key only when health endpoints are protected."""

    model: Callable[[object], str | None] = lambda request: None
    manage: bool = False
    health: bool = False


def _none(request) -> None:
    return None


RULES: dict[str, Rule] = {
    "ServerLive": Rule(health=True),
    "ServerReady": Rule(health=True),
    # A model's readiness is no probe: it needs a key in scope, so it tells nothing about models
    # outside the key's scope (they all answer PERMISSION_DENIED, real or not).
    "ModelReady": Rule(model=lambda r: r.name),
    "ServerMetadata": Rule(),
    "ModelMetadata": Rule(model=lambda r: r.name),
    "ModelConfig": Rule(model=lambda r: r.name),
    "ModelStatistics": Rule(model=lambda r: r.name or None),
    "RepositoryIndex": Rule(),
    "RepositoryModelLoad": Rule(model=lambda r: r.model_name, manage=True),
    "RepositoryModelUnload": Rule(model=lambda r: r.model_name, manage=True),
    "ModelInfer": Rule(model=lambda r: r.model_name),
    # A stream names its model per message: the handler checks each one (current_key()).
    "ModelStreamInfer": Rule(),
    "LogSettings": Rule(manage=True),
    "TraceSetting": Rule(manage=True),
    "SystemSharedMemoryStatus": Rule(),
    "SystemSharedMemoryRegister": Rule(),
    "SystemSharedMemoryUnregister": Rule(),
    "CudaSharedMemoryStatus": Rule(),
    "CudaSharedMemoryRegister": Rule(),
    "CudaSharedMemoryUnregister": Rule(),
}


async def abort(context, exc: BaseException) -> None:
    code, _, message = status_of(exc)
    await context.abort(grpc.StatusCode[code], message)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every call needs a valid key in scope for what it touches; an unknown method is left to
    gRPC (UNIMPLEMENTED)."""

    def __init__(self, keys: Keyring) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        rule = RULES.get(details.method.rsplit("/", 1)[-1])
        if handler is None or rule is None or (rule.health and not self.keys.protect_health):
            return handler
        keys = self.keys
        given = authorization(details)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def checked(request, context):
                try:
                    key = keys.authorize(given, rule.model(request), rule.manage)
                except ConvoyError as exc:
                    await abort(context, exc)
                token = _KEY.set(key)
                try:
                    return await inner(request, context)
                finally:
                    _KEY.reset(token)

            return grpc.unary_unary_rpc_method_handler(
                checked, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def checked_stream(request_iterator, context):
                try:
                    key = keys.authorize(given, None, rule.manage)
                except ConvoyError as exc:
                    await abort(context, exc)
                _KEY.set(key)  # the call's own task and context: nothing to reset
                async for response in inner_stream(request_iterator, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                checked_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
