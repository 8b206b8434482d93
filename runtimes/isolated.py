"""Process isolation: a runtime whose model code executes in a worker process of its own.

Chosen per model with `parameters { key: "isolation" value { string_value: "process" } }` (or
the server's `--isolation process`). The server keeps an `IsolatedRuntime` per instance; its
worker (`python -m convoy.runtimes.isolated`) loads the real backend and executes batches. A
worker that crashes (segfault, os._exit, OOM kill) fails only the batch it was executing: the
instance raises InstanceLost, which the scheduler answers by starting a fresh worker.

The channel is a private Unix socket pair carrying convoy/wire.py frames, as every process
boundary in Convoy does: a msgpack message (what is asked or answered; the model's typed config
when it loads) and the tensors' raw bytes; BYTES tensors travel length-prefixed as on the V2
wire. Nothing is pickled.

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
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import msgspec
import numpy as np

from convoy import errors, wire
from convoy.config import ModelVersionSource
from convoy.errors import (
    ConvoyError,
    DeadlineExceeded,
    InferenceFailed,
    InstanceLost,
    ModelLoadFailed,
    Unavailable,
    Unsupported,
)
from convoy.runtimes.base import Capabilities, RuntimeBase
from convoy.types import RESCHEDULED, DetachedFuture, ModelCall, Response
from convoy.wire import FrameWriter, TensorMeta, read_tensors, receive_frame, send_frame

log = logging.getLogger("convoy.runtimes.isolated")

#: Seconds a worker gets to finish `close` (the model's finalize) before it is killed.
CLOSE_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def _same_row_shapes(batch: list) -> list[list[int]]:
    """Indices of the batch's requests grouped by their inputs' per-row shapes, in order."""
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(batch):
        key = tuple((name, array.shape[1:]) for name, array in request.inputs.items())
        groups.setdefault(key, []).append(index)
    return list(groups.values())


class WorkerGone(Exception):
    """The other end of the channel closed (the worker exited, or the server did)."""


# --- the channel ---------------------------------------------------------------------------------
class _Setup(msgspec.Struct, array_like=True):
    """What the worker loads: the backend, the model version (its typed config) and which
    instance it is."""

    backend: str
    source: ModelVersionSource
    instance_index: int


class ChannelMessage(msgspec.Struct, array_like=True):
    """One message on a worker's channel: what it asks or answers (`op`, outcomes, request
    metadata, metrics) and the tensors it carries, in convoy/wire.py frames like every other
    process boundary."""

    header: dict[str, Any]
    tensors: list[TensorMeta] = []


def _send(sock: socket.socket, header: dict, tensors: dict[str, np.ndarray] | None = None) -> None:
    """One frame: the header and the tensors' bytes (sent from the arrays' own memory)."""
    writer = FrameWriter()
    metas = writer.tensors({n: np.asarray(a) for n, a in tensors.items()}) if tensors else []
    writer.add(ChannelMessage(header, metas))
    send_frame(sock, writer)


def _receive(reader) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, tensors): tensors view one received buffer (the copy out of the socket is the
    only one)."""
    try:
        messages, data = receive_frame(reader, ChannelMessage)
    except EOFError:
        raise WorkerGone("channel closed") from None
    message = messages[0]
    return message.header, read_tensors(message.tensors, data)


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
class IsolatedRuntime(RuntimeBase):
    """A runtime that forwards load / infer / close to `backend` running in a worker process.

    Called on its instance's thread, like any runtime; `kill` may come from any thread.
    """

    capabilities = Capabilities(isolated=True)

    def __init__(self, backend: str, source: ModelVersionSource, instance_index: int) -> None:
        self._backend = backend
        self._source = source
        self._instance_index = instance_index
        self._name = source.config.name
        self._process: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._reader = None
        self._lock = threading.Lock()
        self._services = None

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
                # A process group of its own: a model that signals its group (os.killpg) ends
                # its worker, not the server (it dies with the server through PDEATHSIG).
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._sock = ours
        self._reader = ours.makefile("rb")
        setup = wire.encode(_Setup(self._backend, self._source, self._instance_index))
        try:
            _send(self._sock, {"op": "load", "setup": setup})
            header, _ = self._reply()  # BLS calls from the model's initialize are served
        except (WorkerGone, OSError):
            code = self._reap()
            raise ModelLoadFailed(
                f"model '{self._name}' worker {_describe_exit(code)} while loading"
            ) from None
        if "error" in header:
            self._reap()
            raise ModelLoadFailed(header["error"]["message"])
        #: The backend executes per request (a Triton python model): see `infer_requests`.
        self.executes_requests = bool(header.get("executes_requests", False))

    def infer_requests(self, batch: list, loop) -> list:
        """A per-request runtime's batch: the requests' inputs go as one merged buffer with
        each request's rows and metadata; the worker hands the model views of its rows."""
        groups = _same_row_shapes(batch)
        if len(groups) > 1:
            # A ragged batch (allow_ragged_batch): requests whose rows differ in shape cannot
            # share one buffer, so each group of equal shapes goes as a message of its own.
            results: list = [None] * len(batch)
            for indices in groups:
                part = self.infer_requests([batch[i] for i in indices], loop)
                for index, result in zip(indices, part, strict=True):
                    results[index] = result
            return results
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            # The one copy on the way in: the requests' inputs into one message buffer.
            inputs = {n: np.concatenate([r.inputs[n] for r in batch]) for n in batch[0].inputs}
        meta = [
            [r.id, r.rows, list(r.requested_outputs), r.parameters, r.timeout_us, r.bls_call]
            for r in batch
        ]
        if self._process.poll() is not None:
            self._restart_idle()
        try:
            _send(self._sock, {"op": "requests", "requests": meta}, inputs)
            header, tensors = self._reply()
        except (WorkerGone, OSError):
            code = self._reap()
            raise InstanceLost(
                f"model '{self._name}' worker {_describe_exit(code)} while executing; restarting"
            ) from None
        if "error" in header:
            raise _error_from(header["error"], self._name)
        results: list = []
        for index, result in enumerate(header["results"]):
            if result.get("rescheduled"):
                results.append(RESCHEDULED)
                continue
            if "error" in result:
                results.append(_error_from(result["error"], self._name))
                continue
            outputs = {name: tensors[f"{index}/{name}"] for name in result["outputs"]}
            if result.get("parameters"):
                outputs = _WithParameters(outputs, result["parameters"])
            results.append(outputs)
        return results

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._process.poll() is not None:
            self._restart_idle()
        try:
            _send(self._sock, {"op": "infer"}, inputs)
            header, outputs = self._reply()
        except (WorkerGone, OSError):
            code = self._reap()
            raise InstanceLost(
                f"model '{self._name}' worker {_describe_exit(code)} while executing; restarting"
            ) from None
        if "error" in header:
            raise _error_from(header["error"], self._name)
        return outputs

    def bind_services(self, services) -> None:
        """The server's services: BLS calls the worker's model code makes come through here."""
        self._services = services

    def _reply(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The worker's answer to the batch; BLS calls it makes meanwhile are served first."""
        while True:
            header, tensors = _receive(self._reader)
            if header.get("op") != "bls":
                metrics = header.get("metrics")
                if metrics is not None and self._services is not None:
                    source = f"{self._name}-{self._source.version}-{self._instance_index}"
                    self._services.metrics.apply_snapshot(source, metrics)
                return header, tensors
            self._serve_bls(header, tensors)

    def _serve_bls(self, header: dict, inputs: dict[str, np.ndarray]) -> None:
        """Run a BLS call for the worker (on this instance's thread, which waits anyway)."""
        services = self._services
        requested = tuple(header["requested"])
        call = ModelCall(
            model_name=header["model"],
            inputs=inputs,
            requested_outputs=requested,
            model_version=header["version"],
            request_id=header["id"],
            parameters=header["parameters"],
            timeout_us=header["timeout_us"],
            waiter=header["waiter"],
            serving=tuple(header["serving"]),
        )
        future: Future = Future()
        cancel = None
        try:
            if services is None or services.caller is None:
                raise Unavailable("BLS calls are not available to this model")
            cancel = services.caller.submit_threadsafe(call, future)
            response = future.result(call.timeout_us / 1e6 if call.timeout_us else None)
        except FutureTimeout:
            if cancel is not None:
                cancel()
            error = DeadlineExceeded(f"BLS request to '{call.model_name}' timed out")
            _send(self._sock, _error_header(error, False))
            return
        except ConvoyError as exc:
            _send(self._sock, _error_header(exc, False))
            return
        outputs = response.outputs
        if requested:
            outputs = {n: outputs[n] for n in requested if n in outputs}
        _send(self._sock, {"ok": True, "parameters": response.parameters}, outputs)

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
            _send(self._sock, {"op": "close"})
            _receive(self._reader)
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


def _error_from(error: dict, model: str) -> ConvoyError:
    """The exception the server raises for an error the worker reported."""
    if error.get("fatal"):
        return InstanceLost(
            f"model '{model}' hit a fatal error ({error['type']}: {error['message']}); "
            "restarting its worker"
        )
    cls = getattr(errors, error["type"], None)
    if isinstance(cls, type) and issubclass(cls, ConvoyError):
        return cls(error["message"])
    return InferenceFailed(
        f"model '{model}' failed to execute the batch: {error['type']}: {error['message']}"
    )


class _WithParameters(dict):
    """A request's outputs that also carry the model's response parameters."""

    __slots__ = ("parameters",)

    def __init__(self, outputs: dict, parameters: dict) -> None:
        super().__init__(outputs)
        self.parameters = parameters


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


def _error_header(exc: BaseException, fatal: bool) -> dict:
    return {"error": {"type": type(exc).__name__, "message": str(exc), "fatal": fatal}}


def serve(sock: socket.socket) -> int:
    """The worker loop: load, then execute batches until `close` or EOF."""
    from convoy.runtimes.base import is_fatal, runtime_factory

    reader = sock.makefile("rb")
    metrics = None  # the model's custom metrics, reported with every answer once it has any
    try:
        header, _ = _receive(reader)
    except WorkerGone:
        return 0
    setup = wire.decode(header["setup"], _Setup)
    backend, source, index = setup.backend, setup.source, setup.instance_index
    try:
        runtime = runtime_factory(backend)(source, index)
        # BLS calls go over the channel; custom metrics travel with every answer.
        from convoy.runtimes.custom_metrics import CustomMetrics
        from convoy.types import ModelServices

        caller = _ChannelCaller(sock, reader)
        metrics = CustomMetrics()
        runtime.bind_services(
            ModelServices(caller=caller, loop=None, loop_thread_id=0, metrics=metrics, isolated=True)
        )
        runtime.load()
    except Exception as exc:
        if not isinstance(exc, ConvoyError):
            log.exception("model '%s' worker failed to load", source.config.name)
            exc = ModelLoadFailed(f"model '{source.config.name}': {type(exc).__name__}: {exc}")
        _send(sock, _error_header(exc, False))
        return 1
    _send(sock, {"ok": True, "executes_requests": runtime.executes_requests})
    while True:
        try:
            header, inputs = _receive(reader)
        except WorkerGone:
            return 0
        if header["op"] == "close":
            try:
                runtime.close()
            finally:
                _send(sock, {"ok": True})
            return 0
        if header["op"] == "requests":
            try:
                header, outputs = _execute_requests(runtime, source, header["requests"], inputs)
            except Exception as exc:
                fatal = is_fatal(runtime, exc)
                if not isinstance(exc, ConvoyError) or fatal:
                    log.error("model '%s' failed a batch", source.config.name, exc_info=exc)
                _send(sock, _error_header(exc, fatal))
                if fatal:
                    return 1
                continue
            _send(sock, _with_metrics(header, metrics), outputs)
            continue
        try:
            outputs = runtime.infer(inputs)
        except Exception as exc:
            fatal = is_fatal(runtime, exc)
            if not isinstance(exc, ConvoyError) or fatal:
                log.error("model '%s' failed a batch", source.config.name, exc_info=exc)
            _send(sock, _error_header(exc, fatal))
            if fatal:
                return 1  # this process cannot be trusted any more; the server starts another
            continue
        _send(sock, _with_metrics({"ok": True}, metrics), outputs)


class _ChannelCaller:
    """The worker's ModelCaller: BLS calls travel to the server over the worker's channel while
    the server waits for the batch (so only from code running inside execute / initialize)."""

    def __init__(self, sock: socket.socket, reader) -> None:
        self._sock = sock
        self._reader = reader
        self._lock = threading.Lock()

    def call(self, call: ModelCall) -> Response:
        header = {
            "op": "bls",
            "model": call.model_name,
            "version": call.model_version,
            "requested": list(call.requested_outputs),
            "parameters": call.parameters,
            "timeout_us": call.timeout_us,
            "waiter": call.waiter,
            "serving": list(call.serving),
            "id": call.request_id,
        }
        with self._lock:
            _send(self._sock, header, call.inputs)
            reply, outputs = _receive(self._reader)
        if "error" in reply:
            raise _error_from(reply["error"], call.model_name)
        version = call.model_version or ""
        return Response(outputs, call.model_name, version, None, reply.get("parameters"))

    def submit_threadsafe(self, call: ModelCall, future) -> Callable[[], None]:
        try:
            future.set_result(self.call(call))
        except ConvoyError as exc:
            future.set_exception(exc)
        return lambda: None

    async def infer(self, call: ModelCall) -> Response:
        # The worker's event loop (async execute) is the channel's only user meanwhile.
        return self.call(call)

    def stream_threadsafe(self, call: ModelCall, sink, future) -> Callable[[], None]:
        raise Unsupported(
            "decoupled BLS calls (exec(decoupled=True)) are not available to a model in an "
            "isolated worker process"
        )


def _with_metrics(header: dict, metrics) -> dict:
    """The reply header, with the worker's custom metric families when the model defined any
    (the server sums them with its own and the other workers' on /metrics)."""
    if metrics is not None and metrics.families:
        header["metrics"] = metrics.snapshot()
    return header


def _execute_requests(runtime, source, meta: list, inputs: dict) -> tuple[dict, dict]:
    """Run a per-request batch: each request sees views of its rows of the merged inputs."""
    from convoy.types import Request

    batched = source.config.max_batch_size > 0
    requests = []
    start = 0
    for request_id, rows, requested, parameters, timeout_us, bls_call in meta:
        end = start + rows
        own = {n: a[start:end] for n, a in inputs.items()} if batched else inputs
        start = end
        requests.append(
            Request(
                request_id,
                own,
                tuple(requested),
                rows,
                DetachedFuture(),
                timeout_us=timeout_us,
                parameters=parameters,
                bls_call=bls_call,
            )
        )
    results = runtime.infer_requests(requests, None)
    described = []
    tensors = {}
    for index, result in enumerate(results):
        if isinstance(result, BaseException):
            described.append(_error_header(result, False))
            continue
        if result is RESCHEDULED:
            described.append({"rescheduled": True})
            continue
        for name, array in result.items():
            tensors[f"{index}/{name}"] = array
        described.append({"outputs": list(result), "parameters": getattr(result, "parameters", None)})
    return {"ok": True, "results": described}, tensors


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
