"""A --workers front-end process: the gRPC and HTTP front ends over a remote engine.

The front ends run unchanged over an InferenceService whose repository is a mirror of the
engine's (pushed over IPC whenever it changes) and whose schedulers are `RemoteScheduler`s:
`submit` sends the validated request to the engine, the engine's answer resolves its future.
Started by the engine (`python -m convoy.server.workers`); exits when the engine does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import shutil
import signal
import sys
import time

import zmq

from convoy.engine import ipc
from convoy.engine.repository import Model, ModelRepository, ModelVersion
from convoy.engine.service import InferenceService
from convoy.errors import EngineDead, Overloaded, Unsupported
from convoy.logs import configure_logging
from convoy.protos import model_config_pb2 as mc
from convoy.server.app import FrontEnds, load_keys
from convoy.types import Request

log = logging.getLogger("convoy.workers")

#: How often a worker checks that the engine (its parent) is still there.
ENGINE_CHECK_S = 0.2


class RemoteScheduler:
    """Stands where a model version's Scheduler stands in a single process: same verbs."""

    def __init__(self, client: EngineClient, model: str, version: int, available: bool) -> None:
        self.client = client
        self.model = model
        self.version = version
        self.available = available

    def submit(self, request: Request) -> None:
        if request.stream is not None:
            raise Unsupported(
                f"model '{self.model}' is decoupled: its streamed responses are not carried "
                "through --workers front ends yet; serve it without --workers"
            )
        self.client.submit(self.model, self.version, request)

    def cancel(self, request: Request) -> None:
        self.client.cancel(request)


class MirrorRepository:
    """The engine's models as the front ends read them, replaced whole on every catalog."""

    get = ModelRepository.get
    model = ModelRepository.model
    ready = ModelRepository.ready

    def __init__(self) -> None:
        self.models: dict[str, Model] = {}

    def apply(self, client: EngineClient, catalog: list) -> None:
        models = {}
        for name, state, reason, config, config_proto, versions in catalog:
            proto = None
            if config_proto is not None:
                proto = mc.ModelConfig()
                proto.ParseFromString(config_proto)
            model = Model(name=name, state=state, reason=reason, config=config, config_proto=proto)
            for number, v_state, v_reason, available in versions:
                model.versions[number] = ModelVersion(
                    config=config,
                    version=number,
                    state=v_state,
                    reason=v_reason,
                    scheduler=RemoteScheduler(client, name, number, available),
                )
            models[name] = model
        self.models = models


class RemoteInferenceService(InferenceService):
    """Answers from the mirror what it holds; asks the engine for what only it knows."""

    def __init__(self, repository: MirrorRepository, loop, client: EngineClient) -> None:
        super().__init__(repository, loop)  # type: ignore[arg-type]
        self.client = client

    async def model_statistics(self, name: str = "", version: str = "") -> dict:
        return await self.client.call("model_statistics", name, version)

    async def repository_index(self, ready_only: bool = False) -> list[dict]:
        return await self.client.call("repository_index", ready_only)

    async def load_model(self, name: str) -> None:
        await self.client.call("load_model", name)

    async def unload_model(self, name: str) -> None:
        await self.client.call("unload_model", name)


class ForwardingLogControl:
    """The LogSettings API in a worker: applied here, then by the engine and every other worker."""

    def __init__(self, local, client: EngineClient) -> None:
        self._local = local
        self._client = client

    def settings(self) -> dict[str, object]:
        return self._local.settings()

    def update(self, changes: dict[str, object]) -> dict[str, object]:
        current = self._local.update(changes)  # validates: a bad change raises before it spreads
        self._client.send(ipc.message(ipc.LOG, changes))
        return current

    def follow_format(self, handler: logging.Handler) -> None:
        self._local.follow_format(handler)


class EngineClient:
    """The worker's end of the IPC channel: requests in flight by call id, catalog updates."""

    def __init__(self, address: str, identity: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._context = zmq.Context()
        sock = ipc.new_socket(self._context, zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(address)
        self._channel = ipc.Channel(sock, self._on_message, loop)
        self._ids = itertools.count(1)
        # The engine answers by call id, so requests in flight are found by it (the one side
        # table a process boundary needs); `_call_of` finds the id again for a cancel.
        self.in_flight: dict[int, Request] = {}
        self._call_of: dict[Request, int] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self.repository = MirrorRepository()
        self.settings = None
        self.ports: tuple[int, int] = (0, 0)
        self.service: RemoteInferenceService | None = None
        self.log_control = None
        self._first_catalog: asyncio.Future = loop.create_future()

    async def hello(self, index: int) -> None:
        """Register with the engine and wait for the first catalog (settings, ports, models)."""
        self.send(ipc.message(ipc.HELLO, (index, os.getpid())))
        await self._first_catalog

    def send(self, frames: list) -> None:
        try:
            self._channel.send(frames)
        except zmq.Again:
            raise Overloaded("the engine process is not keeping up; retry later") from None

    # --- inference ---------------------------------------------------------------------------
    def submit(self, model: str, version: int, request: Request) -> None:
        call_id = next(self._ids)
        self.send(ipc.encode_infer(call_id, model, version, request))
        self.in_flight[call_id] = request
        self._call_of[request] = call_id

    def cancel(self, request: Request) -> None:
        call_id = self._call_of.get(request)
        if call_id is not None:
            with contextlib.suppress(Overloaded):
                self.send(ipc.message(ipc.CANCEL, call_id))

    def _finish(self, call_id: int) -> Request | None:
        request = self.in_flight.pop(call_id, None)
        if request is not None:
            del self._call_of[request]
        return request

    def fail_all(self, error: Exception) -> None:
        """The engine is gone: every request in flight gets `error`."""
        for call_id in list(self.in_flight):
            request = self._finish(call_id)
            if not request.future.done():
                request.future.set_exception(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()

    # --- control plane -------------------------------------------------------------------------
    async def call(self, method: str, *args):
        call_id = next(self._ids)
        future = self.loop.create_future()
        self._calls[call_id] = future
        try:
            self.send(ipc.message(ipc.CALL, (call_id, method, args)))
            return await future
        finally:
            self._calls.pop(call_id, None)

    # --- messages from the engine ---------------------------------------------------------------
    def _on_message(self, frames) -> None:
        kind, header, frames = ipc.parse(frames)
        if kind == ipc.RESULT:
            call_id, response = ipc.decode_result(header, frames)
            request = self._finish(call_id)
            if request is not None and not request.future.done():
                request.future.set_result(response)
        elif kind == ipc.ERROR:
            call_id, name, message, retry_after = header
            error = ipc.rebuild_error(name, message, retry_after)
            request = self._finish(call_id)
            if request is not None:
                if not request.future.done():
                    request.future.set_exception(error)
            else:
                future = self._calls.get(call_id)
                if future is not None and not future.done():
                    future.set_exception(error)
        elif kind == ipc.REPLY:
            call_id, value = header
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                future.set_result(value)
        elif kind == ipc.CATALOG:
            self._on_catalog(*header)
        elif kind == ipc.LOG and self.log_control is not None:
            self.log_control.update(header)

    def _on_catalog(self, sequence: int, catalog: list, settings, ports) -> None:
        self.repository.apply(self, catalog)
        if not self._first_catalog.done():
            self.settings, self.ports = settings, ports
            self._first_catalog.set_result(None)
        self.send(ipc.message(ipc.ACK, sequence))

    def close(self) -> None:
        self._channel.close()
        self._context.term()


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the engine dies (the engine is checked by polling
    too, which covers other systems and the moment before this call)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def serve(address: str, index: int, engine_pid: int) -> int:
    """Run one worker until SIGTERM (drain, exit 0) or until the engine is gone (exit 1)."""
    loop = asyncio.get_running_loop()
    client = EngineClient(address, f"w{index}-{os.getpid()}".encode(), loop)
    stopped = asyncio.Event()
    engine_gone = False

    def engine_alive() -> bool:
        return os.getppid() == engine_pid

    async def watch_engine() -> None:
        nonlocal engine_gone
        while engine_alive():
            await asyncio.sleep(ENGINE_CHECK_S)
        engine_gone = True
        stopped.set()

    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    # Ctrl-C reaches the whole process group: the engine decides when workers stop.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    watcher = loop.create_task(watch_engine())
    try:
        await asyncio.wait_for(client.hello(index), timeout=60)
    except (TimeoutError, EngineDead):
        log.error("worker %d: no answer from the engine", index)
        client.close()
        return 1
    settings = client.settings
    client.log_control = configure_logging(settings.log_level, settings.log_format)
    service = RemoteInferenceService(client.repository, loop, client)
    client.service = service
    deadline = time.monotonic()
    keys = load_keys(settings)  # each worker checks keys itself, and rereads the file itself
    if keys is not None:
        keys.enforce_quotas = False  # the engine counts them, across all workers
    keys_watch = None if keys is None else loop.create_task(keys.watch())
    if keys is not None:
        loop.add_signal_handler(signal.SIGHUP, keys.request_reload)
    front_ends = FrontEnds(
        service,
        settings,
        ForwardingLogControl(client.log_control, client),
        reuse_port=True,
        keys=keys,
        catalog=False,
    )
    try:
        await front_ends.start(*client.ports)
        client.send(ipc.message(ipc.UP, None))
        await stopped.wait()
        service.accepting = False
        deadline = time.monotonic() + settings.shutdown_grace
        while client.in_flight and time.monotonic() < deadline and engine_alive():
            await asyncio.sleep(0.01)
        if not engine_alive():
            engine_gone = True
            client.fail_all(EngineDead("the engine process is gone"))
            deadline = time.monotonic() + 1
    finally:
        await front_ends.stop(deadline)
        front_ends.close()
        watcher.cancel()
        if keys_watch is not None:
            keys_watch.cancel()
        client.close()
    if engine_gone:
        log.error("worker %d: the engine process is gone; exiting", index)
        # The engine could not remove its socket's private directory: the last one out does.
        shutil.rmtree(os.path.dirname(address.removeprefix("ipc://")), ignore_errors=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convoy-worker")
    parser.add_argument("--ipc", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--engine-pid", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    if os.getppid() != args.engine_pid:
        sys.exit(1)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        code = runner.run(serve(args.ipc, args.index, args.engine_pid))
    sys.exit(code)


if __name__ == "__main__":
    main()
