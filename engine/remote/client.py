"""The front-end process's side of the IPC: `RemoteEngine`, the EngineClient of a --workers
front-end process (server/workers.py), and the model table as it sees it.

It imports none of the engine's machinery (engine.core, batching, runtimes): what it knows of
the engine comes in messages (engine/remote/messages.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from convoy.config import ModelConfig, ServerConfig
from convoy.errors import ConvoyError, EngineDead, Overloaded, Unavailable
from convoy.logs import LogControl
from convoy.protos import model_config_pb2 as mc
from convoy.trace_settings import TraceControl, trace_setup
from convoy.types import Request, Response, StageTimes, StreamedResponse
from convoy.wire import Link, read_tensors, rebuild_error

from ..arena import Arena
from ..client import EngineClient, ModelView
from ..shared_memory import RegionRow, SharedMemoryRegistry
from .messages import (
    Call,
    Cancel,
    Failure,
    Infer,
    LogUpdate,
    Models,
    ModelState,
    Reply,
    Result,
    SharedArena,
    Streamed,
    ToFrontEnd,
    TraceState,
    Up,
    VersionState,
    Welcome,
)

log = logging.getLogger("convoy.engine.remote")


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
    """A model as a front end sees it (from the engine's last model table)."""

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
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._welcomed = asyncio.get_running_loop().create_future()
        self.shared_memory = SharedMemoryRegistry()
        #: Replaced on the engine's welcome (its settings' defaults), then follows its changes.
        self.trace_control = TraceControl()
        #: Where large inputs go to the engine (None: every tensor travels in frames), and the
        #: blocks each request in flight holds there, by call id.
        self.arena: Arena | None = None
        self._placed: dict[int, list[list[Any]]] = {}
        #: Set when the engine's side of the link is gone.
        self.lost = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def protocol(self) -> Link:
        self.link = Link(ToFrontEnd, self._on_frame, self._on_lost)
        return self.link

    async def connect(self, sock: socket.socket, timeout: float = 60.0) -> None:
        """Take the engine's end of a socket pair; return once the engine sent the settings."""
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(self.protocol, sock=sock)
        await asyncio.wait_for(self._welcomed, timeout)
        # Both set by now: `link` by the connection (`protocol`), `settings` by the welcome.
        assert self.settings is not None and self.link is not None
        self.arena = Arena.create(self.settings.ipc_arena_mb << 20)
        if self.arena is not None:
            self.link.send(SharedArena(name=self.arena.name, size=self.arena.size))

    def serving(self) -> None:
        assert self.link is not None  # set by connect
        self.link.send(Up())

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.shared_memory.close()
        if self.arena is not None:
            self.arena.close()

    # --- the model table -------------------------------------------------------------------------
    def models(self) -> Mapping[str, RemoteModel]:
        return self._table

    def watch_models(self, listener: Callable[[], None]) -> None:
        self._model_listeners.append(listener)

    def ready(self) -> bool:
        return self._engine_accepting and super().ready()

    def resolve(self, name: str, version: str = "") -> RemoteVersion:
        # No isinstance check on the request path: the table (`models`) holds RemoteVersions only.
        found: RemoteVersion = super().resolve(name, version)  # type: ignore[assignment]
        return found if version else found.as_latest

    # --- inference ---------------------------------------------------------------------------------
    # A view this client's `resolve` returned, as EngineClient.submit says: a RemoteVersion.
    def submit(self, model: RemoteVersion, request: Request) -> None:  # type: ignore[override]
        arena = None
        try:
            if self.refusing:
                raise Unavailable("server is shutting down")
            link = self.link
            assert link is not None  # set by connect, before any request
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
            message = Infer(
                call=call,
                model=model.name,
                version=model.version,
                latest=model.latest,
                id=request.id,
                requested=request.requested_outputs,
                rows=request.rows,
                priority=request.priority,
                timeout_us=request.timeout_us,
                deadline=request.deadline,
                parameters=request.parameters,
                received_ns=request.received_ns,
                principal=request.principal,
                inputs=metas,
                streamed=request.stream is not None,
            )
            # Set apart: a 16th keyword would make CPython build a dict for the call (~0.5 µs
            # per request here).
            if request.split_key is not None:
                message.split_key = request.split_key
            writer.add(message)
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

    def cancel(self, model: ModelView, request: Request) -> None:
        call = self._call_of.get(request)
        if call is not None and self.link is not None and not self.link.closed:
            self.link.send(Cancel(call=call))

    def _finish(self, call: int) -> Request | None:
        """The engine answered `call`: it reads none of its inputs any more."""
        placed = self._placed.pop(call, None)
        if placed is not None:
            assert self.arena is not None  # blocks were placed in it
            self.arena.free(placed)
        request = self._in_flight.pop(call, None)
        if request is not None:
            del self._call_of[request]
        return request

    # --- calls -------------------------------------------------------------------------------------
    async def _call(self, method: str, *args: object) -> Any:
        """The engine's reply to `method(*args)` (as the EngineClient method returns it)."""
        if self.link is None or self.link.closed:
            raise EngineDead("the engine process is gone")
        call = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call] = future
        try:
            self.link.send(Call(call=call, method=method, args=list(args)))
            return await future
        finally:
            self._calls.pop(call, None)

    async def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        value: dict[str, Any] = await self._call("model_statistics", name, version)
        return value

    async def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        value: list[dict[str, Any]] = await self._call("repository_index", ready_only)
        return value

    async def load_model(
        self, name: str, parameters: dict[str, Any] | None = None, base64_files: bool = False
    ) -> None:
        await self._call("load_model", name, parameters, base64_files)

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        await self._call("unload_model", name, parameters)

    async def catalog_figures(self) -> dict[str, Any]:
        value: dict[str, Any] = await self._call("catalog_figures")
        return value

    async def rollout_start(self, name: str, document: dict[str, Any]) -> dict[str, Any]:
        value: dict[str, Any] = await self._call("rollout_start", name, document)
        return value

    async def rollout_status(self, name: str = "") -> dict[str, Any]:
        value: dict[str, Any] = await self._call("rollout_status", name)
        return value

    async def rollout_promote(self, name: str) -> dict[str, Any]:
        value: dict[str, Any] = await self._call("rollout_promote", name)
        return value

    async def rollout_abort(self, name: str) -> dict[str, Any]:
        value: dict[str, Any] = await self._call("rollout_abort", name)
        return value

    async def rollout_report(self, name: str) -> dict[str, Any]:
        value: dict[str, Any] = await self._call("rollout_report", name)
        return value

    async def register_system_shared_memory(
        self, name: str, key: str, offset: int, byte_size: int
    ) -> None:
        await self._call("register_system_shared_memory", name, key, offset, byte_size)

    async def unregister_system_shared_memory(self, name: str = "") -> None:
        await self._call("unregister_system_shared_memory", name)

    async def system_shared_memory_status(self, name: str = "") -> list[RegionRow]:
        value: list[RegionRow] = await self._call("system_shared_memory_status", name)
        return value

    def log_settings(self) -> dict[str, object]:
        assert self.log_control is not None  # set after connect, before a front end serves
        return self.log_control.settings()

    async def update_log_settings(self, changes: dict[str, object]) -> dict[str, object]:
        # The engine validates and applies them, then tells every front end (this one too).
        value: dict[str, object] = await self._call("update_log_settings", changes)
        return value

    async def update_trace_settings(self, model: str, changes: dict[str, object]) -> dict[str, Any]:
        # The engine checks the model, validates and applies, then tells every front end.
        value: dict[str, Any] = await self._call("update_trace_settings", model, changes)
        return value

    # --- messages from the engine ----------------------------------------------------------------------
    def _on_frame(self, messages: list[Any], data: memoryview) -> None:
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

    def _on_lost(self, exc: Exception | None) -> None:
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
