"""Process isolation: a runtime whose model code executes in a worker process of its own.

Chosen per model with `parameters { key: "isolation" value { string_value: "process" } }` (or
the server's `--isolation process`). The server keeps an `IsolatedRuntime` per instance; its
worker (`python -m convoy.runtimes.isolated`) loads the real backend and executes batches. A
worker that crashes (segfault, os._exit, OOM kill) fails only the batch it was executing: the
instance raises InstanceLost, which the scheduler answers by starting a fresh worker.

The channel is a private Unix socket pair carrying convoy/wire.py frames, as every process
boundary in Convoy does: the typed messages of runtimes/isolated_messages.py (what is asked or
answered; the model's typed config when it loads; failures with their kind) and the tensors' raw
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
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from convoy import errors
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
from convoy.runtimes.isolated_messages import (
    BlsAnswer,
    BlsCall,
    Close,
    Closed,
    Execute,
    ExecuteRequests,
    FromWorker,
    Load,
    Loaded,
    Outputs,
    RequestInfo,
    RequestResult,
    RequestResults,
    ToWorker,
    WorkerFailure,
)
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
def _put(writer: FrameWriter, tensors: dict | None) -> list[TensorMeta]:
    """Queue the tensors' bytes in the frame (sent from the arrays' own memory); their metas."""
    return writer.tensors({n: np.asarray(a) for n, a in tensors.items()}) if tensors else []


def _send(sock: socket.socket, message, writer: FrameWriter | None = None) -> None:
    """One frame: the message, and the tensors queued in `writer` for it."""
    if writer is None:  # (an empty writer is falsy)
        writer = FrameWriter()
    writer.add(message)
    send_frame(sock, writer)


def _receive(reader, kind) -> tuple:
    """(message, data): one message of `kind` (a Union) and its frame's data, which the
    message's tensors view (the copy out of the socket is the only one)."""
    try:
        messages, data = receive_frame(reader, kind)
    except EOFError:
        raise WorkerGone("channel closed") from None
    return messages[0], data


def _failure(exc: BaseException, fatal: bool = False) -> WorkerFailure:
    return WorkerFailure(kind=type(exc).__name__, message=str(exc), fatal=fatal)


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
        load = Load(backend=self._backend, source=self._source, instance_index=self._instance_index)
        try:
            _send(self._sock, load)
            reply, _ = self._reply()  # BLS calls from the model's initialize are served
        except (WorkerGone, OSError):
            code = self._reap()
            raise ModelLoadFailed(
                f"model '{self._name}' worker {_describe_exit(code)} while loading"
            ) from None
        if isinstance(reply, WorkerFailure):
            self._reap()
            raise ModelLoadFailed(reply.message)
        #: The backend executes per request (a Triton python model): see `infer_requests`.
        self.executes_requests = isinstance(reply, Loaded) and reply.executes_requests

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
        requests = [
            RequestInfo(
                id=r.id,
                rows=r.rows,
                requested=r.requested_outputs,
                parameters=r.parameters,
                timeout_us=r.timeout_us,
                bls_call=r.bls_call,
            )
            for r in batch
        ]
        if self._process.poll() is not None:
            self._restart_idle()
        try:
            writer = FrameWriter()
            _send(self._sock, ExecuteRequests(requests=requests, inputs=_put(writer, inputs)), writer)
            reply, data = self._reply()
        except (WorkerGone, OSError):
            code = self._reap()
            raise InstanceLost(
                f"model '{self._name}' worker {_describe_exit(code)} while executing; restarting"
            ) from None
        if isinstance(reply, WorkerFailure):
            raise _error_from(reply, self._name)
        results: list = []
        for result in reply.results:
            if result.rescheduled:
                results.append(RESCHEDULED)
                continue
            if result.error is not None:
                results.append(_error_from(result.error, self._name))
                continue
            outputs = read_tensors(result.outputs, data)
            if result.parameters:
                outputs = _WithParameters(outputs, result.parameters)
            results.append(outputs)
        return results

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._process.poll() is not None:
            self._restart_idle()
        try:
            writer = FrameWriter()
            _send(self._sock, Execute(inputs=_put(writer, inputs)), writer)
            reply, data = self._reply()
        except (WorkerGone, OSError):
            code = self._reap()
            raise InstanceLost(
                f"model '{self._name}' worker {_describe_exit(code)} while executing; restarting"
            ) from None
        if isinstance(reply, WorkerFailure):
            raise _error_from(reply, self._name)
        return read_tensors(reply.outputs, data)

    def bind_services(self, services) -> None:
        """The server's services: BLS calls the worker's model code makes come through here."""
        self._services = services

    def _reply(self) -> tuple:
        """(message, data): the worker's answer to what was asked; BLS calls it makes
        meanwhile are served first."""
        while True:
            message, data = _receive(self._reader, FromWorker)
            kind = type(message)
            if kind is not BlsCall:
                metrics = message.metrics if kind is Outputs or kind is RequestResults else None
                if metrics is not None and self._services is not None:
                    source = f"{self._name}-{self._source.version}-{self._instance_index}"
                    self._services.metrics.apply_snapshot(source, metrics)
                return message, data
            self._serve_bls(message, read_tensors(message.inputs, data))

    def _serve_bls(self, message: BlsCall, inputs: dict[str, np.ndarray]) -> None:
        """Run a BLS call for the worker (on this instance's thread, which waits anyway)."""
        services = self._services
        requested = message.requested
        call = ModelCall(
            model_name=message.model,
            inputs=inputs,
            requested_outputs=requested,
            model_version=message.version,
            request_id=message.id,
            parameters=message.parameters,
            timeout_us=message.timeout_us,
            waiter=message.waiter,
            serving=message.serving,
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
            _send(self._sock, _failure(error))
            return
        except ConvoyError as exc:
            _send(self._sock, _failure(exc))
            return
        outputs = response.outputs
        if requested:
            outputs = {n: outputs[n] for n in requested if n in outputs}
        writer = FrameWriter()
        answer = BlsAnswer(outputs=_put(writer, outputs), parameters=response.parameters)
        _send(self._sock, answer, writer)

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
            _receive(self._reader, FromWorker)  # Closed: the model is finalized
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


def _error_from(failure: WorkerFailure, model: str) -> ConvoyError:
    """The exception raised for a failure the other side of the channel reported."""
    if failure.fatal:
        return InstanceLost(
            f"model '{model}' hit a fatal error ({failure.kind}: {failure.message}); "
            "restarting its worker"
        )
    cls = getattr(errors, failure.kind, None)
    if isinstance(cls, type) and issubclass(cls, ConvoyError):
        return cls(failure.message)
    return InferenceFailed(
        f"model '{model}' failed to execute the batch: {failure.kind}: {failure.message}"
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


def serve(sock: socket.socket) -> int:
    """The worker loop: load, then execute batches until `close` or EOF."""
    from convoy.runtimes.base import is_fatal, runtime_factory

    reader = sock.makefile("rb")
    metrics = None  # the model's custom metrics, reported with every answer once it has any
    try:
        load, _ = _receive(reader, ToWorker)
    except WorkerGone:
        return 0
    backend, source, index = load.backend, load.source, load.instance_index
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
        _send(sock, _failure(exc))
        return 1
    _send(sock, Loaded(executes_requests=runtime.executes_requests))
    while True:
        try:
            message, data = _receive(reader, ToWorker)
        except WorkerGone:
            return 0
        if type(message) is Close:
            try:
                runtime.close()
            finally:
                _send(sock, Closed())
            return 0
        inputs = read_tensors(message.inputs, data)
        per_request = type(message) is ExecuteRequests
        writer = FrameWriter()
        try:
            if per_request:
                outcomes = _execute_requests(runtime, source, message.requests, inputs)
                results = _described(outcomes, writer)
            else:
                outputs = runtime.infer(inputs)
        except Exception as exc:
            fatal = is_fatal(runtime, exc)
            if not isinstance(exc, ConvoyError) or fatal:
                log.error("model '%s' failed a batch", source.config.name, exc_info=exc)
            _send(sock, _failure(exc, fatal))
            if fatal:
                return 1  # this process cannot be trusted any more; the server starts another
            continue
        if per_request:
            answer = RequestResults(results=results, metrics=_snapshot(metrics))
        else:
            answer = Outputs(outputs=_put(writer, outputs), metrics=_snapshot(metrics))
        _send(sock, answer, writer)


class _ChannelCaller:
    """The worker's ModelCaller: BLS calls travel to the server over the worker's channel while
    the server waits for the batch (so only from code running inside execute / initialize)."""

    def __init__(self, sock: socket.socket, reader) -> None:
        self._sock = sock
        self._reader = reader
        self._lock = threading.Lock()

    def call(self, call: ModelCall) -> Response:
        writer = FrameWriter()
        message = BlsCall(
            model=call.model_name,
            version=call.model_version,
            requested=tuple(call.requested_outputs),
            parameters=call.parameters,
            timeout_us=call.timeout_us,
            waiter=call.waiter,
            serving=tuple(call.serving),
            id=call.request_id,
            inputs=_put(writer, call.inputs),
        )
        with self._lock:
            _send(self._sock, message, writer)
            reply, data = _receive(self._reader, ToWorker)
        if isinstance(reply, WorkerFailure):
            raise _error_from(reply, call.model_name)
        outputs = read_tensors(reply.outputs, data)
        version = call.model_version or ""
        return Response(outputs, call.model_name, version, None, reply.parameters)

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


def _snapshot(metrics) -> list | None:
    """The worker's custom metric families for the answer, when the model defined any (the
    server sums them with its own and the other workers' on /metrics)."""
    if metrics is not None and metrics.families:
        return metrics.snapshot()
    return None


def _execute_requests(runtime, source, infos: list[RequestInfo], inputs: dict) -> list:
    """Run a per-request batch: each request sees views of its rows of the merged inputs; what
    the runtime returned for each (outputs, RESCHEDULED or an exception)."""
    from convoy.types import Request

    batched = source.config.max_batch_size > 0
    requests = []
    start = 0
    for info in infos:
        end = start + info.rows
        own = {n: a[start:end] for n, a in inputs.items()} if batched else inputs
        start = end
        requests.append(
            Request(
                info.id,
                own,
                info.requested,
                info.rows,
                DetachedFuture(),
                timeout_us=info.timeout_us,
                parameters=info.parameters,
                bls_call=info.bls_call,
            )
        )
    return runtime.infer_requests(requests, None)


def _described(outcomes: list, writer: FrameWriter) -> list[RequestResult]:
    """The per-request outcomes as messages, their outputs queued in `writer`."""
    results = []
    for result in outcomes:
        if isinstance(result, BaseException):
            results.append(RequestResult(error=_failure(result)))
        elif result is RESCHEDULED:
            results.append(RequestResult(rescheduled=True))
        else:
            outputs = _put(writer, result)
            results.append(
                RequestResult(outputs=outputs, parameters=getattr(result, "parameters", None))
            )
    return results


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
