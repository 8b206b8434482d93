"""The model repository: which models exist on disk, their versions, and their lifetimes.

Loading a model version = parse config -> create `count` runtime instances (loaded on their
own threads) -> warm up -> start its scheduler -> READY. A failure leaves that model NOT READY
with the reason and touches no other model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from convoy.batching.protocol import ModelScheduler
from convoy.batching.ragged import ragged_warmup
from convoy.batching.scheduler import Scheduler
from convoy.batching.sequence import SequenceScheduler
from convoy.batching.stats import ModelStats
from convoy.batching.usage import UsageMeter
from convoy.config import EnsembleStep, ModelConfig, ModelVersionSource, ServerConfig
from convoy.engine.bls import LocalModelCaller
from convoy.engine.cache_key import revision_digest
from convoy.engine.client import check_name_length, parse_version
from convoy.engine.ensemble import EnsembleScheduler
from convoy.engine.ensemble_plan import plan_ensemble
from convoy.engine.model_config import (
    build_model_config,
    complete_proto,
    model_code_document,
    proto_from_document,
    public_view,
    read_config_proto,
    runtime_view,
    without_filled_defaults,
)
from convoy.engine.overrides import LoadOverrides, discard, materialise
from convoy.engine.poller import RepositoryPoller, fingerprint
from convoy.errors import (
    ConvoyError,
    InvalidConfig,
    InvalidInput,
    ModelNotFound,
    ModelPollFailed,
    Unavailable,
)
from convoy.protos import model_config_pb2 as mc
from convoy.runtimes.base import RuntimeFactory, RuntimeInstance, runtime_factory
from convoy.runtimes.custom_metrics import CustomMetrics
from convoy.runtimes.isolated import isolated_factory
from convoy.runtimes.warmup import run_warmup
from convoy.types import ModelServices, Request

log = logging.getLogger("convoy.repository")

_MODEL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def poll_failure(name: str, reason: str) -> ModelPollFailed:
    """A load that could not read what it names, in Triton's words (which clients match on)."""
    return ModelPollFailed(f"failed to load '{name}', failed to poll from model repository: {reason}")


#: _plan failures that are about reading the model, not loading it (Triton: poll failures).
_POLL_ERRORS = (InvalidConfig, InvalidInput, ModelNotFound, ModelPollFailed)


def check_model_name(name: str) -> None:
    """A model name is a folder in the repository: letters, digits, '_', '.', '-' (the whole
    name: `re.match` with `$` let "add_sub\\n" through), at most MAX_MODEL_NAME of them."""
    check_name_length(name)
    if not _MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidInput(f"model name {name[:60]!r} may hold only letters, digits, '_', '.' and '-'")


@dataclass(slots=True, eq=False)
class _NameLock:
    """Serialises loads and unloads of one model name; kept only while held or awaited."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(slots=True, eq=False)
class ModelVersion:
    """One served version of a model."""

    config: ModelConfig
    version: int
    state: str = "LOADING"  # LOADING, READY, UNAVAILABLE, UNLOADING
    #: Why it failed to load or went away (`reason` adds why a READY version is unavailable).
    failure: str = ""
    stats: ModelStats = field(default_factory=ModelStats)
    scheduler: ModelScheduler | None = None
    instances: list[RuntimeInstance] = field(default_factory=list)
    #: The version folder's files as loaded (see engine/poller.py: fingerprint).
    fingerprint: str = ""
    #: With a response cache: a digest of the config and the files' contents, part of every
    #: cache key (engine/cache_key.py), so a changed model never answers from old entries.
    revision: str = ""
    #: A named version is served as asked: no roll-out splits it (see RolloutRoute).
    split_header: ClassVar[str] = ""

    @property
    def ready(self) -> bool:
        # A version whose every instance is being replaced (after a hung batch) is not ready.
        return self.state == "READY" and (self.scheduler is None or self.scheduler.available)

    @property
    def reason(self) -> str:
        """Why it is not ready: its failure, or while READY the scheduler's reason for being
        unavailable (instances being replaced; an ensemble's composing model not ready)."""
        if self.failure or self.scheduler is None or self.state != "READY":
            return self.failure
        return "" if self.scheduler.available else self.scheduler.restart_reason

    @reason.setter
    def reason(self, value: str) -> None:
        self.failure = value


@dataclass(slots=True, eq=False)
class Model:
    name: str
    state: str = "UNAVAILABLE"
    reason: str = ""
    config: ModelConfig | None = None
    #: The config as the ModelConfig API returns it (user's config + what Convoy filled in).
    config_proto: mc.ModelConfig | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    #: Why the last load of this model failed ("" when it succeeded); the model may still serve
    #: its older versions (a refused roll-out).
    load_error: str = ""
    #: The private directory the model was loaded from (load with file overrides), or None.
    private_dir: Path | None = None
    #: The last load failed reading the model (its folder, config or the load's overrides)
    #: before any version loaded: Triton's "failed to poll from model repository".
    failed_polling: bool = False
    #: The version requests naming none go to, set by a roll-out (its stable, or the version
    #: it promoted); None: the latest ready version.
    default_version: int | None = None

    def latest_ready(self) -> ModelVersion | None:
        for number in sorted(self.versions, reverse=True):
            if self.versions[number].ready:
                return self.versions[number]
        return None

    def serving(self) -> ModelVersion | None:
        """The version a request naming none gets (not split by a roll-out): the roll-out's
        version when one holds it (None while that one is not ready: never another version
        in its place), else the latest ready."""
        if self.default_version is not None and self.default_version in self.versions:
            found = self.versions[self.default_version]
            return found if found.ready else None
        return self.latest_ready()


class RolloutHooks(Protocol):
    """What the roll-outs (engine/rollout) add to loading a model: versions they keep loaded
    whatever the version policy says, the version requests naming none go to, and what a load
    starts (a roll-out rollout.json declares, or a new version folder made the candidate)."""

    def plan_versions(
        self, name: str, model_dir: Path, previous: Model | None, chosen: list[int]
    ) -> list[int]:
        """The versions to load: the policy's `chosen` and those roll-outs hold (newest first).
        Raises InvalidConfig for a bad rollout.json."""

    def default_version(self, name: str) -> int | None: ...

    def loaded(self, name: str, model: Model) -> None:
        """`model` was (re)loaded and now serves."""


class ModelRepository:
    """Owns every loaded model; `async with` unloads them all on exit."""

    def __init__(self, settings: ServerConfig, usage: UsageMeter | None = None) -> None:
        self.root = settings.model_repository.resolve()
        self._settings = settings
        #: Showback meter handed to every scheduler (None: not metered).
        self.usage = usage
        self.models: dict[str, Model] = {}
        self._locks: dict[str, _NameLock] = {}
        #: Loads started by `_ensure_loaded` (start-up, an ensemble's composing models).
        self._loads: dict[str, asyncio.Task[Model]] = {}
        #: How an ensemble submits its steps: the Engine replaces this with its own submit,
        #: so step requests take the front ends' path.
        self.submit_step: Callable[[ModelVersion, Request], None] = _submit_to_scheduler
        #: Called (on the loop) whenever a model or version changes state, e.g. to tell the
        #: --workers front ends (engine/remote/endpoint.py).
        self.listeners: list[Callable[[], None]] = []
        #: --model-control-mode poll: the watcher and its task (None otherwise).
        self._poller: RepositoryPoller | None = None
        self._poll_task: asyncio.Task[None] | None = None
        #: Model code's calls to other models (BLS); the Engine sets its `service` (itself).
        self.model_caller = LocalModelCaller(self)
        #: Metric families model code defines (pb_utils.MetricFamily), exported on /metrics.
        self.custom_metrics = CustomMetrics()
        self._services: ModelServices | None = None
        #: The engine's roll-outs (None: versions follow the version policy alone).
        self.rollouts: RolloutHooks | None = None

    def changed(self) -> None:
        for listener in self.listeners:
            listener()

    async def __aenter__(self) -> ModelRepository:
        settings = self._settings
        if settings.repository_poll_secs > 0:
            self._poller = RepositoryPoller(self, settings.repository_poll_secs)
            await self._poller.baseline()
        names = self.model_names() if settings.load_all else list(settings.load_models)
        await asyncio.gather(*(self._ensure_loaded(name) for name in names), return_exceptions=True)
        if self._poller is not None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poller.run())
        return self

    async def _ensure_loaded(self, name: str, chain: tuple[str, ...] = ()) -> None:
        """Load `name` unless it is loaded or being loaded (then wait for that load)."""
        if name in chain:
            raise InvalidConfig(
                f"ensembles include each other in a cycle: {' -> '.join([*chain, name])}"
            )
        running = self._loads.get(name)
        if running is not None:
            await asyncio.shield(running)
            return
        if name in self.models and self.models[name].state != "LOADING":
            return
        task = asyncio.ensure_future(self.load(name, _chain=chain))
        self._loads[name] = task
        try:
            await asyncio.shield(task)
        finally:
            if self._loads.get(name) is task and task.done():
                del self._loads[name]

    async def __aexit__(self, *exc_info: object) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
            self._poll_task = None
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
            number = parse_version(version)
            assert number is not None  # None only for an empty version
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
        found = model.serving()
        if found is None:
            if model.default_version is not None and model.default_version in model.versions:
                entry = model.versions[model.default_version]
                raise Unavailable(
                    f"model '{name}' version {entry.version} (the version its roll-out serves) is "
                    f"not ready: {entry.reason or entry.state}"
                )
            reason = model.reason
            for entry in model.versions.values():
                if entry.state == "READY" and entry.scheduler is not None:
                    reason = reason or entry.scheduler.restart_reason
            raise Unavailable(f"model '{name}' is not ready: {reason or model.state}")
        return found

    def model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        return model

    def ready(self) -> bool:
        """Server readiness: every model asked for is ready (none failed to load)."""
        return all(m.state == "READY" for m in self.models.values())

    def index(self) -> list[dict[str, str]]:
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
                    assert entry.scheduler is not None  # READY yet not ready: it is unavailable
                    state, reason = "UNAVAILABLE", entry.scheduler.restart_reason
                rows.append({"name": name, "version": str(number), "state": state, "reason": reason})
        return rows

    def relative(self, text: str) -> str:
        """`text` with paths inside the repository shown relative to it (what clients see)."""
        return text.replace(f"{self.root}/", "")

    # --- lifecycle (loop thread) ---------------------------------------------------------------
    @staticmethod
    def _check_name(name: str) -> None:
        check_model_name(name)

    @contextlib.asynccontextmanager
    async def _name_locked(self, name: str) -> AsyncIterator[None]:
        """Hold `name`'s lock; the lock is dropped once nobody holds or awaits it, so names
        that were asked for once cost nothing afterwards."""
        entry = self._locks.get(name)
        if entry is None:
            entry = self._locks[name] = _NameLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[name]

    def _model_dir(self, name: str, loading: bool = False) -> Path:
        check_model_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InvalidInput(f"model name '{name}' points outside the model repository")
        if not path.is_dir():
            if loading:  # Triton's words, which clients and tools match on
                raise poll_failure(name, f"no folder '{name}' in the model repository")
            raise ModelNotFound(f"model '{name}' is not found in the model repository")
        return path

    async def load(
        self, name: str, overrides: LoadOverrides | None = None, _chain: tuple[str, ...] = ()
    ) -> Model:
        """(Re)load a model, from disk or from a load request's overrides. Roll-out: the new
        versions are loaded and warmed while the old ones serve; then requests move to them
        and the old versions drain and unload. Versions whose config is unchanged are kept as
        they are. When a new version fails while an old one serves, nothing moves: the old
        versions keep serving and `Model.load_error` says why (the failed version is listed
        UNAVAILABLE with its reason). An ensemble loads its composing models first (those not
        loaded yet)."""
        overrides = overrides if overrides is not None and not overrides.empty else None
        private = None
        if overrides is not None and overrides.files:
            self._check_name(name)
            try:
                private = materialise(name, overrides)
            except OSError as exc:  # e.g. a path component past the filesystem's NAME_MAX
                raise poll_failure(name, f"cannot write the load's files: {exc.strerror}") from None
            model_dir = private
        else:
            model_dir = self._model_dir(name, loading=True)
        async with self._name_locked(name):
            previous = self.models.get(name)
            serving = previous is not None and previous.latest_ready() is not None
            try:
                proto, config, chosen = await self._plan(model_dir, overrides)
                if self.rollouts is not None and config.ensemble is None:
                    chosen = self.rollouts.plan_versions(name, model_dir, previous, chosen)
            except InvalidInput as exc:  # the load's own overrides: the model is left as it was
                discard(private)
                raise poll_failure(name, str(exc)) from None
            except Exception as exc:
                polling = isinstance(exc, _POLL_ERRORS)
                discard(private)
                reason = str(exc) if isinstance(exc, ConvoyError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, ConvoyError):
                    log.exception("model '%s' failed to load", name)
                else:
                    log.error("model '%s' failed to load: %s", name, reason)
                reason = self.relative(reason)  # the log keeps full paths; clients see these
                if serving:
                    assert previous is not None  # serving: previous has a ready version
                    previous.load_error = reason
                    previous.failed_polling = polling
                    return previous
                failed = Model(
                    name=name,
                    state="UNAVAILABLE",
                    reason=reason,
                    load_error=reason,
                    failed_polling=polling,
                )
                self.models[name] = failed
                self.changed()
                if previous is not None:
                    await self._stop(previous)
                return failed
            model = Model(name=name, state="LOADING", private_dir=private)
            if self.rollouts is not None:
                model.default_version = self.rollouts.default_version(name)
            model.config_proto = complete_proto(proto, config)
            # The completed config as JSON, for model code (Triton's args["model_config"]).
            config = dataclasses.replace(
                config, document=json.dumps(model_code_document(model.config_proto))
            )
            model.config = config
            kept: dict[int, ModelVersion] = {}
            if previous is not None and private is None and previous.private_dir is None:
                for number in chosen:
                    old = previous.versions.get(number)
                    if (
                        old is not None
                        and old.ready
                        and old.config == config
                        and old.fingerprint == fingerprint(model_dir / str(number))
                    ):
                        kept[number] = old
            if config.ensemble is not None:
                try:
                    fresh = await self._load_ensemble(config, model_dir, chosen, (*_chain, name))
                except ConvoyError as exc:
                    fresh = [
                        ModelVersion(config, v, state="UNAVAILABLE", failure=self.relative(str(exc)))
                        for v in chosen
                    ]
                    log.error("model '%s' failed to load: %s", name, exc)
            else:
                served = model.config_proto.SerializeToString(deterministic=True)
                fresh = await asyncio.gather(
                    *(self._load_version(config, model_dir, v, served) for v in chosen if v not in kept)
                )
            failed_new = [entry for entry in fresh if not entry.ready]
            if failed_new and serving:
                assert previous is not None  # serving: previous has a ready version
                # Roll-out refused: the old versions keep every request.
                reason = "; ".join(f"version {e.version}: {e.reason}" for e in failed_new)
                for entry in fresh:
                    if entry.ready:
                        await self._stop_version(entry)
                versions = dict(previous.versions)
                for entry in failed_new:
                    versions.setdefault(entry.version, entry)
                previous.versions = versions
                previous.load_error = reason
                previous.failed_polling = False
                self.changed()
                log.error("model '%s': new version failed, old versions keep serving: %s", name, reason)
                discard(private)
                return previous
            model.versions = {**kept, **{entry.version: entry for entry in fresh}}
            model.versions = dict(sorted(model.versions.items()))
            if any(entry.ready for entry in model.versions.values()):
                model.state, model.reason = "READY", ""
            else:
                model.state = "UNAVAILABLE"
                model.reason = "; ".join(e.reason for e in fresh if e.reason)
                model.load_error = model.reason
            retired = []
            if previous is not None:
                retired = [e for n, e in previous.versions.items() if kept.get(n) is not e]
            # The switch: from here every lookup finds the new versions.
            self.models[name] = model
            # Front ends in other processes learn of it now; a request one of them already
            # sent to a retired version of "latest" is routed by the engine to the new latest.
            self.changed()
            if self.rollouts is not None:
                self.rollouts.loaded(name, model)
            for entry in retired:
                await self._stop_version(entry)
            if previous is not None and previous.private_dir not in (None, private):
                discard(previous.private_dir)
            if model.state == "READY":
                log.info(
                    "model '%s' ready (versions %s, backend %s)",
                    name,
                    sorted(model.versions),
                    model.config.backend,
                )
            return model

    async def _plan(
        self, model_dir: Path, overrides: LoadOverrides | None
    ) -> tuple[mc.ModelConfig, ModelConfig, list[int]]:
        """The config (completed from the model file) and the versions to serve."""
        if overrides is not None and overrides.config is not None:
            proto = mc.ModelConfig()
            proto.CopyFrom(overrides.config)
            try:
                config = build_model_config(proto, model_dir)
            except InvalidConfig as exc:
                where = f"{model_dir / 'config.pbtxt'}: "
                raise InvalidInput(f"load parameter 'config': {str(exc).removeprefix(where)}") from None
        else:
            proto = read_config_proto(model_dir / "config.pbtxt")
            config = build_model_config(proto, model_dir)
        available = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if config.ensemble is not None and not available:
            available = [1]  # an ensemble has no files: its version folder is optional
        chosen = config.version_policy.select(available)
        if not chosen:
            raise ModelNotFound(
                f"{model_dir}: no version folder matches the version policy "
                f"(found {sorted(available) or 'none'})"
            )
        if config.ensemble is None:
            # What the model file itself declares fills what config.pbtxt left out.
            newest = ModelVersionSource(runtime_view(config), chosen[0], model_dir / str(chosen[0]))
            factory = _factory(config.backend, model_dir)
            if factory.capabilities.edits_config:
                # The model's own auto-complete (Triton's auto_complete_config) edits the
                # config as a dict; it imports model code, so off the loop.
                document = await asyncio.to_thread(
                    factory.complete_config_dict, newest, model_code_document(proto)
                )
                document = without_filled_defaults(document, proto)
                proto = proto_from_document(document, model_dir / "config.pbtxt")
                config = build_model_config(proto, model_dir)
                newest = ModelVersionSource(runtime_view(config), chosen[0], newest.path)
            if config.decoupled and not factory.capabilities.decoupled:
                raise InvalidConfig(
                    f"{model_dir / 'config.pbtxt'}: model_transaction_policy.decoupled: "
                    f"the {config.backend} backend returns one response per request; "
                    "decoupled models need the python backend (TritonPythonModel)"
                )
            config = public_view(factory.complete_config(newest))
        return proto, config, chosen

    async def add_versions(self, name: str, numbers: set[int]) -> None:
        """Load versions of a loaded model beside those it serves (a roll-out's stable or
        candidate outside the version policy), with the model's current config. Raises
        InvalidInput naming the version when one has no folder or fails to load."""
        async with self._name_locked(name):
            model = self.model(name)
            if model.config is None:
                raise Unavailable(f"model '{name}' is not ready: {model.reason}")
            model_dir = model.private_dir or self._model_dir(name)
            missing = sorted(n for n in numbers if n not in model.versions)
            for number in missing:
                if not (model_dir / str(number)).is_dir():
                    on_disk = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
                    raise InvalidInput(
                        f"version {number}: model '{name}' has no version folder {number} "
                        f"(versions on disk: {on_disk or 'none'})"
                    )
            fresh = await asyncio.gather(
                *(self._load_version(model.config, model_dir, n) for n in missing)
            )
            failed = [entry for entry in fresh if not entry.ready]
            if failed:
                for entry in fresh:
                    if entry.ready:
                        await self._stop_version(entry)
                raise InvalidInput(
                    "; ".join(f"version {e.version}: failed to load: {e.reason}" for e in failed)
                )
            if fresh:
                model.versions = dict(
                    sorted({**model.versions, **{e.version: e for e in fresh}}.items())
                )
                self.changed()

    async def release_versions(self, name: str, held: set[int]) -> None:
        """Unload the versions of `name` neither its version policy nor `held` wants any more
        (a roll-out let them go)."""
        async with self._name_locked(name):
            model = self.models.get(name)
            if model is None or model.config is None or model.config.ensemble is not None:
                return
            model_dir = model.private_dir or self._model_dir(name)
            available = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
            wanted = set(model.config.version_policy.select(available)) | held
            retired = [entry for number, entry in model.versions.items() if number not in wanted]
            if not retired or len(retired) == len(model.versions):
                return
            model.versions = {n: e for n, e in model.versions.items() if n in wanted}
            self.changed()
            for entry in retired:
                log.info("model '%s': version %d released by its roll-out", name, entry.version)
                await self._stop_version(entry)

    async def unload(self, name: str) -> None:
        check_model_name(name)
        if name not in self.models and name not in self._locks:
            raise ModelNotFound(f"model '{name}' is not loaded")
        async with self._name_locked(name):
            model = self.models.pop(name, None)
            if model is None:
                raise ModelNotFound(f"model '{name}' is not loaded")
            self.changed()
            await self._stop(model)

    async def _load_version(
        self, config: ModelConfig, model_dir: Path, version: int, served_config: bytes = b""
    ) -> ModelVersion:
        entry = ModelVersion(
            config=config,
            version=version,
            fingerprint=fingerprint(model_dir / str(version)),
            stats=ModelStats.for_buckets(config.metric_buckets),
        )
        if config.response_cache is not None:
            entry.revision = await asyncio.to_thread(revision_digest, served_config, model_dir, version)
        source = ModelVersionSource(
            config=runtime_view(config), version=version, path=model_dir / str(version)
        )
        try:
            factory = _factory(config.backend, model_dir)
            if self._isolation(config) == "process":
                if config.decoupled:
                    raise InvalidConfig(
                        f"{self.root / config.name / 'config.pbtxt'}: parameters.isolation: "
                        "'process' is not supported for decoupled models yet (their responses "
                        "stream from the server's process); use 'thread'"
                    )
                factory = isolated_factory(config.backend)
            for index in range(config.instance_count):
                entry.instances.append(await self._start_instance(factory, source, index))

            async def replace(lost: RuntimeInstance) -> RuntimeInstance:
                return await self._start_instance(factory, source, lost.index)

            # A model with sequence_batching gets the sequence batcher instead.
            kind = SequenceScheduler if config.sequence_batching is not None else Scheduler
            scheduler = kind(
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

    async def _load_ensemble(
        self, config: ModelConfig, model_dir: Path, versions: list[int], chain: tuple[str, ...]
    ) -> list[ModelVersion]:
        """Load the composing models not loaded yet, check the graph, start one executor per
        version. The ensemble is unavailable whenever a composing model is (checked live)."""
        assert config.ensemble is not None  # called for ensembles only
        where = model_dir / "config.pbtxt"
        for index, step in enumerate(config.ensemble.steps):
            try:
                await self._ensure_loaded(step.model_name, chain)
            except ConvoyError as exc:
                raise InvalidConfig(
                    f"{where}: ensemble_scheduling.step[{index}]: model '{step.model_name}': {exc}"
                ) from None

        def composing(index: int, step: EnsembleStep) -> ModelConfig:
            field = f"{where}: ensemble_scheduling.step[{index}]"
            model = self.models.get(step.model_name)
            if model is None or model.config is None:
                reason = model.reason if model is not None else "not loaded"
                raise InvalidConfig(
                    f"{field}: composing model '{step.model_name}' failed to load: {reason}"
                )
            if step.model_version != -1 and step.model_version not in model.versions:
                raise InvalidConfig(
                    f"{field}.model_version: model '{step.model_name}' has no version "
                    f"{step.model_version} (served: {sorted(model.versions)})"
                )
            return model.config

        plan = plan_ensemble(config, composing, str(where))
        entries = []
        for version in versions:
            entry = ModelVersion(config=config, version=version)
            scheduler = EnsembleScheduler(
                config,
                str(version),
                plan,
                self.get,
                lambda target, request: self.submit_step(target, request),
                entry.stats,
                self._settings.max_queue_size,
                config.ensemble.max_inflight_requests,
            )
            await scheduler.__aenter__()
            entry.scheduler = scheduler
            entry.state = "READY"
            entries.append(entry)
        return entries

    async def _start_instance(
        self, factory: RuntimeFactory, source: ModelVersionSource, index: int
    ) -> RuntimeInstance:
        """Create, load and warm up instance `index` of a model version on its own thread."""
        config = source.config
        runtime = factory(source, index)
        runtime.bind_services(self.services())
        instance = RuntimeInstance(runtime, f"{config.name}-{source.version}-{index}", index)
        try:
            await instance.call(instance.runtime.load)
            ragged = config.ragged and config.warmup and not instance.executes_requests
            await run_warmup(instance, config, source.path, ragged_warmup(config) if ragged else None)
        except BaseException:
            await instance.close()
            raise
        return instance

    def services(self) -> ModelServices:
        """What model code may use of the server (built on the loop, once)."""
        if self._services is None:
            self.model_caller.loop = asyncio.get_running_loop()
            self._services = ModelServices(
                caller=self.model_caller,
                loop=asyncio.get_running_loop(),
                loop_thread_id=threading.get_ident(),
                metrics=self.custom_metrics,
            )
        return self._services

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
            await self._stop_version(entry)
        discard(model.private_dir)

    async def _stop_version(self, entry: ModelVersion) -> None:
        """Drain a version (it finishes what it holds, new requests are refused), then unload."""
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


def _factory(backend: str, model_dir: Path) -> RuntimeFactory:
    """The backend's runtime factory; an unknown or uninstalled backend names the config file."""
    try:
        return runtime_factory(backend)
    except InvalidConfig as exc:
        raise InvalidConfig(f"{model_dir / 'config.pbtxt'}: backend: {exc}") from None


def _submit_to_scheduler(entry: ModelVersion, request: Request) -> None:
    """Queue a request on its model's scheduler; an error goes to its future."""
    try:
        if entry.scheduler is None:
            raise Unavailable(f"model '{entry.config.name}' is not ready")
        entry.scheduler.submit(request)
    except ConvoyError as exc:
        if not request.future.done():
            request.future.set_exception(exc)
