"""The HTTP API as curl would see it: plain requests, JSON bodies, the binary tensor extension,
and JSON errors (never a traceback) for malformed requests."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
import requests
from helpers import FRONTENDS, WITH_WORKERS, ConvoyProcess, build_broken_repository

pytestmark = pytest.mark.frontends(*WITH_WORKERS)

TIMEOUT = 10


def _post(server, path: str, **kwargs) -> requests.Response:
    return requests.post(f"{server.base_url}{path}", timeout=TIMEOUT, **kwargs)


def _get(server, path: str) -> requests.Response:
    return requests.get(f"{server.base_url}{path}", timeout=TIMEOUT)


def _add_sub_body(rows: int = 1) -> dict:
    return {
        "id": "curl-1",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [rows, 16], "data": [1.5] * 16 * rows},
            {"name": "INPUT1", "datatype": "FP32", "shape": [rows, 16], "data": [0.5] * 16 * rows},
        ],
    }


def _assert_json_error(answer: requests.Response, status: int, *fragments: str) -> str:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    message = answer.json()["error"]
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in answer.text
    return message


def test_health_live_and_ready_answer_200(server):
    assert _get(server, "/v2/health/live").status_code == 200
    assert _get(server, "/v2/health/ready").status_code == 200


def test_model_ready_answers_200_for_a_served_model_and_not_for_an_unknown_one(server):
    assert _get(server, "/v2/models/add_sub/ready").status_code == 200
    assert _get(server, "/v2/models/add_sub/versions/1/ready").status_code == 200
    assert _get(server, "/v2/models/no_such_model/ready").status_code != 200


def test_server_metadata_is_json(server):
    answer = _get(server, "/v2")
    assert answer.status_code == 200
    assert answer.json()["name"] == "convoy"


def test_openapi_document_is_valid_json_listing_the_v2_paths(server):
    answer = _get(server, "/openapi.json")
    assert answer.status_code == 200
    document = json.loads(answer.content)
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model}",
        "/v2/models/{model}/ready",
        "/v2/models/{model}/config",
        "/v2/models/{model}/stats",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
        "/v2/repository/index",
        "/v2/repository/models/{model}/load",
        "/v2/repository/models/{model}/unload",
    ):
        assert path in paths, path
    assert all(path.startswith("/v2") for path in paths)


def test_json_infer_returns_json_outputs(server):
    answer = _post(server, "/v2/models/add_sub/infer", json=_add_sub_body())
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    document = answer.json()
    assert document["model_name"] == "add_sub"
    assert document["model_version"] == "1"
    assert document["id"] == "curl-1"
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["OUTPUT0"] == {
        "name": "OUTPUT0",
        "datatype": "FP32",
        "shape": [1, 16],
        "data": [2.0] * 16,
    }
    assert outputs["OUTPUT1"]["data"] == [1.0] * 16


def test_json_infer_accepts_nested_data_lists(server):
    body = _add_sub_body(rows=2)
    body["inputs"][0]["data"] = [[1.5] * 16, [2.5] * 16]
    answer = _post(server, "/v2/models/add_sub/infer", json=body)
    assert answer.status_code == 200, answer.text
    (output0,) = [o for o in answer.json()["outputs"] if o["name"] == "OUTPUT0"]
    assert output0["data"] == [2.0] * 16 + [3.0] * 16


def test_explicit_version_path_is_answered_by_that_version(server):
    body = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 1], "data": [10]}]}
    answer = _post(server, "/v2/models/versioned_all/versions/1/infer", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "1"
    assert answer.json()["outputs"][0]["data"] == [11]


def test_binary_tensor_extension_round_trips(server):
    values = np.arange(16, dtype=np.float32).reshape(1, 16)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "FP32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                }
                for name in ("INPUT0", "INPUT1")
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    answer = _post(
        server,
        "/v2/models/add_sub/infer",
        data=header + values.tobytes() * 2,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert answer.status_code == 200, answer.text
    split = int(answer.headers["Inference-Header-Content-Length"])
    document = json.loads(answer.content[:split])
    (output,) = document["outputs"]
    assert output["parameters"]["binary_data_size"] == 64
    np.testing.assert_array_equal(np.frombuffer(answer.content[split:], np.float32), values[0] * 2)


def test_gzip_request_body_is_accepted(server):
    body = gzip.compress(json.dumps(_add_sub_body()).encode())
    answer = _post(
        server,
        "/v2/models/add_sub/infer",
        data=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [2.0] * 16


def test_large_response_is_gzipped_when_the_client_accepts_it(server):
    answer = _post(
        server,
        "/v2/models/add_sub/infer",
        json=_add_sub_body(rows=32),
        headers={"Accept-Encoding": "gzip"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers.get("content-encoding") == "gzip"
    assert answer.json()["outputs"][0]["shape"] == [32, 16]  # requests decompressed it


def test_model_config_and_statistics_are_json(server):
    config = _get(server, "/v2/models/add_sub/config").json()
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    stats = _get(server, "/v2/models/add_sub/stats").json()
    assert stats["model_stats"][0]["name"] == "add_sub"


def test_repository_index_can_be_limited_to_ready_models(server):
    everything = _post(server, "/v2/repository/index").json()
    ready = _post(server, "/v2/repository/index", json={"ready": True}).json()
    assert {r["name"] for r in ready} <= {r["name"] for r in everything}
    assert all(r["state"] == "READY" for r in ready)


# --- malformed requests ---------------------------------------------------------------------------
def test_malformed_json_body_returns_400_with_json_error(server):
    answer = _post(
        server,
        "/v2/models/add_sub/infer",
        data=b'{"inputs": [',
        headers={"Content-Type": "application/json"},
    )
    _assert_json_error(answer, 400, "JSON")


def test_json_body_that_is_not_an_object_returns_400(server):
    _assert_json_error(_post(server, "/v2/models/add_sub/infer", json=[1, 2]), 400, "object")


def test_inputs_that_are_not_a_list_return_400(server):
    _assert_json_error(_post(server, "/v2/models/add_sub/infer", json={"inputs": {}}), 400, "inputs")


@pytest.mark.parametrize("value", ["abc", "-1", "100000"])
def test_bad_inference_header_content_length_returns_400_with_json_error(server, value):
    body = json.dumps(_add_sub_body()).encode()
    answer = _post(
        server, "/v2/models/add_sub/infer", data=body, headers={"Inference-Header-Content-Length": value}
    )
    _assert_json_error(answer, 400, "Inference-Header-Content-Length")


def test_inference_header_content_length_splitting_the_json_returns_400(server):
    body = json.dumps(_add_sub_body()).encode()
    answer = _post(
        server, "/v2/models/add_sub/infer", data=body, headers={"Inference-Header-Content-Length": "10"}
    )
    _assert_json_error(answer, 400, "JSON")


def test_binary_data_size_past_the_body_returns_400(server):
    body = _add_sub_body()
    body["inputs"][0].pop("data")
    body["inputs"][0]["parameters"] = {"binary_data_size": 64}
    header = json.dumps(body).encode()
    answer = _post(
        server,
        "/v2/models/add_sub/infer",
        data=header + b"\0" * 10,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    _assert_json_error(answer, 400, "INPUT0", "binary_data_size")


def test_binary_bytes_no_input_claims_return_400(server):
    header = json.dumps(_add_sub_body()).encode()
    answer = _post(
        server,
        "/v2/models/add_sub/infer",
        data=header + b"\0" * 8,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    _assert_json_error(answer, 400, "8")


def test_input_without_data_returns_400_naming_it(server):
    body = _add_sub_body()
    body["inputs"][1].pop("data")
    _assert_json_error(_post(server, "/v2/models/add_sub/infer", json=body), 400, "INPUT1")


def test_non_numeric_json_data_returns_400_naming_the_input(server):
    body = _add_sub_body()
    body["inputs"][0]["data"] = ["x"] * 16
    _assert_json_error(_post(server, "/v2/models/add_sub/infer", json=body), 400, "INPUT0")


def test_invalid_gzip_body_returns_400(server):
    answer = _post(
        server, "/v2/models/add_sub/infer", data=b"not gzip", headers={"Content-Encoding": "gzip"}
    )
    _assert_json_error(answer, 400, "gzip")


def test_unknown_model_returns_404_with_json_error(server):
    answer = _post(server, "/v2/models/no_such_model/infer", json=_add_sub_body())
    _assert_json_error(answer, 404, "no_such_model")


def test_unknown_path_returns_404_with_json_error(server):
    _assert_json_error(_get(server, "/v2/no/such/endpoint"), 404)


def test_wrong_method_on_infer_returns_a_json_client_error(server):
    answer = _get(server, "/v2/models/add_sub/infer")
    assert 400 <= answer.status_code < 500
    assert "POST" in answer.json()["error"]


def test_json_infer_still_succeeds_after_the_malformed_requests(server):
    answer = _post(server, "/v2/models/add_sub/infer", json=_add_sub_body())
    assert answer.status_code == 200, answer.text


def test_output_parameters_that_are_not_an_object_return_400(server):
    body = _add_sub_body()
    body["outputs"] = [{"name": "OUTPUT0", "parameters": [1]}]
    _assert_json_error(_post(server, "/v2/models/add_sub/infer", json=body), 400, "OUTPUT0")


@pytest.mark.parametrize("values", [[5, 3], [10**12, 1]], ids=["small", "huge"])
def test_bytes_json_data_holding_numbers_returns_400(server, values):
    body = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 2], "data": values}]}
    answer = _post(server, "/v2/models/identity_bytes/infer", json=body)
    _assert_json_error(answer, 400, "INPUT0")


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("BOOL", ["yes"]),
        ("BOOL", [1]),
        ("INT32", [1.5]),
        ("INT32", [True]),
        ("FP32", [None]),
        ("FP32", ["1.5"]),
        ("FP16", [False]),
        ("UINT8", [300]),
        ("INT8", [-129]),
    ],
)
def test_json_data_of_the_wrong_json_type_returns_400(server, datatype, values):
    body = {"inputs": [{"name": "INPUT0", "datatype": datatype, "shape": [1, 1], "data": values}]}
    answer = _post(server, f"/v2/models/identity_{datatype.lower()}/infer", json=body)
    _assert_json_error(answer, 400, "INPUT0", datatype)


def test_bytes_shape_larger_than_its_data_returns_400_without_allocating_it(server):
    """2**31 elements would need 16 GiB of element slots; 8 bytes of data cannot hold them."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "BYTES",
                    "shape": [1, 2**31],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    answer = _post(
        server,
        "/v2/models/identity_bytes/infer",
        data=header + b"\0" * 8,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    _assert_json_error(answer, 400, "INPUT0")


# --- request body limit (--http-max-body-bytes) ------------------------------------------------
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_body_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("small_body")
    process = ConvoyProcess(
        build_broken_repository(root / "models"),
        root / "server.log",
        extra_args=("--http-max-body-bytes", str(BODY_LIMIT)),
        frontend=frontend,
    )
    process.start("live")
    yield process
    assert process.stop() == 0, process.log()


@pytest.mark.frontends(*FRONTENDS)
def test_body_over_the_limit_returns_400(small_body_server):
    body = _add_sub_body()
    body["padding"] = "x" * BODY_LIMIT
    answer = _post(small_body_server, "/v2/models/add_sub/infer", json=body)
    _assert_json_error(answer, 400, str(BODY_LIMIT))


@pytest.mark.frontends(*FRONTENDS)
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_body_inflating_past_the_limit_returns_400(small_body_server, encoding):
    document = json.dumps({**_add_sub_body(), "padding": " " * (BODY_LIMIT * 64)}).encode()
    compressed = gzip.compress(document) if encoding == "gzip" else zlib.compress(document)
    assert len(compressed) < BODY_LIMIT
    answer = _post(
        small_body_server,
        "/v2/models/add_sub/infer",
        data=compressed,
        headers={"Content-Encoding": encoding},
    )
    _assert_json_error(answer, 400, str(BODY_LIMIT))


@pytest.mark.frontends(*FRONTENDS)
def test_compressed_body_within_the_limit_is_served(small_body_server):
    answer = _post(
        small_body_server,
        "/v2/models/add_sub/infer",
        data=zlib.compress(json.dumps(_add_sub_body()).encode()),
        headers={"Content-Encoding": "deflate"},
    )
    assert answer.status_code == 200, answer.text


def test_multi_member_gzip_body_is_accepted(server):
    document = json.dumps(_add_sub_body()).encode()
    body = gzip.compress(document[:20]) + gzip.compress(document[20:])
    answer = _post(server, "/v2/models/add_sub/infer", data=body, headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.text
