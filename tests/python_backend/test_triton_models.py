"""TritonPythonModel served unchanged: the execute contract, pb_utils helpers, auto-complete,
per-request errors, async execute and custom metrics, through tritonclient (gRPC and HTTP)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException


def _module(client):
    return grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient


@pytest.fixture(params=["grpc", "http"])
def client(request, grpc_client, http_client):
    return grpc_client if request.param == "grpc" else http_client


def tensor(module, name, array, datatype):
    item = module.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def test_add_sub_answers_each_request_with_its_own_rows(client):
    module = _module(client)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.ones((3, 4), dtype=np.float32)
    result = client.infer(
        "tp_add_sub", [tensor(module, "INPUT0", a, "FP32"), tensor(module, "INPUT1", b, "FP32")]
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_concurrent_requests_batched_together_get_their_own_answers(grpc_client):
    def one(i: int):
        x = np.full((1 + i % 3, 2), i, dtype=np.int32)
        result = grpc_client.infer("tp_batch_probe", [tensor(grpcclient, "X", x, "INT32")])
        return x, result.as_numpy("Y"), int(result.as_numpy("N")[0, 0])

    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(one, range(48)))
    for x, y, _ in outcomes:
        np.testing.assert_array_equal(y, x)
    # Requests queued behind a 50 ms execution shared the next execute call.
    assert max(n for _, _, n in outcomes) > 1


def test_auto_complete_config_is_what_the_config_api_reports(http_client):
    config = http_client.get_model_config("tp_autocomplete")
    assert config["max_batch_size"] == 8
    assert [i["name"] for i in config["input"]] == ["TEXT"]
    assert config["input"][0]["data_type"] == "TYPE_STRING"
    assert [o["name"] for o in config["output"]] == ["UPPER", "INFO"]
    assert "dynamic_batching" in config
    metadata = http_client.get_model_metadata("tp_autocomplete")
    assert metadata["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]


def test_request_metadata_initialize_args_and_helpers_reach_the_model(client):
    module = _module(client)
    text = np.array([[b"abc"]], dtype=np.object_)
    result = client.infer(
        "tp_autocomplete",
        [tensor(module, "TEXT", text, "BYTES")],
        request_id="req-7",
        parameters={"color": "blue"},
        outputs=[module.InferRequestedOutput("INFO"), module.InferRequestedOutput("UPPER")],
    )
    assert result.as_numpy("UPPER").tolist() == [[b"ABC"]]
    info = json.loads(result.as_numpy("INFO")[0, 0])
    assert info["request_id"] == "req-7"
    assert info["parameters"]["color"] == "blue"
    assert sorted(info["requested"]) == ["INFO", "UPPER"]
    assert info["args"] == {
        "model_instance_kind": "CPU",
        "model_instance_name": "tp_autocomplete_0_0",
        "model_instance_device_id": "0",
        "model_repository": info["args"]["model_repository"],
        "model_version": "1",
        "model_name": "tp_autocomplete",
    }
    assert info["args"]["model_repository"].endswith("tp_autocomplete")
    assert info["max_batch_size"] == 8 and info["dims"] == [1]
    assert info["triton_dtype"] == 13 and info["shape"] == [1, 1] and info["is_cpu"] is True
    assert info["decoupled"] is False and info["model_dir_ok"] is True
    assert info["roundtrip"] == ["abc"]
    assert info["np_to_triton"] == 11 and info["triton_to_np"] == "int64"


def test_async_execute(client):
    module = _module(client)
    x = np.array([[1, 2, 3]], dtype=np.int64)
    result = client.infer("tp_async", [tensor(module, "X", x, "INT64")])
    np.testing.assert_array_equal(result.as_numpy("Y"), x * 2)
    # Response parameters reach the client.
    if module is grpcclient:
        parameters = result.get_response().parameters
        assert parameters["doubled"].bool_param is True and parameters["rows"].int64_param == 1
    else:
        assert result.get_response()["parameters"] == {"doubled": True, "rows": 1}


def _errors(client, value: int):
    module = _module(client)
    return client.infer("tp_errors", [tensor(module, "X", np.array([[value]], dtype=np.int32), "INT32")])


def test_an_error_response_fails_only_its_request(grpc_client):
    def one(value: int):
        try:
            return value, _errors(grpc_client, value).as_numpy("Y")[0, 0], None
        except InferenceServerException as exc:
            return value, None, exc

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, [1, -2, 3, -4, 5, 6, -7, 8]))
    for value, y, error in outcomes:
        if value < 0:
            assert error is not None and f"negative value {value}" in error.message()
            assert error.status() == "StatusCode.INVALID_ARGUMENT"
        else:
            assert error is None and y == value + 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (100, "TritonModelException: the model refuses the value 100"),
        (200, "execute() must return one InferenceResponse per request (1), got 0"),
        (300, "execute() returned None; expected a list of 1 InferenceResponse"),
    ],
)
def test_a_misbehaving_execute_fails_the_batch_with_a_clear_error(client, value, message):
    with pytest.raises(InferenceServerException) as caught:
        _errors(client, value)
    assert message in caught.value.message()
    # The server keeps serving.
    assert _errors(client, 1).as_numpy("Y")[0, 0] == 2


def test_custom_metrics_are_exported(triton_server, grpc_client):
    a = np.zeros((1, 4), dtype=np.float32)
    grpc_client.infer(
        "tp_add_sub", [tensor(grpcclient, "INPUT0", a, "FP32"), tensor(grpcclient, "INPUT1", a, "FP32")]
    )
    text = requests.get(f"http://127.0.0.1:{triton_server.metrics_port}/metrics", timeout=10).text
    counted = [
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "tp_add_sub_requests"  # a counter: the parser names samples _total
        for sample in family.samples
    ]
    assert len(counted) == 2  # one series per instance (label `instance`)
    assert sum(counted) >= 1
    assert "# HELP tp_add_sub_requests Requests tp_add_sub has executed" in text
    assert "# TYPE tp_add_sub_requests counter" in text


def test_logger_writes_to_the_server_log(triton_server):
    assert "tp_add_sub initialized as tp_add_sub_0_1" in triton_server.log()


def test_a_model_that_is_not_decoupled_may_answer_through_its_response_sender(client):
    module = _module(client)
    x = np.array([[4]], dtype=np.int32)
    result = client.infer("tp_sender", [tensor(module, "X", x, "INT32")])
    assert result.as_numpy("Y")[0, 0] == 40
