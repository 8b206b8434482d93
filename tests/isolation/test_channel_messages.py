"""The isolated worker channel's typed messages (runtimes/isolated_messages.py) survive a frame
whole: the model version to load (typed config, path), per-request outcomes with their own
tensors, and failures with their kind and fatal flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convoy.config import ModelConfig, ModelVersionSource
from convoy.runtimes.isolated_messages import (
    FromWorker,
    Load,
    RequestResult,
    RequestResults,
    ToWorker,
    WorkerFailure,
)
from convoy.wire import PREFIX, FrameWriter, decoder, read_tensors


def _round_trip(writer: FrameWriter, kind):
    frame = b"".join(bytes(part) for part in writer.take())
    header, _ = PREFIX.unpack_from(frame)
    [message] = decoder(kind).decode(frame[PREFIX.size : PREFIX.size + header])
    return message, memoryview(frame)[PREFIX.size + header :]


def test_load_carries_the_typed_model_version():
    config = ModelConfig(name="echo", backend="python", max_batch_size=8)
    source = ModelVersionSource(config, 3, Path("/m/echo/3"))
    writer = FrameWriter()
    writer.add(Load(backend="python", source=source, instance_index=2))
    message, _ = _round_trip(writer, ToWorker)
    assert isinstance(message, Load)
    assert message.source == source and isinstance(message.source.path, Path)
    assert message.instance_index == 2


def test_per_request_outcomes_keep_their_own_tensors_and_failures():
    writer = FrameWriter()
    first = {"OUT": np.arange(4, dtype=np.float32)}
    second = {"OUT": np.array([b"a", b"bc"], dtype=object)}
    results = [
        RequestResult(outputs=writer.tensors(first), parameters={"p": 1}),
        RequestResult(rescheduled=True),
        RequestResult(error=WorkerFailure(kind="InvalidInput", message="bad 'x'")),
        RequestResult(outputs=writer.tensors(second)),
    ]
    writer.add(RequestResults(results=results, metrics=[["m", "help", "counter", []]]))
    message, data = _round_trip(writer, FromWorker)
    assert isinstance(message, RequestResults)
    got = message.results
    np.testing.assert_array_equal(read_tensors(got[0].outputs, data)["OUT"], first["OUT"])
    assert got[0].parameters == {"p": 1}
    assert got[1].rescheduled and got[1].outputs == []
    assert got[2].error == WorkerFailure(kind="InvalidInput", message="bad 'x'", fatal=False)
    assert read_tensors(got[3].outputs, data)["OUT"].tolist() == [b"a", b"bc"]
    assert message.metrics == [["m", "help", "counter", []]]


def test_a_fatal_failure_says_so():
    writer = FrameWriter()
    writer.add(WorkerFailure(kind="RuntimeError", message="CUDA error", fatal=True))
    message, _ = _round_trip(writer, FromWorker)
    assert message == WorkerFailure(kind="RuntimeError", message="CUDA error", fatal=True)
