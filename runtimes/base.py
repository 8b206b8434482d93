"""The runtime contract: load -> warm up -> infer a batch -> close, and the backend registry.

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
from typing import Protocol, runtime_checkable

import numpy as np

from convoy.config import ModelConfig, ModelVersionSource
from convoy.errors import InstanceLost, InvalidConfig

log = logging.getLogger("convoy.runtimes")


@runtime_checkable
class Runtime(Protocol):
    """One loaded copy of a model version, executing batches on the calling thread."""

    def load(self) -> None:
        """Read the model files and get ready to execute (may take long)."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: every declared input present, first dimension = batch rows when the
        model batches. Returns every output the model produces for the batch."""

    def close(self) -> None:
        """Release the model's resources."""

    # Optional: `is_fatal(error) -> bool`, True when the instance cannot be trusted after
    # `error` (see `is_fatal` below for the default).
    #
    # Optional: `batch_buffers(rows, like) -> dict[str, np.ndarray] | None`: writable arrays of
    # `rows` rows, per-row shape and dtype as in `like` (one request's inputs), that the
    # scheduler assembles a batch into; e.g. pinned host memory the device copies from without
    # another staging copy. Called on the instance's thread, so buffers may be reused from one
    # batch to the next. None: let the scheduler allocate.
    #
    # Optional, declared: `executes_requests` (bool, read after load): the runtime takes the
    # batch's requests themselves, `infer_requests(requests, loop) -> list` (per request: its
    # outputs, an exception, or None when it answers through `request.stream`), instead of
    # merged inputs; `supports_decoupled` (bool, on the factory): such requests may be
    # decoupled; `bind_services(ModelServices)`: the server's services for model code.


def cuda_context_lost(error: BaseException) -> bool:
    """A CUDA error that poisons the process's CUDA context (a device-side assert, an illegal
    address): every later call on that device fails until the process exits."""
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return "CUDA error" in text or "device-side assert" in text


def is_fatal(runtime: Runtime, error: BaseException) -> bool:
    """Whether `runtime` must be replaced after `error` (rather than failing only the batch):
    the runtime's own `is_fatal` hook where it has one, else InstanceLost or a lost CUDA context."""
    check = getattr(runtime, "is_fatal", None)
    if check is None:
        return isinstance(error, InstanceLost) or cuda_context_lost(error)
    try:
        return bool(check(error))
    except Exception:
        log.exception("is_fatal hook of %s raised; treating the error as not fatal", type(runtime))
        return False


def where_in_model(error: BaseException, path) -> str:
    """' at line N in func()': the deepest frame of the model's own file in `error`'s traceback
    (a SyntaxError names its line itself); '' when the model file is not in it."""
    if isinstance(error, SyntaxError):
        return ""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    if not frames:
        return ""
    return f" at line {frames[-1].lineno} in {frames[-1].name}()"


class RuntimeFactory(Protocol):
    def __call__(self, source: ModelVersionSource, instance_index: int) -> Runtime: ...


def autocomplete(factory: RuntimeFactory, source: ModelVersionSource) -> ModelConfig:
    """The config with what the backend can read from the model file filled in.

    A backend offers this by giving its factory a `complete_config(source) -> ModelConfig`
    (ONNX Runtime reads inputs/outputs from the graph); others return the config unchanged.
    """
    complete = getattr(factory, "complete_config", None)
    return source.config if complete is None else complete(source)


#: backend name -> "module:attribute" of its factory, imported on first use so a missing
#: optional dependency (torch, onnxruntime) only matters to the models that need it.
BACKENDS: dict[str, str] = {
    "python": "convoy.runtimes.python:PythonRuntime",
    "pytorch": "convoy.runtimes.pytorch:TorchRuntime",
    "onnxruntime": "convoy.runtimes.onnx:OnnxRuntime",
}

#: backend name -> the convoy-inference extra that installs what it imports.
BACKEND_EXTRAS: dict[str, str] = {"pytorch": "torch", "onnxruntime": "onnx"}

#: Extra backends registered at run time (tests register fakes here through `register_backend`).
_registered: dict[str, RuntimeFactory] = {}


def register_backend(name: str, factory: RuntimeFactory) -> None:
    _registered[name] = factory


def runtime_factory(backend: str) -> RuntimeFactory:
    if backend in _registered:
        return _registered[backend]
    target = BACKENDS.get(backend)
    if target is None:
        known = sorted(set(BACKENDS) | set(_registered))
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
    return getattr(module, attribute)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return  # the awaiting coroutine was cancelled meanwhile
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


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
        self.isolated = bool(getattr(runtime, "isolated", False))
        #: The runtime's batch buffers (see Runtime), or None.
        self.batch_buffers = getattr(runtime, "batch_buffers", None)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, callback, context, function, argument = job
            try:
                result = function(argument)
            except BaseException as exc:  # handed to the callback on the loop
                loop.call_soon_threadsafe(callback, *context, None, exc)
            else:
                loop.call_soon_threadsafe(callback, *context, result, None)

    @property
    def executes_requests(self) -> bool:
        """The runtime executes per request (`infer_requests`); read once it is loaded."""
        return bool(getattr(self.runtime, "executes_requests", False))

    def submit_requests(self, callback: Callable, context: tuple, requests: list) -> None:
        """Run `infer_requests(requests, loop)` on this instance's thread, then
        `callback(*context, results, error)` on the calling loop. Call it on the loop."""
        loop = asyncio.get_running_loop()
        self._jobs.put((loop, callback, context, self._infer_requests, (requests, loop)))

    def _infer_requests(self, argument):
        return self.runtime.infer_requests(*argument)

    def submit(self, callback: Callable, context: tuple, inputs: dict[str, np.ndarray]) -> None:
        """Run `infer(inputs)` on this instance's thread, then `callback(*context, outputs,
        error)` on the calling loop. Call it on the loop."""
        self._jobs.put((asyncio.get_running_loop(), callback, context, self.runtime.infer, inputs))

    def run(self, callback: Callable, context: tuple, function: Callable, argument) -> None:
        """Run `function(argument)` on this instance's thread, then `callback(*context, result,
        error)` on the calling loop (the scheduler: assemble a batch, then infer). Call it on the
        loop."""
        self._jobs.put((asyncio.get_running_loop(), callback, context, function, argument))

    async def call(self, function: Callable, *args):
        """Run a blocking runtime verb on this instance's thread and await its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, _settle, (future,), lambda _: function(*args), None))
        return await future

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self.call(self.runtime.infer, inputs)

    def is_fatal(self, error: BaseException) -> bool:
        return is_fatal(self.runtime, error)

    def abandon(self) -> None:
        """Give up on a thread stuck in a batch: it exits once (if ever) the batch returns. An
        isolated runtime's worker process is killed, which also ends the batch."""
        self._jobs.put(None)
        kill = getattr(self.runtime, "kill", None)
        if kill is not None:
            kill()

    async def close(self, timeout: float = 10.0) -> None:
        """Close the runtime on its thread. A thread stuck in a hung batch is abandoned after
        `timeout` (it is a daemon thread), so a hung model cannot stall shutdown."""
        try:
            await asyncio.wait_for(self.call(self.runtime.close), timeout)
        finally:
            self._jobs.put(None)
