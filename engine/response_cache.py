"""The response cache between the front ends and the schedulers (Triton's response_cache).

Every inference request reaches the engine's submit path whichever front end decoded it, so
each gets the cache the same way. For a model with `response_cache { enable: true }`:

1. Its key (or, for row-level caching, one key per row: engine/cache_key.py) is looked up in the
   store: the local one (engine/cache_store.py) or Redis (engine/cache_redis.py).
2. Every unit (the request, or each row) found is taken from the cache; a unit whose key an
   earlier request is computing right now waits for that computation (single-flight: identical
   concurrent misses cost one execution); the rest go to the scheduler as one sub-request holding
   only those rows.
3. When every unit has arrived, the answer is stitched together in row order and carries the
   response parameter `convoy-cache`: `hit` (nothing computed for it), `miss` (everything
   computed) or `partial`. Only successful responses are cached.

A failed computation fails only the request it was computed for: requests waiting on it compute
their rows themselves. Statistics follow Triton: a hit counts in `cache_hit` (its lookup time),
successes and queue (zero) but not in the inference or execution counts; a miss or partial
answer counts in `cache_miss` (lookup and insert time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from convoy.batching.completion import resolve
from convoy.batching.usage import UsageMeter
from convoy.config import CacheSettings
from convoy.errors import Cancelled, DeadlineExceeded, InferenceFailed
from convoy.types import Request, Response, StageTimes

from .cache_key import key_prefix, request_key, row_keys
from .cache_store import CacheEntry, LocalStore, entry_from
from .repository import ModelVersion

if TYPE_CHECKING:
    from .cache_redis import RedisStore

log = logging.getLogger("convoy.cache")

#: The response parameter that says where an answer came from.
CACHE_PARAMETER = "convoy-cache"
#: The parameters of an answer the model set none for, one shared dict per outcome (front ends
#: only read a response's parameters).
_MARKERS = {result: {CACHE_PARAMETER: result} for result in ("hit", "miss", "partial")}


def owner_of(entry: ModelVersion) -> str:
    """Whose entries these are: a model version at one revision (what invalidation drops)."""
    return f"{entry.config.name}/{entry.version}/{entry.revision}"


class _Assembly:
    """One request while its units arrive: from the store, from others' flights, computed."""

    __slots__ = (
        "cached",
        "coalesced",
        "computed",
        "deadline_timer",
        "direct",
        "entry",
        "finished",
        "insert_ns",
        "keys",
        "lookup_ns",
        "parameters",
        "parts",
        "pending",
        "request",
        "reused_cost",
        "reused_rows",
        "rows",
        "started_ns",
        "subs",
        "timings",
    )

    def __init__(self, entry: ModelVersion, request: Request, keys: list[bytes], rows: bool) -> None:
        self.entry = entry
        self.request = request
        self.keys = keys
        self.rows = rows
        self.parts: list[CacheEntry | None] = [None] * len(keys)
        self.pending = len(keys)
        self.started_ns = time.monotonic_ns()
        self.lookup_ns = 0
        self.insert_ns = 0
        self.cached = 0
        self.coalesced = 0
        #: Rows taken from the cache or from others' computations, and what they cost to compute.
        self.reused_rows = 0
        self.reused_cost = 0
        self.computed = 0
        self.subs: list[Request] = []
        self.timings: StageTimes | None = None
        #: The computed response's own outputs and parameters when it answers the request whole.
        self.direct: dict[str, np.ndarray] | None = None
        self.parameters: dict[str, Any] | None = None
        self.finished = False
        self.deadline_timer: asyncio.TimerHandle | None = None

    def unit_rows(self) -> int:
        return 1 if self.rows else self.request.rows


class _SubFuture:
    """The future of a sub-request: its outcome goes back to the cache, not to a client."""

    __slots__ = ("_cache", "_done", "assembly", "indices")

    def __init__(self, cache: ResponseCache, assembly: _Assembly, indices: list[int]) -> None:
        self._cache = cache
        self.assembly = assembly
        self.indices = indices
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def set_result(self, result: Response) -> None:
        self._done = True
        self._cache._computed(self.assembly, self.indices, result)

    def set_exception(self, exception: BaseException) -> None:
        self._done = True
        self._cache._compute_failed(self.assembly, self.indices, exception)

    def add_done_callback(self, callback: Callable[[Any], object]) -> None:
        pass  # nobody awaits a sub-request


def open_store(settings: CacheSettings) -> LocalStore | RedisStore:
    if settings.kind == "redis":
        from .cache_redis import RedisStore

        return RedisStore(settings)
    return LocalStore(settings.size, settings.ttl_s)


class ResponseCache:
    """Owned by the Engine; `submit` is called on the loop thread for every inference request."""

    def __init__(
        self,
        store: LocalStore | RedisStore,
        schedule: Callable[[ModelVersion, Request], None],
        cancel: Callable[[ModelVersion, Request], None],
        usage: UsageMeter | None = None,
    ) -> None:
        """`schedule` queues a (sub-)request on its model's scheduler; `cancel` takes it back."""
        self.store = store
        self._schedule = schedule
        self._cancel = cancel
        self._usage = usage
        #: key -> [(assembly, unit index)] waiting for the computation in progress.
        self._flights: dict[bytes, list[tuple[_Assembly, int]]] = {}
        #: Client requests being answered, for `cancel`.
        self._assemblies: dict[Request, _Assembly] = {}
        self._key_errors = 0

    async def start(self) -> None:
        start = getattr(self.store, "start", None)
        if start is not None:
            await start()

    async def close(self) -> None:
        close = getattr(self.store, "close", None)
        if close is not None:
            await close()

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    # --- the request path ----------------------------------------------------------------------
    def submit(self, entry: ModelVersion, request: Request) -> bool:
        """Take `request` if its model is cached (then its future is answered from here)."""
        policy = entry.config.response_cache
        if policy is None or request.stream is not None:
            return False
        try:
            principal = (request.principal or "") if policy.per_key else None
            prefix = key_prefix(entry.config.name, entry.version, entry.revision, request, principal)
            rows = policy.rows and request.rows > 0
            if rows:
                keys = row_keys(prefix, entry.config, request)
            else:
                keys = [request_key(prefix, entry.config, request)]
        except Exception:
            # Fail open: a request the cache cannot key is served as if uncached.
            self._key_errors += 1
            log.exception("response cache: cannot key a request to '%s'", entry.config.name)
            return False
        assembly = _Assembly(entry, request, keys, rows)
        self._assemblies[request] = assembly
        store = self.store
        if store.synchronous:
            get = store.get
            self._looked_up(assembly, [get(key) for key in keys] if len(keys) > 1 else [get(keys[0])])
        else:
            store.get_many(keys, lambda found: self._looked_up(assembly, found))
        return True

    def cancel(self, request: Request) -> bool:
        """The client went away; True if the cache holds the request (and dealt with it)."""
        assembly = self._assemblies.get(request)
        if assembly is None:
            return False
        if assembly.subs:
            for sub in list(assembly.subs):
                self._cancel(assembly.entry, sub)  # its failure answers the request
        else:
            self._fail(assembly, Cancelled("request cancelled by the client"))
            assembly.entry.stats.record_failure("CANCELED", time.monotonic_ns() - request.received_ns)
        return True

    def _looked_up(self, assembly: _Assembly, found: list[CacheEntry | None]) -> None:
        assembly.lookup_ns = time.monotonic_ns() - assembly.started_ns
        if assembly.finished:
            return  # cancelled while Redis answered
        multi = len(assembly.keys) > 1
        compute = []
        for index, (key, hit) in enumerate(zip(assembly.keys, found, strict=True)):
            # An entry with model-set parameters answers only a request of that one unit.
            if hit is not None and not (multi and hit.parameters):
                assembly.parts[index] = hit
                assembly.cached += 1
                assembly.pending -= 1
                assembly.reused_rows += assembly.unit_rows()
                assembly.reused_cost += hit.cost_ns
                continue
            waiters = self._flights.get(key)
            if waiters is not None:
                waiters.append((assembly, index))
            else:
                self._flights[key] = []
                compute.append(index)
        if compute:
            self._compute(assembly, compute)
        if assembly.finished:
            return  # answered (or failed) while its sub-request was queued
        if assembly.pending == 0:
            self._complete(assembly)
        elif not assembly.subs and assembly.request.deadline is not None:
            # Only waiting on others' computations: the client's deadline still holds.
            loop = asyncio.get_running_loop()
            at = loop.time() + assembly.request.deadline - time.monotonic()
            assembly.deadline_timer = loop.call_at(at, self._deadline_passed, assembly)

    def _compute(self, assembly: _Assembly, indices: list[int]) -> None:
        """Queue the units `indices` of the request as one sub-request."""
        request = assembly.request
        if assembly.rows and len(indices) != request.rows:
            # Only the missing rows are computed (one copy of them, in row order).
            inputs = {name: np.take(array, indices, axis=0) for name, array in request.inputs.items()}
            rows = len(indices)
        else:
            inputs, rows = request.inputs, request.rows
        sub = Request(
            request.id,
            inputs,
            request.requested_outputs,
            rows,
            _SubFuture(self, assembly, indices),
            request.priority,
            request.timeout_us,
            request.deadline,
            request.parameters,
            request.received_ns,
            request.principal,
            bls_call=request.bls_call,
        )
        assembly.subs.append(sub)
        self._schedule(assembly.entry, sub)

    def _cost_per_row(self, entry: ModelVersion) -> int:
        stats = entry.stats
        return stats.batch_compute.total // max(stats.inference_count, 1)

    def _computed(self, assembly: _Assembly, indices: list[int], response: Response) -> None:
        started = time.monotonic_ns()
        for sub in assembly.subs:
            if sub.future.indices is indices:  # type: ignore[attr-defined]
                assembly.subs.remove(sub)
                break
        entry = assembly.entry
        policy = entry.config.response_cache
        assert policy is not None  # submit takes only requests to models with a policy
        owner = owner_of(entry)
        store = self.store
        cost = self._cost_per_row(entry)
        outputs = response.outputs
        whole = len(indices) == len(assembly.keys)
        if assembly.rows:
            # A model's parameters describe its whole response: rows computed together with
            # them are not cached one by one.
            cacheable = not (response.parameters and len(indices) > 1)
            parameters = response.parameters if len(indices) == 1 else None
            for position, index in enumerate(indices):
                part = entry_from(
                    {name: array[position : position + 1] for name, array in outputs.items()},
                    parameters,
                    cost,
                )
                assembly.parts[index] = part
                if cacheable:
                    store.insert(assembly.keys[index], owner, part, policy.ttl_s, policy.max_bytes)
                self._land(assembly.keys[index], part, assembly)
        else:
            part = entry_from(outputs, response.parameters, cost * max(assembly.request.rows, 1))
            assembly.parts[0] = part
            store.insert(assembly.keys[0], owner, part, policy.ttl_s, policy.max_bytes)
            self._land(assembly.keys[0], part, assembly)
        assembly.computed += len(indices)
        assembly.pending -= len(indices)
        assembly.timings = response.timings
        if whole:
            assembly.direct = outputs
            assembly.parameters = response.parameters
        assembly.insert_ns += time.monotonic_ns() - started
        if assembly.pending == 0 and not assembly.finished:
            self._complete(assembly)

    def _land(self, key: bytes, part: CacheEntry, computing: _Assembly) -> None:
        """A key's computation finished: every request waiting for it gets the entry."""
        for waiter, index in self._flights.pop(key, ()):
            if waiter.finished:
                continue
            waiter.parts[index] = part
            waiter.coalesced += 1
            waiter.pending -= 1
            waiter.reused_rows += waiter.unit_rows()
            waiter.reused_cost += part.cost_ns
            if waiter.pending == 0 and waiter is not computing:
                self._complete(waiter)

    def _compute_failed(self, assembly: _Assembly, indices: list[int], error: BaseException) -> None:
        for sub in assembly.subs:
            if sub.future.indices is indices:  # type: ignore[attr-defined]
                assembly.subs.remove(sub)
                break
        for index in indices:
            for waiter, unit in self._flights.pop(assembly.keys[index], ()):
                if waiter is assembly or waiter.finished:
                    continue
                # Its source failed: it computes the unit itself (the failure was not its own).
                if assembly.keys[index] in self._flights:
                    self._flights[assembly.keys[index]].append((waiter, unit))
                else:
                    self._flights[assembly.keys[index]] = []
                    if waiter.deadline_timer is not None:
                        waiter.deadline_timer.cancel()
                        waiter.deadline_timer = None
                    self._compute(waiter, [unit])
        self._fail(assembly, error)

    def _deadline_passed(self, assembly: _Assembly) -> None:
        if assembly.finished or assembly.subs:
            return
        request = assembly.request
        self._fail(
            assembly, DeadlineExceeded("request timed out waiting for an identical request's answer")
        )
        assembly.entry.stats.record_rejection("timeout", time.monotonic_ns() - request.received_ns)

    def _fail(self, assembly: _Assembly, error: BaseException) -> None:
        if assembly.finished:
            return
        assembly.finished = True
        self._assemblies.pop(assembly.request, None)
        if assembly.deadline_timer is not None:
            assembly.deadline_timer.cancel()
        for sub in list(assembly.subs):
            self._cancel(assembly.entry, sub)
        resolve(assembly.request, error=error)

    def _complete(self, assembly: _Assembly) -> None:
        if assembly.finished:
            return
        assembly.finished = True
        self._assemblies.pop(assembly.request, None)
        if assembly.deadline_timer is not None:
            assembly.deadline_timer.cancel()
        entry = assembly.entry
        request = assembly.request
        units = len(assembly.keys)
        if assembly.computed == 0:
            result = "hit"
        elif assembly.computed == units:
            result = "miss"
        else:
            result = "partial"
        # Every part is filled now (pending is 0).
        parts: list[CacheEntry] = assembly.parts  # type: ignore[assignment]
        parameters = None
        if assembly.direct is not None:
            outputs, parameters = assembly.direct, assembly.parameters
        elif units == 1:
            outputs, parameters = parts[0].outputs, parts[0].parameters
        else:
            try:
                outputs = {
                    name: np.concatenate([part.outputs[name] for part in parts], axis=0)
                    for name in parts[0].outputs
                }
            except (ValueError, KeyError) as exc:
                error = InferenceFailed(
                    f"model '{entry.config.name}': cached rows do not stitch into one response "
                    f"({type(exc).__name__}: {exc})"
                )
                resolve(request, error=error)
                return
        answer = {**parameters, CACHE_PARAMETER: result} if parameters else _MARKERS[result]
        response = Response(outputs, entry.config.name, str(entry.version), assembly.timings, answer)
        delivered = resolve(request, response)
        # Statistics (loop thread, as the scheduler's).
        stats = entry.stats
        cache = stats.cache
        now = time.monotonic_ns()
        if assembly.coalesced:
            cache.coalesced += 1
        cache.rows_cached += assembly.reused_rows
        cache.rows_computed += request.rows - assembly.reused_rows
        # What the reused rows would cost now (the model's mean compute per row so far); the
        # entries' own estimates where this replica has computed nothing yet (Redis entries).
        per_row = self._cost_per_row(entry)
        saved = per_row * assembly.reused_rows if per_row else assembly.reused_cost
        cache.saved_ns += saved
        if result == "hit":
            cache.hit.add(assembly.lookup_ns)
            if delivered:
                stats.success.add(now - (request.received_ns or assembly.started_ns))
                stats.queue.add(0)
            else:
                stats.record_failure("CANCELED", now - (request.received_ns or assembly.started_ns))
        else:
            cache.miss.add(assembly.lookup_ns + assembly.insert_ns)
            if result == "partial":
                cache.partial += 1
        if self._usage is not None and request.principal is not None and assembly.reused_rows:
            self._usage.record_cache(
                entry.config.name,
                str(entry.version),
                request,
                assembly.reused_rows,
                saved,
                result == "hit",
            )

    # --- invalidation --------------------------------------------------------------------------
    def retain(self, served: set[str]) -> None:
        """Drop the entries of every model version not in `served` (owner_of names): unloaded,
        replaced by a roll-out, or reloaded with another config or other files."""
        owners = getattr(self.store, "owners", None)
        if owners is None:
            return
        for owner in owners():
            if owner not in served:
                dropped = self.store.drop_owner(owner)
                if dropped:
                    log.info("response cache: dropped %d entries of %s", dropped, owner)
