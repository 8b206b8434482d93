"""Ragged batching's merge and split (batching/ragged.py): ragged inputs concatenated flat,
every batch_input kind exact (Triton's documented examples and random batches), outputs back to
the request they belong to."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convoy.batching.assemble import Collation, collation_for
from convoy.batching.ragged import RaggedCollation, batch_input_tensor
from convoy.batching.scheduler import Scheduler
from convoy.batching.stats import ModelStats
from convoy.config import BatchInput, BatchOutput, DynamicBatching, ModelConfig
from convoy.errors import InferenceFailed
from convoy.runtimes.base import RuntimeBase, RuntimeInstance
from convoy.types import DetachedFuture, Request, TensorSpec

KINDS = (
    "BATCH_ELEMENT_COUNT",
    "BATCH_ACCUMULATED_ELEMENT_COUNT",
    "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO",
    "BATCH_MAX_ELEMENT_COUNT_AS_SHAPE",
    "BATCH_ITEM_SHAPE",
    "BATCH_ITEM_SHAPE_FLATTEN",
)


def _config(rank: int = 1, datatype: str = "INT32", scatter: bool = True) -> ModelConfig:
    """RAGGED (ragged, `rank` dims) and DENSE [2] inputs, one target per batch input kind;
    SCATTERED follows RAGGED's shape, PER_ROW has one row per batch row."""
    return ModelConfig(
        name="ragged",
        backend="python",
        max_batch_size=64,
        inputs=(
            TensorSpec("RAGGED", "FP32", (-1,) * rank, allow_ragged_batch=True),
            TensorSpec("DENSE", "FP32", (2,)),
        ),
        outputs=(
            TensorSpec("SCATTERED", "FP32", (-1,) * rank),
            TensorSpec("PER_ROW", "FP32", (2,)),
        ),
        batch_inputs=tuple(BatchInput(kind, (kind.lower(),), datatype, "RAGGED") for kind in KINDS),
        batch_outputs=(BatchOutput("BATCH_SCATTER_WITH_INPUT_SHAPE", ("SCATTERED",), "RAGGED"),)
        if scatter
        else (),
    )


def _request(index: int, ragged_shape: tuple[int, ...], outputs: tuple[str, ...] = ()) -> Request:
    rows = ragged_shape[0]
    ragged = np.arange(np.prod(ragged_shape), dtype=np.float32).reshape(ragged_shape) + 1000 * index
    dense = np.full((rows, 2), index, dtype=np.float32)
    return Request(
        f"r{index}", {"RAGGED": ragged, "DENSE": dense}, outputs, rows, future=DetachedFuture()
    )


def test_a_config_with_ragged_inputs_gets_the_ragged_collation_and_others_the_dense_one():
    assert type(collation_for(_config())) is RaggedCollation
    dense = ModelConfig(name="d", backend="python", max_batch_size=8)
    assert type(collation_for(dense)) is Collation


def test_the_documented_example_concatenates_into_one_dimension_with_end_offsets():
    """Triton's ragged_batching.md: requests [1, 3], [1, 4], [1, 5] -> INPUT [12], INDEX
    [3, 7, 12]."""
    config = ModelConfig(
        name="m",
        backend="python",
        max_batch_size=16,
        inputs=(TensorSpec("INPUT", "FP32", (-1,), allow_ragged_batch=True),),
        batch_inputs=(BatchInput("BATCH_ACCUMULATED_ELEMENT_COUNT", ("INDEX",), "FP32", "INPUT"),),
    )
    requests = [
        Request(str(n), {"INPUT": np.full((1, n), n, np.float32)}, (), 1, DetachedFuture())
        for n in (3, 4, 5)
    ]
    merged = RaggedCollation(config).merge(requests)
    assert merged["INPUT"].shape == (12,)
    assert merged["INPUT"].tolist() == [3] * 3 + [4] * 4 + [5] * 5
    assert merged["INDEX"].dtype == np.float32
    assert merged["INDEX"].tolist() == [3, 7, 12]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("BATCH_ELEMENT_COUNT", [3, 8, 4]),
        ("BATCH_ACCUMULATED_ELEMENT_COUNT", [3, 11, 15]),
        ("BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO", [0, 3, 11, 15]),
        ("BATCH_ITEM_SHAPE", [[3, 1], [2, 2], [2, 2], [1, 4]]),
        ("BATCH_ITEM_SHAPE_FLATTEN", [3, 1, 2, 2, 2, 2, 1, 4]),
    ],
)
def test_each_batch_input_kind_counts_requests_and_items_as_triton_does(kind, expected):
    """Element counts are per request, batch dimension included (a batch-2 request of 2x2
    items has 8 elements); the item shapes have one row per batch item."""
    shapes = [(1, 3, 1), (2, 2, 2), (1, 1, 4)]
    tensor = batch_input_tensor(BatchInput(kind, ("T",), "INT32", "S"), shapes)
    assert tensor.dtype == np.int32
    assert tensor.tolist() == expected


def test_item_shape_of_the_proto_example():
    """A batch-2 input [3, 1] and a batch-1 input [2, 2]: [[3, 1], [3, 1], [2, 2]] and its
    flattening [3, 1, 3, 1, 2, 2]."""
    shapes = [(2, 3, 1), (1, 2, 2)]
    item = batch_input_tensor(BatchInput("BATCH_ITEM_SHAPE", ("T",), "FP32", "S"), shapes)
    flat = batch_input_tensor(BatchInput("BATCH_ITEM_SHAPE_FLATTEN", ("T",), "FP32", "S"), shapes)
    assert item.dtype == np.float32 and item.shape == (3, 2)
    assert item.tolist() == [[3, 1], [3, 1], [2, 2]]
    assert flat.tolist() == [3, 1, 3, 1, 2, 2]


def test_max_element_count_is_carried_by_the_shape():
    kind = BatchInput("BATCH_MAX_ELEMENT_COUNT_AS_SHAPE", ("T",), "INT32", "S")
    assert batch_input_tensor(kind, [(1, 2), (1, 4), (1, 1), (1, 3)]).shape == (4,)


def test_every_target_name_receives_the_batch_input():
    config = ModelConfig(
        name="m",
        backend="python",
        max_batch_size=4,
        inputs=(TensorSpec("X", "FP32", (-1,), allow_ragged_batch=True),),
        batch_inputs=(BatchInput("BATCH_ELEMENT_COUNT", ("A", "B"), "INT32", "X"),),
    )
    requests = [Request("a", {"X": np.zeros((1, 2), np.float32)}, (), 1, DetachedFuture())]
    merged = RaggedCollation(config).merge(requests)
    assert merged["A"].tolist() == merged["B"].tolist() == [2]


def test_the_key_ignores_ragged_shapes_but_not_the_other_inputs():
    collation = RaggedCollation(_config())
    assert collation.key(_request(0, (1, 3))) == collation.key(_request(1, (2, 7)))
    other = _request(2, (1, 3))
    other.inputs["DENSE"] = np.zeros((1, 3), np.float32)
    assert collation.key(other) != collation.key(_request(0, (1, 3)))


def test_a_lone_request_is_flattened_too():
    merged = RaggedCollation(_config()).merge([_request(0, (2, 3))])
    assert merged["RAGGED"].shape == (6,)
    assert merged["DENSE"].shape == (2, 2)


def test_a_scattered_output_of_the_wrong_size_fails_the_batch_naming_it():
    collation = RaggedCollation(_config())
    requests = [_request(0, (1, 3)), _request(1, (1, 2))]
    outputs = {"SCATTERED": np.zeros(4, np.float32), "PER_ROW": np.zeros((2, 2), np.float32)}
    with pytest.raises(InferenceFailed, match=r"'SCATTERED' with 4 elements.*need 5"):
        collation.split(outputs, requests, True)


def test_a_per_row_output_must_have_one_row_per_batch_row():
    collation = RaggedCollation(_config())
    requests = [_request(0, (1, 3)), _request(1, (2, 2))]
    outputs = {"SCATTERED": np.zeros(7, np.float32), "PER_ROW": np.zeros((2, 2), np.float32)}
    with pytest.raises(InferenceFailed, match=r"'PER_ROW'.*expected first dimension 3"):
        collation.split(outputs, requests, True)


def _reference_batch_input(kind: str, shapes: list[tuple[int, ...]]) -> list:
    """Each kind written out the long way, independently of batching/ragged.py."""
    counts = []
    for shape in shapes:
        count = 1
        for dim in shape:
            count *= dim
        counts.append(count)
    running, accumulated = 0, []
    for count in counts:
        running += count
        accumulated.append(running)
    items = []
    for shape in shapes:
        for _ in range(shape[0]):
            items.append(list(shape[1:]))
    return {
        "BATCH_ELEMENT_COUNT": counts,
        "BATCH_ACCUMULATED_ELEMENT_COUNT": accumulated,
        "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO": [0, *accumulated],
        "BATCH_MAX_ELEMENT_COUNT_AS_SHAPE": [0] * max(counts),
        "BATCH_ITEM_SHAPE": items,
        "BATCH_ITEM_SHAPE_FLATTEN": [d for item in items for d in item],
    }[kind]


def _model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a ragged model does: find each request's elements from the offsets, answer from
    them alone. SCATTERED = own elements + own first element; PER_ROW = DENSE + 1."""
    flat = inputs["RAGGED"]
    offsets = inputs["batch_accumulated_element_count_with_zero"].astype(np.int64)
    scattered = np.empty_like(flat)
    for start, end in itertools.pairwise(offsets):
        part = flat[start:end]
        scattered[start:end] = part + (part[0] if part.size else 0)
    return {"SCATTERED": scattered, "PER_ROW": inputs["DENSE"] + 1}


shapes_strategy = st.lists(
    st.tuples(st.integers(1, 3), st.integers(0, 6), st.integers(1, 3)), min_size=1, max_size=8
)


@settings(max_examples=150, deadline=None)
@given(shapes=shapes_strategy, rank=st.sampled_from([1, 2]), datatype=st.sampled_from(["INT32", "FP32"]))
def test_random_ragged_batches_merge_exactly_and_split_back_to_their_own_request(shapes, rank, datatype):
    shapes = [shape[: rank + 1] for shape in shapes]
    config = _config(rank, datatype)
    collation = RaggedCollation(config)
    requests = [_request(i, shape) for i, shape in enumerate(shapes)]
    assert len({collation.key(r) for r in requests}) == 1
    merged = collation.merge(requests)

    assert merged["RAGGED"].ndim == 1
    assert merged["RAGGED"].tolist() == [
        v for r in requests for v in r.inputs["RAGGED"].reshape(-1).tolist()
    ]
    assert merged["DENSE"].shape == (sum(s[0] for s in shapes), 2)
    for kind in KINDS:
        tensor = merged[kind.lower()]
        assert tensor.dtype == (np.int32 if datatype == "INT32" else np.float32)
        assert tensor.tolist() == _reference_batch_input(kind, shapes), kind

    parts = collation.split(_model(merged), requests, True)
    for request, part in zip(requests, parts, strict=True):
        own = request.inputs["RAGGED"]
        first = own.reshape(-1)[0] if own.size else 0
        assert part["SCATTERED"].shape == own.shape
        np.testing.assert_array_equal(part["SCATTERED"], own + first)
        np.testing.assert_array_equal(part["PER_ROW"], request.inputs["DENSE"] + 1)


@settings(max_examples=50, deadline=None)
@given(shapes=shapes_strategy)
def test_each_request_gets_only_the_outputs_it_asked_for(shapes):
    shapes = [shape[:2] for shape in shapes]
    collation = RaggedCollation(_config())
    asked = [("SCATTERED",), ("PER_ROW",), ()]
    requests = [_request(i, s, asked[i % 3]) for i, s in enumerate(shapes)]
    parts = collation.split(_model(collation.merge(requests)), requests, True)
    for index, part in enumerate(parts):
        assert tuple(part) == (asked[index % 3] or ("SCATTERED", "PER_ROW"))


def test_without_a_batch_output_every_output_goes_back_by_rows():
    collation = RaggedCollation(_config(scatter=False))
    requests = [_request(0, (2, 3)), _request(1, (1, 5))]
    outputs = {"SCATTERED": np.arange(6, dtype=np.float32).reshape(3, 2), "PER_ROW": np.zeros((3, 2))}
    first, second = collation.split(outputs, requests, True)
    assert first["SCATTERED"].tolist() == [[0, 1], [2, 3]]
    assert second["SCATTERED"].tolist() == [[4, 5]]


# --- through the scheduler ---------------------------------------------------------------------


class _RaggedRuntime(RuntimeBase):
    """Answers from the batch inputs alone: each request's elements found by its offsets; a
    threading.Event holds the first batch so the others pile up behind it."""

    def __init__(self, hold: threading.Event) -> None:
        self.hold = hold
        self.batches: list[list[int]] = []

    def load(self) -> None:
        pass

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.hold.wait(10)
        self.batches.append((inputs["batch_element_count"].tolist(), inputs["DENSE"].shape[0]))
        return _model(inputs)

    def close(self) -> None:
        pass


@pytest.mark.timeout(120, method="thread")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes_strategy)
def test_the_scheduler_batches_ragged_requests_and_answers_each_its_own(shapes):
    """Requests of random lengths queued behind a busy instance share ragged batches within
    max_batch_size rows, and every request gets exactly its own outputs."""
    shapes = [shape[:2] for shape in shapes]

    async def scenario() -> None:
        hold = threading.Event()
        runtime = _RaggedRuntime(hold)
        config = replace(_config(), max_batch_size=6, dynamic_batching=DynamicBatching(100_000))
        instance = RuntimeInstance(runtime, "ragged-0")
        loop = asyncio.get_running_loop()
        try:
            async with Scheduler(config, "1", [instance], ModelStats(), 64) as scheduler:
                requests = [_request(i, shape) for i, shape in enumerate(shapes)]
                for request in requests:
                    request.future = loop.create_future()
                    scheduler.submit(request)
                hold.set()
                for request in requests:
                    response = await asyncio.wait_for(request.future, 10)
                    own = request.inputs["RAGGED"]
                    first = own.reshape(-1)[0] if own.size else 0
                    np.testing.assert_array_equal(response.outputs["SCATTERED"], own + first)
                    np.testing.assert_array_equal(
                        response.outputs["PER_ROW"], request.inputs["DENSE"] + 1
                    )
        finally:
            await instance.close()
        assert sum(len(counts) for counts, _ in runtime.batches) == len(shapes)
        assert all(rows <= 6 for _, rows in runtime.batches)
        if len(shapes) > 1:  # any two requests fit in 6 rows: the first batch holds several
            assert max(len(counts) for counts, _ in runtime.batches) > 1

    asyncio.run(scenario())
