"""The runtime contract: load -> warm up -> infer a batch -> close, the capabilities a backend
declares beyond those verbs, and the backend registry.

A runtime is one *instance* of a model version; `instance_group.count` creates that many. Its
verbs block, so Convoy calls them on a thread the instance owns (see `RuntimeInstance`), never
on the event loop. Runtimes see only numpy arrays and typed config: no protocol, no scheduler.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from convoy.config import ModelConfig, ModelVersionSource
from convoy.errors import InstanceLost, InvalidConfig
from convoy.types import ModelServices, Request

log = logging.getLogger("convoy.runtimes")


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers beyond load / infer / close, declared once on its runtime class
    (`capabilities = Capabilities(...)`) and read by the repository and the scheduler."""

    #: Its models may be decoupled (`model_transaction_policy { decoupled: true }`): many
    #: responses per request, answered through `request.stream`.
    decoupled: bool = False
    #: `complete_config_dict` runs the model's own code on the config (Triton's
    #: `auto_complete_config`), as a dict, before `complete_config`.
    edits_config: bool = False
    #: `batch_buffers` may hand out the buffers batches are assembled into.
    batch_buffers: bool = False
    #: Executes in a worker process of its own (runtimes/isolated.py): a fatal error poisons
    #: only that process, and `kill` ends a hung batch.
    isolated: bool = False


@runtime_checkable
class Runtime(Protocol):
    """One loaded copy of a model version, executing batches on the calling thread.

    `RuntimeBase` gives every optional member its default; a runtime overrides what its
    `capabilities` declare.
    """

    capabilities: ClassVar[Capabilities]
    #: Read after load: the runtime takes the batch's requests themselves (`infer_requests`)
    #: instead of merged inputs (a Triton python model).
    executes_requests: bool

    def load(self) -> None:
        """Read the model files and get ready to execute (may take long)."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: every declared input present, first dimension = batch rows when the
        model batches. Returns every output the model produces for the batch."""

    def close(self) -> None:
        """Release the model's resources."""

    def infer_requests(self, requests: list[Request], loop: Any) -> list[Any]:
        """Run one batch request by request (when `executes_requests`): per request its
        outputs, an exception, or None when it answers through `request.stream`."""

    def is_fatal(self, error: BaseException) -> bool:
        """True when the instance cannot be trusted after `error` and must be replaced."""

    def batch_buffers(self, rows: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Writable arrays of `rows` rows, per-row shape and dtype as in `like` (one request's
        inputs), that the scheduler assembles a batch into (e.g. pinned host memory the device
        copies from without another staging copy); None: let the scheduler allocate. Called on
        the instance's thread, so buffers may be reused from one batch to the next."""

    def kill(self) -> None:
        """End a hung batch now, from any thread (where the runtime can)."""

    def bind_services(self, services: ModelServices) -> None:
        """The server's services for model code (BLS calls, custom metrics), before load."""


class RuntimeFactory(Protocol):
    """Makes a backend's instances; the runtime class itself, with `RuntimeBase`'s defaults."""

    capabilities: Capabilities

    def __call__(self, source: ModelVersionSource, instance_index: int) -> Runtime: ...

    def complete_config(self, source: ModelVersionSource) -> ModelConfig:
        """The config with what the backend reads from the model file filled in."""
        ...

    def complete_config_dict(self, source: ModelVersionSource, config: dict[str, Any]) -> dict[str, Any]:
        """The config (Triton's JSON dict) as the model's own code completes it (when
        `capabilities.edits_config`)."""
        ...


class RuntimeBase:
    """The defaults of the runtime contract: no optional capability. Subclasses implement
    load / infer / close and override what their `capabilities` declare."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    executes_requests: bool = False

    def infer_requests(self, requests: list[Request], loop: Any) -> list[Any]:
        raise TypeError(f"{type(self).__name__} executes merged batches, not requests")

    def is_fatal(self, error: BaseException) -> bool:
        return isinstance(error, InstanceLost) or cuda_context_lost(error)

    def batch_buffers(self, rows: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        return None

    def kill(self) -> None:
        """An in-process runtime's thread cannot be ended: it is abandoned instead."""

    def bind_services(self, services: ModelServices) -> None:
        """Model code that uses no server services ignores them."""

    @staticmethod
    def complete_config(source: ModelVersionSource) -> ModelConfig:
        return source.config

    @staticmethod
    def complete_config_dict(source: ModelVersionSource, config: dict[str, Any]) -> dict[str, Any]:
        return config


def cuda_context_lost(error: BaseException) -> bool:
    """A CUDA error that poisons the process's CUDA context (a device-side assert, an illegal
    address): every later call on that device fails until the process exits."""
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return "CUDA error" in text or "device-side assert" in text


def is_fatal(runtime: Runtime, error: BaseException) -> bool:
    """Whether `runtime` must be replaced after `error` (rather than failing only the batch);
    a hook that raises counts as not fatal."""
    try:
        return bool(runtime.is_fatal(error))
    except Exception:
        log.exception("is_fatal hook of %s raised; treating the error as not fatal", type(runtime))
        return False


def where_in_model(error: BaseException, path: object) -> str:
    """' at line N in func()': the deepest frame of the model's own file in `error`'s traceback
    (a SyntaxError names its line itself); '' when the model file is not in it."""
    if isinstance(error, SyntaxError):
        return ""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    if not frames:
        return ""
    return f" at line {frames[-1].lineno} in {frames[-1].name}()"


#: backend name -> "module:attribute" of its factory, imported on first use so a missing
#: optional dependency (torch, onnxruntime) only matters to the models that need it.
BACKENDS: dict[str, str] = {
    "python": "convoy.runtimes.python:PythonRuntime",
    "pytorch": "convoy.runtimes.pytorch:TorchRuntime",
    "onnxruntime": "convoy.runtimes.onnx:OnnxRuntime",
}

#: backend name -> the convoy-inference extra that installs what it imports.
BACKEND_EXTRAS: dict[str, str] = {"pytorch": "torch", "onnxruntime": "onnx"}


def runtime_factory(backend: str) -> RuntimeFactory:
    """The runtime class of `backend`, imported now."""
    target = BACKENDS.get(backend)
    if target is None:
        known = sorted(BACKENDS)
        raise InvalidConfig(f"backend '{backend}' is not available; expected one of {known}")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = BACKEND_EXTRAS.get(backend, backend)
        raise InvalidConfig(
            f"backend '{backend}' needs a package that is not installed ({exc.name}); "
            f"install it with: pip install 'convoy-inference[{extra}]'"
        ) from None
    factory: RuntimeFactory = getattr(module, attribute)  # the table names it: no probe
    return factory


def _settle(future: asyncio.Future[Any], result: object, error: BaseException | None) -> None:
    if future.done():
        return  # the awaiting coroutine was cancelled meanwhile
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


#: One job for an instance's thread: (loop, callback, context, function, argument).
_Job = tuple[
    asyncio.AbstractEventLoop, Callable[..., object], tuple[Any, ...], Callable[[Any], Any], Any
]


class RuntimeInstance:
    """Owns one runtime and the one thread it executes on.

    A plain thread fed by a SimpleQueue that answers through `call_soon_threadsafe`: one wake-up
    each way per batch, without the executor's Future/Condition machinery (which measured as the
    bulk of the hand-off cost for small batches).
    """

    def __init__(self, runtime: Runtime, name: str, index: int = 0) -> None:
        self.runtime = runtime
        self.name = name
        #: Which instance of its model version this is (placement counts through the groups).
        self.index = index
        #: The runtime executes in a process of its own (see runtimes/isolated.py): a fatal
        #: error then poisons only this instance, not the others sharing the server's process.
        self.isolated = runtime.capabilities.isolated
        #: The runtime's batch buffers (see Runtime), or None: the scheduler allocates.
        self.batch_buffers = runtime.batch_buffers if runtime.capabilities.batch_buffers else None
        #: None ends the thread.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, callback, context, function, argument = job
            # The ignores: mypy cannot match a `...` callback to `*context` plus two arguments.
            try:
                result = function(argument)
            except BaseException as exc:  # handed to the callback on the loop
                loop.call_soon_threadsafe(callback, *context, None, exc)  # type: ignore[arg-type]
            else:
                loop.call_soon_threadsafe(callback, *context, result, None)  # type: ignore[arg-type]

    @property
    def executes_requests(self) -> bool:
        """The runtime executes per request (`infer_requests`); read once it is loaded."""
        return self.runtime.executes_requests

    def submit_requests(
        self, callback: Callable[..., None], context: tuple[Any, ...], requests: list[Request]
    ) -> None:
        """Run `infer_requests(requests, loop)` on this instance's thread, then
        `callback(*context, results, error)` on the calling loop. Call it on the loop."""
        loop = asyncio.get_running_loop()
        self._jobs.put((loop, callback, context, self._infer_requests, (requests, loop)))

    def _infer_requests(self, argument: tuple[list[Request], asyncio.AbstractEventLoop]) -> list[Any]:
        return self.runtime.infer_requests(*argument)

    def submit(
        self, callback: Callable[..., None], context: tuple[Any, ...], inputs: dict[str, np.ndarray]
    ) -> None:
        """Run `infer(inputs)` on this instance's thread, then `callback(*context, outputs,
        error)` on the calling loop. Call it on the loop."""
        self._jobs.put((asyncio.get_running_loop(), callback, context, self.runtime.infer, inputs))

    def run(
        self,
        callback: Callable[..., None],
        context: tuple[Any, ...],
        function: Callable[[Any], Any],
        argument: object,
    ) -> None:
        """Run `function(argument)` on this instance's thread, then `callback(*context, result,
        error)` on the calling loop (the scheduler: assemble a batch, then infer). Call it on the
        loop."""
        self._jobs.put((asyncio.get_running_loop(), callback, context, function, argument))

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking runtime verb on this instance's thread and await its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, _settle, (future,), lambda _: function(*args), None))
        return await future

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs: dict[str, np.ndarray] = await self.call(self.runtime.infer, inputs)
        return outputs

    def is_fatal(self, error: BaseException) -> bool:
        return is_fatal(self.runtime, error)

    def abandon(self) -> None:
        """Give up on a thread stuck in a batch: it exits once (if ever) the batch returns. An
        isolated runtime's worker process is killed, which also ends the batch."""
        self._jobs.put(None)
        self.runtime.kill()

    async def close(self, timeout: float = 10.0) -> None:
        """Close the runtime on its thread. A thread stuck in a hung batch is abandoned after
        `timeout` (it is a daemon thread), so a hung model cannot stall shutdown."""
        try:
            await asyncio.wait_for(self.call(self.runtime.close), timeout)
        finally:
            self._jobs.put(None)
