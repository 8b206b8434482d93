"""The worker <-> engine wire format on its own: what goes in comes out (tensors of every kind,
the request's fields, outcomes and errors), small tensors inline and large ones as frames."""

from __future__ import annotations

import numpy as np
import pytest

from convoy.engine import ipc
from convoy.engine.ipc import ZERO_COPY_BYTES, RemoteInternalError
from convoy.errors import InvalidInput, Overloaded
from convoy.types import Request, Response, StageTimes


def sent(frames: list) -> list[bytes]:
    """What the peer receives: every frame as bytes (the sender's memory no longer shared)."""
    return [bytes(frame) for frame in frames]


def test_a_request_arrives_with_every_field_and_tensor():
    small = np.arange(6, dtype=np.float16).reshape(2, 3)
    large = np.random.default_rng(1).standard_normal((4, ZERO_COPY_BYTES // 8)).astype(np.float32)
    text = np.array([b"", b"abc", "gr\u00fc\u00df".encode()], dtype=object).reshape(3, 1)
    request = Request(
        id="req-7",
        inputs={"SMALL": small, "LARGE": large[:, ::2], "TEXT": text},  # a non-contiguous view too
        requested_outputs=("OUT",),
        rows=2,
        future=None,
        priority=2,
        timeout_us=1500,
        deadline=12345.5,
        parameters={"priority": 2, "custom": b"\x00raw", "flag": True},
        received_ns=99,
    )
    frames = sent(ipc.encode_infer(41, "model", 3, request))
    assert len(frames) == 2, "only the large tensor travels as a frame of its own"
    kind, header, rest = ipc.parse(frames)
    assert kind == ipc.INFER
    call_id, model, version, got = ipc.decode_infer(header, rest, "future")
    assert (call_id, model, version) == (41, "model", 3)
    assert (got.id, got.requested_outputs, got.rows, got.priority, got.timeout_us) == (
        "req-7",
        ("OUT",),
        2,
        2,
        1500,
    )
    assert (got.deadline, got.received_ns, got.future) == (12345.5, 99, "future")
    assert got.parameters == request.parameters
    assert got.inputs["SMALL"].dtype == np.float16
    np.testing.assert_array_equal(got.inputs["SMALL"], small)
    np.testing.assert_array_equal(got.inputs["LARGE"], large[:, ::2])
    assert got.inputs["TEXT"].shape == (3, 1)
    assert list(got.inputs["TEXT"].reshape(-1)) == list(text.reshape(-1))


def test_a_result_arrives_with_outputs_and_stage_times():
    outputs = {"OUT": np.arange(10, dtype=np.int64), "BIG": np.ones(ZERO_COPY_BYTES, dtype=np.uint8)}
    times = StageTimes(1, 2, 3, 4, 5)
    frames = sent(ipc.encode_result(5, Response(outputs, "m", "1", times), outputs))
    kind, header, rest = ipc.parse(frames)
    assert kind == ipc.RESULT
    call_id, response = ipc.decode_result(header, rest)
    assert (call_id, response.model_name, response.model_version, response.timings) == (
        5,
        "m",
        "1",
        times,
    )
    assert list(response.outputs) == ["OUT", "BIG"]
    for name, array in outputs.items():
        np.testing.assert_array_equal(response.outputs[name], array)


@pytest.mark.parametrize(
    "error", [InvalidInput("input 'X': bad"), Overloaded("queue is full", retry_after=2.5)]
)
def test_convoy_errors_keep_their_class_message_and_retry_hint(error):
    kind, (call_id, name, message, retry_after), _ = ipc.parse(sent(ipc.encode_error(9, error)))
    rebuilt = ipc.rebuild_error(name, message, retry_after)
    assert (kind, call_id, type(rebuilt), str(rebuilt)) == (ipc.ERROR, 9, type(error), str(error))
    if isinstance(error, Overloaded):
        assert rebuilt.retry_after == 2.5


def test_unexpected_errors_travel_without_their_details():
    _, (_, name, message, _), _ = ipc.parse(sent(ipc.encode_error(1, KeyError("secret path"))))
    rebuilt = ipc.rebuild_error(name, message)
    assert isinstance(rebuilt, RemoteInternalError)
    assert "secret" not in str(rebuilt)
