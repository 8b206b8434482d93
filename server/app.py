"""The Convoy server: repository + gRPC + HTTP (+ metrics) on one event loop, one lifetime.

async with ConvoyServer(settings) as server:
    await server.wait_closed()        # until stop() (SIGTERM/SIGINT in the CLI)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

import uvicorn

from convoy.config import ServerConfig

from .access_log import AccessLog, AccessLogInterceptor, AccessLogMiddleware
from .grpc_frontend import start_grpc_server
from .http_frontend import HttpFrontend
from .logs import LogControl
from .metrics import Metrics
from .repository import ModelRepository
from .service import InferenceService
from .tracing import Tracer

log = logging.getLogger("convoy.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Convoy server owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        # --workers: every worker listens on the same port and the kernel spreads connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class FrontEnds:
    """The gRPC and HTTP front ends over one InferenceService, with the access log and tracer
    they feed: what a single-process server and each --workers front-end process both run."""

    def __init__(
        self,
        service: InferenceService,
        settings: ServerConfig,
        log_control: LogControl,
        reuse_port: bool = False,
    ) -> None:
        self.service = service
        self.settings = settings
        self.log_control = log_control
        self.reuse_port = reuse_port
        self.http_port = 0
        self.grpc_port = 0
        self._grpc = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._access_log: AccessLog | None = None
        self.tracer: Tracer | None = None

    async def start(self, http_port: int, grpc_port: int) -> None:
        settings = self.settings
        if settings.trace_otlp_endpoint or settings.trace_console:
            self.tracer = Tracer(settings.trace_otlp_endpoint, settings.trace_console)
        interceptors = []
        if settings.access_log:
            self._access_log = AccessLog(settings.access_log, settings.log_format)
            self.log_control.follow_format(self._access_log.handler)
            self._access_log.start()
            interceptors.append(AccessLogInterceptor(self._access_log))
        self._grpc, self.grpc_port = await start_grpc_server(
            self.service,
            settings.host,
            grpc_port,
            settings.grpc_max_message_bytes,
            self.log_control,
            interceptors,
            self.tracer,
            reuse_port=self.reuse_port,
        )
        sock = _bind(settings.host, http_port, self.reuse_port)
        self.http_port = sock.getsockname()[1]
        app = HttpFrontend(self.service, settings.http_max_body_bytes, self.log_control, self.tracer)
        if self._access_log is not None:
            app = AccessLogMiddleware(app, self._access_log)
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_level="warning",
            http="httptools",
            timeout_keep_alive=30,
            backlog=2048,
        )
        self._http = _Uvicorn(config)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise OSError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self, deadline: float) -> None:
        """Stop accepting; calls in flight get until `deadline` (monotonic) to finish."""
        if self._grpc is not None:
            await self._grpc.stop(grace=max(deadline - time.monotonic(), 0.5))
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=max(deadline - time.monotonic(), 1))

    def close(self) -> None:
        if self._access_log is not None:
            self._access_log.close()
        if self.tracer is not None:
            self.tracer.close()


class ConvoyServer:
    def __init__(self, settings: ServerConfig, log_control: LogControl | None = None) -> None:
        """`log_control`: what the LogSettings API changes (the CLI's, from configure_logging);
        without one, only the root logger's level follows the settings."""
        self.settings = settings
        self.log_control = log_control or LogControl(settings.log_level, settings.log_format)
        self.repository = ModelRepository(settings)
        self.service: InferenceService | None = None
        self.front_ends: FrontEnds | None = None
        self.http_port = 0
        self.grpc_port = 0
        self.metrics_port = 0
        self.metrics: Metrics | None = None
        self._metrics_server = None
        self._stopped = asyncio.Event()

    @property
    def tracer(self) -> Tracer | None:
        return None if self.front_ends is None else self.front_ends.tracer

    async def __aenter__(self) -> ConvoyServer:
        settings = self.settings
        await self.repository.__aenter__()
        self.service = InferenceService(self.repository, asyncio.get_running_loop())
        try:
            self.front_ends = FrontEnds(self.service, settings, self.log_control)
            await self.front_ends.start(settings.http_port, settings.grpc_port)
            self.http_port = self.front_ends.http_port
            self.grpc_port = self.front_ends.grpc_port
            if settings.metrics_port >= 0:
                self._start_metrics()
        except BaseException:
            await self._shutdown(grace=0)
            raise
        return self

    def _start_metrics(self) -> None:
        """/metrics on its own thread, from this server's registry (read at scrape time)."""
        self.metrics, self._metrics_server = start_metrics(self.repository, self.settings)
        self.metrics_port = self._metrics_server.server_port

    async def __aexit__(self, *exc_info) -> None:
        await self._shutdown(self.settings.shutdown_grace)

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler on the loop)."""
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    async def _shutdown(self, grace: float) -> None:
        started = time.monotonic()
        if self.service is not None:
            # Readiness goes false and new requests get UNAVAILABLE; in-flight work continues.
            self.service.accepting = False
        deadline = started + grace
        await drain_schedulers(self.repository, deadline)
        if self.front_ends is not None:
            await self.front_ends.stop(deadline)
        stop_metrics(self.metrics, self._metrics_server)
        await self.repository.__aexit__(None, None, None)
        if self.front_ends is not None:
            self.front_ends.close()
        log.info("server stopped after %.2f s", time.monotonic() - started)


def start_metrics(repository: ModelRepository, settings: ServerConfig):
    """The Prometheus endpoint on its own thread: (Metrics, its HTTP server)."""
    import prometheus_client

    metrics = Metrics(repository)
    server, _thread = prometheus_client.start_http_server(
        settings.metrics_port, addr=settings.host, registry=metrics.registry
    )
    return metrics, server


def stop_metrics(metrics: Metrics | None, server) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
    if metrics is not None:
        metrics.close()


async def drain_schedulers(repository: ModelRepository, deadline: float) -> None:
    """Wait until no model has requests queued or executing, or until `deadline` (monotonic)."""
    while time.monotonic() < deadline and any(
        entry.scheduler is not None and entry.scheduler.in_flight
        for model in repository.models.values()
        for entry in model.versions.values()
    ):
        await asyncio.sleep(0.01)
