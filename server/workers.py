"""A --workers front-end process: the gRPC and HTTP front ends over a `RemoteEngine`.

Started by the engine process (server/multiprocess.py) with its end of a socket pair; serves
until SIGTERM (drains, exits 0) or until the engine's end of the socket closes (exits 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time

from convoy.auth import load_keys
from convoy.engine.client import ShutdownPhase
from convoy.engine.remote.client import RemoteEngine, wait_drained
from convoy.errors import EngineDead
from convoy.logs import configure_logging

from .app import FrontEnds

log = logging.getLogger("convoy.workers")


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the engine dies (its socket closing covers other
    systems, and the moment before this call)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def serve(fd: int, index: int) -> int:
    """Run one front end until SIGTERM (drain, exit 0) or until the engine is gone (exit 1)."""
    loop = asyncio.get_running_loop()
    engine = RemoteEngine()
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    # Ctrl-C reaches the whole process group: the engine decides when front ends stop.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    sock = socket.socket(fileno=fd)
    try:
        await engine.connect(sock)
    except (TimeoutError, EngineDead):
        log.error("worker %d: no answer from the engine", index)
        engine.close()
        return 1
    settings = engine.settings
    engine.log_control = configure_logging(settings.log_level, settings.log_format)
    keys = load_keys(settings)  # each front end checks keys itself; the engine counts quotas
    keys_watch = None if keys is None else loop.create_task(keys.watch())
    if keys is not None:
        loop.add_signal_handler(signal.SIGHUP, keys.request_reload)
    front_ends = FrontEnds(engine, settings, engine.log_control, reuse_port=True, keys=keys)
    lost = loop.create_task(engine.lost.wait())
    stop = loop.create_task(stopped.wait())
    deadline = time.monotonic()
    try:
        await front_ends.start(*engine.ports)
        engine.serving()
        await asyncio.wait({lost, stop}, return_when=asyncio.FIRST_COMPLETED)
        # Unready at once; requests still arriving on open connections are served while the
        # front ends stop (FrontEnds.stop), then the rest are refused.
        engine.enter(ShutdownPhase.DRAINING)
        deadline = time.monotonic() + settings.shutdown_grace
        if engine.lost.is_set():
            deadline = time.monotonic() + 1
    finally:
        await front_ends.stop(deadline)
        engine.enter(ShutdownPhase.STOPPING)
        await wait_drained(engine, deadline)
        front_ends.close()
        for task in (lost, stop, keys_watch):
            if task is not None:
                task.cancel()
        engine.close()
    if engine.lost.is_set() and not stopped.is_set():
        log.error("worker %d: the engine process is gone; exiting", index)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convoy-worker")
    parser.add_argument("--fd", type=int, required=True)
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
        code = runner.run(serve(args.fd, args.index))
    sys.exit(code)


if __name__ == "__main__":
    main()
