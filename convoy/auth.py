"""API keys with scopes: the key file, who a bearer key belongs to, what it may call.

The key file is JSON (read and written with the standard library only)::

    {"keys": [{"name": "team-a", "sha256": "<hex digest of the key>",
               "models": ["add_sub", "text_*"], "manage": false}]}

Only the SHA-256 of each key is stored: keys are high-entropy random strings
(`secrets.token_urlsafe`), so a plain digest is enough, and a presented key is found by the digest
of what was sent (a dict lookup that compares digests, never secrets; `hmac.compare_digest`
confirms the match). `name` is the caller's identity, the only thing logs ever show. `models`
holds names or shell-style globs ("*" for all); `manage` allows the management APIs (repository
load/unload, log settings). Optional `rate_limit` (inference requests per second) and `burst`
(requests allowed at once; default the rate rounded up) give the key a quota: a token bucket
per key name, kept across reloads; past it, requests get RESOURCE_EXHAUSTED / 429.

Framework-free like the rest of the core: the front ends pass the raw `Authorization` value and
turn the errors raised here into their statuses through `convoy.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from convoy.errors import InvalidConfig, Overloaded, PermissionDenied, Unauthenticated

if TYPE_CHECKING:
    from convoy.config import ServerConfig

log = logging.getLogger("convoy.auth")

#: Prefix of generated keys, so secret scanners and people can tell what a leaked string is.
KEY_PREFIX = "cvy_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_BEARER = "bearer "

#: How often the key file's modification time is checked for a reload (seconds).
WATCH_INTERVAL_S = 1.0


def digest(key: str) -> str:
    """The stored form of a key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key file entry: whose key it is and what it may call (never the key itself)."""

    name: str
    sha256: str
    models: tuple[str, ...]
    manage: bool = False
    #: Quota: inference requests per second (0: none) and the burst allowed at once.
    rate_limit: float = 0.0
    burst: int = 0
    #: All of `models` as one regex: a scope check is a single match per request.
    scope: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = "|".join(fnmatch.translate(p) for p in self.models) or r"(?!)"
        object.__setattr__(self, "scope", re.compile(pattern))
        if self.rate_limit and not self.burst:
            object.__setattr__(self, "burst", max(1, math.ceil(self.rate_limit)))

    def allows(self, model: str) -> bool:
        return self.scope.match(model) is not None

    def require(self, model: str) -> None:
        if self.scope.match(model) is None:
            # At most 200 characters of the name: the message travels in gRPC metadata.
            raise PermissionDenied(f"API key '{self.name}' may not use model '{model[:200]}'")

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "models": list(self.models),
            "manage": self.manage,
        } | ({"rate_limit": self.rate_limit, "burst": self.burst} if self.rate_limit else {})


def parse_keys(text: str, source: str) -> dict[str, ApiKey]:
    """{sha256: ApiKey} from a key file's text; InvalidConfig names the file and the entry."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidConfig(f"{source}: not valid JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise InvalidConfig(f"{source}: expected an object with a 'keys' list")
    keys: dict[str, ApiKey] = {}
    names: set[str] = set()
    for position, entry in enumerate(entries):
        where = f"{source}: keys[{position}]"
        if not isinstance(entry, dict):
            raise InvalidConfig(f"{where}: expected an object")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidConfig(
                f"{where}.name: expected 1-64 letters, digits, '.', '_' or '-', got {name!r}"
            )
        where = f"{source}: key '{name}'"
        sha256 = entry.get("sha256")
        if not isinstance(sha256, str) or not _HEX_DIGEST.match(sha256):
            raise InvalidConfig(f"{where}: sha256 must be 64 lowercase hex digits")
        models = entry.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise InvalidConfig(f"{where}: models must be a list of model names or glob patterns")
        manage = entry.get("manage", False)
        if not isinstance(manage, bool):
            raise InvalidConfig(f"{where}: manage must be true or false")
        rate_limit = entry.get("rate_limit", 0)
        if isinstance(rate_limit, bool) or not isinstance(rate_limit, int | float) or rate_limit < 0:
            raise InvalidConfig(f"{where}: rate_limit must be requests per second >= 0")
        burst = entry.get("burst", 0)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            raise InvalidConfig(f"{where}: burst must be a whole number of requests >= 0")
        if name in names:
            raise InvalidConfig(f"{where}: the name appears more than once")
        if sha256 in keys:
            raise InvalidConfig(f"{where}: the same key is listed twice")
        names.add(name)
        keys[sha256] = ApiKey(name, sha256, tuple(models), manage, float(rate_limit), burst)
    return keys


def read_key_file(path: Path) -> dict[str, ApiKey]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidConfig(f"{path}: cannot read the key file: {exc.strerror}") from None
    return parse_keys(text, str(path))


def write_key_file(path: Path, keys: list[ApiKey]) -> None:
    """Replace the file in one rename (a watching server never reads half a file), mode 0600.
    What is written is first read back as the server will (a bad name fails here, not there)."""
    text = json.dumps({"keys": [key.to_json() for key in keys]}, indent=2) + "\n"
    parse_keys(text, str(path))
    path = path.resolve()
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class Keyring:
    """The server's keys, reloadable while it serves: `authorize` answers on the request path
    (one hash and one dict lookup), `reload` swaps the whole table at once."""

    def __init__(self, path: Path, protect_health: bool = False, protect_metrics: bool = False) -> None:
        self.path = path
        self.protect_health = protect_health
        self.protect_metrics = protect_metrics
        self._keys = read_key_file(path)  # a broken file at start-up stops the server
        self._stamp = self._file_stamp()
        self._reload_requested = asyncio.Event()
        #: Quota token buckets by key name: [tokens, last refill (monotonic s)]; kept on reload.
        self._buckets: dict[str, list[float]] = {}
        #: Requests refused by a key's quota, by key name (for the metrics).
        self.quota_rejections: dict[str, int] = {}
        #: False in --workers front ends: the engine keeps the quotas, so they hold server-wide.
        self.enforce_quotas = True
        log.info("loaded %d API keys from %s", len(self._keys), path)

    def __len__(self) -> int:
        return len(self._keys)

    # --- the request path -----------------------------------------------------------------------
    def identify(self, authorization: str | None) -> ApiKey | None:
        """The key an `Authorization: Bearer <key>` value presents, or None. Surrounding blanks
        are ignored: gRPC metadata arrives as sent (perf_analyzer's -H keeps the one after ':')."""
        if not authorization:
            return None
        authorization = authorization.strip()
        if authorization[:7].lower() != _BEARER:
            return None
        wanted = digest(authorization[7:].strip())
        found = self._keys.get(wanted)
        if found is None or not hmac.compare_digest(found.sha256, wanted):
            return None
        return found

    def authenticate(self, authorization: str | None) -> ApiKey:
        key = self.identify(authorization)
        if key is None:
            if not authorization:
                raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
            raise Unauthenticated(
                "invalid API key: expected 'Authorization: Bearer <key>' with a valid key"
            )
        return key

    def authorize(
        self, authorization: str | None, model: str | None = None, manage: bool = False
    ) -> ApiKey:
        """The caller's key, checked for `model` (when given) and the management scope."""
        key = self.authenticate(authorization)
        if model is not None:
            key.require(model)
        if manage and not key.manage:
            raise PermissionDenied(f"API key '{key.name}' may not use the management APIs")
        return key

    def admit(self, key: ApiKey) -> None:
        """Take one inference request off the key's quota; Overloaded when it has none left."""
        rate = key.rate_limit
        if not rate or not self.enforce_quotas:
            return
        now = time.monotonic()
        bucket = self._buckets.get(key.name)
        if bucket is None:
            bucket = self._buckets[key.name] = [float(key.burst), now]
        tokens = min(float(key.burst), bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            self.quota_rejections[key.name] = self.quota_rejections.get(key.name, 0) + 1
            raise Overloaded(
                f"API key '{key.name}' is over its quota of {rate:g} requests/s "
                f"(burst {key.burst}); retry later",
                retry_after=(1.0 - tokens) / rate,
            )
        bucket[0] = tokens - 1.0

    def admit_principal(self, name: str) -> None:
        """`admit` for the key of this name (the engine, for requests a worker let through);
        a key revoked meanwhile has no quota left to take."""
        for key in self._keys.values():
            if key.name == name:
                return self.admit(key)
        return None

    # --- reloading ---------------------------------------------------------------------------------
    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def reload(self) -> bool:
        """Read the file again; a broken file keeps the keys in force and logs why."""
        self._stamp = self._file_stamp()
        try:
            keys = read_key_file(self.path)
        except InvalidConfig as exc:
            log.error("API keys not reloaded, keeping the %d in force: %s", len(self._keys), exc)
            return False
        self._keys = keys
        log.info("reloaded %d API keys from %s", len(keys), self.path)
        return True

    def reload_if_changed(self) -> bool:
        """Reload when the file's mtime, size or inode changed since the last read."""
        if self._file_stamp() == self._stamp:
            return False
        return self.reload()

    def request_reload(self) -> None:
        """Reload at once (SIGHUP); safe from a signal handler on the loop."""
        self._reload_requested.set()

    async def watch(self, interval: float = WATCH_INTERVAL_S) -> None:
        """Check the file every `interval` seconds and on `request_reload`, off the loop (a stat,
        then a read on change). The server owns this task and cancels it on shutdown."""
        requested = self._reload_requested
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(requested.wait(), interval)
            forced = requested.is_set()
            requested.clear()
            try:
                await asyncio.to_thread(self.reload if forced else self.reload_if_changed)
            except Exception:  # the watcher must outlive any surprise; the log says what
                log.exception("checking the API key file failed")


def load_keys(settings: ServerConfig) -> Keyring | None:
    """The API keys of --api-keys, or None (everything open). The engine and each --workers
    front end read them (the front ends check keys, the engine keeps the quotas)."""
    if settings.api_keys_file is None:
        return None
    return Keyring(settings.api_keys_file, settings.protect_health, settings.protect_metrics)
