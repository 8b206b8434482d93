"""What real clients compare on the wire (issue 16): undecodable gRPC messages, the Open
Inference Protocol's health bodies, and the error texts Triton's client examples check."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
#: A length-delimited field 1 whose declared length runs past the end: never a valid message.
GARBAGE = b"\x0a\xff\xff\xff\x0f\x01"


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_undecodable_grpc_message_is_invalid_argument_naming_its_type(server, method):
    descriptor = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    with grpc.insecure_channel(server.grpc_url) as channel:
        if descriptor.client_streaming:
            call = channel.stream_stream(path)
            with pytest.raises(grpc.RpcError) as caught:
                list(call(iter([GARBAGE]), timeout=10))
        else:
            call = channel.unary_unary(path)
            with pytest.raises(grpc.RpcError) as caught:
                call(GARBAGE, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert descriptor.input_type.full_name in caught.value.details()
    assert "Unexpected" not in caught.value.details()


def test_undecodable_grpc_message_leaves_no_traceback_and_the_server_serving(server, grpc_client):
    # The session server is shared: other tests' model failures log their tracebacks, so only
    # what this test's calls add to the log is read.
    seen = len(server.log())
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(f"/{SERVICE.full_name}/ModelInfer")
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                call(GARBAGE, timeout=10)
    assert grpc_client.is_server_ready()
    log = server.log()[seen:]
    assert "Traceback" not in log
    assert "DecodeError" not in log
    assert grpc_client.is_server_ready()


@pytest.mark.parametrize("which", ["live", "ready"])
def test_health_endpoints_answer_the_protocols_json_body(server, which):
    answer = requests.get(f"{server.base_url}/v2/health/{which}", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json() == {which: True}


def test_model_ready_answers_a_json_body(server):
    answer = requests.get(f"{server.base_url}/v2/models/add_sub/ready", timeout=10)
    assert answer.status_code == 200
    assert answer.json() == {"name": "add_sub", "ready": True}
    missing = requests.get(f"{server.base_url}/v2/models/nosuch/ready", timeout=10)
    assert missing.status_code == 503
    assert missing.json() == {"name": "nosuch", "ready": False}


def _add_sub_inputs(protocol):
    vector = np.arange(16, dtype=np.float32).reshape(1, 16)
    return [
        protocol.input("INPUT0", vector, "FP32"),
        protocol.input("INPUT1", vector, "FP32"),
    ]


def test_unknown_model_leads_with_tritons_wording(protocol):
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.infer("nosuch", _add_sub_inputs(protocol))
    assert caught.value.message().startswith("Request for unknown model")
    assert "nosuch" in caught.value.message()


def test_bad_version_string_leads_with_tritons_wording(protocol):
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.infer("add_sub", _add_sub_inputs(protocol), model_version="abc")
    assert caught.value.message().startswith("failed to get model version from specified version string")


def test_contents_beside_raw_input_contents_leads_with_tritons_wording(server):
    vector = np.arange(16, dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        tensor.contents.fp32_contents.extend(vector.tolist())
        request.raw_input_contents.append(vector.tobytes())
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(
        "contents field must not be specified when using raw_input_contents"
    )


def test_tritonclient_health_calls_still_work(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
    finally:
        client.close()
