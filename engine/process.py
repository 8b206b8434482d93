"""`convoy serve --workers N`: one engine process behind N front-end worker processes.

The engine owns what must exist once: the model repository, the schedulers and runtimes, the
metrics endpoint. Workers (server/workers.py) own the sockets clients talk to: they share the HTTP
and gRPC ports (SO_REUSEPORT, ports picked here so port 0 works), decode and validate requests,
and hand them to the engine over ZeroMQ (server/engine_ipc.py). The engine restarts a worker
that dies and stops them all, drained, on SIGTERM; a worker whose engine is gone exits.

async with Engine(settings, log_control) as engine:
    await engine.wait_closed()        # until stop() (SIGTERM/SIGINT in the CLI)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial

import zmq
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from convoy.batching.usage import UsageMeter
from convoy.config import ServerConfig
from convoy.engine import ipc
from convoy.engine.ledger import UsageLedger
from convoy.engine.metrics import Metrics
from convoy.engine.payload_log import PayloadLog
from convoy.engine.repository import ModelRepository, ModelVersion
from convoy.engine.service import InferenceService
from convoy.errors import ConvoyError, InvalidInput
from convoy.logs import LogControl
from convoy.server import codec as tensors
from convoy.server.app import drain_schedulers, load_keys, start_metrics, start_payload_log, stop_metrics
from convoy.types import Request

log = logging.getLogger("convoy.workers")

#: How often the engine looks for model state changes to push to the workers.
CATALOG_POLL_S = 0.1
#: How long a repository load/unload waits for every worker to see the new models.
CATALOG_ACK_S = 5.0
WORKER_START_S = 60.0
#: Control-plane methods a worker may call on the engine's InferenceService.
CONTROL_METHODS = frozenset({"model_statistics", "repository_index", "load_model", "unload_model"})
#: Shared-memory control (issue 19): the engine's registry is the server's; every change is
#: published with the catalog, and each worker opens the segments itself to read and write them.
SHARED_MEMORY_CHANGES = frozenset({"register_system_shared_memory", "unregister_system_shared_memory"})
CONTROL_METHODS |= SHARED_MEMORY_CHANGES | {
    "system_shared_memory_status",
    "register_cuda_shared_memory",
    "unregister_cuda_shared_memory",
    "cuda_shared_memory_status",
}


@dataclass(eq=False)
class WorkerProcess:
    """One front-end worker slot; its process is replaced when it dies."""

    index: int
    process: asyncio.subprocess.Process | None = None
    pid: int = 0
    identity: bytes = b""
    started: float = 0.0
    serving: bool = False
    acked: int = 0
    #: Inference requests this slot handed to the engine, over all its processes.
    requests: int = 0
    restarts: int = 0


def _reserve_port(host: str, port: int, what: str) -> socket.socket:
    """Bind (without listening) so the port is ours and concrete; workers join it with
    SO_REUSEPORT. Held for the engine's lifetime so a restarting worker always gets it back."""
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
    """Per-worker series on the engine's /metrics (read at scrape time)."""

    def __init__(self, workers: list[WorkerProcess]) -> None:
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
            requests.add_metric([label], worker.requests)
            restarts.add_metric([label], worker.restarts)
            up.add_metric([label, str(worker.pid)], 1 if worker.serving else 0)
        yield from (requests, restarts, up)


class Engine:
    """The engine process: repository, schedulers, metrics, and the workers it supervises."""

    def __init__(self, settings: ServerConfig, log_control: LogControl | None = None) -> None:
        self.settings = settings
        self.log_control = log_control or LogControl(settings.log_level, settings.log_format)
        #: Showback happens here, where the batches are: the workers send each request's principal.
        metered = settings.usage_ledger is not None or settings.api_keys_file is not None
        self.usage = UsageMeter() if metered else None
        self._ledger: UsageLedger | None = None
        self.repository = ModelRepository(settings, self.usage)
        # Roll-out: every worker sees the new versions before the old ones stop (issue 19).
        self.repository.on_switch = lambda: self._publish(wait=True)
        #: API keys: the workers check requests; the engine's copy guards /metrics.
        self.keys = load_keys(settings)
        self.payload_log: PayloadLog | None = None
        self.service: InferenceService | None = None
        self.workers = [WorkerProcess(index) for index in range(settings.workers)]
        self.http_port = 0
        self.grpc_port = 0
        self.metrics_port = 0
        self.metrics: Metrics | None = None
        self._metrics_server = None
        self._reserved: list[socket.socket] = []
        self._directory = ""
        self._address = ""
        self._context: zmq.Context | None = None
        self._channel: ipc.Channel | None = None
        #: (worker identity, call id) -> the engine-side request, for cancels and dead workers.
        self._in_flight: dict[tuple[bytes, int], tuple[ModelVersion, Request]] = {}
        self._by_identity: dict[bytes, WorkerProcess] = {}
        self._tasks: set[asyncio.Task] = set()
        self._sequence = 0
        self._fingerprint = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifetime ------------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        # Every request reaches a scheduler through this process's InferenceService.submit, so
        # payload logging happens here, as in a single process.
        self.payload_log = start_payload_log(settings)
        await self.repository.__aenter__()
        if settings.usage_ledger is not None and self.usage is not None:
            self._ledger = UsageLedger(settings.usage_ledger, self.usage, settings.usage_interval)
            self._ledger.start()
        self.service = InferenceService(self.repository, self._loop, self.payload_log)
        try:
            for port, what in ((settings.http_port, "HTTP"), (settings.grpc_port, "gRPC")):
                self._reserved.append(_reserve_port(settings.host, port, what))
            self.http_port, self.grpc_port = (s.getsockname()[1] for s in self._reserved)
            if settings.metrics_port >= 0:
                # Keys here only guard /metrics (--auth-metrics); the workers check requests.
                self.metrics, self._metrics_server = start_metrics(
                    self.repository, settings, self.usage, self.payload_log, self.keys
                )
                self.metrics.registry.register(WorkerCollector(self.workers))
                self.metrics_port = self._metrics_server.server_port
            self._directory = tempfile.mkdtemp(prefix="convoy-")  # 0700: this user only
            self._address = f"ipc://{self._directory}/engine.sock"
            self._context = zmq.Context()
            sock = ipc.new_socket(self._context, zmq.ROUTER)
            sock.bind(self._address)
            self._channel = ipc.Channel(sock, self._on_message, self._loop)
            self._fingerprint = self._catalog_fingerprint()
            for worker in self.workers:
                await self._spawn(worker)
            await self._wait_serving()
            self._own(self._watch_catalog())
        except BaseException:
            await self._shutdown(grace=0)
            raise
        return self

    def reload_keys(self) -> None:
        """SIGHUP: reread the API keys here and in every worker."""
        if self.keys is not None:
            self.keys.reload()
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
        deadline = time.monotonic() + WORKER_START_S
        while not all(w.serving for w in self.workers):
            for worker in self.workers:
                code = worker.process.returncode if worker.process else None
                if code is not None:
                    raise OSError(f"worker {worker.index} exited with {code} during start-up")
            if time.monotonic() > deadline:
                raise OSError(f"workers not serving within {WORKER_START_S:.0f} s")
            await asyncio.sleep(0.01)

    async def _shutdown(self, grace: float) -> None:
        started = time.monotonic()
        deadline = started + grace
        self._stopping = True
        if self.service is not None:
            self.service.accepting = False
        # Workers turn unready, refuse new requests and drain theirs (the engine answers them).
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
        await drain_schedulers(self.repository, deadline)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        stop_metrics(self.metrics, self._metrics_server)
        await self.repository.__aexit__(None, None, None)
        if self._ledger is not None:
            self._ledger.close()
        if self.payload_log is not None:
            await asyncio.sleep(0)  # outcome callbacks scheduled by the last answers run first
            self.payload_log.close()
        if self._channel is not None:
            self._channel.close()
        if self._context is not None:
            self._context.term()
        for sock in self._reserved:
            sock.close()
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
        log.info("engine stopped after %.2f s", time.monotonic() - started)

    # --- workers ---------------------------------------------------------------------------------
    async def _spawn(self, worker: WorkerProcess) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "convoy.server.workers",
            "--ipc",
            self._address,
            "--index",
            str(worker.index),
            "--engine-pid",
            str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
        )
        worker.process, worker.pid, worker.started = process, process.pid, time.monotonic()
        worker.serving, worker.identity, worker.acked = False, b"", 0
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        self._own(self._supervise(worker, process))

    async def _supervise(self, worker: WorkerProcess, process) -> None:
        """Restart the worker when its process ends, unless the engine is stopping."""
        code = await process.wait()
        worker.serving = False
        self._forget(worker.identity)
        self._by_identity.pop(worker.identity, None)
        worker.identity = b""
        if self._stopping:
            return
        log.warning("worker %d (pid %d) exited with %s; restarting", worker.index, process.pid, code)
        worker.restarts += 1
        if time.monotonic() - worker.started < 1.0:
            await asyncio.sleep(1.0)  # a worker that cannot start does not spin the engine
        if not self._stopping:
            await self._spawn(worker)

    def _forget(self, identity: bytes) -> None:
        """A worker is gone: its queued requests leave the queues (nobody waits for them)."""
        for key in [key for key in self._in_flight if key[0] == identity]:
            entry, request = self._in_flight.pop(key)
            if entry.scheduler is not None:
                entry.scheduler.cancel(request)

    def _worker(self, identity: bytes) -> WorkerProcess | None:
        return self._by_identity.get(identity)

    def _send(self, identity: bytes, frames: list) -> None:
        try:
            self._channel.send([identity, *frames])
        except zmq.Again:
            log.warning("worker %r is not reading its answers; one dropped", identity)

    # --- messages from workers ---------------------------------------------------------------------
    def _on_message(self, frames) -> None:
        identity = frames[0].bytes
        kind, header, frames = ipc.parse(frames[1:])
        if kind == ipc.INFER:
            self._infer(identity, header, frames)
        elif kind == ipc.CANCEL:
            found = self._in_flight.get((identity, header))
            if found is not None and found[0].scheduler is not None:
                found[0].scheduler.cancel(found[1])
        elif kind == ipc.CALL:
            self._own(self._call(identity, *header))
        elif kind == ipc.ACK:
            worker = self._worker(identity)
            if worker is not None:
                worker.acked = max(worker.acked, header)
        elif kind == ipc.UP:
            worker = self._worker(identity)
            if worker is not None:
                worker.serving = True
                log.info("worker %d (pid %d) serving", worker.index, worker.pid)
        elif kind == ipc.HELLO:
            self._hello(identity, *header)
        elif kind == ipc.LOG:
            self._log_settings(identity, header)

    def _hello(self, identity: bytes, index: int, pid: int) -> None:
        if not 0 <= index < len(self.workers) or self.workers[index].pid != pid:
            log.warning("ignoring a hello from an unknown worker (index %s, pid %s)", index, pid)
            return
        self.workers[index].identity = identity
        self._by_identity[identity] = self.workers[index]
        self._send(identity, self._catalog_message())

    def _infer(self, identity: bytes, header, frames) -> None:
        future = self._loop.create_future()
        call_id, model, version, request = ipc.decode_infer(header, frames, future)
        worker = self._worker(identity)
        if worker is not None:
            worker.requests += 1
        try:
            entry = self.repository.route(model, str(version))
        except Exception as exc:  # unloaded since the worker's catalog, or not ready any more
            self._send(identity, ipc.encode_error(call_id, exc))
            return
        if self.keys is not None and request.principal is not None:
            try:  # quotas are counted here, where every worker's requests meet
                self.keys.admit_principal(request.principal)
            except ConvoyError as exc:
                self._send(identity, ipc.encode_error(call_id, exc))
                return
        self._in_flight[identity, call_id] = (entry, request)
        future.add_done_callback(partial(self._answer, identity, call_id, entry, request))
        self.service.submit(entry, request)

    def _answer(self, identity, call_id: int, entry: ModelVersion, request: Request, future) -> None:
        self._in_flight.pop((identity, call_id), None)
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            response = future.result()
            try:
                selected = tensors.select_outputs(
                    entry.config, response.outputs, request.requested_outputs
                )
                frames = ipc.encode_result(call_id, response, {n: a for n, _, a in selected})
            except Exception as exc:
                error = exc
        if error is not None:
            if not isinstance(error, ConvoyError):
                log.error("request to model '%s' failed", entry.config.name, exc_info=error)
            frames = ipc.encode_error(call_id, error)
        self._send(identity, frames)

    async def _call(self, identity: bytes, call_id: int, method: str, args: tuple) -> None:
        try:
            if method not in CONTROL_METHODS:
                raise InvalidInput(f"'{method}' is not an engine method")
            try:
                result = await getattr(self.service, method)(*args)
            finally:
                if method in ("load_model", "unload_model") or method in SHARED_MEMORY_CHANGES:
                    # Every worker sees the new models before the caller hears it is done.
                    await self._publish(wait=True)
            frames = ipc.message(ipc.REPLY, (call_id, result))
        except Exception as exc:
            if not isinstance(exc, ConvoyError):
                log.exception("engine call %s failed", method)
            frames = ipc.encode_error(call_id, exc)
        self._send(identity, frames)

    def _log_settings(self, sender: bytes, changes: dict) -> None:
        try:
            self.log_control.update(changes)  # the sender validated them already
        except ConvoyError as exc:
            log.warning("log settings from a worker rejected: %s", exc)
            return
        for worker in self.workers:
            if worker.identity and worker.identity != sender:
                self._send(worker.identity, ipc.message(ipc.LOG, changes))

    # --- the catalog: models as the workers' front ends see them ------------------------------------
    def _catalog_fingerprint(self):
        return tuple(
            (
                name,
                model.state,
                model.reason,
                id(model.config),
                tuple(
                    (n, e.state, e.reason, e.scheduler is None or e.scheduler.available)
                    for n, e in sorted(model.versions.items())
                ),
            )
            for name, model in sorted(self.repository.models.items())
        )

    def _catalog_message(self) -> list:
        catalog = []
        for name, model in sorted(self.repository.models.items()):
            proto = model.config_proto.SerializeToString() if model.config_proto is not None else None
            versions = [
                (n, e.state, e.reason, e.scheduler is None or e.scheduler.available)
                for n, e in sorted(model.versions.items())
            ]
            catalog.append((name, model.state, model.reason, model.config, proto, versions))
        ports = (self.http_port, self.grpc_port)
        regions = self.service.shared_memory.status() if self.service is not None else []
        return ipc.message(ipc.CATALOG, (self._sequence, catalog, self.settings, ports, regions))

    async def _publish(self, wait: bool) -> None:
        self._sequence += 1
        self._fingerprint = self._catalog_fingerprint()
        message = self._catalog_message()
        targets = [w for w in self.workers if w.identity]
        for worker in targets:
            self._send(worker.identity, message)
        deadline = time.monotonic() + CATALOG_ACK_S
        sequence = self._sequence
        while wait and time.monotonic() < deadline:
            if all(w.acked >= sequence or not w.identity for w in targets):
                return
            await asyncio.sleep(0.002)

    async def _watch_catalog(self) -> None:
        """Push model state changes the engine makes on its own (a replaced instance, a model
        that failed) within CATALOG_POLL_S; loads and unloads push at once."""
        while True:
            await asyncio.sleep(CATALOG_POLL_S)
            if self._catalog_fingerprint() != self._fingerprint:
                await self._publish(wait=False)
