"""The sequence batcher's invariants, on real RuntimeInstance threads with a fake accumulator:
every request gets exactly one outcome; a sequence's requests run in order, one at a time, on
one instance (with `direct`, at one batch row); batches never exceed max_batch_size; a request
cancelled while queued never runs, and the running total goes on without it."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convoy.batching.sequence import SequenceScheduler, sequence_flags
from convoy.batching.stats import ModelStats
from convoy.config import ModelConfig, SequenceBatching, SequenceControl, SequenceState
from convoy.errors import Cancelled, InvalidInput
from convoy.runtimes.base import RuntimeBase, RuntimeInstance
from convoy.types import Request, TensorSpec

PATIENCE_S = 20.0


class Accumulator(RuntimeBase):
    """Adds INPUT to the sequence's total (by CORRID, or the implicit state ACC_IN when the
    config has one); records every batch as (instance, [(corrid, row)])."""

    def __init__(self, index: int, log: list, lock: threading.Lock) -> None:
        self.index = index
        self.log = log
        self.lock = lock
        self.totals: dict[int, int] = {}

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    def infer(self, inputs):
        values = inputs["INPUT"].reshape(-1)
        start = inputs["START"].reshape(-1)
        ready = inputs["READY"].reshape(-1)
        corrid = inputs["CORRID"].reshape(-1)
        rows = [(int(corrid[r]), r) for r in range(len(values)) if ready[r]]
        with self.lock:
            self.log.append((self.index, rows, len(values)))
        out = np.zeros(len(values), dtype=np.int64)
        if "ACC_IN" in inputs:
            out = inputs["ACC_IN"].reshape(-1) + values
            return {"OUTPUT": out[:, None], "ACC_OUT": out[:, None].copy()}
        for corr, row in rows:
            total = 0 if start[row] else self.totals.get(corr, 0)
            total += int(values[row])
            self.totals[corr] = total
            out[row] = total
        return {"OUTPUT": out[:, None]}


def config(strategy: str, max_batch_size: int, candidates: int, state: bool) -> ModelConfig:
    controls = (
        SequenceControl("START", "START", "INT32", 0, 1),
        SequenceControl("READY", "READY", "INT32", 0, 1),
        SequenceControl("CORRID", "CORRID", "UINT64"),
    )
    states = (SequenceState("ACC_IN", "ACC_OUT", "INT64", (1,)),) if state else ()
    return ModelConfig(
        name="acc",
        backend="fake",
        max_batch_size=max_batch_size,
        inputs=(TensorSpec("INPUT", "INT64", (1,)),),
        outputs=(TensorSpec("OUTPUT", "INT64", (1,)),),
        sequence_batching=SequenceBatching(
            strategy=strategy,
            controls=controls,
            states=states,
            max_candidate_sequences=candidates,
            max_queue_delay_us=500 if strategy == "oldest" else 0,
            max_sequence_idle_us=200_000,  # frees slots held by sequences whose END was cancelled
        ),
    )


@dataclass
class Scenario:
    strategy: str
    max_batch_size: int
    instances: int
    candidates: int
    state: bool
    #: Each sequence's values, in order.
    sequences: list[list[int]]
    #: Submission order: sequence indexes (each appears as often as it has values).
    order: list[int]
    #: (sequence, position) of requests cancelled right after submission.
    cancelled: set[tuple[int, int]]
    #: Cancelled through the scheduler (as the front ends do) or only by cancelling the future.
    through_scheduler: bool


@st.composite
def scenarios(draw) -> Scenario:
    sequences = draw(
        st.lists(st.lists(st.integers(-9, 9), min_size=1, max_size=6), min_size=1, max_size=10)
    )
    order = draw(st.permutations([i for i, values in enumerate(sequences) for _ in values]))
    positions = [(i, p) for i, values in enumerate(sequences) for p in range(len(values))]
    cancelled = draw(st.sets(st.sampled_from(positions))) if positions else set()
    return Scenario(
        strategy=draw(st.sampled_from(["direct", "oldest"])),
        max_batch_size=draw(st.integers(1, 4)),
        instances=draw(st.integers(1, 2)),
        candidates=draw(st.integers(0, 5)),
        state=draw(st.booleans()),
        sequences=sequences,
        order=list(order),
        cancelled=cancelled,
        through_scheduler=draw(st.booleans()),
    )


async def _run(scenario: Scenario) -> None:
    log: list = []
    lock = threading.Lock()
    instances = [
        RuntimeInstance(Accumulator(i, log, lock), f"acc-{i}", i) for i in range(scenario.instances)
    ]
    model = config(scenario.strategy, scenario.max_batch_size, scenario.candidates, scenario.state)
    scheduler = SequenceScheduler(model, "1", instances, ModelStats(), max_queue_size=1000)
    loop = asyncio.get_running_loop()
    await scheduler.__aenter__()
    requests: dict[tuple[int, int], Request] = {}
    next_position = [0] * len(scenario.sequences)
    try:
        for index in scenario.order:
            position = next_position[index]
            next_position[index] += 1
            values = scenario.sequences[index]
            request = Request(
                id=f"{index}-{position}",
                inputs={"INPUT": np.array([[values[position]]], dtype=np.int64)},
                requested_outputs=(),
                rows=1,
                future=loop.create_future(),
                parameters={
                    "sequence_id": 1000 + index,
                    "sequence_start": position == 0,
                    "sequence_end": position == len(values) - 1,
                },
            )
            requests[(index, position)] = request
            scheduler.submit(request)
            if (index, position) in scenario.cancelled:
                if scenario.through_scheduler:
                    scheduler.cancel(request)
                else:
                    request.future.cancel()
        await asyncio.wait_for(
            asyncio.gather(*(r.future for r in requests.values()), return_exceptions=True),
            PATIENCE_S,
        )
    finally:
        await scheduler.close(grace=1.0)
        for instance in instances:
            await instance.close()

    # Cancelled right after submission, a request is still queued: it never runs.
    for index, values in enumerate(scenario.sequences):
        total = 0
        for position, value in enumerate(values):
            future = requests[(index, position)].future
            assert future.done()
            if future.cancelled():
                assert (index, position) in scenario.cancelled
                continue
            error = future.exception()
            if error is not None:
                assert isinstance(error, Cancelled), error
                assert (index, position) in scenario.cancelled
                continue
            total += value
            assert int(future.result().outputs["OUTPUT"][0, 0]) == total, (index, position)
    # Batches: within the size, one row per sequence, each sequence on one instance (and row).
    placement: dict[int, set] = {}
    for instance, rows, size in log:
        assert size <= max(scenario.max_batch_size, 1)
        corrids = [corr for corr, _ in rows]
        assert len(corrids) == len(set(corrids))
        for corr, row in rows:
            key = (instance, row) if scenario.strategy == "direct" else (instance,)
            placement.setdefault(corr, set()).add(key)
    assert all(len(places) == 1 for places in placement.values()), placement
    # A sequence whose END was cancelled stays open until its idle timeout; the rest ended.
    open_left = {
        i for i, values in enumerate(scenario.sequences) if (i, len(values) - 1) in scenario.cancelled
    }
    assert scheduler.active_sequences <= len(open_left)


@pytest.mark.timeout(120, method="thread")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_sequences_run_in_order_on_one_slot_and_each_request_gets_its_own_total(scenario):
    asyncio.run(_run(scenario))


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({}, "must specify a non-zero or non-empty correlation ID"),
        ({"sequence_id": 0}, "must specify a non-zero or non-empty correlation ID"),
        ({"sequence_id": ""}, "must specify a non-zero or non-empty correlation ID"),
        ({"sequence_id": True}, "must specify a non-zero or non-empty correlation ID"),
        ({"sequence_id": 1 << 64}, "unsigned 64-bit"),
        ({"sequence_id": 1.5}, "unsigned 64-bit"),
        ({"sequence_id": 3, "sequence_start": 1}, "'sequence_start': expected a boolean"),
        ({"sequence_id": 3, "sequence_end": "yes"}, "'sequence_end': expected a boolean"),
    ],
)
def test_sequence_parameters_are_validated_in_one_place(parameters, fragment):
    with pytest.raises(InvalidInput) as caught:
        sequence_flags("m", parameters)
    assert fragment in str(caught.value)


def test_sequence_flags_accept_uint64_and_string_ids():
    assert sequence_flags("m", {"sequence_id": (1 << 64) - 1}).correlation_id == (1 << 64) - 1
    flags = sequence_flags("m", {"sequence_id": "abc", "sequence_start": True})
    assert (flags.correlation_id, flags.start, flags.end) == ("abc", True, False)
