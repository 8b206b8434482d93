"""gRPC bidirectional streaming (ModelStreamInfer): every request gets its own response, and a
failing request answers with an error for that request only."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import WITH_WORKERS
from tritonclient.grpc import service_pb2, service_pb2_grpc

pytestmark = pytest.mark.frontends(*WITH_WORKERS)

RESPONSE_DEADLINE_S = 30


@pytest.fixture
def stream(server):
    """A client with an open stream; yields (client, responses queue of (result, error))."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    yield client, responses
    client.stop_stream()
    client.close()


def _value_input(value: int):
    tensor = grpcclient.InferInput("INPUT0", [1, 2], "INT32")
    tensor.set_data_from_numpy(np.array([[value, value + 1000]], dtype=np.int32))
    return tensor


def _collect(responses: queue.SimpleQueue, count: int) -> list:
    return [responses.get(timeout=RESPONSE_DEADLINE_S) for _ in range(count)]


def test_every_stream_response_matches_its_request_id(stream):
    client, responses = stream
    values = [v for v in range(20) if v != 13]  # 13 makes fails_on_value raise
    for value in values:
        client.async_stream_infer("fails_on_value", [_value_input(value)], request_id=f"r{value}")
    answered = {}
    for result, error in _collect(responses, len(values)):
        assert error is None, error
        request_id = result.get_response().id
        assert request_id not in answered
        answered[request_id] = result.as_numpy("OUTPUT0")
    assert set(answered) == {f"r{v}" for v in values}
    for value in values:
        np.testing.assert_array_equal(answered[f"r{value}"], [[value, value + 1000]])


def test_failing_stream_request_gets_an_error_while_the_others_succeed(stream):
    client, responses = stream
    values = [1, 2, 13, 4, 5]
    for value in values:
        client.async_stream_infer("fails_on_value", [_value_input(value)], request_id=f"r{value}")
    received = _collect(responses, len(values))
    errors = [error for _, error in received if error is not None]
    successes = {result.get_response().id for result, error in received if error is None}
    assert successes == {"r1", "r2", "r4", "r5"}
    (error,) = errors
    assert "ValueError: refusing the value 13" in error.message()
    assert "Traceback" not in error.message()


def test_invalid_stream_request_gets_an_error_while_the_others_succeed(stream):
    client, responses = stream
    client.async_stream_infer("fails_on_value", [_value_input(1)], request_id="good-1")
    client.async_stream_infer("no_such_model", [_value_input(2)], request_id="unknown-model")
    wrong = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 2), dtype=np.float32))
    client.async_stream_infer("fails_on_value", [wrong], request_id="wrong-datatype")
    client.async_stream_infer("fails_on_value", [_value_input(3)], request_id="good-2")
    received = _collect(responses, 4)
    successes = {result.get_response().id for result, error in received if error is None}
    messages = sorted(error.message() for _, error in received if error is not None)
    assert successes == {"good-1", "good-2"}
    assert len(messages) == 2
    assert any("no_such_model" in m for m in messages)
    assert any("INPUT0" in m and "INT32" in m for m in messages)


def test_stream_error_response_carries_the_failing_request_id(server):
    """Checked on the raw protocol: tritonclient hides the id of an error response."""

    def requests():
        for request_id, value in (("ok", 1), ("bad", 13), ("ok-too", 2)):
            message = service_pb2.ModelInferRequest(model_name="fails_on_value", id=request_id)
            message.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 1])
            message.raw_input_contents.append(np.array([value], dtype=np.int32).tobytes())
            yield message

    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(requests(), timeout=RESPONSE_DEADLINE_S))
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"ok", "bad", "ok-too"}
    assert by_id["ok"].error_message == ""
    assert by_id["ok-too"].error_message == ""
    assert "refusing the value 13" in by_id["bad"].error_message
    assert by_id["bad"].infer_response.model_name == "fails_on_value"
