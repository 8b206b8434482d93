"""Padded batching: parameters, bucket choice, merge (pad value, lengths input), the token budget
in the queue, trimmed outputs, and every request answered with its own rows through a real
scheduler over a fake padded runtime."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_fakes import outcome, serve

from convoy.batching.assemble import Collation, collation_for
from convoy.batching.padding import PaddedCollation
from convoy.batching.queue import PriorityQueue
from convoy.config import DynamicBatching, ModelConfig
from convoy.errors import Cancelled, InvalidConfig, InvalidInput
from convoy.padding import Padding, parse_padding
from convoy.runtimes.base import RuntimeBase
from convoy.types import DetachedFuture, Request, RequestState, Response, TensorSpec

IDS_PAD = -7
INPUTS = (
    TensorSpec("ids", "INT64", (-1,)),
    TensorSpec("mask", "INT64", (-1,)),
    TensorSpec("scale", "FP32", (2,)),
)
OUTPUTS = (
    TensorSpec("emb", "INT64", (-1,)),
    TensorSpec("total", "INT64", (1,)),
    TensorSpec("padded", "INT64", (1,)),
)
PARAMETERS = {
    "padding_inputs": f"ids={IDS_PAD}, mask",
    "padding_value": "0",
    "padding_buckets": "4,8,16,32",
    "padding_lengths_input": "lengths:INT32",
    "padding_outputs": "emb",
    "max_batch_tokens": "64",
}


def _fail(field: str, message: str) -> InvalidConfig:
    return InvalidConfig(f"config.pbtxt: {field}: {message}")


def padded_config(max_batch_size: int = 16, **changes: str) -> ModelConfig:
    parameters = {**PARAMETERS, **changes}
    parameters = {key: value for key, value in parameters.items() if value is not None}
    padding = parse_padding(parameters, INPUTS, OUTPUTS, max_batch_size, _fail)
    return ModelConfig(
        name="padded",
        backend="fake",
        max_batch_size=max_batch_size,
        inputs=INPUTS,
        outputs=OUTPUTS,
        dynamic_batching=DynamicBatching(max_queue_delay_us=100_000),
        parameters=parameters,
        padding=padding,
    )


def tokens(tag: int, rows: int, length: int) -> np.ndarray:
    """Token ids naming their request, row and position (never the pad value)."""
    row = np.arange(rows, dtype=np.int64)[:, None] * 1000
    position = np.arange(length, dtype=np.int64)[None, :] + 1
    return tag * 100_000 + row + position


def padded_request(tag: int, length: int, rows: int = 1, future=None) -> Request:
    ids = tokens(tag, rows, length)
    inputs = {
        "ids": ids,
        "mask": np.ones((rows, length), np.int64),
        "scale": np.full((rows, 2), tag, np.float32),
    }
    if future is None:
        future = DetachedFuture()
    return Request(f"r{tag}", inputs, (), rows, future, received_ns=time.monotonic_ns())


# --- parameters --------------------------------------------------------------------------------
def test_parameters_parse_into_typed_padding():
    padding = padded_config().padding
    assert padding.buckets == (4, 8, 16, 32)
    assert [(p.name, p.axis, p.value) for p in padding.inputs] == [("ids", 0, IDS_PAD), ("mask", 0, 0)]
    assert padding.lengths_input == "lengths" and padding.lengths_datatype == "INT32"
    assert [o.name for o in padding.outputs] == ["emb"]
    assert padding.max_batch_tokens == 64 and padding.fill_buckets == 1
    assert isinstance(collation_for(padded_config()), PaddedCollation)
    unpadded = ModelConfig(name="m", backend="fake", max_batch_size=4, inputs=INPUTS)
    assert type(collation_for(unpadded)) is Collation


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        ({"padding_bucket": "16"}, "parameters.padding_bucket", "not a Convoy padding parameter"),
        ({"max_batch_token": "16"}, "parameters.max_batch_token", "did you mean 'max_batch_tokens'"),
        ({"padding_buckets": "16,8"}, "parameters.padding_buckets", "strictly increasing"),
        ({"padding_buckets": "16,x"}, "parameters.padding_buckets", "positive lengths"),
        ({"padding_inputs": "nope"}, "parameters.padding_inputs", "not a declared input"),
        ({"padding_inputs": "scale"}, "parameters.padding_inputs", "name the dim to pad"),
        ({"padding_inputs": "ids:1"}, "parameters.padding_inputs", "index of a -1 dim"),
        ({"padding_inputs": "ids=0.5"}, "parameters.padding_inputs", "not an integer"),
        ({"padding_value": "zero"}, "parameters.padding_value", "expected a number"),
        ({"padding_lengths_input": "ids"}, "parameters.padding_lengths_input", "new input"),
        ({"padding_lengths_input": "n:FP32"}, "parameters.padding_lengths_input", "INT32|INT64"),
        ({"padding_outputs": "total"}, "parameters.padding_outputs", "name the dim"),
        ({"max_batch_tokens": "0"}, "parameters.max_batch_tokens", "integer >= 1"),
        ({"padding_fill_buckets": "-1"}, "parameters.padding_fill_buckets", "integer >= 0"),
        ({"padding_inputs": None}, "parameters.padding_buckets", "needs parameters.padding_inputs"),
    ],
)
def test_bad_parameters_are_refused_naming_the_parameter(changes, field, expected):
    with pytest.raises(InvalidConfig) as refused:
        padded_config(**changes)
    assert f": {field}: " in str(refused.value)
    assert expected in str(refused.value)


def test_a_models_own_padding_parameter_passes_while_padding_is_off():
    parameters = {"padding_side": "left", "max_seq_length": "256"}
    assert parse_padding(parameters, INPUTS, OUTPUTS, 16, _fail) is None
    with pytest.raises(InvalidConfig, match=r"parameters\.padding_input: .*'padding_inputs'"):
        parse_padding({"padding_input": "ids"}, INPUTS, OUTPUTS, 16, _fail)


def test_padding_needs_a_batching_model():
    with pytest.raises(InvalidConfig, match=r"parameters\.padding_inputs: .*max_batch_size > 0"):
        padded_config(max_batch_size=0)


def test_bucket_is_the_smallest_that_holds_the_length_or_the_length_without_buckets():
    padding = padded_config().padding
    assert [padding.bucket_for(n) for n in (1, 4, 5, 8, 9, 17, 32)] == [4, 4, 8, 8, 16, 32, 32]
    assert Padding(inputs=padding.inputs).bucket_for(13) == 13


# --- admit and key -------------------------------------------------------------------------------
def test_requests_whose_padded_inputs_disagree_or_exceed_the_longest_bucket_are_refused():
    collation = PaddedCollation(padded_config())
    request = padded_request(1, 5)
    request.inputs["mask"] = np.ones((1, 6), np.int64)
    with pytest.raises(InvalidInput, match="input 'mask': length 6 differs from input 'ids'"):
        collation.admit(request)
    with pytest.raises(InvalidInput, match=r"length 33 exceeds .* longest padding bucket 32"):
        collation.admit(padded_request(1, 33))
    collation.admit(padded_request(1, 32))


def test_key_is_the_bucket_and_the_unpadded_shapes():
    collation = PaddedCollation(padded_config())
    assert collation.key(padded_request(1, 5)) == collation.key(padded_request(2, 8, rows=3))
    assert collation.key(padded_request(1, 5)) != collation.key(padded_request(1, 9))
    other = padded_request(1, 5)
    other.inputs["scale"] = np.zeros((1, 3), np.float32)
    assert collation.key(other) != collation.key(padded_request(1, 5))


# --- merge and split -------------------------------------------------------------------------------
def fake_model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per row: its tokens doubled (at every position), the sum of its real tokens, and the
    padded length it was given."""
    ids, lengths = inputs["ids"], inputs["lengths"]
    real = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    return {
        "emb": ids * 2 + 1,
        "total": np.where(real, ids, 0).sum(axis=1, keepdims=True),
        "padded": np.full((ids.shape[0], 1), ids.shape[1], np.int64),
    }


def check_merged(collation: PaddedCollation, requests: list[Request], merged) -> None:
    padding = collation.padding
    lengths = [collation.length(r) for r in requests]
    padded_length = padding.bucket_for(max(lengths))
    assert merged["ids"].shape == (sum(r.rows for r in requests), padded_length)
    assert merged["lengths"].dtype == np.int32
    start = 0
    for request, length in zip(requests, lengths, strict=True):
        end = start + request.rows
        np.testing.assert_array_equal(merged["ids"][start:end, :length], request.inputs["ids"])
        assert (merged["ids"][start:end, length:] == IDS_PAD).all()
        assert (merged["mask"][start:end, :length] == 1).all()
        assert (merged["mask"][start:end, length:] == 0).all()
        np.testing.assert_array_equal(merged["scale"][start:end], request.inputs["scale"])
        assert (merged["lengths"][start:end] == length).all()
        start = end


def check_split(collation: PaddedCollation, requests: list[Request], parts) -> None:
    for request, part in zip(requests, parts, strict=True):
        ids = request.inputs["ids"]
        np.testing.assert_array_equal(part["emb"], ids * 2 + 1)  # trimmed to its own length
        np.testing.assert_array_equal(part["total"][:, 0], ids.sum(axis=1))
        bucket = collation.padding.bucket_for(max(collation.length(r) for r in requests))
        assert (part["padded"] == bucket).all()


batches = st.lists(st.tuples(st.integers(1, 3), st.integers(0, 32)), min_size=1, max_size=6).map(
    lambda shapes: [padded_request(tag, length, rows) for tag, (rows, length) in enumerate(shapes)]
)


@given(batches, st.booleans())
@settings(max_examples=60, deadline=None)
def test_merge_pads_exactly_and_split_returns_each_request_its_own_trimmed_rows(requests, buffered):
    collation = PaddedCollation(padded_config())
    handed_out: dict[str, np.ndarray] = {}

    def buffers(rows: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Dirty buffers (as reused pinned memory is): every element must be written by merge.
        for name, array in like.items():
            handed_out[name] = np.full((rows, *array.shape[1:]), 99, array.dtype)
        return dict(handed_out)

    merged = collation.merge(requests, buffers if buffered else None)
    if buffered:
        assert all(merged[name] is handed_out[name] for name in merged)
    check_merged(collation, requests, merged)
    check_split(collation, requests, collation.split(fake_model(merged), requests, True))


def test_a_lone_request_at_its_bucket_length_passes_through_uncopied():
    collation = PaddedCollation(padded_config())
    request = padded_request(1, 8)
    merged = collation.merge([request])
    assert merged["ids"] is request.inputs["ids"]
    assert merged["lengths"].tolist() == [8]


def test_without_buckets_a_batch_pads_to_its_longest_request():
    collation = PaddedCollation(padded_config(padding_buckets="none"))
    requests = [padded_request(1, 3), padded_request(2, 11), padded_request(3, 7)]
    merged = collation.merge(requests)
    assert merged["ids"].shape == (3, 11)
    check_merged(collation, requests, merged)


# --- the queue's token budget ---------------------------------------------------------------------
def queued(requests: list[Request], levels: int = 1) -> PriorityQueue:
    queue = PriorityQueue([1024] * levels)
    for request in requests:
        request.state = RequestState.QUEUED
        queue.push(request)
    return queue


def test_the_leader_takes_its_bucket_first_then_fills_from_the_next_shorter_one():
    collation = PaddedCollation(padded_config(max_batch_tokens="1000"))
    # Leader in bucket 16; a 4-bucket request (two buckets down) never fills its batch.
    lengths = [12, 3, 7, 15, 8, 16]
    requests = [padded_request(tag, n) for tag, n in enumerate(lengths)]
    batch = queued(requests).take(16, 16, collation.key, budget=collation.budget)
    assert [collation.length(r) for r in batch] == [12, 15, 16, 7, 8]


def test_no_fill_keeps_batches_to_one_bucket():
    collation = PaddedCollation(padded_config(padding_fill_buckets="0", max_batch_tokens="1000"))
    requests = [padded_request(tag, n) for tag, n in enumerate([12, 3, 7, 15])]
    batch = queued(requests).take(16, 16, collation.key, budget=collation.budget)
    assert [collation.length(r) for r in batch] == [12, 15]


@given(
    st.lists(
        st.tuples(st.integers(1, 3), st.integers(1, 32), st.integers(0, 1)), min_size=1, max_size=40
    ),
    st.integers(8, 128),
    st.integers(0, 2),
)
@settings(max_examples=80, deadline=None)
def test_every_batch_keeps_the_token_budget_and_the_oldest_request_leads(shapes, budget, fill):
    collation = PaddedCollation(
        padded_config(max_batch_tokens=str(budget), padding_fill_buckets=str(fill))
    )
    padding = collation.padding
    requests = []
    for tag, (rows, length, level) in enumerate(shapes):
        request = padded_request(tag, length, rows)
        request.level = level  # two priority levels: the leader is the oldest of the highest
        requests.append(request)
    queue = queued(requests, levels=2)
    taken: list[Request] = []
    while queue.size:
        oldest = queue.oldest()
        batch = queue.take(8, 8, collation.key, budget=collation.budget)
        assert batch and batch[0] is oldest
        lead = padding.bucket_for(collation.length(oldest))
        rows = sum(r.rows for r in batch)
        assert rows <= 8
        if len(batch) > 1:
            assert rows * lead <= budget  # only a lone leader may exceed the budget
        for request in batch:
            bucket = padding.bucket_for(collation.length(request))
            assert bucket <= lead
            steps = padding.buckets.index(lead) - padding.buckets.index(bucket)
            assert steps <= fill
        # The batch's padded length is its leader's bucket.
        assert padding.bucket_for(max(collation.length(r) for r in batch)) == lead
        taken.extend(batch)
    assert sorted(r.id for r in taken) == sorted(r.id for r in requests)


# --- through the scheduler -----------------------------------------------------------------------
class PaddedRuntime(RuntimeBase):
    """The fake model above on a real instance thread; records each batch's shape and lengths."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[tuple[int, ...], list[int]]] = []
        self.tags: set[int] = set()

    def load(self) -> None:
        pass

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = inputs["ids"]
        with self.lock:
            self.batches.append((ids.shape, inputs["lengths"].tolist()))
            self.tags.update(int(tag) for tag in np.unique(ids[ids > 0] // 100_000))
        return fake_model(inputs)

    def close(self) -> None:
        pass


CANCEL = ("no", "at once", "a turn later")


@given(
    st.lists(
        st.tuples(st.integers(1, 2), st.integers(1, 32), st.sampled_from(CANCEL)),
        min_size=1,
        max_size=24,
    )
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_request_gets_exactly_its_own_trimmed_outputs_through_the_scheduler(shapes):
    async def scenario() -> None:
        config = padded_config(max_batch_size=8)
        runtime = PaddedRuntime()
        async with serve(config, [runtime]) as scheduler:
            loop = asyncio.get_running_loop()
            requests = [
                padded_request(tag, length, rows, loop.create_future())
                for tag, (rows, length, _) in enumerate(shapes)
            ]
            for request in requests:
                scheduler.submit(request)
            for request, (_, _, cancel) in zip(requests, shapes, strict=True):
                if cancel == "at once":  # before any batch formed: never computed
                    scheduler.cancel(request)
            await asyncio.sleep(0)  # the first batch forms
            for request, (_, _, cancel) in zip(requests, shapes, strict=True):
                if cancel == "a turn later":  # queued or already running
                    scheduler.cancel(request)
            results = [await outcome(request) for request in requests]
        collation = PaddedCollation(config)
        for tag, (request, result) in enumerate(zip(requests, results, strict=True)):
            cancel = shapes[tag][2]
            if cancel == "at once":
                assert isinstance(result, Cancelled) and tag not in runtime.tags
                continue
            if cancel == "a turn later" and isinstance(result, Cancelled):
                continue
            assert isinstance(result, Response), result
            ids = request.inputs["ids"]
            np.testing.assert_array_equal(result.outputs["emb"], ids * 2 + 1)
            np.testing.assert_array_equal(result.outputs["total"][:, 0], ids.sum(axis=1))
            padded = int(result.outputs["padded"][0, 0])
            assert padded in config.padding.buckets
            assert padded >= config.padding.bucket_for(collation.length(request))
        for shape, _ in runtime.batches:
            assert shape[1] in config.padding.buckets
            # A lone request costs at most 2 rows x 32 = 64 tokens, so every batch keeps it.
            assert shape[0] * shape[1] <= 64

    asyncio.run(scenario())


def test_scheduler_refuses_a_request_longer_than_the_longest_bucket():
    async def scenario() -> None:
        async with serve(padded_config(), [PaddedRuntime()]) as scheduler:
            request = padded_request(1, 40, future=asyncio.get_running_loop().create_future())
            with pytest.raises(InvalidInput, match="longest padding bucket 32"):
                scheduler.submit(request)

    asyncio.run(scenario())


@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(1, 32)), min_size=1, max_size=30),
    st.integers(8, 256),
)
@settings(max_examples=80, deadline=None)
def test_the_scheduler_sees_a_batch_full_by_tokens_exactly_when_its_leaders_batch_reaches_the_budget(
    shapes, budget
):
    """`fills_budget` (the dispatch rule "full" for padded models) agrees with what `take`
    gathers: when it says no, the leader's batch takes every request that may join it and still
    costs less than the budget."""
    collation = PaddedCollation(padded_config(max_batch_size=1024, max_batch_tokens=str(budget)))
    requests = [padded_request(tag, length, rows) for tag, (rows, length) in enumerate(shapes)]
    queue = queued(requests)
    lead = requests[0]
    lead_key = collation.key(lead)
    joining = [
        r
        for r in requests
        if collation.key(r) == lead_key or collation.joins(lead_key, collation.key(r))
    ]
    total = sum(collation.cost(lead_key, r) for r in joining)
    full = queue.fills_budget(lead, collation.key, collation.budget)
    assert full == (total >= budget)
    if not full:
        batch = queue.take(1024, 1024, collation.key, budget=collation.budget)
        assert sorted(id(r) for r in batch) == sorted(id(r) for r in joining)
