"""The one seam between the front ends and the engine: `EngineClient`.

Front ends (gRPC, HTTP, the catalog) see the engine only through this interface. Two
implementations: the `Engine` itself (engine/core.py, same process) and `RemoteEngine`
(engine/remote/client.py, a --workers front-end process talking to the engine process over IPC). A
front end never knows which one it holds.

Model state both implementations answer from a `ModelTable`: the engine's live repository, or
the copy the engine pushes to a remote client whenever a model changes. Metadata, config and
readiness answers are written once here, over that table.
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from convoy import __version__
from convoy.config import ModelConfig
from convoy.errors import (
    ConvoyError,
    InvalidInput,
    ModelNotFound,
    RegionNotFound,
    Unavailable,
    Unsupported,
)
from convoy.protos import model_config_pb2 as mc
from convoy.trace_settings import TraceControl
from convoy.types import Request, TensorSpec

from .shared_memory import (
    RegionRow,
    SharedMemoryLease,
    SharedMemoryRef,
    SharedMemoryRegistry,
    cuda_shared_memory_unavailable,
)

#: Triton's answer to a shared-memory registration on a server started without the flag.
CLIENT_SHM_DISABLED = (
    "Client shared memory is disabled. Start the server with '--allow-client-shm=true' to enable."
)

EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "statistics",
    "system_shared_memory",
    "cuda_shared_memory",
    "logging",
    "trace",
]

#: What Triton reports as a model's platform when its config names only the backend.
DEFAULT_PLATFORM = {"onnxruntime": "onnxruntime_onnx", "pytorch": "pytorch_libtorch"}

#: Longest model version string accepted (an int64 has at most 19 digits).
_MAX_VERSION_DIGITS = 19
#: Longest model name accepted (a folder name: filesystems allow 255 bytes).
MAX_MODEL_NAME = 200


class ModelView(Protocol):
    """One served model version as a front end needs it: to validate a request and answer it.
    Read-only: a front end never changes it (implementations may use plain attributes)."""

    @property
    def config(self) -> ModelConfig: ...
    @property
    def version(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def reason(self) -> str: ...

    #: A roll-out splits requests for this model that name no version by the value of this
    #: request header (HTTP header / gRPC metadata key, lower case): the front end puts it in
    #: `Request.split_key`. "": no header (a roll-out then splits by API key).
    @property
    def split_header(self) -> str: ...
    @property
    def ready(self) -> bool: ...


class ModelEntry(Protocol):
    """A model (all its versions) in a ModelTable (read-only, as ModelView)."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def config(self) -> ModelConfig | None: ...
    @property
    def config_proto(self) -> mc.ModelConfig | None: ...
    @property
    def versions(self) -> Mapping[int, ModelView]: ...

    #: The version a roll-out serves requests naming none (its stable, or the version it
    #: promoted); None: the latest ready.
    @property
    def default_version(self) -> int | None: ...


def check_name_length(name: str) -> None:
    """A name past MAX_MODEL_NAME is refused before it is looked up or echoed back whole (a
    256 KiB name in a gRPC error's details overflowed the client's metadata limit)."""
    if len(name) > MAX_MODEL_NAME:
        raise InvalidInput(
            f"model name '{name[:40]}...' has {len(name)} characters; expected at most {MAX_MODEL_NAME}"
        )


def parse_version(version: str) -> int | None:
    """A request's model version: None for "latest", else a non-negative int64. Versions are
    ASCII digits only (str.isdigit accepts '²' and other Unicode digits, which int() refuses)."""
    if not version:
        return None
    if not (version.isascii() and version.isdigit()) or len(version) > _MAX_VERSION_DIGITS:
        raise InvalidInput(
            f"failed to get model version from specified version string '{version[:40]}': "
            "expected a non-negative integer"
        )
    number = int(version)
    if number >= 1 << 63:
        raise InvalidInput(f"model version {version}: expected a value within int64")
    return number


class ShutdownPhase(enum.IntEnum):
    """How far a server's shutdown has come; it only moves forward (`EngineClient.enter`)."""

    #: Requests are taken (and readiness holds once the models are loaded).
    SERVING = 0
    #: Readiness is false and answers tell clients to go (HTTP `Connection: close`), but
    #: requests still arriving on open connections are served while the front ends stop.
    DRAINING = 1
    #: The front ends have stopped taking requests: anything that still reaches `submit` is
    #: refused UNAVAILABLE; what is queued or executing finishes.
    STOPPING = 2
    #: The models are unloaded and the engine's writers closed.
    STOPPED = 3


class EngineClient(abc.ABC):
    """What a front end may ask of the engine. Inference is fire-and-forget: `submit` queues the
    request and its outcome (a Response with the requested outputs, or an error) arrives on
    `request.future`; everything else answers directly."""

    #: Where shutdown stands; the one place it is held, moved forward by `enter` only.
    phase: ShutdownPhase = ShutdownPhase.SERVING
    #: Still SERVING: ready, and answers keep their connections open. Written by `enter`
    #: alone, a plain attribute because the request path reads it.
    accepting: bool = True
    #: STOPPING or later: a request that still reaches `submit` is refused (as `accepting`).
    refusing: bool = False
    #: True once the models asked for at start-up have been loaded (or failed to).
    started: bool = False
    #: Readiness also needs every model ready (--strict-readiness, the default).
    strict_readiness: bool = True
    #: What server metadata calls this server (--server-name).
    server_name: str = "convoy"
    #: --allow-client-shm: clients may register and unregister shared-memory regions.
    allow_client_shm: bool = False
    #: System shared-memory regions: the engine's own registry, or a front end's copy of it
    #: (each process opens the segments itself, so tensors are read and written where they
    #: are decoded and encoded).
    shared_memory: SharedMemoryRegistry

    def enter(self, phase: ShutdownPhase) -> None:
        """Move shutdown on to `phase` (never back: a later step may be reached twice)."""
        if phase > self.phase:
            self.phase = phase
            self.accepting = phase is ShutdownPhase.SERVING
            self.refusing = phase >= ShutdownPhase.STOPPING

    # --- the model table both implementations answer from -------------------------------------
    @abc.abstractmethod
    def models(self) -> Mapping[str, ModelEntry]:
        """Every model the engine knows (loaded, loading or failed), by name."""

    @abc.abstractmethod
    def watch_models(self, listener: Callable[[], None]) -> None:
        """Call `listener()` on the loop whenever a model or version changes state (the native
        front end keeps its model table current with it)."""

    # --- inference -----------------------------------------------------------------------------
    def resolve(self, name: str, version: str = "") -> ModelView:
        """The version that serves a request for `name` (latest ready when `version` is empty)."""
        model = self.models().get(name)
        if model is None:
            check_name_length(name)
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        number = parse_version(version)
        if number is not None:
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
        held = model.default_version
        if held is not None and held in model.versions:
            found = model.versions[held]
            if not found.ready:  # never another version in its place: the roll-out decided
                raise Unavailable(
                    f"model '{name}' version {held} (the version its roll-out serves) is not "
                    f"ready: {found.reason or found.state}"
                )
            return found
        versions = model.versions
        if len(versions) == 1:  # most models: no need to order the versions
            for only in versions.values():
                if only.ready:
                    return only
        else:
            for number in sorted(versions, reverse=True):
                if versions[number].ready:
                    return versions[number]
        reasons = (v.reason for v in model.versions.values() if v.reason)
        reason = model.reason or next(reasons, "") or model.state
        raise Unavailable(f"model '{name}' is not ready: {reason}")

    @abc.abstractmethod
    def submit(self, model: ModelView, request: Request) -> None:
        """Queue `request` on `model` (a view from `resolve`); errors go to its future too."""

    @abc.abstractmethod
    def cancel(self, model: ModelView, request: Request) -> None:
        """The client went away: drop the request if it is still queued."""

    # --- health and metadata -------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if not (self.accepting and self.started):
            return False
        return not self.strict_readiness or all(m.state == "READY" for m in self.models().values())

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except ConvoyError:
            return False
        return self.accepting

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.server_name, "version": __version__, "extensions": EXTENSIONS}

    def _model(self, name: str, version: str = "") -> ModelEntry:
        model = self.models().get(name)
        if model is None:
            check_name_length(name)
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        number = parse_version(version)
        if number is not None and number not in model.versions:
            raise ModelNotFound(f"Request for unknown model: '{name}' has no version {version}")
        return model

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        model = self._model(name, version)
        config = model.config
        if config is None:
            raise Unavailable(f"model '{name}' is not ready: {model.reason}")
        batch = [-1] if config.max_batch_size > 0 else []

        def describe(specs: Iterable[TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": s.name, "datatype": s.datatype, "shape": [*batch, *s.dims]} for s in specs]

        return {
            "name": name,
            "versions": [str(v) for v in sorted(model.versions)],
            "platform": config.platform or DEFAULT_PLATFORM.get(config.backend, config.backend),
            "inputs": describe(config.inputs),
            "outputs": describe(config.outputs),
        }

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        """The completed ModelConfig protobuf (callers serialise it for their transport)."""
        model = self._model(name, version)
        if model.config_proto is None:
            raise Unavailable(f"model '{name}' has no valid configuration: {model.reason}")
        return model.config_proto

    # --- answered by the engine ------------------------------------------------------------------
    @abc.abstractmethod
    async def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics extension, in its JSON shape."""

    @abc.abstractmethod
    async def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def load_model(
        self, name: str, parameters: dict[str, Any] | None = None, base64_files: bool = False
    ) -> None:
        """Triton's RepositoryModelLoad: `parameters` may hold a JSON `config` and
        `file:<version>/<name>` contents (engine/overrides.py); `base64_files`: file contents
        come base64-encoded (HTTP)."""

    @abc.abstractmethod
    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None: ...

    # --- roll-outs (engine/rollout): JSON in, JSON out, the admin API's documents ---------------
    @abc.abstractmethod
    async def rollout_start(self, name: str, document: dict[str, Any]) -> dict[str, Any]:
        """Start a roll-out of `name` from its JSON spec (engine/rollout/spec.py); its status."""

    @abc.abstractmethod
    async def rollout_status(self, name: str = "") -> dict[str, Any]:
        """One model's roll-out status, or {"rollouts": [...]} for every model that has one."""

    @abc.abstractmethod
    async def rollout_promote(self, name: str) -> dict[str, Any]:
        """Promote the candidate now (whatever step the roll-out is at)."""

    @abc.abstractmethod
    async def rollout_abort(self, name: str) -> dict[str, Any]:
        """Roll back a running roll-out, revert a promotion whose previous stable is still
        loaded, or release a rolled-back candidate."""

    @abc.abstractmethod
    async def rollout_report(self, name: str) -> dict[str, Any]:
        """Everything the roll-out measured, for `convoy rollout report`."""

    @abc.abstractmethod
    async def catalog_figures(self) -> dict[str, Any]:
        """What the catalog page shows beyond the model table: live request rates and latency
        quantiles per model version, payload-log state ({"models": {...}, ...})."""

    # --- shared memory ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def register_system_shared_memory(
        self, name: str, key: str, offset: int, byte_size: int
    ) -> None: ...

    @abc.abstractmethod
    async def unregister_system_shared_memory(self, name: str = "") -> None: ...

    @abc.abstractmethod
    async def system_shared_memory_status(self, name: str = "") -> list[RegionRow]: ...

    def check_client_shared_memory(self) -> None:
        """Registering and unregistering regions needs --allow-client-shm (Triton's rule and
        words); status answers either way."""
        if not self.allow_client_shm:
            raise Unsupported(CLIENT_SHM_DISABLED)

    async def register_cuda_shared_memory(self, name: str, *_: object) -> None:
        self.check_client_shared_memory()
        raise cuda_shared_memory_unavailable(
            "this server has no GPU"
            if not os.path.exists("/dev/nvidiactl")
            else "Convoy does not open CUDA IPC handles; use system shared memory"
        )

    async def unregister_cuda_shared_memory(self, name: str = "") -> None:
        """Nothing can be registered, so there is nothing to unregister (not an error)."""
        self.check_client_shared_memory()

    async def cuda_shared_memory_status(self, name: str = "") -> list[dict[str, Any]]:
        if name:
            raise RegionNotFound(f"Unable to find cuda shared memory region: '{name}'")
        return []

    def lease_shared_memory(self, ref: SharedMemoryRef, what: str) -> SharedMemoryLease:
        """A request's hold on the region `ref` names (bounds checked), through which its
        tensor is read or written; released once the request is answered. A region
        unregistered meanwhile stays until then."""
        return self.shared_memory.lease(ref, what)

    # --- trace settings ----------------------------------------------------------------------------
    #: Triton's trace settings and the sampling they decide (convoy/trace_settings.py).
    trace_control: TraceControl

    def _check_trace_model(self, model: str) -> None:
        """A model's trace settings need the model (ready, as in Triton; its words)."""
        if model and not self.model_ready(model):
            check_name_length(model)
            raise InvalidInput(f"Request for unknown model : {model}")

    def trace_settings(self, model: str = "") -> dict[str, Any]:
        """The trace settings in force for `model` ("" global), as Triton's API answers them."""
        self._check_trace_model(model)
        return self.trace_control.settings(model)

    @abc.abstractmethod
    async def update_trace_settings(self, model: str, changes: dict[str, object]) -> dict[str, Any]:
        """Apply trace setting changes (None clears one) for `model` ("" global) in every
        process; the settings in force after them."""

    # --- log settings ------------------------------------------------------------------------------
    @abc.abstractmethod
    def log_settings(self) -> dict[str, object]: ...

    @abc.abstractmethod
    async def update_log_settings(self, changes: dict[str, object]) -> dict[str, object]:
        """Apply changes to the log settings of every process; the settings after them."""
