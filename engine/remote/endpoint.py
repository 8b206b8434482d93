"""The engine process's side of the IPC: `EngineEndpoint` serves one --workers front-end process
(server/multiprocess.py keeps one per front end). Requests from it go to the engine; their
answers go back in the frame being built for this loop turn."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from convoy.config import ServerConfig
from convoy.errors import ConvoyError, InvalidInput, Unavailable
from convoy.types import DirectOutcome, Request, Response, StreamedResponse
from convoy.wire import Link, error_info, read_tensors

from ..arena import open_arena
from ..core import Engine
from ..repository import ModelVersion
from .messages import (
    CALLS,
    Call,
    Cancel,
    Failure,
    Infer,
    Models,
    ModelState,
    Reply,
    Result,
    SharedArena,
    Streamed,
    ToEngine,
    ToFrontEnd,
    TraceState,
    Up,
    VersionState,
    Welcome,
)

if TYPE_CHECKING:
    from ..rollout.routing import RolloutRoute

log = logging.getLogger("convoy.engine.remote")


class _Outcome(DirectOutcome):
    """A remote request's future in the engine: the outcome goes straight into the frame being
    built for its front end (no asyncio future, no callback hop)."""

    __slots__ = ("_endpoint", "call", "model")

    def __init__(self, endpoint: EngineEndpoint, call: int, model: ModelVersion | RolloutRoute) -> None:
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
        self._in_flight: dict[int, tuple[Request, ModelVersion | RolloutRoute]] = {}
        self.requests = 0
        #: Control-plane calls being answered.
        self._calls: set[asyncio.Future[None]] = set()
        self.lost = asyncio.Event()
        #: The front end's arena, mapped read-only (large inputs are read from it in place).
        self._shared: memoryview | None = None

    def protocol(self) -> Link:
        self.link = Link(ToEngine, self._on_frame, self._on_lost)
        return self.link

    def welcome(self, settings: ServerConfig, http_port: int, grpc_port: int) -> None:
        assert self.link is not None  # set by `protocol` when the front end connected
        self.link.send(Welcome(settings=settings, http_port=http_port, grpc_port=grpc_port))
        self.link.send(TraceState(levels=self.engine.trace_control.state()))
        self.send_models()

    def send_models(self) -> None:
        if self.link is not None and not self.link.closed:
            self.link.send(model_table(self.engine))

    def send(self, message: ToFrontEnd) -> None:
        if self.link is not None and not self.link.closed:
            self.link.send(message)

    def _on_lost(self, exc: Exception | None) -> None:
        """The front end is gone: its queued requests leave the queues (nobody waits)."""
        in_flight, self._in_flight = self._in_flight, {}
        for request, model in in_flight.values():
            self.engine.cancel(model, request)
        self.lost.set()

    def _on_frame(self, messages: list[Any], data: memoryview) -> None:
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
                        assert isinstance(request.future, _Outcome)  # made by `_infer`
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
            entry: ModelVersion | RolloutRoute | None = (
                None if model is None else model.versions.get(message.version)
            )
            route = engine.rollouts.routes.get(message.model) if message.latest else None
            if route is not None:
                entry = engine.resolve(message.model)  # a running roll-out splits it
            elif entry is None or (
                # `model` is not None here: `entry` is one of its versions.
                message.latest
                and (not entry.ready or (model is not None and model.default_version is not None))
            ):
                if not message.latest:
                    raise Unavailable(f"model '{message.model}' version {message.version} is not loaded")
                entry = engine.resolve(message.model)  # a roll-out moved "latest" meanwhile
            inputs = read_tensors(message.inputs, data, self._shared)
        except ConvoyError as exc:
            self.send(Failure(call=message.call, error=error_info(exc)))
            return
        outcome = _Outcome(self, message.call, entry)
        # Positional: keywords cost ~0.3 µs more per request in this dataclass's __init__.
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
            writer.add(
                Streamed(
                    call=call,
                    outputs=metas,
                    final=item.final,
                    error=item.error,
                    parameters=item.parameters,
                    error_status=item.error_status,
                )
            )

        return sink

    def answer(self, outcome: _Outcome, response: Response | None, error: BaseException | None) -> None:
        self._in_flight.pop(outcome.call, None)
        link = self.link
        if link is None or link.closed:
            return
        if error is None:
            try:
                assert response is not None  # no error: the request's response
                writer = link.writer()
                metas = writer.tensors(response.outputs)
            except Exception as exc:
                error = exc
            else:
                timings = response.timings
                writer.add(
                    Result(
                        call=outcome.call,
                        model=response.model_name,
                        version=response.model_version,
                        timings=None if timings is None else (*timings,),
                        outputs=metas,
                        steps=response.steps,
                        parameters=response.parameters,
                    )
                )
                return
        if not isinstance(error, ConvoyError):
            log.error("request to model '%s' failed", outcome.model.config.name, exc_info=error)
        link.send(Failure(call=outcome.call, error=error_info(error)))

    async def _call(self, message: Call) -> None:
        try:
            if message.method not in CALLS:
                raise InvalidInput(f"'{message.method}' is not an engine call")
            value = await getattr(self.engine, message.method)(*message.args)
            reply: Reply | Failure = Reply(call=message.call, value=value)
        except Exception as exc:
            if not isinstance(exc, ConvoyError):
                log.exception("engine call %s failed", message.method)
            reply = Failure(call=message.call, error=error_info(exc))
        self.send(reply)


def model_table(engine: Engine) -> Models:
    """The engine's model table as front ends receive it."""
    models = []
    for name, model in sorted(engine.repository.models.items()):
        proto = model.config_proto.SerializeToString() if model.config_proto is not None else None
        versions = [
            VersionState(version=number, state=entry.state, reason=entry.reason, ready=entry.ready)
            for number, entry in sorted(model.versions.items())
        ]
        route = engine.rollouts.routes.get(name)
        models.append(
            ModelState(
                name=name,
                state=model.state,
                reason=model.reason,
                config=model.config,
                config_proto=proto,
                versions=versions,
                default_version=model.default_version,
                split_header=route.split_header if route is not None else "",
            )
        )
    return Models(
        started=engine.started,
        accepting=engine.accepting,
        models=models,
        regions=engine.shared_memory.status(),
    )
