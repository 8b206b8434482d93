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
from .catalog import Catalog
from .grpc_frontend import start_grpc_server
from .http_frontend import HttpFrontend
from .logs import LogControl
from .metrics import Metrics
from .payload_log import PayloadLog
from .repository import ModelRepository
from .service import InferenceService
from .tracing import Tracer

log = logging.getLogger("convoy.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Convoy server owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class ConvoyServer:
    def __init__(self, settings: ServerConfig, log_control: LogControl | None = None) -> None:
        """`log_control`: what the LogSettings API changes (the CLI's, from configure_logging);
        without one, only the root logger's level follows the settings."""
        self.settings = settings
        self.log_control = log_control or LogControl(settings.log_level, settings.log_format)
        self.repository = ModelRepository(settings)
        self.service: InferenceService | None = None
        self.http_port = 0
        self.grpc_port = 0
        self.metrics_port = 0
        self._grpc = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self.metrics: Metrics | None = None
        self._metrics_server = None
        self._access_log: AccessLog | None = None
        self.tracer: Tracer | None = None
        self.payload_log: PayloadLog | None = None
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> ConvoyServer:
        settings = self.settings
        loop = asyncio.get_running_loop()
        if settings.payload_log_dir is not None:
            self.payload_log = PayloadLog(
                settings.payload_log_dir,
                settings.payload_log_max_bytes,
                settings.payload_log_backups,
                settings.payload_log_max_elements,
                settings.payload_log_queue_size,
            )
            self.payload_log.start()
        await self.repository.__aenter__()
        self.service = InferenceService(self.repository, loop, self.payload_log)
        try:
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
                settings.grpc_port,
                settings.grpc_max_message_bytes,
                self.log_control,
                interceptors,
                self.tracer,
            )
            sock = _bind(settings.host, settings.http_port)
            self.http_port = sock.getsockname()[1]
            catalog = Catalog(self.service, self.grpc_port, settings.capacity_reports)
            app = HttpFrontend(
                self.service, settings.http_max_body_bytes, self.log_control, self.tracer, catalog
            )
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
            self._http_task = loop.create_task(self._http.serve(sockets=[sock]))
            while not self._http.started:
                if self._http_task.done():
                    self._http_task.result()
                    raise OSError("HTTP server stopped during start-up")
                await asyncio.sleep(0.01)
            if settings.metrics_port >= 0:
                self._start_metrics()
        except BaseException:
            await self._shutdown(grace=0)
            raise
        return self

    def _start_metrics(self) -> None:
        """/metrics on its own thread, from this server's registry (read at scrape time)."""
        import prometheus_client

        self.metrics = Metrics(self.repository, self.payload_log)
        self._metrics_server, _thread = prometheus_client.start_http_server(
            self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
        )
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
        while time.monotonic() < deadline and any(
            entry.scheduler is not None and entry.scheduler.in_flight
            for model in self.repository.models.values()
            for entry in model.versions.values()
        ):
            await asyncio.sleep(0.01)
        if self._grpc is not None:
            await self._grpc.stop(grace=max(deadline - time.monotonic(), 0.5))
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=max(deadline - time.monotonic(), 1))
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.metrics is not None:
            self.metrics.close()
        await self.repository.__aexit__(None, None, None)
        if self.payload_log is not None:
            await asyncio.sleep(0)  # outcome callbacks scheduled by the last answers run first
            self.payload_log.close()
        if self._access_log is not None:
            self._access_log.close()
        if self.tracer is not None:
            self.tracer.close()
        log.info("server stopped after %.2f s", time.monotonic() - started)
