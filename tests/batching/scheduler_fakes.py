"""Fake runtimes and request builders for the scheduler tests.

The fakes are real `Runtime` classes (load / infer / close) run by real `RuntimeInstance`s on
their own threads; nothing is mocked. Every row a test sends carries a unique integer id
(`request tag * ROWS_PER_TAG + row index`) repeated along the row, and every fake computes
`OUTPUT0 = INPUT0 * 2 + 1`, so an output row names the input row it came from and a response
delivered to the wrong request cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from convoy.batching.scheduler import Scheduler
from convoy.batching.stats import ModelStats
from convoy.batching.usage import UsageMeter
from convoy.config import ModelConfig
from convoy.errors import ConvoyError
from convoy.runtimes.base import Capabilities, Runtime, RuntimeBase, RuntimeInstance
from convoy.types import Request, Response, TensorSpec

#: Row ids are tag * ROWS_PER_TAG + row, so a request may carry up to this many rows.
ROWS_PER_TAG = 64
#: Upper bound on how long a gated batch blocks its runtime thread if a test never opens it.
GATE_LIMIT_S = 10.0
#: Safety net for awaiting anything; never a measurement.
PATIENCE_S = 10.0

INPUT = TensorSpec("INPUT0", "INT64", (-1,))
OUTPUT = TensorSpec("OUTPUT0", "INT64", (-1,))


def model_config(max_batch_size: int = 8, dynamic_batching=None, name: str = "fake") -> ModelConfig:
    """A model over one variable-length INT64 vector per row (dims [-1])."""
    return ModelConfig(
        name=name,
        backend="fake",
        max_batch_size=max_batch_size,
        inputs=(INPUT,),
        outputs=(OUTPUT,),
        dynamic_batching=dynamic_batching,
    )


def known_function(x: np.ndarray) -> np.ndarray:
    return x * 2 + 1


def row_tags(x: np.ndarray) -> tuple[int, ...]:
    """The request tag of every row of a batch, in batch order."""
    return tuple(int(v) // ROWS_PER_TAG for v in x[:, 0])


def make_request(
    tag: int,
    rows: int = 1,
    length: int = 1,
    *,
    priority: int = 0,
    timeout_us: int = 0,
    deadline: float | None = None,
) -> Request:
    """A request of `rows` rows of `length` values; must be built on the running loop."""
    assert 1 <= rows <= ROWS_PER_TAG
    ids = tag * ROWS_PER_TAG + np.arange(rows, dtype=np.int64)
    inputs = {"INPUT0": np.repeat(ids[:, None], length, axis=1)}
    return Request(
        id=f"r{tag}",
        inputs=inputs,
        requested_outputs=(),
        rows=rows,
        future=asyncio.get_running_loop().create_future(),
        priority=priority,
        timeout_us=timeout_us,
        deadline=deadline,
        received_ns=time.monotonic_ns(),
    )


def tag_of(request: Request) -> int:
    return int(request.inputs["INPUT0"][0, 0]) // ROWS_PER_TAG


def assert_served_correctly(request: Request, result: object) -> None:
    """The result is a Response holding f(this request's own input), nobody else's."""
    assert isinstance(result, Response), f"{request.id}: expected a Response, got {result!r}"
    x = request.inputs["INPUT0"]
    output = result.outputs["OUTPUT0"]
    assert output.shape == x.shape, f"{request.id}: output {output.shape} for input {x.shape}"
    np.testing.assert_array_equal(output, known_function(x), err_msg=request.id)


async def outcome(request: Request, patience: float = PATIENCE_S) -> object:
    """The request's Response, or the ConvoyError it failed with."""
    try:
        return await asyncio.wait_for(asyncio.shield(request.future), patience)
    except ConvoyError as exc:
        return exc


async def wait_until(predicate, patience: float = PATIENCE_S) -> None:
    """Poll `predicate` on the loop (yielding to it) until true; fail after `patience`."""
    give_up = time.monotonic() + patience
    while not predicate():
        assert time.monotonic() < give_up, "condition not reached in time"
        await asyncio.sleep(0.001)


@dataclass(frozen=True, slots=True)
class SeenBatch:
    instance: str
    #: Request tag of each row, in the order the runtime received them.
    tags: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def request_tags(self) -> list[int]:
        """Distinct request tags in batch order."""
        return list(dict.fromkeys(self.tags))


class BatchLog:
    """Every batch the fake runtimes started, in start order (appended from runtime threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches: list[SeenBatch] = []

    def record(self, instance: str, x: np.ndarray) -> None:
        with self._lock:
            self.batches.append(SeenBatch(instance, row_tags(x), tuple(x.shape)))

    def tags_seen(self) -> set[int]:
        with self._lock:
            return {tag for batch in self.batches for tag in batch.tags}

    def snapshot(self) -> list[SeenBatch]:
        with self._lock:
            return list(self.batches)


class Gate:
    """Holds any batch containing one of `tags` on its runtime thread until `open()`."""

    def __init__(self, *tags: int) -> None:
        self.tags = frozenset(tags)
        self.entered = threading.Event()
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()

    def hold(self, tags: Iterable[int]) -> None:
        if self.tags.isdisjoint(tags):
            return
        self.entered.set()
        # Bounded so a test that forgets to open the gate fails instead of hanging.
        self._open.wait(GATE_LIMIT_S)

    async def wait_entered(self) -> None:
        await wait_until(self.entered.is_set)


class EchoRuntime(RuntimeBase):
    """Known function (OUTPUT0 = INPUT0 * 2 + 1) that records every batch it is given."""

    def __init__(self, name: str, log: BatchLog, work_s: float = 0.0) -> None:
        self.name = name
        self.log = log
        self.work_s = work_s

    def load(self) -> None:
        pass

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["INPUT0"]
        self.log.record(self.name, x)
        self.work(row_tags(x))
        if self.work_s:
            time.sleep(self.work_s)  # on the instance's thread, standing in for compute
        return {"OUTPUT0": known_function(x)}

    def work(self, tags: tuple[int, ...]) -> None:
        """What a subclass does with a batch before answering it."""

    def close(self) -> None:
        pass


class SlowRuntime(EchoRuntime):
    """Blocks on its gates while executing a batch that holds a gated tag."""

    def __init__(self, name: str, log: BatchLog, *gates: Gate, work_s: float = 0.0) -> None:
        super().__init__(name, log, work_s)
        self.gates = gates

    def work(self, tags: tuple[int, ...]) -> None:
        for gate in self.gates:
            gate.hold(tags)


class FailingRuntime(SlowRuntime):
    """Raises on any batch containing a row of a marked request (after holding at its gates)."""

    def __init__(
        self, name: str, log: BatchLog, marked: Iterable[int], *gates: Gate, work_s: float = 0.0
    ) -> None:
        super().__init__(name, log, *gates, work_s=work_s)
        self.marked = frozenset(marked)

    def work(self, tags: tuple[int, ...]) -> None:
        super().work(tags)
        bad = self.marked.intersection(tags)
        if bad:
            raise ValueError(f"refusing marked requests {sorted(bad)}")


class PerRequestRuntime(FailingRuntime):
    """Executes request by request, as a Triton python model does (`executes_requests`): each
    request gets its own result, and a marked request fails alone."""

    executes_requests = True

    def infer_requests(self, batch: list[Request], loop) -> list:
        x = np.concatenate([request.inputs["INPUT0"] for request in batch])
        self.log.record(self.name, x)
        SlowRuntime.work(self, row_tags(x))  # the gates only: failures are per request
        if self.work_s:
            time.sleep(self.work_s)
        results: list = []
        for request in batch:
            own = request.inputs["INPUT0"]
            bad = self.marked.intersection(row_tags(own))
            if bad:
                results.append(ValueError(f"refusing marked request {sorted(bad)}"))
            else:
                results.append({"OUTPUT0": known_function(own)})
        return results


@asynccontextmanager
async def serve(
    config: ModelConfig,
    runtimes: list[Runtime],
    *,
    gates: Iterable[Gate] = (),
    max_queue_size: int = 1024,
    stats: ModelStats | None = None,
    usage: UsageMeter | None = None,
) -> AsyncIterator[Scheduler]:
    """A started scheduler over `runtimes`, each wrapped in its own RuntimeInstance.

    On the way out every gate is opened (so no runtime thread stays blocked), the scheduler
    closes with its grace period and the instances are closed.
    """
    for runtime in runtimes:
        assert isinstance(runtime, Runtime)
    instances = [
        RuntimeInstance(runtime, f"{config.name}-{index}") for index, runtime in enumerate(runtimes)
    ]
    scheduler = Scheduler(config, "1", instances, stats or ModelStats(), max_queue_size, usage=usage)
    try:
        async with scheduler:
            try:
                yield scheduler
            finally:
                for gate in gates:
                    gate.open()
    finally:
        for gate in gates:
            gate.open()
        for instance in instances:
            await instance.close()


class BufferedRuntime(SlowRuntime):
    """Declares batch buffers (as a GPU runtime's pinned staging memory): one reusable buffer per
    per-row shape; records whether each batch it ran was assembled into that buffer."""

    capabilities = Capabilities(batch_buffers=True)

    def __init__(self, name: str, log: BatchLog, *gates: Gate) -> None:
        super().__init__(name, log, *gates)
        self.buffers: dict[tuple, np.ndarray] = {}
        self.assembled_into_own: list[bool] = []

    def batch_buffers(self, rows: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = like["INPUT0"]
        key = (x.shape[1:], x.dtype.str)
        held = self.buffers.get(key)
        if held is None or held.shape[0] < rows:
            held = self.buffers[key] = np.full((rows + 8, *x.shape[1:]), -1, dtype=x.dtype)
        return {"INPUT0": held[:rows]}

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["INPUT0"]
        own = any(np.shares_memory(x, held) for held in self.buffers.values())
        self.assembled_into_own.append(own)
        return super().infer(inputs)
