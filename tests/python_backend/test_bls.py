"""BLS: model code calling other models of the server (exec, async_exec, exec(decoupled=True)),
through their schedulers; errors come back as response errors; a call that would close a cycle
of models calling each other (itself, or back to its caller) is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient


def call(client, model: str, x: np.ndarray, mode: str | None = None):
    item = grpcclient.InferInput("X", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return client.infer(model, [item], parameters={"mode": mode} if mode else None)


def test_exec_calls_another_model_and_gets_only_the_requested_output(grpc_client):
    before = grpc_client.get_inference_statistics("tp_add_sub", as_json=True)["model_stats"][0]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = call(grpc_client, "tp_bls", x, "add")
    np.testing.assert_array_equal(result.as_numpy("Y"), 2 * x)
    assert result.as_numpy("MSG")[0, 0] == b"OUTPUT0"
    after = grpc_client.get_inference_statistics("tp_add_sub", as_json=True)["model_stats"][0]
    # The call went through tp_add_sub's scheduler: it counts in that model's statistics.
    succeeded = int(after["inference_stats"]["success"].get("count", 0))
    assert succeeded == int(before["inference_stats"]["success"].get("count", 0)) + 1


def test_exec_decoupled_iterates_over_every_response_then_an_empty_final(grpc_client):
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    result = call(grpc_client, "tp_bls", x, "stream")
    assert result.as_numpy("Y")[0, 0] == 10
    assert json.loads(result.as_numpy("MSG")[0, 0]) == {"responses": 5, "last_empty": True}


def test_async_exec_and_async_decoupled_exec(grpc_client):
    x = np.full((1, 4), 3, dtype=np.float32)
    y = call(grpc_client, "tp_bls_async", x).as_numpy("Y")
    np.testing.assert_array_equal(y[0, :3], [6, 6, 6])
    assert y[0, 3] == 3  # tp_repeat streamed three responses with outputs


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (
            "self",
            "BLS call from model 'tp_bls' to model 'tp_bls' refused: it would close a cycle of "
            "models calling each other (tp_bls -> tp_bls), which can deadlock their instances",
        ),
        (
            "pingpong",
            "BLS call from model 'tp_pong' to model 'tp_bls' refused: it would close a cycle of "
            "models calling each other (tp_pong -> tp_bls -> tp_pong), which can deadlock their "
            "instances",
        ),
        ("missing", "Request for unknown model: 'no_such_model' is not found"),
        ("timeout", "BLS request to 'tp_slow' timed out"),
    ],
)
def test_a_failing_call_comes_back_as_a_response_error(grpc_client, mode, message):
    result = call(grpc_client, "tp_bls", np.zeros((1, 4), dtype=np.float32), mode)
    assert result.as_numpy("MSG")[0, 0].decode() == message
