"""The Convoy server: repository + gRPC + HTTP (+ metrics) on one event loop, one lifetime.

async with ConvoyServer(settings) as server:
    await server.wait_closed()        # until stop() (SIGTERM/SIGINT in the CLI)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import importlib
import logging
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING

import grpc
import uvicorn

from convoy.auth import Keyring
from convoy.config import ServerConfig
from convoy.engine.client import EngineClient, ShutdownPhase
from convoy.logs import LogControl
from convoy.server.catalog.page import Catalog
from convoy.server.grpc_api.handlers import start_grpc_server
from convoy.server.http_api.connections import ConnectionLimits, connection_cap
from convoy.server.http_api.handlers import HttpFrontend
from convoy.server.http_api.middleware import ApiKeyMiddleware
from convoy.server.observability.access_log import AccessLog, AccessLogInterceptor, AccessLogMiddleware
from convoy.server.observability.metrics_server import start_metrics_server
from convoy.server.observability.tracing import Tracer
from convoy.trace_settings import trace_setup

if TYPE_CHECKING:
    from convoy.engine.core import Engine

log = logging.getLogger("convoy.server")

#: At shutdown: time for the loop to accept the HTTP connections queued in the backlog, then for
#: requests already sent on accepted connections to arrive and be answered.
_ACCEPT_BACKLOG_S = 0.05
_LATE_REQUEST_S = 0.1
#: At shutdown: gRPC ModelInfer answers are held until every call in progress is held and none
#: has joined for _HOLD_QUIET_S (at most _HOLD_MAX_S, within the grace), then the gRPC server
#: stops, and _STOP_BEGUN_S later they are sent.
_HOLD_QUIET_S = 0.05
_HOLD_MAX_S = 2.0
_STOP_BEGUN_S = 0.01


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Convoy server owns shutdown; `up` is set
    once it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.up.set()


#: SO_ATTACH_FILTER, and a classic BPF program of one instruction, `ret #0`: drop every packet.
_SO_ATTACH_FILTER = 26
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)


def _drop_new_connections(sock: socket.socket) -> None:
    """Make a listening socket drop incoming SYNs (Linux), so no new connection can join its
    accept queue while the connections already in it are accepted and answered. A client whose
    SYN is dropped retries it after a second and then finds the port closed: refused, with its
    request never sent, which it can safely retry elsewhere."""
    program = ctypes.create_string_buffer(_DROP_ALL)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        # --workers: every worker listens on the same port and the kernel spreads connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"HTTP could not bind {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _grpc_credentials(settings: ServerConfig) -> grpc.ServerCredentials:
    """TLS for the gRPC port; with a client CA, clients must present a certificate it signed."""
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _uvicorn_tls(settings: ServerConfig) -> dict:
    """uvicorn.Config's TLS settings (it builds the SSL context from the files)."""
    if settings.tls_cert is None:
        return {}
    tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca is not None:
        tls["ssl_ca_certs"] = str(settings.tls_client_ca)
        tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return tls


def _server_tls_context(settings: ServerConfig) -> ssl.SSLContext:
    """The same TLS (and client-certificate) settings as an SSLContext, for /metrics."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca is not None:
        context.load_verify_locations(cafile=settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def observers(
    engine: EngineClient, settings: ServerConfig, log_control: LogControl, keys: Keyring | None
) -> tuple[Tracer | None, AccessLog | None, list]:
    """What both front ends feed: the tracer (when spans go anywhere), the access log (started)
    and the gRPC interceptors that write it."""
    tracer = None
    setup = trace_setup(settings.trace_otlp_endpoint, settings.trace_console, settings.trace_config)
    if setup.exporting:
        tracer = Tracer(setup, engine.trace_control)
    access_log = None
    interceptors = []
    if settings.access_log:
        access_log = AccessLog(settings.access_log, settings.log_format)
        log_control.follow_format(access_log.handler)
        access_log.start()
        interceptors.append(AccessLogInterceptor(access_log, keys))
    return tracer, access_log, interceptors


def http_application(
    engine: EngineClient,
    settings: ServerConfig,
    tracer: Tracer | None,
    grpc_port: int,
    keys: Keyring | None,
    access_log: AccessLog | None,
) -> tuple[HttpFrontend, object]:
    """The HTTP front end's ASGI application, with its API-key and access-log middleware (what
    both front ends serve HTTP with): (the app itself, the outermost wrapper)."""
    catalog = Catalog(engine, grpc_port, settings.capacity_reports, keys_required=keys is not None)
    frontend = HttpFrontend(
        engine,
        settings.http_max_body_bytes,
        tracer,
        catalog,
        max_json_bytes=settings.http_max_json_bytes,
    )
    app = frontend
    if keys is not None:
        app = ApiKeyMiddleware(app, keys)
    if access_log is not None:
        app = AccessLogMiddleware(app, access_log)
    return frontend, app


class FrontEnds:
    """The gRPC and HTTP front ends over one engine client, with the access log and tracer
    they feed: what a single-process server and each --workers front-end process both run."""

    def __init__(
        self,
        engine: EngineClient,
        settings: ServerConfig,
        log_control: LogControl,
        reuse_port: bool = False,
        keys: Keyring | None = None,
    ) -> None:
        """`keys`: API keys (None: open). `log_control`: this process's logging (the access
        log follows its format)."""
        self.engine = engine
        self.settings = settings
        self.log_control = log_control
        self.reuse_port = reuse_port
        self.keys = keys
        self.http_port = 0
        self.grpc_port = 0
        self._grpc = None
        self._grpc_frontend = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._http_socket: socket.socket | None = None
        self._access_log: AccessLog | None = None
        self._http_app: HttpFrontend | None = None
        self.tracer: Tracer | None = None

    async def start(self, http_port: int, grpc_port: int) -> None:
        settings = self.settings
        self.tracer, self._access_log, interceptors = observers(
            self.engine, settings, self.log_control, self.keys
        )
        max_connections = connection_cap(settings.max_connections)
        self._grpc, self._grpc_frontend, self.grpc_port = await start_grpc_server(
            self.engine,
            settings.host,
            grpc_port,
            settings.grpc_max_message_bytes,
            interceptors,
            self.tracer,
            self.keys,
            _grpc_credentials(settings) if settings.tls_cert is not None else None,
            reuse_port=self.reuse_port,
            max_connections=max_connections,
            handshake_timeout=settings.header_timeout,
        )
        sock = self._http_socket = _bind(settings.host, http_port, self.reuse_port)
        self.http_port = sock.getsockname()[1]
        self._http_app, app = http_application(
            self.engine, settings, self.tracer, self.grpc_port, self.keys, self._access_log
        )
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_level="warning",
            http=ConnectionLimits(
                max_connections,
                settings.http_max_head_bytes,
                settings.http_max_headers,
                settings.header_timeout,
            ).protocol(),
            timeout_keep_alive=30,
            backlog=2048,
            **_uvicorn_tls(settings),
        )
        self._http = _Uvicorn(config)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve(sockets=[sock]))
        up = asyncio.ensure_future(self._http.up.wait())
        try:
            await asyncio.wait({up, self._http_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
        if not self._http.started:
            self._http_task.result()
            raise OSError("HTTP server stopped during start-up")

    async def stop(self, deadline: float) -> None:
        """Stop accepting without cutting off requests already sent; calls in flight get until
        `deadline` (monotonic) to finish."""
        if self._grpc is not None:
            await self._stop_grpc(max(deadline - time.monotonic(), 0.5))
        if self._http is not None and self._http_task is not None:
            await self._close_http_listener()
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=max(deadline - time.monotonic(), 1))

    async def _stop_grpc(self, grace: float) -> None:
        """Stop gRPC the way its graceful stop means: calls already sent are served.

        gRPC's core cancels (CANCELLED) every call it has received but not yet handed to the
        application when the server stops, and closed-loop clients send their next call as soon
        as they have an answer. So for the first moment of shutdown calls are still served but
        their answers held: each client waits on its answer and sends nothing new; once every
        call in progress is held, the server stops listening (GOAWAY: later calls fail over to
        a new connection and find the port closed, UNAVAILABLE on the client) and the held
        answers go out within the grace."""
        held = asyncio.Event()
        frontend = self._grpc_frontend
        if frontend is not None:
            frontend.held_answers = held
            started = time.monotonic()
            limit = min(_HOLD_MAX_S, grace / 2)
            seen, quiet_since = -1, started
            # Polled on purpose: what is awaited is a quiet spell (no call newly held for
            # _HOLD_QUIET_S), a lapse of time rather than an event.
            while time.monotonic() - started < limit:
                if frontend.held_count != seen or frontend.held_count < frontend.active_calls:
                    seen, quiet_since = frontend.held_count, time.monotonic()
                elif time.monotonic() - quiet_since >= _HOLD_QUIET_S:
                    break
                await asyncio.sleep(0.005)
        stopping = asyncio.ensure_future(self._grpc.stop(grace=grace))
        await asyncio.sleep(_STOP_BEGUN_S)  # the stop has begun: nothing new is matched
        held.set()
        await stopping

    async def _close_http_listener(self) -> None:
        """Stop taking HTTP connections without resetting any the kernel already accepted.

        Closing a listening socket resets the connections still in its accept queue, whose
        clients may already have sent a request. So: drop new SYNs first, let the loop accept
        what is queued, close the listener, and give the requests on those connections a moment
        to arrive and be answered (503 + `Connection: close` while shutting down)."""
        if self._http_socket is not None:
            try:
                _drop_new_connections(self._http_socket)
            except OSError as exc:  # not Linux, or no BPF: plain close, as uvicorn would
                log.debug("cannot filter the HTTP listener: %s", exc)
            await asyncio.sleep(_ACCEPT_BACKLOG_S)
        for server in self._http.servers:
            server.close()
        await asyncio.sleep(_LATE_REQUEST_S)

    def close(self) -> None:
        if self._http_app is not None:
            self._http_app.close()
        if self._access_log is not None:
            self._access_log.close()
        if self.tracer is not None:
            self.tracer.close()


def settle_heap() -> None:
    """Once the models are loaded, move everything alive into the collector's permanent
    generation: start-up's modules, configs and weights never die, and traversing them again on
    every full collection cost ~7% of the server's CPU under load (perf, 1-row add_sub, c=64)."""
    gc.collect()
    gc.freeze()


def choose_frontend(settings: ServerConfig) -> tuple[str, str]:
    """("native" | "python", why the Python one when it is not what was asked). --frontend
    native without the extension is an error; auto falls back, and says why."""
    if settings.frontend == "python":
        return "python", ""
    try:
        importlib.import_module("convoy.server._native")
    except ImportError as exc:
        why = (
            f"the native front end (convoy.server._native) is not built: {exc}; reinstall with "
            "a Rust toolchain (cargo) on PATH to build it"
        )
        if settings.frontend == "native":
            raise OSError(f"--frontend native: {why}") from None
        return "python", why
    return "native", ""


class ConvoyServer:
    """One process: the engine, and both front ends holding it as their engine client."""

    def __init__(self, settings: ServerConfig, log_control: LogControl | None = None) -> None:
        """`log_control`: what the LogSettings API changes (the CLI's, from configure_logging);
        without one, only the root logger's level follows the settings."""
        self.settings = settings
        self.log_control = log_control or LogControl(settings.log_level, settings.log_format)
        # Imported here: a --workers front-end process imports this module for FrontEnds and
        # must not load the engine (its schedulers, its runtimes).
        from convoy.engine.core import Engine

        self.engine = Engine(settings, self.log_control)
        self.front_ends: FrontEnds | None = None
        #: "native" or "python": which front end serves (see choose_frontend).
        self.frontend = ""
        self.http_port = 0
        self.grpc_port = 0
        #: -1 while metrics are off (--metrics-port -1), as the flag says.
        self.metrics_port = -1
        self._metrics_server = None
        self._stopped = asyncio.Event()
        #: What `__aenter__` started (front ends, engine, metrics), closed in reverse.
        self._lifetime = contextlib.AsyncExitStack()

    @property
    def tracer(self) -> Tracer | None:
        return None if self.front_ends is None else self.front_ends.tracer

    async def __aenter__(self) -> ConvoyServer:
        settings = self.settings
        # One keyring: the front ends check keys, the engine counts quotas.
        frontend, why = choose_frontend(settings)
        if frontend == "native":
            from convoy.server.dataplane.frontend import NativeFrontEnds

            self.front_ends = NativeFrontEnds(
                self.engine, settings, self.log_control, keys=self.engine.keys
            )
        else:
            if why:
                log.warning("serving with the Python front end: %s", why)
            self.front_ends = FrontEnds(self.engine, settings, self.log_control, keys=self.engine.keys)
        self.frontend = frontend
        log.info("front end: %s", frontend)
        lifetime = self._lifetime
        try:
            # Ports first: a port in use is found before any model loads; until the models
            # are loaded the server is live but not ready. Closed whatever part of it started.
            lifetime.callback(self.front_ends.close)
            await self.front_ends.start(settings.http_port, settings.grpc_port)
            self.http_port = self.front_ends.http_port
            self.grpc_port = self.front_ends.grpc_port
            await self.engine.start()
            lifetime.push_async_callback(self.engine.close)
            settle_heap()
            if settings.metrics_port >= 0:
                self._metrics_server = start_metrics(self.engine, settings)
                lifetime.callback(stop_metrics, self._metrics_server)
                self.metrics_port = self._metrics_server.server_port
        except BaseException:
            await self._shutdown(grace=0)
            raise
        return self

    def reload_keys(self) -> None:
        """Reread the API key file now (SIGHUP); safe from a signal handler on the loop."""
        self.engine.reload_keys()

    async def __aexit__(self, *exc_info) -> None:
        await self._shutdown(self.settings.shutdown_grace)

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler on the loop)."""
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    async def _shutdown(self, grace: float) -> None:
        started = time.monotonic()
        # Readiness goes false at once; the front ends stop taking connections and serve what
        # arrives on the open ones until their clients have been told (see FrontEnds.stop).
        self.engine.enter(ShutdownPhase.DRAINING)
        deadline = started + grace
        if self.front_ends is not None:
            await self.front_ends.stop(deadline)
        self.engine.enter(ShutdownPhase.STOPPING)
        await self.engine.drain(deadline)
        await self._lifetime.aclose()  # metrics, the engine, the front ends
        log.info("server stopped after %.2f s", time.monotonic() - started)


def start_metrics(engine: Engine, settings: ServerConfig):
    """The engine's Prometheus registry served on its own thread, with the server's TLS
    settings and, when asked, behind an API key."""
    keys = engine.keys
    if keys is not None and not keys.protect_metrics:
        log.warning(
            "/metrics on port %d is OPEN although API keys are configured: it names every model "
            "and every key; drop --auth-metrics open to require a (scrape) key",
            settings.metrics_port,
        )
    server, _thread = start_metrics_server(
        settings.host,
        settings.metrics_port,
        engine.metrics.registry,
        _server_tls_context(settings) if settings.tls_cert is not None else None,
        keys if keys is not None and keys.protect_metrics else None,
    )
    return server


def stop_metrics(server) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
