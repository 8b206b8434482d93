"""TritonPythonModel with isolation: process: each instance in a worker process of its own,
requests still presented one by one (views of their rows), errors per request; decoupled
models are refused under process isolation with a reason naming the field."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from conftest import triton_repository
from helpers import ConvoyProcess, serve_until_stopped
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    root = tmp_path_factory.mktemp("python_backend_isolated")
    repository = triton_repository(root / "models", ["tp_add_sub", "tp_errors", "tp_repeat"])
    process = ConvoyProcess(repository, root / "server.log", extra_args=("--isolation", "process"))
    # tp_repeat (decoupled) does not load under process isolation: wait for liveness.
    yield from serve_until_stopped(process, "live")


def test_batched_requests_in_a_worker_process_get_their_own_rows(isolated):
    client = grpcclient.InferenceServerClient(isolated.grpc_url)

    def one(i: int):
        a = np.full((1 + i % 3, 4), i, dtype=np.float32)
        inputs = [
            grpcclient.InferInput("INPUT0", list(a.shape), "FP32"),
            grpcclient.InferInput("INPUT1", list(a.shape), "FP32"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(np.ones_like(a))
        got = client.infer("tp_add_sub", inputs)
        return a, got.as_numpy("OUTPUT0"), got.as_numpy("OUTPUT1")

    with ThreadPoolExecutor(8) as pool:
        for a, added, subtracted in pool.map(one, range(32)):
            np.testing.assert_array_equal(added, a + 1)
            np.testing.assert_array_equal(subtracted, a - 1)
    client.close()


def test_error_response_in_a_worker_fails_only_its_request(isolated):
    client = grpcclient.InferenceServerClient(isolated.grpc_url)
    item = grpcclient.InferInput("X", [1, 1], "INT32")
    item.set_data_from_numpy(np.array([[-3]], dtype=np.int32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("tp_errors", [item])
    assert "negative value -3" in caught.value.message()
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    item.set_data_from_numpy(np.array([[4]], dtype=np.int32))
    assert client.infer("tp_errors", [item]).as_numpy("Y")[0, 0] == 5
    client.close()


def test_decoupled_model_is_refused_under_process_isolation(isolated):
    rows = requests.post(f"{isolated.base_url}/v2/repository/index", json={}, timeout=30).json()
    row = next(r for r in rows if r["name"] == "tp_repeat")
    assert row["state"] == "UNAVAILABLE"
    assert "parameters.isolation: 'process' is not supported for decoupled models" in row["reason"]
