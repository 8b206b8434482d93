"""The engine over IPC: `RemoteEngine`, the EngineClient of a --workers front-end process, and
`EngineEndpoint`, which serves one such process from the engine process.

Both ends speak convoy/wire.py over a private Unix socket pair. Per loop turn a front end sends
one frame with every request that arrived in that turn; the engine answers in one frame per
loop turn too, so a batch's answers to one front end travel together. The engine pushes the
model table whenever a model changes (a load, an unload, an instance lost or replaced), so a
front end resolves models, checks readiness and answers metadata without asking; statistics,
the repository index, load/unload and log settings are calls.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from convoy.config import ModelConfig, ServerConfig
from convoy.errors import (
    ConvoyError,
    EngineDead,
    InvalidInput,
    Overloaded,
    Unavailable,
)
from convoy.logs import LogControl
from convoy.protos import model_config_pb2 as mc
from convoy.trace_settings import TraceControl, trace_setup
from convoy.types import DirectOutcome, Request, Response, StageTimes, StepTiming, StreamedResponse
from convoy.wire import ErrorInfo, Link, TensorMeta, error_info, read_tensors, rebuild_error

from .arena import Arena, open_arena
from .client import EngineClient, ModelEntry
from .core import Engine
from .repository import ModelVersion
from .shared_memory import SharedMemoryRegistry

log = logging.getLogger("convoy.engine.remote")


# --- messages ----------------------------------------------------------------------------------------
class Infer(msgspec.Struct, tag="infer", array_like=True):
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


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    call: int


class Call(msgspec.Struct, tag="call", array_like=True):
    """A control-plane call: one of the EngineClient's async methods, by name."""

    call: int
    method: str
    args: list[Any]


class Result(msgspec.Struct, tag="result", array_like=True):
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


class Streamed(msgspec.Struct, tag="streamed", array_like=True):
    """One response of a decoupled model's request, as the model sent it."""

    call: int
    outputs: list[TensorMeta]
    final: bool
    error: str
    parameters: dict[str, Any]
    error_status: str = ""


class Failure(msgspec.Struct, tag="failure", array_like=True):
    call: int
    error: ErrorInfo


class Reply(msgspec.Struct, tag="reply", array_like=True):
    call: int
    value: Any


class VersionState(msgspec.Struct, array_like=True):
    version: int
    state: str
    reason: str
    ready: bool


class ModelState(msgspec.Struct, array_like=True):
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


class Models(msgspec.Struct, tag="models", array_like=True):
    """The engine's model table, whole (sent on connect and after every change), with the
    shared-memory regions registered (each front end opens them itself)."""

    started: bool
    accepting: bool
    models: list[ModelState]
    regions: list[dict[str, Any]]


class Welcome(msgspec.Struct, tag="welcome", array_like=True):
    """The engine's first message: the settings and the ports every front end serves."""

    settings: ServerConfig
    http_port: int
    grpc_port: int


class LogUpdate(msgspec.Struct, tag="log", array_like=True):
    changes: dict[str, Any]


class TraceState(msgspec.Struct, tag="trace", array_like=True):
    """The engine's trace settings, whole (on connect and after every change)."""

    levels: dict[str, dict[str, Any]]


class Up(msgspec.Struct, tag="up", array_like=True):
    """A front end is serving."""


class SharedArena(msgspec.Struct, tag="arena", array_like=True):
    """The front end's shared-memory arena for large inputs (engine/arena.py): sent before its
    first request."""

    name: str
    size: int


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


# --- the engine's side ----------------------------------------------------------------------------
class _Outcome(DirectOutcome):
    """A remote request's future in the engine: the outcome goes straight into the frame being
    built for its front end (no asyncio future, no callback hop)."""

    __slots__ = ("_endpoint", "call", "model")

    def __init__(self, endpoint: EngineEndpoint, call: int, model: ModelVersion) -> None:
        super().__init__()
        self._endpoint = endpoint
        self.call = call
        self.model = model

    def _deliver(self, result: Response | None, error: BaseException | None) -> None:
        self._endpoint.answer(self, result, error)


class EngineEndpoint:
    """Serves one front-end process: its requests go to the engine, its answers come back."""

    def __init__(self, engine: Engine, name: str, on_up: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.name = name
        self._on_up = on_up
        self.link: Link | None = None
        #: Requests of this front end not yet answered and the version each was submitted to,
        #: by call id (for cancels and its death).
        self._in_flight: dict[int, tuple[Request, Any]] = {}
        self.requests = 0
        #: Control-plane calls being answered.
        self._calls: set[asyncio.Future] = set()
        self.lost = asyncio.Event()
        #: The front end's arena, mapped read-only (large inputs are read from it in place).
        self._shared: memoryview | None = None

    def protocol(self) -> Link:
        self.link = Link(ToEngine, self._on_frame, self._on_lost)
        return self.link

    def welcome(self, settings: ServerConfig, http_port: int, grpc_port: int) -> None:
        self.link.send(Welcome(settings, http_port, grpc_port))
        self.link.send(TraceState(self.engine.trace_control.state()))
        self.send_models()

    def send_models(self) -> None:
        if self.link is not None and not self.link.closed:
            self.link.send(model_table(self.engine))

    def send(self, message) -> None:
        if self.link is not None and not self.link.closed:
            self.link.send(message)

    def _on_lost(self, exc) -> None:
        """The front end is gone: its queued requests leave the queues (nobody waits)."""
        in_flight, self._in_flight = self._in_flight, {}
        for request, model in in_flight.values():
            self.engine.cancel(model, request)
        self.lost.set()

    def _on_frame(self, messages: list, data: memoryview) -> None:
        engine = self.engine
        for message in messages:
            kind = type(message)
            if kind is Infer:
                self._infer(engine, message, data)
            elif kind is Cancel:
                found = self._in_flight.get(message.call)
                if found is not None:
                    request, model = found
                    engine.cancel(model, request)
                    if request.stream is not None:
                        request.future.cancel()  # running: the model's is_cancelled() sees it
            elif kind is Call:
                task = asyncio.ensure_future(self._call(message))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
            elif kind is Up and self._on_up is not None:
                self._on_up()
            elif kind is SharedArena:
                try:
                    self._shared = open_arena(message.name, message.size)
                except (OSError, ValueError) as exc:
                    log.error("%s: cannot map its shared-memory arena: %s", self.name, exc)

    def _infer(self, engine: Engine, message: Infer, data: memoryview) -> None:
        self.requests += 1
        try:
            model = engine.models().get(message.model)
            entry = None if model is None else model.versions.get(message.version)
            route = engine.rollouts.routes.get(message.model) if message.latest else None
            if route is not None:
                entry = engine.resolve(message.model)  # a running roll-out splits it
            elif entry is None or (
                message.latest and (not entry.ready or model.default_version is not None)
            ):
                if not message.latest:
                    raise Unavailable(f"model '{message.model}' version {message.version} is not loaded")
                entry = engine.resolve(message.model)  # a roll-out moved "latest" meanwhile
            inputs = read_tensors(message.inputs, data, self._shared)
        except ConvoyError as exc:
            self.send(Failure(message.call, error_info(exc)))
            return
        outcome = _Outcome(self, message.call, entry)
        request = Request(
            message.id,
            inputs,
            message.requested,
            message.rows,
            outcome,
            message.priority,
            message.timeout_us,
            message.deadline,
            message.parameters,
            message.received_ns,
            message.principal,
        )
        request.split_key = message.split_key
        if message.streamed:
            request.stream = self._stream_to(message.call)
        self._in_flight[message.call] = (request, entry)
        engine.submit(entry, request)

    def _stream_to(self, call: int) -> Callable[[StreamedResponse], None]:
        """A decoupled request's sink in the engine: each response goes to its front end."""

        def sink(item: StreamedResponse) -> None:
            link = self.link
            if link is None or link.closed:
                return
            try:
                writer = link.writer()
                metas = writer.tensors(item.outputs)
            except Exception as exc:
                log.error("a streamed response could not be framed", exc_info=exc)
                item = StreamedResponse({}, item.final, "the response could not be encoded")
                writer, metas = link.writer(), []
            writer.add(Streamed(call, metas, item.final, item.error, item.parameters, item.error_status))

        return sink

    def answer(self, outcome: _Outcome, response: Response | None, error) -> None:
        self._in_flight.pop(outcome.call, None)
        link = self.link
        if link is None or link.closed:
            return
        if error is None:
            try:
                writer = link.writer()
                metas = writer.tensors(response.outputs)
            except Exception as exc:
                error = exc
            else:
                timings = response.timings
                writer.add(
                    Result(
                        outcome.call,
                        response.model_name,
                        response.model_version,
                        None if timings is None else tuple(timings),
                        metas,
                        response.steps,
                        response.parameters,
                    )
                )
                return
        if not isinstance(error, ConvoyError):
            log.error("request to model '%s' failed", outcome.model.config.name, exc_info=error)
        link.send(Failure(outcome.call, error_info(error)))

    async def _call(self, message: Call) -> None:
        try:
            if message.method not in CALLS:
                raise InvalidInput(f"'{message.method}' is not an engine call")
            value = await getattr(self.engine, message.method)(*message.args)
            reply = Reply(message.call, value)
        except Exception as exc:
            if not isinstance(exc, ConvoyError):
                log.exception("engine call %s failed", message.method)
            reply = Failure(message.call, error_info(exc))
        self.send(reply)


def model_table(engine: Engine) -> Models:
    models = []
    for name, model in sorted(engine.repository.models.items()):
        proto = model.config_proto.SerializeToString() if model.config_proto is not None else None
        versions = [
            VersionState(number, entry.state, entry.reason, entry.ready)
            for number, entry in sorted(model.versions.items())
        ]
        route = engine.rollouts.routes.get(name)
        split_header = route.split_header if route is not None else ""
        models.append(
            ModelState(
                name,
                model.state,
                model.reason,
                model.config,
                proto,
                versions,
                model.default_version,
                split_header,
            )
        )
    return Models(engine.started, engine.accepting, models, engine.shared_memory.status())


# --- the front end's side -------------------------------------------------------------------------
class RemoteVersion:
    """A model version as a front end sees it (from the engine's last model table)."""

    __slots__ = (
        "as_latest",
        "config",
        "latest",
        "name",
        "ready",
        "reason",
        "split_header",
        "state",
        "version",
    )

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        state: VersionState,
        latest: bool = False,
        split_header: str = "",
    ) -> None:
        self.name = name
        self.config = config
        self.version = state.version
        self.state = state.state
        self.reason = state.reason
        self.ready = state.ready
        #: Resolved for a request that named no version.
        self.latest = latest
        #: Only a request naming no version is split by a roll-out.
        self.split_header = split_header if latest else ""
        #: The same version as resolved for such a request (built once, not per request).
        self.as_latest = self if latest else RemoteVersion(name, config, state, True, split_header)


class RemoteModel:
    __slots__ = ("config", "config_proto", "default_version", "name", "reason", "state", "versions")

    def __init__(self, state: ModelState) -> None:
        self.name = state.name
        self.state = state.state
        self.reason = state.reason
        self.config = state.config
        self.default_version = state.default_version
        self.config_proto = None
        if state.config_proto is not None:
            self.config_proto = mc.ModelConfig()
            self.config_proto.ParseFromString(state.config_proto)
        config = state.config
        self.versions = {
            v.version: RemoteVersion(state.name, config, v, split_header=state.split_header)
            for v in state.versions
            if config
        }


class RemoteEngine(EngineClient):
    """The EngineClient of a --workers front-end process."""

    def __init__(self, log_control: LogControl | None = None) -> None:
        self.log_control = log_control
        self.link: Link | None = None
        self.settings: ServerConfig | None = None
        self.ports = (0, 0)
        self._table: dict[str, RemoteModel] = {}
        self._model_listeners: list[Callable[[], None]] = []
        self._engine_accepting = False
        self._ids = itertools.count(1)
        # The engine answers by call id: the requests in flight are found by it (the one side
        # table a process boundary needs); `_call_of` finds the id again for a cancel.
        self._in_flight: dict[int, Request] = {}
        self._call_of: dict[Request, int] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._welcomed = asyncio.get_running_loop().create_future()
        self.shared_memory = SharedMemoryRegistry()
        #: Replaced on the engine's welcome (its settings' defaults), then follows its changes.
        self.trace_control = TraceControl()
        #: Where large inputs go to the engine (None: every tensor travels in frames), and the
        #: blocks each request in flight holds there, by call id.
        self.arena: Arena | None = None
        self._placed: dict[int, list] = {}
        #: Set when the engine's side of the link is gone.
        self.lost = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def protocol(self) -> Link:
        self.link = Link(ToFrontEnd, self._on_frame, self._on_lost)
        return self.link

    async def connect(self, sock, timeout: float = 60.0) -> None:
        """Take the engine's end of a socket pair; return once the engine sent the settings."""
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(self.protocol, sock=sock)
        await asyncio.wait_for(self._welcomed, timeout)
        self.arena = Arena.create(self.settings.ipc_arena_mb << 20)
        if self.arena is not None:
            self.link.send(SharedArena(self.arena.name, self.arena.size))

    def serving(self) -> None:
        self.link.send(Up())

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.shared_memory.close()
        if self.arena is not None:
            self.arena.close()

    # --- the model table -------------------------------------------------------------------------
    def models(self) -> Mapping[str, ModelEntry]:
        return self._table

    def watch_models(self, listener: Callable[[], None]) -> None:
        self._model_listeners.append(listener)

    def ready(self) -> bool:
        return self._engine_accepting and super().ready()

    def resolve(self, name: str, version: str = "") -> RemoteVersion:
        found = super().resolve(name, version)
        return found if version else found.as_latest

    # --- inference ---------------------------------------------------------------------------------
    def submit(self, model: RemoteVersion, request: Request) -> None:
        arena = None
        try:
            if self.refusing:
                raise Unavailable("server is shutting down")
            link = self.link
            if link.closed:
                raise EngineDead("the engine process is gone")
            if link.congested:
                raise Overloaded("the engine process is not keeping up; retry later")
            call = next(self._ids)
            writer = link.writer()
            # A decoupled request is answered (Failure) when cancelled while its model may still
            # read its inputs: it keeps them in the frame.
            arena = self.arena if request.stream is None else None
            metas = writer.tensors(request.inputs, arena)
            writer.add(
                Infer(
                    call,
                    model.name,
                    model.version,
                    model.latest,
                    request.id,
                    request.requested_outputs,
                    request.rows,
                    request.priority,
                    request.timeout_us,
                    request.deadline,
                    request.parameters,
                    request.received_ns,
                    request.principal,
                    metas,
                    request.stream is not None,
                    request.split_key,
                )
            )
        except ConvoyError as exc:
            if arena is not None and (placed := arena.take_placed()) is not None:
                arena.free(placed)
            if not request.future.done():
                request.future.set_exception(exc)
            return
        if arena is not None and (placed := arena.take_placed()) is not None:
            self._placed[call] = placed
        self._in_flight[call] = request
        self._call_of[request] = call

    def cancel(self, model, request: Request) -> None:
        call = self._call_of.get(request)
        if call is not None and self.link is not None and not self.link.closed:
            self.link.send(Cancel(call))

    def _finish(self, call: int) -> Request | None:
        """The engine answered `call`: it reads none of its inputs any more."""
        placed = self._placed.pop(call, None)
        if placed is not None:
            self.arena.free(placed)
        request = self._in_flight.pop(call, None)
        if request is not None:
            del self._call_of[request]
        return request

    # --- calls -------------------------------------------------------------------------------------
    async def _call(self, method: str, *args):
        if self.link is None or self.link.closed:
            raise EngineDead("the engine process is gone")
        call = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call] = future
        try:
            self.link.send(Call(call, method, list(args)))
            return await future
        finally:
            self._calls.pop(call, None)

    async def model_statistics(self, name: str = "", version: str = "") -> dict:
        return await self._call("model_statistics", name, version)

    async def repository_index(self, ready_only: bool = False) -> list[dict]:
        return await self._call("repository_index", ready_only)

    async def load_model(
        self, name: str, parameters: dict[str, Any] | None = None, base64_files: bool = False
    ) -> None:
        await self._call("load_model", name, parameters, base64_files)

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        await self._call("unload_model", name, parameters)

    async def catalog_figures(self) -> dict:
        return await self._call("catalog_figures")

    async def rollout_start(self, name: str, document: dict) -> dict:
        return await self._call("rollout_start", name, document)

    async def rollout_status(self, name: str = "") -> dict:
        return await self._call("rollout_status", name)

    async def rollout_promote(self, name: str) -> dict:
        return await self._call("rollout_promote", name)

    async def rollout_abort(self, name: str) -> dict:
        return await self._call("rollout_abort", name)

    async def rollout_report(self, name: str) -> dict:
        return await self._call("rollout_report", name)

    async def register_system_shared_memory(
        self, name: str, key: str, offset: int, byte_size: int
    ) -> None:
        await self._call("register_system_shared_memory", name, key, offset, byte_size)

    async def unregister_system_shared_memory(self, name: str = "") -> None:
        await self._call("unregister_system_shared_memory", name)

    async def system_shared_memory_status(self, name: str = "") -> list[dict]:
        return await self._call("system_shared_memory_status", name)

    def log_settings(self) -> dict[str, object]:
        return self.log_control.settings()

    async def update_log_settings(self, changes: dict[str, object]) -> dict[str, object]:
        # The engine validates and applies them, then tells every front end (this one too).
        return await self._call("update_log_settings", changes)

    async def update_trace_settings(self, model: str, changes: dict[str, object]) -> dict:
        # The engine checks the model, validates and applies, then tells every front end.
        return await self._call("update_trace_settings", model, changes)

    # --- messages from the engine ----------------------------------------------------------------------
    def _on_frame(self, messages: list, data: memoryview) -> None:
        for message in messages:
            kind = type(message)
            if kind is Result:
                request = self._finish(message.call)
                if request is not None and not request.future.done():
                    timings = message.timings
                    request.future.set_result(
                        Response(
                            read_tensors(message.outputs, data),
                            message.model,
                            message.version,
                            None if timings is None else StageTimes(*timings),
                            message.parameters,
                            message.steps,
                        )
                    )
            elif kind is Streamed:
                request = self._in_flight.get(message.call)
                if request is not None and request.stream is not None and not request.future.done():
                    request.stream(
                        StreamedResponse(
                            read_tensors(message.outputs, data),
                            message.final,
                            message.error,
                            message.parameters,
                            message.error_status,
                        )
                    )
            elif kind is Failure:
                error = rebuild_error(message.error)
                request = self._finish(message.call)
                future = request.future if request is not None else self._calls.get(message.call)
                if future is not None and not future.done():
                    future.set_exception(error)
            elif kind is Reply:
                future = self._calls.get(message.call)
                if future is not None and not future.done():
                    future.set_result(message.value)
            elif kind is Models:
                self._table = {state.name: RemoteModel(state) for state in message.models}
                self.started = message.started
                self._engine_accepting = message.accepting
                for problem in self.shared_memory.mirror(message.regions):
                    log.warning("shared memory region not opened here: %s", problem)
                for listener in self._model_listeners:
                    listener()
            elif kind is TraceState:
                self.trace_control.restore(message.levels)
            elif kind is LogUpdate:
                if self.log_control is not None:
                    self.log_control.update(message.changes)
            elif kind is Welcome:
                self.settings = message.settings
                self.strict_readiness = message.settings.strict_readiness
                self.server_name = message.settings.server_name
                settings = message.settings
                self.trace_control = TraceControl(
                    trace_setup(
                        settings.trace_otlp_endpoint, settings.trace_console, settings.trace_config
                    ).defaults
                )
                self.allow_client_shm = message.settings.allow_client_shm
                self.ports = (message.http_port, message.grpc_port)
                if not self._welcomed.done():
                    self._welcomed.set_result(None)

    def _on_lost(self, exc) -> None:
        """The engine is gone: every request and call in flight fails."""
        error = EngineDead("the engine process is gone")
        in_flight, self._in_flight = self._in_flight, {}
        self._call_of.clear()
        for request in in_flight.values():
            if not request.future.done():
                request.future.set_exception(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        if not self._welcomed.done():
            self._welcomed.set_exception(error)
        self.lost.set()


async def wait_drained(client: RemoteEngine, deadline: float) -> None:
    """Until the front end has no request waiting for the engine, or `deadline` (monotonic)."""
    while client.in_flight and time.monotonic() < deadline and not client.lost.is_set():
        await asyncio.sleep(0.01)
