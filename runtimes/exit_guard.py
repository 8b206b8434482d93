"""Model code that shares the server's process cannot end it.

Triton runs every python-backend instance in a stub process of its own, so a model that calls
`os._exit()` or sends itself SIGKILL takes down only that instance. Convoy's instances share the
server's process unless `isolation: process`; there, the ways Python code ends a process are
turned into an exception, `ModelExitRefused`, raised in the calling thread: `os._exit`,
`os.abort`, and a fatal signal the process sends itself (`os.kill` / `os.killpg` of its own pid
or group, `signal.raise_signal`, `signal.pthread_kill`). The python backend fails the batch with
it and restarts only that instance (convoy.errors.InstanceExited); `sys.exit()` in model code is
treated the same way. It costs nothing per request: only those calls go through the guard.

Not covered, and the reason process isolation exists: native code that exits or crashes the
process (a C extension calling exit() or abort(), a segfault, ctypes).

A process forked from the server (multiprocessing's fork start method, subprocess) is not the
server: the guard passes its calls through. Convoy's own code never ends the server this way.
"""

from __future__ import annotations

import os
import signal
import threading

#: Signals whose delivery ends (or stops) the process, whatever handler Convoy set.
FATAL_SIGNALS = frozenset(
    getattr(signal, name)
    for name in (
        "SIGKILL",
        "SIGSTOP",
        "SIGTERM",
        "SIGINT",
        "SIGQUIT",
        "SIGABRT",
        "SIGSEGV",
        "SIGBUS",
        "SIGILL",
        "SIGFPE",
        "SIGHUP",
    )
    if hasattr(signal, name)
)


class ModelExitRefused(BaseException):
    """Model code tried to end the server's process (a BaseException, like SystemExit, so that
    `except Exception` in the model does not swallow it)."""


_lock = threading.Lock()
_server_pid = 0
_originals: dict[str, object] = {}


def install() -> None:
    """Guard this process (idempotent; the server's process, never an isolated worker)."""
    global _server_pid
    with _lock:
        if _originals:
            return
        _server_pid = os.getpid()
        _originals.update(
            _exit=os._exit,
            abort=os.abort,
            kill=os.kill,
            killpg=os.killpg,
            raise_signal=signal.raise_signal,
            pthread_kill=signal.pthread_kill,
        )
        os._exit = _exit
        os.abort = _abort
        os.kill = _kill
        os.killpg = _killpg
        signal.raise_signal = _raise_signal
        signal.pthread_kill = _pthread_kill


def _guarded() -> bool:
    return os.getpid() == _server_pid


def _name(sig) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _exit(code):
    if _guarded():
        raise ModelExitRefused(f"os._exit({code!r})")
    _originals["_exit"](code)


def _abort():
    if _guarded():
        raise ModelExitRefused("os.abort()")
    _originals["abort"]()


def _kill(pid, sig):
    if _guarded() and sig in FATAL_SIGNALS and pid in (_server_pid, 0, -1, -os.getpgrp()):
        raise ModelExitRefused(f"os.kill({pid}, {_name(sig)}) (the server's own process)")
    _originals["kill"](pid, sig)


def _killpg(pgid, sig):
    if _guarded() and sig in FATAL_SIGNALS and pgid in (0, os.getpgrp()):
        raise ModelExitRefused(f"os.killpg({pgid}, {_name(sig)}) (the server's process group)")
    _originals["killpg"](pgid, sig)


def _raise_signal(sig):
    if _guarded() and sig in FATAL_SIGNALS:
        raise ModelExitRefused(f"signal.raise_signal({_name(sig)})")
    _originals["raise_signal"](sig)


def _pthread_kill(thread_id, sig):
    if _guarded() and sig in FATAL_SIGNALS:
        raise ModelExitRefused(f"signal.pthread_kill({thread_id}, {_name(sig)})")
    _originals["pthread_kill"](thread_id, sig)
