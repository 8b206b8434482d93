"""The wire format every process boundary speaks (convoy/wire.py, engine/remote/messages.py): typed
messages and raw tensor bytes survive a round trip through a real socket pair, for every
datatype (BYTES and BF16 included), empty and large tensors, and errors of every kind."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convoy import errors
from convoy.datatypes import NUMPY_DTYPE
from convoy.engine.remote.messages import Failure, Infer, Result, ToEngine, ToFrontEnd
from convoy.wire import (
    FrameWriter,
    Link,
    RemoteInternalError,
    decoder,
    error_info,
    read_tensors,
    rebuild_error,
)

DATATYPES = sorted(NUMPY_DTYPE)


@st.composite
def tensors(draw):
    datatype = draw(st.sampled_from(DATATYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=12), min_size=count, max_size=count))
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = np.dtype(NUMPY_DTYPE[datatype])
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _frame_bytes(writer: FrameWriter) -> bytes:
    return b"".join(bytes(part) for part in writer.take())


def _parse(frame: bytes, kind):
    from convoy.wire import PREFIX

    header, size = PREFIX.unpack_from(frame)
    messages = decoder(kind).decode(frame[PREFIX.size : PREFIX.size + header])
    data = memoryview(frame)[PREFIX.size + header :]
    assert len(data) == size
    return messages, data


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), tensors(), max_size=4), st.integers(0, 2**40))
def test_infer_message_round_trips_every_datatype(arrays, call):
    writer = FrameWriter()
    metas = writer.tensors(arrays)
    writer.add(
        Infer(
            call=call,
            model="m",
            version=3,
            latest=True,
            id="id",
            requested=("OUT",),
            rows=1,
            priority=0,
            timeout_us=0,
            deadline=None,
            parameters={"p": 1, "s": "x"},
            received_ns=5,
            principal=None,
            inputs=metas,
        )
    )
    [message], data = _parse(_frame_bytes(writer), ToEngine)
    assert isinstance(message, Infer) and message.call == call and message.parameters["s"] == "x"
    back = read_tensors(message.inputs, data)
    assert list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].shape == array.shape
        assert back[name].dtype == array.dtype
        if array.dtype.kind == "O":
            assert back[name].tolist() == array.tolist()
        else:  # bit for bit (NaNs included)
            assert back[name].tobytes() == array.tobytes()


def test_large_tensor_and_many_messages_share_one_frame():
    writer = FrameWriter()
    big = np.arange(3_000_000, dtype=np.float32).reshape(1000, 3000)
    for call in range(100):
        metas = writer.tensors({"OUTPUT0": big[call : call + 1]})
        writer.add(Result(call=call, model="m", version="1", timings=(1, 2, 3, 4, 5), outputs=metas))
    messages, data = _parse(_frame_bytes(writer), ToFrontEnd)
    assert [m.call for m in messages] == list(range(100))
    for message in messages:
        out = read_tensors(message.outputs, data)["OUTPUT0"]
        np.testing.assert_array_equal(out, big[message.call : message.call + 1])


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidInput("bad 'x'"),
        errors.ModelNotFound("no model"),
        errors.Overloaded("full", retry_after=2.5),
        errors.Unavailable("later"),
        errors.DeadlineExceeded("late"),
        errors.InferenceFailed("boom"),
        errors.InstanceLost("gone"),
        errors.EngineDead("dead"),
        errors.PermissionDenied("no"),
        KeyError("secret detail"),
    ],
)
def test_errors_keep_their_kind_and_status(error):
    writer = FrameWriter()
    writer.add(Failure(call=7, error=error_info(error)))
    [message], _ = _parse(_frame_bytes(writer), ToFrontEnd)
    rebuilt = rebuild_error(message.error)
    if isinstance(error, errors.ConvoyError):
        assert type(rebuilt) is type(error)
        assert errors.status_of(rebuilt) == errors.status_of(error)
        if isinstance(error, errors.Overloaded):
            assert rebuilt.retry_after == 2.5
    else:
        assert isinstance(rebuilt, RemoteInternalError)
        assert "secret" not in str(rebuilt)  # the detail stays in the sender's log


def test_link_delivers_frames_split_across_reads_in_order():
    """Two Links over a socket pair: a frame larger than the receive buffer, and many small
    messages sent in one loop turn, arrive whole and in order."""

    async def run():
        left, right = socket.socketpair()
        got: list = []
        done = asyncio.Event()

        def on_frame(messages, data):
            for message in messages:
                got.append((message.call, read_tensors(message.outputs, data)))
            if len(got) >= 201:
                done.set()

        loop = asyncio.get_running_loop()
        _, sender = await loop.create_unix_connection(
            lambda: Link(ToEngine, lambda m, d: None, lambda e: None), sock=left
        )
        await loop.create_unix_connection(lambda: Link(ToFrontEnd, on_frame, lambda e: None), sock=right)
        big = np.random.default_rng(0).random((512, 1024))  # 4 MiB, many reads
        writer = sender.writer()
        metas = writer.tensors({"x": big})
        writer.add(Result(call=0, model="m", version="1", timings=None, outputs=metas))
        await asyncio.sleep(0)
        for call in range(1, 201):
            writer = sender.writer()
            writer.add(
                Result(
                    call=call,
                    model="m",
                    version="1",
                    timings=None,
                    outputs=writer.tensors({"x": np.array([call])}),
                )
            )
        await asyncio.wait_for(done.wait(), 10)
        sender.close()
        assert [c for c, _ in got] == list(range(201))
        np.testing.assert_array_equal(got[0][1]["x"], big)
        assert [int(t["x"][0]) for _, t in got[1:]] == list(range(1, 201))

    asyncio.run(run())


def test_an_ensembles_step_timings_travel_with_its_result():
    from convoy.types import StageTimes, StepTiming

    steps = (
        StepTiming(0, "pre", "1", 10, 11, 12, StageTimes(1, 2, 3, 4, 5)),
        StepTiming(1, "post", "2", 13, 14, 15, None),
    )
    writer = FrameWriter()
    metas = writer.tensors({})
    writer.add(Result(call=1, model="pipeline", version="1", timings=None, outputs=metas, steps=steps))
    [message], _ = _parse(_frame_bytes(writer), ToFrontEnd)
    assert message.steps == steps
    assert isinstance(message.steps[0], StepTiming)
    assert isinstance(message.steps[0].timings, StageTimes)
