"""The messages between a --workers front-end process and the engine process.

Each is a msgspec Struct tagged with its kind and built by keyword; on the wire it is a msgpack
array in field order (array_like), so a field is added at the end, with a default. Tensors travel
as convoy.wire.TensorMeta beside their raw bytes in the same frame; errors as convoy.wire.ErrorInfo.
"""

from __future__ import annotations

from typing import Any

import msgspec

from convoy.config import ModelConfig, ServerConfig
from convoy.types import StepTiming
from convoy.wire import ErrorInfo, TensorMeta

from ..shared_memory import RegionRow


# --- front end -> engine ---------------------------------------------------------------------------
class Infer(msgspec.Struct, tag="infer", array_like=True, kw_only=True):
    """One inference request, its inputs in the same frame (or the front end's arena)."""

    call: int
    model: str
    version: int
    #: The client asked for the latest version (none named): if `version` was retired by a
    #: roll-out since the front end resolved it, the engine serves the new latest instead.
    latest: bool
    id: str
    requested: tuple[str, ...]
    rows: int
    priority: int
    timeout_us: int
    deadline: float | None
    parameters: dict[str, Any]
    received_ns: int
    principal: str | None
    inputs: list[TensorMeta]
    #: A decoupled model's request: its responses come back as `Streamed` messages, then its
    #: final `Result` (empty) or `Failure`.
    streamed: bool = False
    #: The roll-out split key the front end read (Request.split_key).
    split_key: str | None = None


class Cancel(msgspec.Struct, tag="cancel", array_like=True, kw_only=True):
    """The client of request `call` went away."""

    call: int


class Call(msgspec.Struct, tag="call", array_like=True, kw_only=True):
    """A control-plane call: one of the EngineClient's async methods (in CALLS), by name."""

    call: int
    method: str
    args: list[Any]


class Up(msgspec.Struct, tag="up", array_like=True, kw_only=True):
    """A front end is serving."""


class SharedArena(msgspec.Struct, tag="arena", array_like=True, kw_only=True):
    """The front end's shared-memory arena for large inputs (engine/arena.py): sent before its
    first request."""

    name: str
    size: int


# --- engine -> front end ---------------------------------------------------------------------------
class Result(msgspec.Struct, tag="result", array_like=True, kw_only=True):
    """Request `call` succeeded; its outputs are in the same frame."""

    call: int
    model: str
    version: str
    #: The batch's StageTimes (monotonic ns: CLOCK_MONOTONIC is one clock for the host).
    timings: tuple[int, int, int, int, int] | None
    outputs: list[TensorMeta]
    #: An ensemble's steps as they ran (for its trace); empty for other models.
    steps: tuple[StepTiming, ...] = ()
    #: Response parameters the model set (Triton python models).
    parameters: dict[str, Any] | None = None


class Streamed(msgspec.Struct, tag="streamed", array_like=True, kw_only=True):
    """One response of a decoupled model's request, as the model sent it."""

    call: int
    outputs: list[TensorMeta]
    final: bool
    error: str
    parameters: dict[str, Any]
    error_status: str = ""


class Failure(msgspec.Struct, tag="failure", array_like=True, kw_only=True):
    """Request or call `call` failed."""

    call: int
    error: ErrorInfo


class Reply(msgspec.Struct, tag="reply", array_like=True, kw_only=True):
    """Call `call` returned `value`."""

    call: int
    value: Any


class VersionState(msgspec.Struct, array_like=True, kw_only=True):
    """One version of a model in the table."""

    version: int
    state: str
    reason: str
    ready: bool


class ModelState(msgspec.Struct, array_like=True, kw_only=True):
    """One model of the table."""

    name: str
    state: str
    reason: str
    config: ModelConfig | None
    #: The completed ModelConfig protobuf, serialised.
    config_proto: bytes | None
    versions: list[VersionState]
    #: The version a roll-out serves requests naming none (ModelEntry.default_version).
    default_version: int | None = None
    #: While a roll-out splits the model: the header its split key comes from ("" for none).
    split_header: str = ""


class Models(msgspec.Struct, tag="models", array_like=True, kw_only=True):
    """The engine's model table, whole (sent on connect and after every change), with the
    shared-memory regions registered (each front end opens them itself)."""

    started: bool
    accepting: bool
    models: list[ModelState]
    regions: list[RegionRow]


class Welcome(msgspec.Struct, tag="welcome", array_like=True, kw_only=True):
    """The engine's first message: the settings and the ports every front end serves."""

    settings: ServerConfig
    http_port: int
    grpc_port: int


class LogUpdate(msgspec.Struct, tag="log", array_like=True, kw_only=True):
    """Log settings changed (through any front end): every front end applies them."""

    changes: dict[str, Any]


class TraceState(msgspec.Struct, tag="trace", array_like=True, kw_only=True):
    """The engine's trace settings, whole (on connect and after every change)."""

    levels: dict[str, dict[str, Any]]


#: What each side decodes.
ToEngine = Infer | Cancel | Call | Up | SharedArena
ToFrontEnd = Result | Streamed | Failure | Reply | Models | Welcome | LogUpdate | TraceState

#: The EngineClient methods a front end may call on the engine.
CALLS = frozenset(
    {
        "model_statistics",
        "repository_index",
        "load_model",
        "unload_model",
        "catalog_figures",
        "update_log_settings",
        "update_trace_settings",
        "rollout_start",
        "rollout_status",
        "rollout_promote",
        "rollout_abort",
        "rollout_report",
        "register_system_shared_memory",
        "unregister_system_shared_memory",
        "system_shared_memory_status",
    }
)
