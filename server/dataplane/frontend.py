"""The native front end's lifetime in the server: start (both ports bound before any model
loads), the model table it checks requests against, the loop's reader, and a shutdown that
serves every request already sent.

The loop watches the native side's eventfd; each wake-up takes every pending item in one call,
and every answer produced during a loop turn goes back in one call at its end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from convoy.auth import Keyring
from convoy.config import ServerConfig
from convoy.engine.client import EngineClient
from convoy.errors import ConvoyError
from convoy.logs import LogControl
from convoy.server.grpc_api.handlers import GrpcFrontend, interceptor_chain
from convoy.server.http_api.body_limits import body_limits
from convoy.server.http_api.connections import connection_cap
from convoy.server.observability.access_log import AccessLog
from convoy.server.observability.tracing import Tracer

from .calls import NativeCalls, model_plan
from .forward import GrpcForwarder, HttpForwarder

log = logging.getLogger("convoy.native")

#: Item kinds (server/native/py/src/lib.rs `item_to_python`).
INFER, HTTP, GRPC, CANCEL, LOG = range(5)
#: uvicorn's keep-alive timeout, which the Python front end serves with.
KEEP_ALIVE_S = 30.0
#: At shutdown: how long the server still takes connections while it reports not ready (a
#: readiness probe or a load balancer sees 503 before the port closes), then time for the
#: native side to accept the connections queued in the backlog, then for requests already sent
#: on open connections to arrive and be answered.
_UNREADY_S = 0.1
_ACCEPT_BACKLOG_S = 0.05
_LATE_REQUEST_S = 0.1


def native_threads(configured: int) -> int:
    """The native front end's threads: as configured, or (0) one per two cores, at least one
    and at most four (the engine and the models need the rest)."""
    if configured > 0:
        return configured
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _load_extension():
    from convoy.server import _native

    return _native


class NativeFrontEnds:
    """Both protocols on the native front end, in front of one engine client: what FrontEnds
    (server/app.py) is for the Python front end, with the same start / stop / close."""

    def __init__(
        self,
        engine: EngineClient,
        settings: ServerConfig,
        log_control: LogControl,
        keys: Keyring | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.log_control = log_control
        self.keys = keys
        self.http_port = 0
        self.grpc_port = 0
        self.tracer: Tracer | None = None
        self._native = None
        self._access_log: AccessLog | None = None
        self._http_app = None
        self._outbox: list[tuple] = []
        self._flushing = False
        self._tasks: dict[int, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Config tokens: id(config) -> (config, token); a token names one config object.
        self._tokens: dict[int, tuple[object, int]] = {}
        self._next_token = 1

    # --- lifetime ---------------------------------------------------------------------------------
    async def start(self, http_port: int, grpc_port: int) -> None:
        from convoy.server.app import http_application, observers

        settings = self.settings
        native = _load_extension()
        self._loop = asyncio.get_running_loop()
        self.tracer, self._access_log, interceptors = observers(
            self.engine, settings, self.log_control, self.keys
        )
        self._native = native.Frontend(
            {
                "host": settings.host,
                "http_port": http_port,
                "grpc_port": grpc_port,
                "reuse_port": False,
                "max_connections": connection_cap(settings.max_connections),
                "header_timeout": settings.header_timeout,
                "keep_alive_timeout": KEEP_ALIVE_S,
                "max_head_bytes": settings.http_max_head_bytes,
                "max_headers": settings.http_max_headers,
                "http_max_body_bytes": settings.http_max_body_bytes,
                "grpc_max_message_bytes": settings.grpc_max_message_bytes,
                "threads": native_threads(settings.native_threads),
                "tls_cert": None if settings.tls_cert is None else str(settings.tls_cert),
                "tls_key": None if settings.tls_key is None else str(settings.tls_key),
                "tls_client_ca": None if settings.tls_client_ca is None else str(settings.tls_client_ca),
            }
        )
        self.http_port = self._native.http_port
        self.grpc_port = self._native.grpc_port
        self._http_app, app = http_application(
            self.engine, settings, self.tracer, self.grpc_port, self.keys, self._access_log
        )
        servicer = GrpcFrontend(self.engine, self.tracer)
        self.calls = NativeCalls(self.engine, self._queue, self.keys, self._access_log, self.tracer)
        self.http = HttpForwarder(app, self._queue)
        chain = interceptor_chain(interceptors, self.keys)
        self.grpc = GrpcForwarder(servicer, chain, self._queue, self.keys, self._access_log)
        self.engine.watch_models(self.push_models)
        self.push_models()
        self._loop.add_reader(self._native.fileno(), self._on_wake)

    async def stop(self, deadline: float) -> None:
        """Stop taking connections without cutting off any request already sent; what is in
        flight gets until `deadline` (monotonic) to be answered."""
        native = self._native
        if native is None:
            return
        native.set_accepting(False)
        await asyncio.sleep(_UNREADY_S)
        for problem in native.filter_new_connections():
            log.debug("%s", problem)
        await asyncio.sleep(_ACCEPT_BACKLOG_S)
        native.close_listeners()
        await asyncio.sleep(_LATE_REQUEST_S)
        native.shutdown_connections()
        # Polled: the open connections are counted on the native side's threads, which wake
        # the loop for requests only, not when a connection closes.
        while time.monotonic() < deadline:
            http, grpc, _ = native.status()
            if http == 0 and grpc == 0:
                break
            await asyncio.sleep(0.01)
        self._flush()

    def close(self) -> None:
        if self._native is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._native.fileno())
            self._native.stop()
            self._native = None
        for task in self._tasks.values():
            task.cancel()
        if self._http_app is not None:
            self._http_app.close()
        if self._access_log is not None:
            self._access_log.close()
        if self.tracer is not None:
            self.tracer.close()

    # --- the model table ----------------------------------------------------------------------------
    def _token(self, config) -> int:
        known = self._tokens.get(id(config))
        if known is not None and known[0] is config:
            return known[1]
        token = self._next_token
        self._next_token += 1
        self._tokens[id(config)] = (config, token)
        self.calls.plans[token] = model_plan(config)
        return token

    def push_models(self) -> None:
        """Tell the native side every model's inputs as they are now (on every change)."""
        if self._native is None:
            return
        settings = self.settings
        rows = []
        live: set[int] = set()
        for name, model in self.engine.models().items():
            config = model.config
            if config is None:
                continue
            token = self._token(config)
            live.add(token)
            limits = body_limits(config, settings.http_max_body_bytes, settings.http_max_json_bytes)
            try:  # a roll-out's split header, when the model runs one that splits by header
                split_header = self.engine.resolve(name).split_header
            except ConvoyError:
                split_header = ""
            rows.append(
                (
                    name,
                    token,
                    config.max_batch_size,
                    # A decoupled model's responses are shaped by the Python handlers.
                    not config.decoupled,
                    [(s.name, s.datatype, list(s.dims), s.optional) for s in config.inputs],
                    [s.name for s in config.outputs],
                    limits.body,
                    limits.json,
                    limits.reason,
                    split_header,
                )
            )
        for key, (_, token) in list(self._tokens.items()):
            if token not in live:
                del self._tokens[key]
                self.calls.plans.pop(token, None)
        self._native.set_models(rows)

    # --- the request path -------------------------------------------------------------------------
    def _queue(self, answer: tuple) -> None:
        """One answer for this loop turn's batch."""
        self._outbox.append(answer)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if not self._outbox or self._native is None:
            return
        answers, self._outbox = self._outbox, []
        try:
            self._native.answer(answers)
        except Exception:
            log.exception("native front end: handing %d answers back failed", len(answers))

    def _on_wake(self) -> None:
        native = self._native
        if native is None:
            return
        try:
            items = native.take()
        except Exception:
            log.exception("native front end: taking requests failed")
            return
        calls = self.calls
        for item in items:
            kind = item[0]
            try:
                if kind == INFER:
                    calls.start(item)
                elif kind == HTTP:
                    self._spawn(item[1], self.http.serve(item))
                elif kind == GRPC:
                    _, slot, method, metadata, message, _received, deadline_ns = item
                    if method == "ModelStreamInfer":
                        work = self.grpc.serve_stream_message(slot, metadata, message, deadline_ns)
                    else:
                        work = self.grpc.serve_unary(slot, method, metadata, message, deadline_ns)
                    self._spawn(slot, work)
                elif kind == CANCEL:
                    self._cancel(item[1])
                elif kind == LOG:
                    log.log(logging.getLevelName(item[1]), "%s", item[2])
            except Exception:
                log.exception("native front end: a request of kind %d failed", kind)

    def _spawn(self, slot: int, work) -> None:
        task = self._loop.create_task(work)
        self._tasks[slot] = task
        task.add_done_callback(lambda _task: self._tasks.pop(slot, None))

    def _cancel(self, slot: int) -> None:
        if self.calls.cancel(slot) or self.http.cancel(slot):
            return
        task = self._tasks.get(slot)
        if task is not None:
            task.cancel()
