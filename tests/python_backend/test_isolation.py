"""TritonPythonModel with isolation: process: each instance in a worker process of its own,
requests still presented one by one (views of their rows), errors per request; decoupled
models are refused under process isolation with a reason naming the field."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import ConvoyProcess, serve_until_stopped
from prometheus_client.parser import text_string_to_metric_families
from python_backend_models import triton_repository
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def isolated(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("python_backend_isolated")
    models = [
        "tp_add_sub",
        "tp_errors",
        "tp_repeat",
        "tp_bls",
        "tp_bls_async",
        "tp_slow",
        "tp_iterative",
    ]
    repository = triton_repository(root / "models", models)
    process = ConvoyProcess(
        repository, root / "server.log", extra_args=("--isolation", "process"), frontend=frontend
    )
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


def bls(isolated, model: str, x: np.ndarray, mode: str | None = None):
    client = grpcclient.InferenceServerClient(isolated.grpc_url)
    item = grpcclient.InferInput("X", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    try:
        return client.infer(model, [item], parameters={"mode": mode} if mode else None)
    finally:
        client.close()


def test_bls_from_a_worker_process_reaches_the_servers_models(isolated):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(bls(isolated, "tp_bls", x, "add").as_numpy("Y"), 2 * x)
    timed_out = bls(isolated, "tp_bls", x, "timeout").as_numpy("MSG")[0, 0].decode()
    assert "BLS request to 'tp_slow' timed out" in timed_out
    refused = bls(isolated, "tp_bls", x, "self").as_numpy("MSG")[0, 0].decode()
    assert "refused: it could never run, since every instance of 'tp_bls' (1)" in refused


def test_async_bls_from_a_worker(isolated):
    y = bls(isolated, "tp_bls_async", np.ones((1, 4), dtype=np.float32)).as_numpy("Y")
    # Both async_exec calls to tp_add_sub came back (2X); the decoupled call to tp_repeat is
    # refused in a worker (an error response, no outputs), so it counted no responses.
    np.testing.assert_array_equal(y, [[2, 2, 2, 0]])


def test_custom_metrics_of_worker_processes_are_exported(isolated):
    test_batched_requests_in_a_worker_process_get_their_own_rows(isolated)  # 32 requests
    text = requests.get(f"http://127.0.0.1:{isolated.metrics_port}/metrics", timeout=10).text
    counted = {
        sample.labels["instance"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "tp_add_sub_requests"  # a counter: the parser names samples _total
        for sample in family.samples
    }
    # One series per worker (its instance name), summed by the server.
    assert set(counted) <= {"tp_add_sub_0_0", "tp_add_sub_0_1"} and counted
    assert sum(counted.values()) >= 32


def test_rescheduling_in_a_worker_process(isolated):
    client = grpcclient.InferenceServerClient(isolated.grpc_url)
    item = grpcclient.InferInput("STEPS", [1, 1], "INT32")
    item.set_data_from_numpy(np.array([[3]], dtype=np.int32))
    result = client.infer("tp_iterative", [item])
    client.close()
    assert result.as_numpy("ITERATIONS")[0, 0] == 3
    assert result.as_numpy("STARTS")[0, 0] == 1
