"""`convoy serve --workers N`: one engine process behind N front-end processes.

This process holds the engine (models, schedulers, metrics) and serves it to each front-end
process (server/workers.py) over a private Unix socket pair (engine/remote/). The front ends
share the HTTP and gRPC ports (SO_REUSEPORT; the ports are picked here so port 0 works). A front
end that dies is restarted and only its own requests are lost; when the engine exits its front
ends see their socket close and exit too; SIGTERM drains every process.

async with MultiProcessServer(settings, log_control) as server:
    await server.wait_closed()        # until stop() (SIGTERM/SIGINT in the CLI)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from convoy.config import ServerConfig
from convoy.engine.client import ShutdownPhase
from convoy.engine.core import Engine
from convoy.engine.remote.endpoint import EngineEndpoint
from convoy.engine.remote.messages import LogUpdate, TraceState
from convoy.logs import LogControl

from .app import start_metrics, stop_metrics

log = logging.getLogger("convoy.workers")

WORKER_START_S = 60.0


def auto_workers(cores: int | None = None) -> int:
    """`--workers auto`: one front end per core left after the engine's own core (the loop that
    batches and answers) and one for the runtimes' threads, at least one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 2)


@dataclass(eq=False)
class WorkerSlot:
    """One front-end process slot; its process is replaced when it dies."""

    index: int
    process: asyncio.subprocess.Process | None = None
    endpoint: EngineEndpoint | None = None
    pid: int = 0
    started: float = 0.0
    serving: bool = False
    #: Inference requests this slot handed to the engine, over all its processes.
    requests: int = 0
    restarts: int = 0

    def total_requests(self) -> int:
        return self.requests + (self.endpoint.requests if self.endpoint is not None else 0)


def _reserve_port(host: str, port: int, what: str) -> socket.socket:
    """Bind (without listening) so the port is ours and concrete; front ends join it with
    SO_REUSEPORT. Held for the server's lifetime so a restarted front end always gets it back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"{what} could not bind {host}:{port} ({exc.strerror})") from None
    return sock


class WorkerCollector(Collector):
    """Per-front-end series on the engine's /metrics (read at scrape time)."""

    def __init__(self, workers: list[WorkerSlot]) -> None:
        self._workers = workers

    def collect(self):
        requests = CounterMetricFamily(
            "convoy_worker_requests",
            "Inference requests each front-end worker handed to the engine",
            labels=["worker"],
        )
        restarts = CounterMetricFamily(
            "convoy_worker_restarts", "Times a front-end worker was restarted", labels=["worker"]
        )
        up = GaugeMetricFamily(
            "convoy_worker_up", "1 while the front-end worker serves", labels=["worker", "pid"]
        )
        for worker in self._workers:
            label = str(worker.index)
            requests.add_metric([label], worker.total_requests())
            restarts.add_metric([label], worker.restarts)
            up.add_metric([label, str(worker.pid)], 1 if worker.serving else 0)
        yield from (requests, restarts, up)


class MultiProcessServer:
    """The engine process: the engine, its metrics, and the front ends it supervises."""

    def __init__(self, settings: ServerConfig, log_control: LogControl | None = None) -> None:
        self.settings = settings
        self.log_control = log_control or LogControl(settings.log_level, settings.log_format)
        self.engine = Engine(settings, self.log_control)
        self.workers = [WorkerSlot(index) for index in range(settings.workers)]
        self.http_port = 0
        self.grpc_port = 0
        #: -1 while metrics are off (--metrics-port -1), as the flag says.
        self.metrics_port = -1
        self._metrics_server = None
        self._reserved: list[socket.socket] = []
        #: What `__aenter__` started (ports, engine, metrics, front-end tasks), closed in reverse.
        self._lifetime = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task] = set()
        self._table_pending = False
        self._stopped = asyncio.Event()
        #: Set when a front end reports serving or its process ends (start-up waits on it).
        self._worker_news = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifetime ----------------------------------------------------------------------------------
    async def __aenter__(self) -> MultiProcessServer:
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        lifetime = self._lifetime
        try:
            # Ports first: one in use is found before any model loads.
            for port, what in ((settings.http_port, "HTTP"), (settings.grpc_port, "gRPC")):
                sock = _reserve_port(settings.host, port, what)
                lifetime.callback(sock.close)
                self._reserved.append(sock)
            self.http_port, self.grpc_port = (s.getsockname()[1] for s in self._reserved)
            # The front ends' links outlive the engine: they carry its last answers.
            lifetime.callback(self._close_links)
            self.engine.repository.listeners.append(self._models_changed)
            self.engine.log_listeners.append(self._log_changed)
            self.engine.trace_listeners.append(self._trace_changed)
            await self.engine.start()
            lifetime.push_async_callback(self.engine.close)
            self._models_changed()  # started: readiness may have changed
            if settings.metrics_port >= 0:
                self._metrics_server = start_metrics(self.engine, settings)
                lifetime.callback(stop_metrics, self._metrics_server)
                self.engine.metrics.registry.register(WorkerCollector(self.workers))
                self.metrics_port = self._metrics_server.server_port
            lifetime.push_async_callback(self._cancel_tasks)
            for worker in self.workers:
                await self._spawn(worker)
            await self._wait_serving()
        except BaseException:
            await self._shutdown(grace=0)
            raise
        return self

    def reload_keys(self) -> None:
        """SIGHUP: reread the API keys here and in every front end."""
        self.engine.reload_keys()
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGHUP)

    async def __aexit__(self, *exc_info) -> None:
        await self._shutdown(self.settings.shutdown_grace)

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler on the loop)."""
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    def _own(self, coroutine) -> asyncio.Task:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait_serving(self) -> None:
        """Until every front end reports serving; one that exits, or WORKER_START_S passing,
        fails start-up."""
        deadline = time.monotonic() + WORKER_START_S
        while not all(w.serving for w in self.workers):
            for worker in self.workers:
                code = worker.process.returncode if worker.process else None
                if code is not None:
                    raise OSError(f"worker {worker.index} exited with {code} during start-up")
            self._worker_news.clear()
            try:
                await asyncio.wait_for(self._worker_news.wait(), deadline - time.monotonic())
            except TimeoutError:
                raise OSError(f"workers not serving within {WORKER_START_S:.0f} s") from None

    async def _shutdown(self, grace: float) -> None:
        started = time.monotonic()
        deadline = started + grace
        self.engine.enter(ShutdownPhase.DRAINING)
        self._models_changed()
        # Front ends turn unready, refuse new requests and drain theirs (the engine answers).
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                await asyncio.wait_for(worker.process.wait(), max(deadline - time.monotonic(), 0) + 5)
            except TimeoutError:
                log.error("worker %d (pid %d) did not stop; killing it", worker.index, worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        self.engine.enter(ShutdownPhase.STOPPING)  # every front end has stopped
        await self.engine.drain(deadline)
        await self._lifetime.aclose()  # supervisors, metrics, the engine, links, ports
        log.info("engine stopped after %.2f s", time.monotonic() - started)

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _close_links(self) -> None:
        for worker in self.workers:
            if worker.endpoint is not None and worker.endpoint.link is not None:
                worker.endpoint.link.close()

    # --- the engine's news for every front end -------------------------------------------------------
    def _models_changed(self) -> None:
        """Push the model table once this loop turn's changes are done."""
        if not self._table_pending and self._loop is not None:
            self._table_pending = True
            self._loop.call_soon(self._push_models)

    def _push_models(self) -> None:
        self._table_pending = False
        for worker in self.workers:
            if worker.endpoint is not None:
                worker.endpoint.send_models()

    def _log_changed(self, changes: dict) -> None:
        for worker in self.workers:
            if worker.endpoint is not None:
                worker.endpoint.send(LogUpdate(changes=changes))

    def _trace_changed(self, state: dict) -> None:
        for worker in self.workers:
            if worker.endpoint is not None:
                worker.endpoint.send(TraceState(levels=state))

    # --- front-end processes ---------------------------------------------------------------------------
    async def _spawn(self, worker: WorkerSlot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "convoy.server.workers",
                "--fd",
                str(theirs.fileno()),
                "--index",
                str(worker.index),
                "--engine-pid",
                str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        if worker.endpoint is not None:
            worker.requests += worker.endpoint.requests

        def up() -> None:
            worker.serving = True
            self._worker_news.set()
            log.info("worker %d (pid %d) serving", worker.index, worker.pid)

        endpoint = EngineEndpoint(self.engine, f"worker {worker.index}", up)
        await self._loop.create_unix_connection(endpoint.protocol, sock=ours)
        endpoint.welcome(self.settings, self.http_port, self.grpc_port)
        worker.process, worker.endpoint = process, endpoint
        worker.pid, worker.started, worker.serving = process.pid, time.monotonic(), False
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        self._own(self._supervise(worker, process))

    async def _supervise(self, worker: WorkerSlot, process) -> None:
        """Restart the front end when its process ends, unless the server is stopping."""
        code = await process.wait()
        worker.serving = False
        self._worker_news.set()
        if self.engine.phase > ShutdownPhase.SERVING:
            return  # the server is stopping
        log.warning("worker %d (pid %d) exited with %s; restarting", worker.index, process.pid, code)
        if worker.endpoint is not None and worker.endpoint.link is not None:
            worker.endpoint.link.close()  # its queued requests leave the queues
        worker.restarts += 1
        if time.monotonic() - worker.started < 1.0:
            await asyncio.sleep(1.0)  # a front end that cannot start does not spin the engine
        if self.engine.phase is ShutdownPhase.SERVING:
            await self._spawn(worker)
