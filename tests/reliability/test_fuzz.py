"""Hostile input never crashes, hangs or leaks internals: every malformed request gets a 4xx/5xx
with a JSON {"error": message} (HTTP) or a non-OK gRPC status with a message, and the server
keeps serving valid requests afterwards."""

from __future__ import annotations

import gzip
import json
import struct

import grpc
import pytest
import requests
from helpers import FRONTENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from convoy.errors import INTERNAL_MESSAGE

pytestmark = pytest.mark.frontends(FRONTENDS[0])


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )


MODELS = ["identity_fp32", "identity_bytes", "identity_int64", "identity_bool", "capacity", "nope"]
DATATYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16", "", "fp32", "STRING", "\u00e9",
]  # fmt: skip
INPUT_NAMES = ["INPUT0", "IN", "", "OUTPUT0", "x" * 300]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)
dims = st.integers(-3, 10) | st.sampled_from([2**31, 2**40, 2**62, -(2**40), 0])
shapes = st.lists(dims, max_size=4) | json_values
datatypes = st.sampled_from(DATATYPES) | json_values


@st.composite
def tensor_documents(draw):
    """A V2 input tensor with each field right, wrong, or missing."""
    item = {}
    if draw(st.booleans()):
        item["name"] = draw(st.sampled_from(INPUT_NAMES) | json_values)
    item["datatype"] = draw(datatypes)
    item["shape"] = draw(shapes)
    choice = draw(st.integers(0, 3))
    if choice == 0:
        item["data"] = draw(json_values)
    elif choice == 1:
        item["data"] = draw(st.lists(st.floats() | st.integers(), max_size=20))
    elif choice == 2:
        size = draw(st.integers(-5, 64) | st.sampled_from([2**31, 2**64]) | json_values)
        item["parameters"] = {"binary_data_size": size}
    return item


@st.composite
def http_requests(draw):
    """(model, headers, body) for a malformed POST .../infer."""
    model = draw(st.sampled_from(MODELS))
    headers = {}
    kind = draw(st.sampled_from(["json", "json", "binary", "gzip", "bytes", "any_json"]))
    if kind == "bytes":
        return model, headers, draw(st.binary(max_size=200))
    if kind == "any_json":
        return model, headers, json.dumps(draw(json_values)).encode()
    document = {"inputs": draw(st.lists(tensor_documents(), max_size=3) | json_values)}
    if draw(st.booleans()):
        document["outputs"] = draw(
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(["OUTPUT0", "OUT", "z"])}))
            | json_values
        )
    if draw(st.booleans()):
        document["parameters"] = draw(
            st.dictionaries(st.sampled_from(["priority", "timeout", "binary_data_output"]), json_values)
            | json_values
        )
    header = json.dumps(document).encode()
    body = header
    if kind == "binary":
        binary = draw(st.binary(max_size=64))
        body = header + binary
        length = draw(
            st.sampled_from([len(header), len(header) - 1, len(body) + 1, 0, -1])
            | st.integers(-(2**70), 2**70)
            | st.text("0123456789-+_xe.", min_size=1, max_size=5)
        )
        headers["Inference-Header-Content-Length"] = str(length)
    elif kind == "gzip":
        packed = gzip.compress(body)
        cut = draw(st.integers(0, len(packed)))
        body = draw(st.sampled_from([packed, packed[:cut], packed + b"junk", body]))
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "gzip, gzip"]))
    return model, headers, body


def assert_http_error(answer: requests.Response) -> None:
    text = answer.text
    assert "Traceback" not in text, text
    if answer.status_code == 200:
        # A binary answer (e.g. to Inference-Header-Content-Length 0, Triton's raw binary
        # request) holds its JSON in the first inference-header-content-length bytes.
        split = answer.headers.get("inference-header-content-length")
        header = answer.content[: int(split)] if split else answer.content
        assert "outputs" in json.loads(header), text
        return
    assert 400 <= answer.status_code < 600, answer.status_code
    document = answer.json()
    assert isinstance(document, dict) and isinstance(document.get("error"), str), text
    assert document["error"], "empty error message"
    assert document["error"] != INTERNAL_MESSAGE, "an unexpected exception escaped the handler"


@pytest.fixture(scope="module")
def http_session(reliability_server):
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def grpc_stub(reliability_server):
    channel = grpc.insecure_channel(reliability_server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def assert_still_serving(server, session) -> None:
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.5]}]}
    answer = session.post(f"{server.base_url}/v2/models/identity_fp32/infer", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [1.5, 2.5]


@fuzz(1500)
@given(case=http_requests())
def test_malformed_http_infer_gets_json_error(reliability_server, http_session, case):
    model, headers, body = case
    url = f"{reliability_server.base_url}/v2/models/{model}/infer"
    assert_http_error(http_session.post(url, data=body, headers=headers, timeout=10))


@st.composite
def grpc_requests(draw):
    message = service_pb2.ModelInferRequest(
        model_name=draw(st.sampled_from(MODELS)), id=draw(st.text(max_size=10))
    )
    raw_mode = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = message.inputs.add(
            name=draw(st.sampled_from(INPUT_NAMES)),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(st.lists(st.integers(-(2**63), 2**63 - 1) | dims, max_size=4)),
        )
        if raw_mode:
            message.raw_input_contents.append(draw(st.binary(max_size=64)))
        else:
            field = draw(
                st.sampled_from(
                    ["bool_contents", "int_contents", "int64_contents", "uint_contents",
                     "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents", None]
                )
            )  # fmt: skip
            if field == "bytes_contents":
                getattr(tensor.contents, field).extend(draw(st.lists(st.binary(max_size=8), max_size=8)))
            elif field == "bool_contents":
                getattr(tensor.contents, field).extend(draw(st.lists(st.booleans(), max_size=8)))
            elif field in ("fp32_contents", "fp64_contents"):
                getattr(tensor.contents, field).extend(draw(st.lists(st.floats(width=32), max_size=8)))
            elif field is not None:
                bits = 64 if "64" in field else 32
                low = 0 if field.startswith("uint") else -(2 ** (bits - 1))
                high = 2**bits - 1 if field.startswith("uint") else 2 ** (bits - 1) - 1
                getattr(tensor.contents, field).extend(
                    draw(st.lists(st.integers(low, high), max_size=8))
                )
    if draw(st.booleans()):  # a mismatched count of raw buffers
        message.raw_input_contents.append(draw(st.binary(max_size=16)))
    for key in draw(st.lists(st.sampled_from(["priority", "timeout", "binary_data_output", "x"]))):
        which = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param"]))
        value = {
            "bool_param": st.booleans(),
            "int64_param": st.integers(-(2**63), 2**63 - 1),
            "string_param": st.text(max_size=8),
            "double_param": st.floats(),
        }[which]
        setattr(message.parameters[key], which, draw(value))
    for name in draw(st.lists(st.sampled_from(["OUTPUT0", "OUT", "zz"]), max_size=2)):
        message.outputs.add(name=name)
    return message


@fuzz(1200)
@given(message=grpc_requests())
def test_malformed_grpc_infer_gets_status_with_message(grpc_stub, message):
    try:
        grpc_stub.ModelInfer(message, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), exc
        assert exc.details(), f"{exc.code()} without a message"
        assert "Traceback" not in exc.details()
        assert exc.details() != INTERNAL_MESSAGE, f"an unexpected exception escaped: {message}"


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_forged_huge_shape_is_rejected_naming_the_size(reliability_server, http_session, datatype):
    """[1, 2**31] elements declared, 8 bytes sent: rejected before any allocation."""
    model = f"identity_{datatype.lower()}"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": datatype,
                    "shape": [1, 2**31],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    answer = http_session.post(
        f"{reliability_server.base_url}/v2/models/{model}/infer",
        data=header + struct.pack("<II", 4, 0),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]
    assert "2147483648" in message and ("got 8" in message or "(8 bytes)" in message), message

    channel = grpc.insecure_channel(reliability_server.grpc_url)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = service_pb2.ModelInferRequest(model_name=model)
        message.inputs.add(name="INPUT0", datatype=datatype, shape=[1, 2**31])
        message.raw_input_contents.append(b"\x00" * 8)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(message, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = raised.value.details()
        assert "2147483648" in details and ("got 8" in details or "(8 bytes)" in details), details
    finally:
        channel.close()


@pytest.mark.parametrize("encoding", [b"\xff", b"gz\xe9ip"])
def test_non_ascii_content_encoding_gets_400(reliability_server, http_session, encoding):
    answer = http_session.post(
        f"{reliability_server.base_url}/v2/models/identity_fp32/infer",
        data=b"{}",
        headers={"Content-Encoding": encoding},
        timeout=10,
    )
    assert answer.status_code == 400, answer.text
    assert "Content-Encoding" in answer.json()["error"]


def test_server_still_serves_after_fuzzing(reliability_server, http_session):
    assert_still_serving(reliability_server, http_session)
