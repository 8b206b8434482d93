"""Every Open Inference Protocol datatype round-trips through an identity model, bit for bit:
gRPC raw contents, gRPC typed contents, HTTP binary tensors and HTTP JSON."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import DATATYPES, WITH_WORKERS, assert_same_tensor, identity_model_name, sample_tensor
from tritonclient.grpc import service_pb2, service_pb2_grpc

from convoy.datatypes import serialize_bytes

pytestmark = pytest.mark.frontends(*WITH_WORKERS)

#: V2 datatype -> InferTensorContents field (FP16 and BF16 have none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _identity(protocol_name, client, module, datatype, array, binary=True):
    tensor = module.InferInput("INPUT0", list(array.shape), datatype)
    if protocol_name == "http":
        tensor.set_data_from_numpy(array, binary_data=binary)
        wanted = [module.InferRequestedOutput("OUTPUT0", binary_data=binary)]
    else:
        tensor.set_data_from_numpy(array)
        wanted = [module.InferRequestedOutput("OUTPUT0")]
    result = client.infer(identity_model_name(datatype), [tensor], outputs=wanted)
    output = result.get_output("OUTPUT0")
    assert (output["datatype"] if protocol_name == "http" else output.datatype) == datatype
    return result.as_numpy("OUTPUT0")


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips_over_grpc_raw_contents(grpc_client, datatype):
    array = sample_tensor(datatype)
    result = _identity("grpc", grpc_client, grpcclient, datatype, array)
    assert_same_tensor(result, array, datatype)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips_over_http_binary(http_client, datatype):
    array = sample_tensor(datatype)
    result = _identity("http", http_client, httpclient, datatype, array, binary=True)
    assert_same_tensor(result, array, datatype)


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BF16"])
def test_every_datatype_but_bf16_round_trips_over_http_json(http_client, datatype):
    array = sample_tensor(datatype, json_safe=True)
    result = _identity("http", http_client, httpclient, datatype, array, binary=False)
    assert_same_tensor(result, array, datatype)


@pytest.fixture(scope="module")
def grpc_stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _typed_request(datatype: str, array: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=identity_model_name(datatype), id="typed")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=list(array.shape))
    if datatype in CONTENTS_FIELD:
        values = array.reshape(-1).tolist()
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(values)
    return request


@pytest.mark.parametrize("datatype", sorted(CONTENTS_FIELD))
def test_every_typed_contents_datatype_round_trips_over_grpc(grpc_stub, datatype):
    array = sample_tensor(datatype, json_safe=True)
    response = grpc_stub.ModelInfer(_typed_request(datatype, array))
    assert response.id == "typed"
    assert [o.name for o in response.outputs] == ["OUTPUT0"]
    assert response.outputs[0].datatype == datatype
    assert list(response.outputs[0].shape) == [2, 3]
    raw = response.raw_output_contents[0]
    if datatype == "BYTES":
        assert raw == serialize_bytes(array)
    else:
        assert raw == array.tobytes()


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_fp16_and_bf16_in_typed_contents_are_rejected_as_raw_only_over_grpc(grpc_stub, datatype):
    request = _typed_request(datatype, sample_tensor(datatype))
    request.inputs[0].contents.fp32_contents.extend([1.0] * 6)
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in caught.value.details()
    assert "raw_input_contents" in caught.value.details()


def test_bf16_output_is_sent_as_float_values_in_http_json(server):
    import requests

    body = {
        "inputs": [{"name": "INPUT0", "datatype": "BF16", "shape": [1, 3], "data": [1.0, -2.5, 0.5]}]
    }
    answer = requests.post(f"{server.base_url}/v2/models/identity_bf16/infer", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    assert output["datatype"] == "BF16"
    assert output["data"] == [1.0, -2.5, 0.5]
