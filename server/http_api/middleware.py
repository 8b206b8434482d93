"""API keys on the HTTP port, in one place: ASGI middleware that checks the request's bearer key
against what the path touches (a model, the management API, nothing) before the app runs, and
leaves the key in the scope (`scope["convoy.key"]`, its name in `scope["convoy.principal"]` for
the access log). Installed only when keys are configured, so an open server pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from convoy.auth import Keyring
from convoy.errors import ConvoyError

from .handlers import send_error


@dataclass(frozen=True, slots=True)
class Need:
    """What a path needs: a key in scope for `model` (None: any valid key), the management
    scope, or (health) a key only when health endpoints are protected."""

    model: str | None = None
    manage: bool = False
    health: bool = False


ANY_KEY = Need()


def need(parts: list[str]) -> Need | None:
    """What the path (split on '/') needs; None when it needs no key (openapi.json, unknown
    paths: the app answers those 404)."""
    if parts == ["catalog"] or parts == ["catalog.json"]:
        return ANY_KEY
    if not parts or parts[0] != "v2":
        return None
    rest = parts[1:]
    if not rest or rest == [""]:
        return ANY_KEY
    head = rest[0]
    if head == "health":
        return Need(health=True)
    if head == "models":
        if rest[1:] == ["stats"]:
            return ANY_KEY
        if len(rest) < 2:
            return None
        tail = rest[2:]
        if len(tail) >= 2 and tail[0] == "versions":
            tail = tail[2:]
        if tail == ["trace", "setting"]:
            return Need(model=rest[1], manage=True)
        # A model's readiness needs a key in scope even with health open: it is no probe, and
        # would tell real models from fake ones to anyone.
        return Need(model=rest[1])
    if head == "logging":
        return Need(manage=True)
    if head == "repository":
        if len(rest) == 4 and rest[1] == "models" and rest[3] in ("load", "unload"):
            return Need(model=rest[2], manage=True)
        return ANY_KEY
    if head in ("systemsharedmemory", "cudasharedmemory"):
        return ANY_KEY
    if head == "rollouts":
        if len(rest) < 2 or not rest[1]:
            return ANY_KEY  # the list shows only the models the key may use
        if rest[2:] in (["start"], ["promote"], ["abort"]):
            return Need(model=rest[1], manage=True)
        return Need(model=rest[1])
    if head == "trace":
        return Need(manage=True)
    return None


class ApiKeyMiddleware:
    def __init__(self, app, keys: Keyring) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            parts = scope["path"].strip("/").split("/")
            wanted = need(parts)
            if wanted is not None and (not wanted.health or self.keys.protect_health):
                given = None
                for key, value in scope["headers"]:
                    if key == b"authorization":
                        given = value.decode("latin-1")
                        break
                if given is None and parts == ["catalog"]:
                    # A browser sends no key: the app answers the key prompt (no models in it).
                    await self.app(scope, receive, send)
                    return
                try:
                    found = self.keys.authorize(given, wanted.model, wanted.manage)
                except ConvoyError as exc:
                    await send_error(send, exc)
                    return
                scope["convoy.key"] = found
                scope["convoy.principal"] = found.name
        await self.app(scope, receive, send)
