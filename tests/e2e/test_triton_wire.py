"""Triton's wire rules that its own tests check: the HTTP raw binary request (the body is the only
input's bytes), duplicate requested outputs, and the order and words of the checks on an input's
shape and data sources (gRPC contents beside raw_input_contents, negative dimensions, element
counts past an int64)."""

from __future__ import annotations

import http.client
import json
import shutil

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import MODEL_SOURCES, ConvoyProcess, serve_until_stopped
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from convoy.cli import demo_repository

RAW_MODELS = {
    # A batching model with one variable dimension: the batch is 1, the rest comes from the size.
    "raw_fp32": ("max_batch_size: 8", "TYPE_FP32", "[ 2, -1 ]"),
    # A non-batching BYTES model of shape [1]: the body is the one element.
    "raw_bytes": ("max_batch_size: 0", "TYPE_STRING", "[ 1 ]"),
    # Two variable dimensions: the shape cannot be deduced.
    "raw_two_variable": ("max_batch_size: 8", "TYPE_FP32", "[ -1, -1 ]"),
    "raw_bytes_vector": ("max_batch_size: 8", "TYPE_STRING", "[ -1 ]"),
}


@pytest.fixture(scope="module")
def raw_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("raw")
    repository = root / "models"
    for name, (batching, datatype, dims) in RAW_MODELS.items():
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\n{batching}\n'
            f'input [ {{ name: "INPUT0", data_type: {datatype}, dims: {dims} }} ]\n'
            f'output [ {{ name: "OUTPUT0", data_type: {datatype}, dims: {dims} }} ]\n'
        )
        shutil.copy(MODEL_SOURCES / "identity" / "model.py", repository / name / "1" / "model.py")
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    yield from serve_until_stopped(ConvoyProcess(repository, root / "server.log", frontend=frontend))


def _binary_answer(answer: requests.Response) -> tuple[dict, bytes]:
    """The JSON header and the binary part of a binary-data response."""
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    split = int(answer.headers["inference-header-content-length"])
    return json.loads(answer.content[:split]), answer.content[split:]


RAW_HEADERS = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}


def test_raw_binary_request_is_the_only_inputs_bytes_batch_of_one(raw_server):
    values = np.arange(6, dtype=np.float32)  # [1, 2, 3]: the variable dimension is 3
    answer = requests.post(
        f"{raw_server.base_url}/v2/models/raw_fp32/infer", data=values.tobytes(), headers=RAW_HEADERS
    )
    header, data = _binary_answer(answer)
    (output,) = header["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("OUTPUT0", "FP32", [1, 2, 3])
    assert output["parameters"] == {"binary_data_size": 24}
    np.testing.assert_array_equal(np.frombuffer(data, dtype=np.float32), values)


def test_raw_binary_request_may_arrive_chunked(raw_server):
    values = np.arange(8, dtype=np.float32)
    payload = values.tobytes()
    connection = http.client.HTTPConnection("127.0.0.1", raw_server.http_port, timeout=30)
    try:
        # Three chunks, no Content-Length (Transfer-Encoding: chunked).
        chunks = iter([payload[:5], payload[5:19], payload[19:]])
        connection.request(
            "POST", "/v2/models/raw_fp32/infer", body=chunks, headers=RAW_HEADERS, encode_chunked=True
        )
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, body
        split = int(response.getheader("Inference-Header-Content-Length"))
    finally:
        connection.close()
    header = json.loads(body[:split])
    assert header["outputs"][0]["shape"] == [1, 2, 4]
    np.testing.assert_array_equal(np.frombuffer(body[split:], dtype=np.float32), values)


def test_raw_binary_bytes_request_is_one_element(raw_server):
    text = b"a sentence, not length-prefixed"
    answer = requests.post(
        f"{raw_server.base_url}/v2/models/raw_bytes/infer", data=text, headers=RAW_HEADERS
    )
    header, data = _binary_answer(answer)
    assert header["outputs"][0]["shape"] == [1]
    assert header["outputs"][0]["datatype"] == "BYTES"
    # The output is a BYTES tensor in binary form: a 4-byte length, then the element.
    assert data == len(text).to_bytes(4, "little") + text


@pytest.mark.parametrize(
    ("model", "body", "expected"),
    [
        (
            "add_sub",
            b"\0" * 64,
            "Raw request must only have 1 input (found 1) to be deduced but got 2 inputs in "
            "'add_sub' model configuration",
        ),
        (
            "raw_two_variable",
            b"\0" * 16,
            "The shape of the raw input 'INPUT0' can not be deduced because there are more than "
            "one variable-sized dimension",
        ),
        (
            "raw_bytes_vector",
            b"abc",
            "For BYTE datatype raw input 'INPUT0', the model must have input shape [1]",
        ),
        ("raw_fp32", b"\0" * 10, "needs 8 bytes, got 10"),  # not a whole number of [2] rows
    ],
)
def test_raw_binary_request_that_cannot_be_deduced_is_refused_in_tritons_words(
    raw_server, model, body, expected
):
    answer = requests.post(
        f"{raw_server.base_url}/v2/models/{model}/infer", data=body, headers=RAW_HEADERS
    )
    assert answer.status_code == 400
    assert expected in answer.json()["error"]


# --- duplicate outputs, data sources, shapes (the session server: add_sub) ------------------------


def test_duplicate_requested_output_is_invalid_argument(protocol):
    a = np.ones((1, 16), dtype=np.float32)
    inputs = [protocol.input("INPUT0", a, "FP32"), protocol.input("INPUT1", a, "FP32")]
    outputs = [protocol.module.InferRequestedOutput("OUTPUT0") for _ in range(2)]
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.infer("add_sub", inputs, outputs=outputs)
    assert caught.value.status() == protocol.status("INVALID_ARGUMENT")
    assert "output 'OUTPUT0' already exists in request" in caught.value.message()


def _grpc_infer(server, request: service_pb2.ModelInferRequest):
    channel = grpc.insecure_channel(server.grpc_url)
    try:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    finally:
        channel.close()


def _grpc_error(server, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _grpc_infer(server, request)
    return caught.value


def _fp32_input(name: str, shape, values=None, datatype: str = "FP32"):
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if values is not None:
        tensor.contents.fp32_contents.extend(values)
    return tensor


def test_contents_beside_raw_input_contents_is_refused_first_in_tritons_words(server):
    # INPUT0 carries typed contents while the request also has raw_input_contents; its datatype
    # is wrong too, but Triton's data-source check comes first.
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    request.inputs.append(_fp32_input("INPUT0", [1, 16], [1.0] * 16, datatype="INT32"))
    request.inputs.append(_fp32_input("INPUT1", [1, 16]))
    request.raw_input_contents.append(np.ones(16, dtype=np.float32).tobytes())
    error = _grpc_error(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "contents field must not be specified when using raw_input_contents for 'INPUT0' for "
        "model 'add_sub'"
    )


def test_input_without_any_data_is_refused_in_tritons_words(server):
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    request.inputs.append(_fp32_input("INPUT0", [1, 16]))
    request.inputs.append(_fp32_input("INPUT1", [1, 16]))
    request.raw_input_contents.append(np.ones(16, dtype=np.float32).tobytes())
    error = _grpc_error(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "unable to find data for input tensor 'INPUT1' for model 'add_sub' in request."
        in error.details()
    )


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ([1, -2], "shape [1,-2] contains one or more invalid dimensions"),
        ([-1, 16], "shape [-1,16] contains one or more invalid dimensions"),
        (
            [1 << 40, 1 << 40],
            f"shape [{1 << 40},{1 << 40}] causes total element count to exceed maximum size of "
            "9223372036854775807",
        ),
    ],
)
def test_invalid_shapes_are_refused_before_the_model_checks_them(server, http_client, shape, expected):
    data = np.ones(16, dtype=np.float32).tobytes()
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.append(_fp32_input(name, shape))
        request.raw_input_contents.append(data)
    error = _grpc_error(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"invalid shape for input 'INPUT0': {expected}"
    body = {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": shape, "data": [1.0] * 16}
            for name in ("INPUT0", "INPUT1")
        ]
    }
    answer = requests.post(f"{server.base_url}/v2/models/add_sub/infer", json=body, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["error"] == f"invalid shape for input 'INPUT0': {expected}"


def test_input_named_twice_is_refused_in_tritons_words(server):
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for _ in range(2):
        request.inputs.append(_fp32_input("INPUT0", [1, 16], [1.0] * 16))
    error = _grpc_error(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "input 'INPUT0' already exists in request"


def test_the_server_serves_after_the_refusals(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    a = np.ones((1, 16), dtype=np.float32)
    inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(a)
    np.testing.assert_array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), a + a)
    client.close()
