"""The Redis response cache (`--cache-config redis,host=H,port=P`): entries shared by replicas.

Lookups made in one loop turn go to Redis as one MGET and inserts as one pipeline of SETs with
an expiry (Triton's redis cache sets none, so its entries live until Redis evicts them). Keys
are `convoy:cache:<hex digest>`; values are msgpack structs holding the tensors' raw bytes.

Fail-open: Redis being down, slow past `socket_timeout` or full never fails a request. A failed
lookup is a miss and a failed insert is dropped, both counted in `errors`; the failure is
logged at most once a minute; after one, Redis is left alone for `RETRY_AFTER_S` (requests are
served as misses meanwhile) so a dead server costs no timeout per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import msgspec
import numpy as np

from convoy.config import CacheSettings
from convoy.errors import InvalidConfig

from .cache_store import ENTRY_OVERHEAD, CacheEntry

log = logging.getLogger("convoy.cache")

KEY_PREFIX = b"convoy:cache:"
#: After a Redis failure, seconds during which lookups and inserts skip it.
RETRY_AFTER_S = 1.0
#: Seconds between two log lines about Redis failures.
LOG_EVERY_S = 60.0


class _Tensor(msgspec.Struct, array_like=True):
    name: str
    #: numpy dtype string, or "|O" for BYTES (then `elements` holds them).
    dtype: str
    shape: tuple[int, ...]
    data: bytes = b""
    elements: list[bytes] = []


class _Stored(msgspec.Struct, array_like=True):
    outputs: list[_Tensor]
    # Any keys, as a bare dict decodes (a narrower type would make msgspec validate more).
    parameters: dict[Any, Any] | None
    cost_ns: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Stored)


def encode_entry(entry: CacheEntry) -> bytes:
    tensors = []
    for name, array in entry.outputs.items():
        if array.dtype == object:
            elements = [x.encode() if isinstance(x, str) else bytes(x) for x in array.reshape(-1)]
            tensors.append(_Tensor(name, "|O", array.shape, elements=elements))
        else:
            tensors.append(
                _Tensor(name, array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())
            )
    return _encoder.encode(_Stored(tensors, entry.parameters, entry.cost_ns))


def decode_entry(blob: bytes) -> CacheEntry:
    stored = _decoder.decode(blob)
    outputs = {}
    for tensor in stored.outputs:
        if tensor.dtype == "|O":
            array = np.empty(len(tensor.elements), dtype=object)
            array[:] = tensor.elements
            array = array.reshape(tensor.shape)
        else:
            array = np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype)).reshape(tensor.shape)
        array.flags.writeable = False
        outputs[tensor.name] = array
    return CacheEntry(outputs, stored.parameters, len(blob) + ENTRY_OVERHEAD, stored.cost_ns)


class RedisStore:
    """Batched, fail-open lookups and inserts against one Redis server."""

    synchronous: Literal[False] = False

    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise InvalidConfig(
                "--cache-config redis needs a package that is not installed (redis); install it "
                "with: pip install 'convoy-inference[redis]'"
            ) from None
        self._redis_errors = (aioredis.RedisError, OSError, asyncio.TimeoutError)
        self.settings = settings
        self.default_ttl_s = settings.ttl_s
        self._clock = clock

        def seconds(ms: int) -> float | None:
            return ms / 1000 if ms > 0 else None

        pool = aioredis.BlockingConnectionPool(
            host=settings.host,
            port=settings.port,
            username=settings.user or None,
            password=settings.password or None,
            db=settings.db,
            socket_connect_timeout=seconds(settings.connect_timeout_ms),
            socket_timeout=seconds(settings.socket_timeout_ms),
            max_connections=max(settings.pool_size, 1),
            timeout=seconds(settings.wait_timeout_ms),
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._gets: list[tuple[list[bytes], Callable[[list[CacheEntry | None]], None]]] = []
        self._puts: list[tuple[bytes, bytes, float]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0
        #: Failures by operation ("get", "set"), and operations skipped while Redis was down.
        self.errors: dict[str, int] = {}
        self.skipped = 0
        self.hits = 0
        self.misses = 0

    @property
    def where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    async def start(self) -> None:
        """Check Redis answers; a Redis that does not is logged (requests still flow, as misses)."""
        try:
            await self._client.ping()
        except self._redis_errors as exc:
            self._failed("ping", exc)
        else:
            log.info("response cache: redis at %s", self.where)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._client.aclose()

    # --- the request path (loop thread) ----------------------------------------------------------
    def get_many(self, keys: list[bytes], done: Callable[[list[CacheEntry | None]], None]) -> None:
        """Look `keys` up; `done(entries)` runs on the loop with an entry or None per key."""
        if self._clock() < self._down_until:
            self.skipped += 1
            done([None] * len(keys))
            return
        if not self._gets:
            self._spawn(self._flush_gets())
        self._gets.append((keys, done))

    def insert(
        self, key: bytes, owner: str, entry: CacheEntry, ttl_s: float = 0.0, owner_budget: int = 0
    ) -> bool:
        if self._clock() < self._down_until:
            self.skipped += 1
            return False
        if not self._puts:
            self._spawn(self._flush_puts())
        self._puts.append(
            (KEY_PREFIX + key.hex().encode(), encode_entry(entry), ttl_s or self.default_ttl_s)
        )
        return True

    def drop_owner(self, owner: str) -> int:
        """Entries of other revisions are never looked up again; Redis lets them expire."""
        return 0

    # --- background ------------------------------------------------------------------------------
    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_gets(self) -> None:
        await asyncio.sleep(0)  # the rest of this loop turn's lookups join the MGET
        batch, self._gets = self._gets, []
        keys = [KEY_PREFIX + key.hex().encode() for keys, _ in batch for key in keys]
        # bytes or None per key (redis types them bytes | str: str only with decode_responses).
        values: list[Any] = [None] * len(keys)
        try:
            values = await self._client.mget(keys)
        except self._redis_errors as exc:
            self._failed("get", exc)
        index = 0
        for wanted, done in batch:
            entries: list[CacheEntry | None] = []
            for blob in values[index : index + len(wanted)]:
                entry = None
                if blob is not None:
                    try:
                        entry = decode_entry(blob)
                    except (msgspec.DecodeError, ValueError, TypeError) as exc:
                        self._failed("decode", exc)
                entries.append(entry)
                if entry is None:
                    self.misses += 1
                else:
                    self.hits += 1
            index += len(wanted)
            try:
                done(entries)
            except Exception:
                log.exception("response cache: a lookup's continuation failed")

    async def _flush_puts(self) -> None:
        await asyncio.sleep(0)
        batch, self._puts = self._puts, []
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value, ttl in batch:
                    pipe.set(key, value, px=int(ttl * 1000) if ttl else None)
                await pipe.execute()
        except self._redis_errors as exc:
            self._failed("set", exc)

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.errors[operation] = self.errors.get(operation, 0) + 1
        now = self._clock()
        if operation != "decode":
            self._down_until = now + RETRY_AFTER_S
        if now - self._logged_at >= LOG_EVERY_S:
            more = f" ({self._unlogged} more failures since the last report)" if self._unlogged else ""
            log.warning(
                "response cache: redis at %s failed (%s: %s: %s); serving without the cache for "
                "now (requests are computed as misses)%s",
                self.where,
                operation,
                type(exc).__name__,
                exc,
                more,
            )
            self._logged_at = now
            self._unlogged = 0
        else:
            self._unlogged += 1
