"""Process isolation: a runtime whose model code executes in a worker process of its own.

Chosen per model with `parameters { key: "isolation" value { string_value: "process" } }` (or
the server's `--isolation process`). The server keeps an `IsolatedRuntime` per instance; its
worker (`python -m convoy.runtimes.isolated`) loads the real backend and executes batches. A
worker that crashes (segfault, os._exit, OOM kill) fails only the batch it was executing: the
instance raises InstanceLost, which the scheduler answers by starting a fresh worker.

The channel is a private Unix socket pair speaking convoy/wire.py, the format of every process
boundary in Convoy: typed messages (Load, Execute, Close; Done, Failed) and the tensors' raw
bytes; BYTES tensors travel length-prefixed as on the V2 wire. Nothing is pickled.

The worker exits when the server does, however it ends: it reads EOF when the server's end
of the socket closes, and it asks the kernel for SIGKILL when its parent dies (prctl) in case
it is busy in a batch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading

import msgspec
import numpy as np

from convoy.config import ModelVersionSource
from convoy.errors import ConvoyError, InferenceFailed, InstanceLost, ModelLoadFailed
from convoy.wire import (
    ErrorInfo,
    FrameWriter,
    TensorMeta,
    error_info,
    read_tensors,
    rebuild_error,
    receive_frame,
    send_frame,
)

log = logging.getLogger("convoy.runtimes.isolated")

#: Seconds a worker gets to finish `close` (the model's finalize) before it is killed.
CLOSE_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


class WorkerGone(Exception):
    """The other end of the channel closed (the worker exited, or the server did)."""


# --- the channel ---------------------------------------------------------------------------------
class Load(msgspec.Struct, tag="load", array_like=True):
    backend: str
    source: ModelVersionSource
    instance_index: int


class Execute(msgspec.Struct, tag="execute", array_like=True):
    inputs: list[TensorMeta]


class Close(msgspec.Struct, tag="close", array_like=True):
    pass


class Done(msgspec.Struct, tag="done", array_like=True):
    outputs: list[TensorMeta] = []


class Failed(msgspec.Struct, tag="failed", array_like=True):
    error: ErrorInfo
    #: The exception's class name (for a message about errors that are not Convoy's own).
    type_name: str
    #: The backend judged the worker unusable after it: the server starts another.
    fatal: bool = False


ToWorker = Load | Execute | Close
FromWorker = Done | Failed


def _send(sock: socket.socket, message) -> None:
    writer = FrameWriter()
    writer.add(message)
    send_frame(sock, writer)


def _send_tensors(sock: socket.socket, kind, tensors: dict[str, np.ndarray]) -> None:
    """One frame: a `kind` message (Execute, Done) and its tensors' bytes, sent from the
    arrays' own memory."""
    writer = FrameWriter()
    writer.add(kind(writer.tensors(tensors)))
    send_frame(sock, writer)


def _receive(reader, kind) -> tuple[object, dict[str, np.ndarray]]:
    """(message, tensors): tensors view one received buffer (the copy out of the socket is the
    only one)."""
    try:
        messages, data = receive_frame(reader, kind)
    except EOFError:
        raise WorkerGone("channel closed") from None
    message = messages[0]
    metas = getattr(message, "inputs", None) or getattr(message, "outputs", None) or []
    return message, read_tensors(metas, data)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "closed its channel"
    if code < 0:
        try:
            return f"exited with signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exited with signal {-code}"
    return f"exited with code {code}"


# --- the server's side ---------------------------------------------------------------------------
class IsolatedRuntime:
    """A runtime that forwards load / infer / close to `backend` running in a worker process.

    Called on its instance's thread, like any runtime; `kill` may come from any thread.
    """

    isolated = True

    def __init__(self, backend: str, source: ModelVersionSource, instance_index: int) -> None:
        self._backend = backend
        self._source = source
        self._instance_index = instance_index
        self._name = source.config.name
        self._process: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._reader = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def load(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "convoy.runtimes.isolated",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._sock = ours
        self._reader = ours.makefile("rb")
        try:
            _send(self._sock, Load(self._backend, self._source, self._instance_index))
            answer, _ = _receive(self._reader, FromWorker)
        except (WorkerGone, OSError):
            code = self._reap()
            raise ModelLoadFailed(
                f"model '{self._name}' worker {_describe_exit(code)} while loading"
            ) from None
        if isinstance(answer, Failed):
            self._reap()
            raise ModelLoadFailed(answer.error.message)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._process.poll() is not None:
            self._restart_idle()
        try:
            _send_tensors(self._sock, Execute, inputs)
            answer, outputs = _receive(self._reader, FromWorker)
        except (WorkerGone, OSError):
            code = self._reap()
            raise InstanceLost(
                f"model '{self._name}' worker {_describe_exit(code)} while executing; restarting"
            ) from None
        if isinstance(answer, Failed):
            raise _error_from(answer, self._name)
        return outputs

    def _restart_idle(self) -> None:
        """The worker died between batches (the OOM killer picks big idle processes too): start
        a fresh one for this batch, which has not run anywhere yet, instead of failing it."""
        code = self._reap()
        log.warning(
            "model '%s' instance %d: worker %s while idle; starting a fresh one",
            self._name,
            self._instance_index,
            _describe_exit(code),
        )
        try:
            self.load()
        except ModelLoadFailed as exc:
            raise InstanceLost(
                f"model '{self._name}' worker {_describe_exit(code)} while idle and could not "
                f"be restarted: {exc}"
            ) from None

    def is_fatal(self, error: BaseException) -> bool:
        # The worker already applied its backend's own hook; InstanceLost carries the verdict.
        return isinstance(error, InstanceLost)

    def close(self) -> None:
        if self._process is None:
            return
        try:
            _send(self._sock, Close())
            _receive(self._reader, FromWorker)
        except (WorkerGone, OSError):
            pass  # already gone: nothing to finalize
        self._reap(CLOSE_TIMEOUT_S)

    def kill(self) -> None:
        """End the worker now (a hung batch): the thread waiting on it sees the channel close."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    def _reap(self, timeout: float = 5.0) -> int | None:
        """Close our end, wait for the worker (killed after `timeout`); its exit code."""
        with self._lock:
            process, self._process = self._process, None
            if self._sock is not None:
                self._reader.close()
                self._sock.close()
                self._sock = self._reader = None
        if process is None:
            return None
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def _error_from(failed: Failed, model: str) -> ConvoyError:
    """The exception the server raises for an error the worker reported."""
    message = failed.error.message
    if failed.fatal:
        return InstanceLost(
            f"model '{model}' hit a fatal error ({failed.type_name}: {message}); restarting its worker"
        )
    if failed.error.kind:
        rebuilt = rebuild_error(failed.error)
        if isinstance(rebuilt, ConvoyError):
            return rebuilt
    return InferenceFailed(f"model '{model}' failed to execute the batch: {failed.type_name}: {message}")


def isolated_factory(backend: str):
    """A RuntimeFactory making IsolatedRuntimes of `backend`."""

    def factory(source: ModelVersionSource, instance_index: int) -> IsolatedRuntime:
        return IsolatedRuntime(backend, source, instance_index)

    return factory


# --- the worker's side ---------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: EOF on the channel still ends an idle worker
    if os.getppid() != parent_pid:
        os._exit(0)  # the server died before the request above took effect


def _failed(exc: BaseException, fatal: bool) -> Failed:
    """The worker's report of an exception: its kind when it is Convoy's own, and its text
    either way (model errors are the model owner's to read, as in a single process)."""
    kind = error_info(exc).kind
    return Failed(ErrorInfo(kind, str(exc)), type(exc).__name__, fatal)


def serve(sock: socket.socket) -> int:
    """The worker loop: load, then execute batches until `close` or EOF."""
    from convoy.runtimes.base import is_fatal, runtime_factory

    reader = sock.makefile("rb")
    try:
        load, _ = _receive(reader, ToWorker)
    except WorkerGone:
        return 0
    source = load.source
    try:
        runtime = runtime_factory(load.backend)(source, load.instance_index)
        runtime.load()
    except Exception as exc:
        if not isinstance(exc, ConvoyError):
            log.exception("model '%s' worker failed to load", source.config.name)
            exc = ModelLoadFailed(f"model '{source.config.name}': {type(exc).__name__}: {exc}")
        _send(sock, _failed(exc, False))
        return 1
    _send(sock, Done())
    while True:
        try:
            message, inputs = _receive(reader, ToWorker)
        except WorkerGone:
            return 0
        if isinstance(message, Close):
            try:
                runtime.close()
            finally:
                _send(sock, Done())
            return 0
        try:
            outputs = runtime.infer(inputs)
        except Exception as exc:
            fatal = is_fatal(runtime, exc)
            if not isinstance(exc, ConvoyError) or fatal:
                log.error("model '%s' failed a batch", source.config.name, exc_info=exc)
            _send(sock, _failed(exc, fatal))
            if fatal:
                return 1  # this process cannot be trusted any more; the server starts another
            continue
        _send_tensors(sock, Done, outputs)


def main(argv: list[str]) -> int:
    fd, parent_pid = int(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
    # SIGINT goes to the whole process group on Ctrl-C: the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The server's standard output is for its own lines; what a model prints goes to stderr.
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s [worker] %(message)s")
    with socket.socket(fileno=fd) as sock:
        return serve(sock)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
