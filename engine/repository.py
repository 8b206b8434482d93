"""The model repository: which models exist on disk, their versions, and their lifetimes.

Loading a model version = parse config -> create `count` runtime instances (loaded on their
own threads) -> warm up -> start its scheduler -> READY. A failure leaves that model NOT READY
with the reason and touches no other model.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from convoy.batching.scheduler import Scheduler
from convoy.batching.stats import ModelStats
from convoy.batching.usage import UsageMeter
from convoy.config import ModelConfig, ModelVersionSource, ServerConfig
from convoy.engine.model_config import build_model_config, complete_proto, read_config_proto
from convoy.errors import ConvoyError, InvalidConfig, InvalidInput, ModelNotFound, Unavailable
from convoy.protos import model_config_pb2 as mc
from convoy.runtimes.base import RuntimeInstance, autocomplete, runtime_factory
from convoy.runtimes.isolated import isolated_factory
from convoy.runtimes.warmup import run_warmup

log = logging.getLogger("convoy.repository")

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(slots=True, eq=False)
class ModelVersion:
    """One served version of a model."""

    config: ModelConfig
    version: int
    state: str = "LOADING"  # LOADING, READY, UNAVAILABLE, UNLOADING
    reason: str = ""
    stats: ModelStats = field(default_factory=ModelStats)
    scheduler: Scheduler | None = None
    instances: list[RuntimeInstance] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        # A version whose every instance is being replaced (after a hung batch) is not ready.
        return self.state == "READY" and (self.scheduler is None or self.scheduler.available)


@dataclass(slots=True, eq=False)
class Model:
    name: str
    state: str = "UNAVAILABLE"
    reason: str = ""
    config: ModelConfig | None = None
    #: The config as the ModelConfig API returns it (user's config + what Convoy filled in).
    config_proto: mc.ModelConfig | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)

    def latest_ready(self) -> ModelVersion | None:
        for number in sorted(self.versions, reverse=True):
            if self.versions[number].ready:
                return self.versions[number]
        return None


class ModelRepository:
    """Owns every loaded model; `async with` unloads them all on exit."""

    def __init__(self, settings: ServerConfig, usage: UsageMeter | None = None) -> None:
        self.root = settings.model_repository.resolve()
        self._settings = settings
        #: Showback meter handed to every scheduler (None: not metered).
        self.usage = usage
        self.models: dict[str, Model] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: Called (on the loop) whenever a model or version changes state, e.g. to tell the
        #: --workers front ends (engine/remote.py).
        self.listeners: list[Callable[[], None]] = []

    def changed(self) -> None:
        for listener in self.listeners:
            listener()

    async def __aenter__(self) -> ModelRepository:
        settings = self._settings
        names = self.model_names() if settings.load_all else list(settings.load_models)
        await asyncio.gather(*(self.load(name) for name in names), return_exceptions=True)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await asyncio.gather(*(self.unload(name) for name in list(self.models)), return_exceptions=True)

    # --- queries (any thread: they only read dicts replaced whole) ---------------------------
    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve a request for (latest ready when `version` is empty)."""
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        if version:
            try:
                number = int(version)
            except ValueError:
                raise InvalidInput(
                    f"failed to get model version from specified version string '{version[:40]}': "
                    "expected a non-negative integer"
                ) from None
            found = model.versions.get(number)
            if found is None:
                raise ModelNotFound(
                    f"Request for unknown model: '{name}' version {version} is not found"
                )
            if not found.ready:
                raise Unavailable(
                    f"model '{name}' version {version} is not ready: {found.reason or found.state}"
                )
            return found
        found = model.latest_ready()
        if found is None:
            raise Unavailable(f"model '{name}' is not ready: {model.reason or model.state}")
        return found

    def model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        return model

    def ready(self) -> bool:
        """Server readiness: every model asked for is ready (none failed to load)."""
        return all(m.state == "READY" for m in self.models.values())

    def index(self) -> list[dict]:
        rows = []
        for name in sorted(set(self.model_names()) | set(self.models)):
            model = self.models.get(name)
            if model is None:
                rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"})
                continue
            if not model.versions:
                rows.append({"name": name, "version": "", "state": model.state, "reason": model.reason})
            for number in sorted(model.versions):
                entry = model.versions[number]
                state, reason = entry.state, entry.reason
                if state == "READY" and not entry.ready:
                    state, reason = "UNAVAILABLE", entry.scheduler.restart_reason
                rows.append({"name": name, "version": str(number), "state": state, "reason": reason})
        return rows

    def relative(self, text: str) -> str:
        """`text` with paths inside the repository shown relative to it (what clients see)."""
        return text.replace(f"{self.root}/", "")

    # --- lifecycle (loop thread) ---------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        if not _MODEL_NAME.match(name) or name in (".", ".."):
            raise InvalidInput(f"model name '{name}' may hold only letters, digits, '_', '.' and '-'")
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InvalidInput(f"model name '{name}' points outside the model repository")
        if not path.is_dir():
            raise ModelNotFound(f"model '{name}' is not found in the model repository")
        return path

    async def load(self, name: str) -> Model:
        """(Re)load a model from disk. The old versions keep serving until the new ones are up."""
        model_dir = self._model_dir(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            model = Model(name=name, state="LOADING")
            previous = self.models.get(name)
            if previous is None:
                self.models[name] = model
                self.changed()
            try:
                proto = read_config_proto(model_dir / "config.pbtxt")
                config = build_model_config(proto, model_dir)
                available = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
                chosen = config.version_policy.select(available)
                if not chosen:
                    raise ModelNotFound(
                        f"{model_dir}: no version folder matches the version policy "
                        f"(found {sorted(available) or 'none'})"
                    )
                # What the model file itself declares fills what config.pbtxt left out.
                newest = ModelVersionSource(config, chosen[0], model_dir / str(chosen[0]))
                config = autocomplete(_factory(config.backend, model_dir), newest)
                model.config = config
                model.config_proto = complete_proto(proto, config)
                results = await asyncio.gather(
                    *(self._load_version(config, model_dir, v) for v in chosen)
                )
                model.versions = {entry.version: entry for entry in results}
                if any(entry.ready for entry in results):
                    model.state, model.reason = "READY", ""
                else:
                    model.state = "UNAVAILABLE"
                    model.reason = "; ".join(e.reason for e in results if e.reason)
            except ConvoyError as exc:
                model.state, model.reason = "UNAVAILABLE", self.relative(str(exc))
                log.error("model '%s' failed to load: %s", name, exc)
            except Exception as exc:
                model.state = "UNAVAILABLE"
                model.reason = self.relative(f"{type(exc).__name__}: {exc}")
                log.exception("model '%s' failed to load", name)
            self.models[name] = model
            self.changed()
            if previous is not None and previous is not model:
                await self._stop(previous)
            if model.state == "READY":
                log.info(
                    "model '%s' ready (versions %s, backend %s)",
                    name,
                    sorted(model.versions),
                    model.config.backend,
                )
            return model

    async def unload(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            model = self.models.pop(name, None)
            if model is None:
                raise ModelNotFound(f"model '{name}' is not loaded")
            self.changed()
            await self._stop(model)

    async def _load_version(self, config: ModelConfig, model_dir: Path, version: int) -> ModelVersion:
        entry = ModelVersion(config=config, version=version)
        source = ModelVersionSource(config=config, version=version, path=model_dir / str(version))
        try:
            factory = _factory(config.backend, model_dir)
            if self._isolation(config) == "process":
                factory = isolated_factory(config.backend)
            for index in range(config.instance_count):
                entry.instances.append(await self._start_instance(factory, source, index))

            async def replace(lost: RuntimeInstance) -> RuntimeInstance:
                return await self._start_instance(factory, source, lost.index)

            scheduler = Scheduler(
                config,
                str(version),
                entry.instances,
                entry.stats,
                self._settings.max_queue_size,
                execution_timeout=self._execution_timeout(config),
                replace_instance=replace,
                usage=self.usage,
                on_available_change=self.changed,
            )
            await scheduler.__aenter__()
            entry.scheduler = scheduler
            entry.state = "READY"
        except Exception as exc:
            entry.state = "UNAVAILABLE"
            reason = str(exc) if isinstance(exc, ConvoyError) else f"{type(exc).__name__}: {exc}"
            # The operator's log keeps full paths (and a traceback for unexpected errors);
            # clients see paths relative to the repository.
            log.error(
                "model '%s' version %d failed to load: %s",
                config.name,
                version,
                reason,
                exc_info=None if isinstance(exc, ConvoyError) else exc,
            )
            entry.reason = self.relative(reason)
            await self._close_instances(entry)
        return entry

    async def _start_instance(self, factory, source: ModelVersionSource, index: int) -> RuntimeInstance:
        """Create, load and warm up instance `index` of a model version on its own thread."""
        config = source.config
        instance = RuntimeInstance(
            factory(source, index), f"{config.name}-{source.version}-{index}", index
        )
        try:
            await instance.call(instance.runtime.load)
            await run_warmup(instance, config, source.path)
        except BaseException:
            await instance.close()
            raise
        return instance

    def _execution_timeout(self, config: ModelConfig) -> float:
        """Seconds a batch may run: the model's `execution_timeout_ms` parameter, else the
        server's --execution-timeout (0 = none)."""
        value = config.parameters.get("execution_timeout_ms", "").strip()
        if not value:
            return self._settings.execution_timeout
        try:
            milliseconds = float(value)
        except ValueError:
            milliseconds = -1
        if milliseconds < 0:
            raise InvalidConfig(
                f"{self.root / config.name / 'config.pbtxt'}: parameters.execution_timeout_ms: "
                f"expected a non-negative number of milliseconds, got '{value}'"
            )
        return milliseconds / 1000

    def _isolation(self, config: ModelConfig) -> str:
        """Where the model's code runs: "thread" (in the server's process) or "process" (a worker
        process per instance, see runtimes/isolated.py); the model's `isolation` parameter, else
        the server's --isolation."""
        value = config.parameters.get("isolation", "").strip() or self._settings.isolation
        if value not in ("thread", "process"):
            raise InvalidConfig(
                f"{self.root / config.name / 'config.pbtxt'}: parameters.isolation: expected "
                f"'thread' or 'process', got '{value}'"
            )
        return value

    async def _stop(self, model: Model) -> None:
        for entry in model.versions.values():
            entry.state = "UNLOADING"
            if entry.scheduler is not None:
                await entry.scheduler.close(self._settings.shutdown_grace)
                # Close the instances working now (not those abandoned in a hung batch).
                entry.instances = entry.scheduler.instances
                entry.scheduler = None
            await self._close_instances(entry)
            entry.state = "UNAVAILABLE"
            entry.reason = "unloaded"

    @staticmethod
    async def _close_instances(entry: ModelVersion) -> None:
        for instance in entry.instances:
            try:
                await instance.close()
            except Exception:
                log.exception("closing instance %s failed", instance.name)
        entry.instances = []


def _factory(backend: str, model_dir: Path):
    """The backend's runtime factory; an unknown or uninstalled backend names the config file."""
    try:
        return runtime_factory(backend)
    except InvalidConfig as exc:
        raise InvalidConfig(f"{model_dir / 'config.pbtxt'}: backend: {exc}") from None
