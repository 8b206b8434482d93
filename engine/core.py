"""The engine: everything that holds models, built once per server.

Repository and model lifecycle, schedulers, statistics and metrics, usage metering, quotas and
the payload log. In a single process the front ends hold the `Engine` itself as their
`EngineClient`; with --workers the engine process serves it to the front-end processes over
IPC (engine/remote/endpoint.py), and they hold a `RemoteEngine` (engine/remote/client.py).

async with Engine(settings, log_control) as engine:
    engine.submit(engine.resolve("add_sub"), request)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from convoy.auth import Keyring, load_keys
from convoy.batching.stats import Duration, Histogram, quantile_ms
from convoy.batching.usage import UsageMeter
from convoy.config import ServerConfig
from convoy.errors import ConvoyError, InvalidInput, ModelLoadFailed, Overloaded, Unavailable
from convoy.logs import LogControl
from convoy.trace_settings import TraceControl, trace_setup
from convoy.types import Request, StreamedResponse

from .client import EngineClient, ShutdownPhase, parse_version
from .ledger import UsageLedger
from .metrics import Metrics
from .overrides import parse_load_parameters
from .payload_log import PayloadLog
from .recent import Counts, RecentWindow
from .repository import Model, ModelRepository, ModelVersion, poll_failure
from .response_cache import ResponseCache, open_store, owner_of
from .rollout.manager import RolloutManager
from .rollout.metrics import RolloutCollector
from .rollout.routing import RolloutRoute
from .shared_memory import RegionRow, SharedMemoryRegistry

log = logging.getLogger("convoy.engine")


def _duration(d: Duration | Histogram[int]) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


class Engine(EngineClient):
    """The in-process engine client: front ends in this process call it directly."""

    def __init__(self, settings: ServerConfig, log_control: LogControl | None = None) -> None:
        self.settings = settings
        self.strict_readiness = settings.strict_readiness
        self.server_name = settings.server_name
        self.allow_client_shm = settings.allow_client_shm
        self.log_control = log_control or LogControl(settings.log_level, settings.log_format)
        #: Showback: per-principal usage, metered when callers are identified (API keys) or a
        #: usage ledger is asked for.
        metered = settings.usage_ledger is not None or settings.api_keys_file is not None
        self.usage = UsageMeter() if metered else None
        self.repository = ModelRepository(settings, self.usage)
        # Model code's BLS calls take the front ends' path (quotas aside: no principal).
        self.repository.model_caller.service = self
        # Ensemble steps reach their composing models through this engine's submit path.
        self.repository.submit_step = self._queue
        #: Roll-outs: which versions each model holds and serves, and how requests naming no
        #: version are split while one runs.
        self.rollouts = RolloutManager(settings, self.repository)
        self.repository.rollouts = self.rollouts
        #: API keys: the engine takes each request off its key's quota (front ends check keys).
        #: Read here, so a broken key file stops start-up before any model loads.
        self.keys: Keyring | None = load_keys(settings)
        self.payload_log: PayloadLog | None = None
        self.metrics: Metrics | None = None
        self._ledger: UsageLedger | None = None
        #: What `start` started, closed by `close` in reverse.
        self._lifetime = contextlib.AsyncExitStack()
        self.shared_memory = SharedMemoryRegistry()
        #: Called (on the loop) after log settings change, e.g. to tell other processes.
        self.log_listeners: list[Callable[[dict[str, object]], None]] = []
        self.trace_control = TraceControl(
            trace_setup(
                settings.trace_otlp_endpoint, settings.trace_console, settings.trace_config
            ).defaults
        )
        #: Called (on the loop) with the whole trace state after trace settings change.
        self.trace_listeners: list[Callable[[dict[str, Any]], None]] = []
        #: The catalog's live figures: recent traffic per version, counted from start.
        self.recent = RecentWindow(self._version_counts)
        #: The response cache (--cache-config), between every front end and the schedulers.
        self.cache: ResponseCache | None = None
        if settings.cache is not None:
            self.cache = ResponseCache(
                open_store(settings.cache), self._schedule, self._unschedule, self.usage
            )
            self.repository.listeners.append(self._cache_models_changed)

    # --- lifetime --------------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.enter(ShutdownPhase.DRAINING)
        await self.drain(time.monotonic() + self.settings.shutdown_grace)
        await self.close()

    async def start(self) -> None:
        """Start the engine's writers, load the models, begin the roll-outs. A start that fails
        midway closes what it had started (`close`)."""
        try:
            await self._start(self._lifetime)
        except BaseException:
            await self.close()
            raise

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        # Registered first, so closed last: the regions clients registered while it served.
        stack.callback(self.shared_memory.close)
        self.payload_log = _start_payload_log(settings)
        if self.payload_log is not None:
            stack.push_async_callback(self._close_payload_log, self.payload_log)
        self.metrics = Metrics(
            self.repository,
            self.usage,
            self.payload_log,
            self.keys,
            settings.metrics,
            self.cache.store if self.cache is not None else None,
        )
        stack.callback(self.metrics.close)
        if self.cache is not None:
            await self.cache.start()
            stack.push_async_callback(self.cache.close)
        self.metrics.registry.register(RolloutCollector(self.rollouts))
        self.rollouts.payload_log = self.payload_log
        self.recent.start()
        stack.push_async_callback(self.recent.close)
        # Before the models, so it closes after them: the last interval counts the final answers.
        stack.callback(self._close_ledger)
        # The state file first: the versions its roll-outs hold load with the models.
        self.rollouts.prepare()
        # Its exit first, so models loaded before a failed (or cancelled) start are unloaded.
        stack.push_async_exit(self.repository)
        await self.repository.__aenter__()
        stack.push_async_callback(self.rollouts.close)
        await self.rollouts.begin()
        self.started = True
        if settings.usage_ledger is not None and self.usage is not None:
            self._ledger = UsageLedger(settings.usage_ledger, self.usage, settings.usage_interval)
            self._ledger.start()
        if self.keys is not None:
            keys_watch = asyncio.get_running_loop().create_task(
                self.keys.watch(), name="convoy-keys-watch"
            )
            stack.push_async_callback(_cancel, keys_watch)

    async def close(self) -> None:
        """Refuse what still arrives, then close what `start` started, in reverse: the
        roll-outs, the models, then the writers that record their last answers."""
        self.enter(ShutdownPhase.STOPPING)
        await self._lifetime.aclose()
        self.enter(ShutdownPhase.STOPPED)

    def _close_ledger(self) -> None:
        if self._ledger is not None:
            self._ledger.close()  # the last interval, up to the final answers

    @staticmethod
    async def _close_payload_log(payload_log: PayloadLog) -> None:
        await asyncio.sleep(0)  # outcome callbacks scheduled by the last answers run first
        payload_log.close()

    def reload_keys(self) -> None:
        """Reread the API key file now (SIGHUP); safe from a signal handler on the loop."""
        if self.keys is not None:
            self.keys.request_reload()

    async def drain(self, deadline: float) -> None:
        """Wait until no model has requests queued or executing, or until `deadline`. Polled:
        the schedulers signal no change of their in-flight count."""
        while time.monotonic() < deadline and any(
            entry.scheduler is not None and entry.scheduler.in_flight
            for model in self.repository.models.values()
            for entry in model.versions.values()
        ):
            await asyncio.sleep(0.01)

    # --- the model table -------------------------------------------------------------------------
    def models(self) -> Mapping[str, Model]:
        return self.repository.models

    def watch_models(self, listener: Callable[[], None]) -> None:
        self.repository.listeners.append(listener)

    # --- inference -------------------------------------------------------------------------------
    def resolve(self, name: str, version: str = "") -> ModelVersion | RolloutRoute:
        """As EngineClient.resolve; a request naming no version of a model under a running
        roll-out gets the roll-out's route (its split happens in `submit`)."""
        if not version:
            route: RolloutRoute | None = self.rollouts.routes.get(name)
            if route is not None and route.ready:
                return route
        # No isinstance check on the request path: `models` holds the repository's versions only.
        return super().resolve(name, version)  # type: ignore[return-value]

    # A view this engine's `resolve` returned, as EngineClient.submit says: a version or a route.
    def submit(self, model: ModelVersion | RolloutRoute, request: Request) -> None:  # type: ignore[override]
        """Queue a request on its model's scheduler (loop thread); errors go to its future."""
        if self.keys is not None and request.principal is not None and not self.refusing:
            # Quotas are counted here, where every front end's requests meet.
            try:
                self._admit(model, request)
            except ConvoyError as exc:
                if not request.future.done():
                    request.future.set_exception(exc)
                if self.payload_log is not None and not isinstance(model, RolloutRoute):
                    self.payload_log.offer(model, request)
                return
        if isinstance(model, RolloutRoute):
            model.rollout.submit(request, self._queue)
            return
        self._queue(model, request)

    def _queue(self, model: ModelVersion, request: Request) -> None:
        """`submit` without the quota: also how an ensemble's steps reach their models (the
        ensemble request was counted once), so composing models are cached too."""
        if request.stream is not None:
            request.stream = _first_response_timer(model, request, request.stream)
        cache = self.cache
        if cache is None or self.refusing or not cache.submit(model, request):
            self._schedule(model, request)
        # Every outcome (errors too) reaches the future, so the log sees them all.
        if self.payload_log is not None:
            self.payload_log.offer(model, request)

    def _schedule(self, model: ModelVersion, request: Request) -> None:
        """Queue a request on its model's scheduler; errors go to its future."""
        try:
            if self.refusing:
                raise Unavailable("server is shutting down")
            scheduler = model.scheduler
            if scheduler is None:
                raise Unavailable(f"model '{model.config.name}' is not ready")
            scheduler.submit(request)
        except ConvoyError as exc:
            if not request.future.done():
                request.future.set_exception(exc)

    def _unschedule(self, model: ModelVersion, request: Request) -> None:
        scheduler = model.scheduler
        if scheduler is not None:
            scheduler.cancel(request)

    def _cache_models_changed(self) -> None:
        """Entries of versions no longer served (unloaded, rolled out, changed) are dropped."""
        served = {
            owner_of(entry)
            for model in self.repository.models.values()
            for entry in model.versions.values()
            if entry.state in ("READY", "LOADING")
        }
        assert self.cache is not None  # this listener is registered only with a cache
        self.cache.retain(served)

    def _admit(self, model: ModelVersion | RolloutRoute, request: Request) -> None:
        """Take the request off its key's quota; a refusal (429) is a rejection in showback."""
        # `submit` admits only with keys, a request from a principal.
        assert self.keys is not None and request.principal is not None
        try:
            self.keys.admit_principal(request.principal)
        except Overloaded:
            if self.usage is not None:
                self.usage.record_rejection(model.config.name, str(model.version), request)
            raise

    # As `submit`: a view from `resolve` (a route's request names the version it was sent to).
    def cancel(self, model: ModelVersion | RolloutRoute, request: Request) -> None:  # type: ignore[override]
        if self.cache is not None and self.cache.cancel(request):
            return
        if request.routed_to is not None:
            model = request.routed_to  # the version its roll-out sent it to
        scheduler = model.scheduler
        if scheduler is not None:
            scheduler.cancel(request)

    # --- statistics and repository -----------------------------------------------------------------
    async def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        models: list[Model]
        if name:
            found = self._model(name, version)
            assert isinstance(found, Model)  # `models` holds the repository's models only
            models = [found]
        else:
            models = [self.repository.models[n] for n in sorted(self.repository.models)]
        number = parse_version(version)
        stats = []
        for model in models:
            for each in sorted(model.versions):
                if number is None or each == number:
                    stats.append(_version_statistics(model.name, model.versions[each]))
        return {"model_stats": stats}

    async def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        rows = self.repository.index()
        if ready_only:
            rows = [r for r in rows if r["state"] == "READY"]
        return rows

    def _check_model_control(self) -> None:
        """Load and unload requests need --model-control-mode explicit (Triton's rule: with
        none or poll the repository decides what is loaded)."""
        if self.settings.model_control_mode != "explicit":
            raise Unavailable("explicit model load / unload is not allowed if polling is enabled")

    async def load_model(
        self, name: str, parameters: dict[str, Any] | None = None, base64_files: bool = False
    ) -> None:
        """Triton's answers: a load that cannot read what it names (no such folder, an invalid
        config or override) fails "failed to load '<m>', failed to poll from model repository"
        (INTERNAL); a model whose versions fail to load, "load failed for model '<m>'"
        (INVALID_ARGUMENT). The reason follows either."""
        self._check_model_control()
        try:
            overrides = parse_load_parameters(name, parameters or {}, base64_files)
        except InvalidInput as exc:
            raise poll_failure(name, str(exc)) from None
        model = await self.repository.load(name, overrides)
        if model.failed_polling:
            raise poll_failure(name, model.load_error)
        if model.load_error or model.state != "READY":
            raise ModelLoadFailed(f"load failed for model '{name}': {model.load_error or model.reason}")

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self._check_model_control()
        await self.repository.unload(name)

    # --- roll-outs ----------------------------------------------------------------------------------
    async def rollout_start(self, name: str, document: dict[str, Any]) -> dict[str, Any]:
        return await self.rollouts.start(name, document)

    async def rollout_status(self, name: str = "") -> dict[str, Any]:
        return self.rollouts.status(name)

    async def rollout_promote(self, name: str) -> dict[str, Any]:
        return self.rollouts.promote(name)

    async def rollout_abort(self, name: str) -> dict[str, Any]:
        return self.rollouts.abort(name)

    async def rollout_report(self, name: str) -> dict[str, Any]:
        return self.rollouts.report(name)

    def _version_counts(self) -> dict[str, Counts]:
        """Every version's (failures, success latency buckets), keyed "model/version"."""
        return {
            f"{name}/{number}": (entry.stats.fail.count, list(entry.stats.success.buckets))
            for name, model in self.repository.models.items()
            for number, entry in model.versions.items()
        }

    async def catalog_figures(self) -> dict[str, Any]:
        current = self._version_counts()
        span, recent = self.recent.window(current)
        versions = {}
        for key, (failures, buckets) in current.items():
            window = None
            if key in recent:
                recent_failures, recent_buckets = recent[key]
                served = sum(recent_buckets)
                window = {
                    "seconds": round(span, 1),
                    "requests": served,
                    "failures": recent_failures,
                    "requests_per_s": served / span,
                    "p50_ms": quantile_ms(recent_buckets, 0.5),
                    "p99_ms": quantile_ms(recent_buckets, 0.99),
                }
            versions[key] = {
                "requests": sum(buckets),
                "failures": failures,
                "p50_ms": quantile_ms(buckets, 0.5),
                "p99_ms": quantile_ms(buckets, 0.99),
                "window": window,
            }
        return {
            "payload_log_on": self.payload_log is not None,
            "window_s": self.recent.window_s,
            "versions": versions,
            "rollouts": self.rollouts.catalog_summary(),
        }

    # --- shared memory -----------------------------------------------------------------------------
    # Front ends in other processes get the regions with the model table (engine/remote/endpoint.py).
    async def register_system_shared_memory(
        self, name: str, key: str, offset: int, byte_size: int
    ) -> None:
        self.check_client_shared_memory()
        self.shared_memory.register(name, key, offset, byte_size)
        self.repository.changed()

    async def unregister_system_shared_memory(self, name: str = "") -> None:
        self.check_client_shared_memory()
        self.shared_memory.unregister(name)
        self.repository.changed()

    async def system_shared_memory_status(self, name: str = "") -> list[RegionRow]:
        return self.shared_memory.status(name)

    # --- trace settings ----------------------------------------------------------------------------
    async def update_trace_settings(self, model: str, changes: dict[str, object]) -> dict[str, Any]:
        self._check_trace_model(model)
        current = self.trace_control.update(model, changes)  # validates: a bad change raises first
        state = self.trace_control.state()
        for listener in self.trace_listeners:
            listener(state)
        return current

    # --- log settings ------------------------------------------------------------------------------
    def log_settings(self) -> dict[str, object]:
        return self.log_control.settings()

    async def update_log_settings(self, changes: dict[str, object]) -> dict[str, object]:
        current = self.log_control.update(changes)  # validates: a bad change raises first
        for listener in self.log_listeners:
            listener(changes)
        return current


def _version_statistics(name: str, entry: ModelVersion) -> dict[str, Any]:
    s = entry.stats
    return {
        "name": name,
        "version": str(entry.version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success),
            "fail": _duration(s.fail),
            "queue": _duration(s.queue),
            "compute_input": _duration(s.compute_input),
            "compute_infer": _duration(s.compute_infer),
            "compute_output": _duration(s.compute_output),
            "cache_hit": _duration(s.cache.hit),
            "cache_miss": _duration(s.cache.miss),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for size, b in sorted(s.batch_stats.items())
        ],
    }


def _first_response_timer(
    model: ModelVersion, request: Request, sink: Callable[[StreamedResponse], None]
) -> Callable[[StreamedResponse], None]:
    """A decoupled request's sink that times its first response (Triton's first-response
    histogram), then passes every response on."""
    first = True

    def stream(item: StreamedResponse) -> None:
        nonlocal first
        if first:
            first = False
            model.stats.first_response.add(time.monotonic_ns() - (request.received_ns or 0))
        sink(item)

    return stream


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _start_payload_log(settings: ServerConfig) -> PayloadLog | None:
    """The payload log's writer when --payload-log-dir is set (models still opt in), else None."""
    if settings.payload_log_dir is None:
        return None
    payload_log = PayloadLog(
        settings.payload_log_dir,
        settings.payload_log_max_bytes,
        settings.payload_log_backups,
        settings.payload_log_max_elements,
        settings.payload_log_queue_size,
    )
    payload_log.start()
    return payload_log
