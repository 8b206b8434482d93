"""Malformed wire input against each front end: request smuggling, broken framing, truncated and
invalid protobufs, invalid UTF-8, deeply nested JSON, garbage on the gRPC port. Each gets a
bounded, named refusal (400 / INVALID_ARGUMENT) or a closed connection, never a crash; the
server keeps serving others and its memory comes back."""

from __future__ import annotations

import contextlib
import shutil
import socket

import grpc
import hostile
import pytest
import requests
from helpers import ConvoyProcess, serve_until_stopped

from convoy.cli import demo_repository
from convoy.protos import grpc_service_pb2 as pb

MIB = 1 << 20
SERVICE = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("wire-attacks")
    repository = root / "models"
    repository.mkdir()
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    process = ConvoyProcess(
        repository, root / "server.log", ("--header-timeout", "2"), frontend=frontend
    )
    yield from serve_until_stopped(process)


@pytest.fixture(scope="module")
def channel(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield channel
    channel.close()


def _served(server) -> None:
    """Another client is still answered, correctly."""
    body = {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": [1, 16], "data": list(range(16))}
            for name in ("INPUT0", "INPUT1")
        ]
    }
    answer = requests.post(f"{server.base_url}/v2/models/add_sub/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [2.0 * v for v in range(16)]


def _exchange(server, raw: bytes) -> bytes:
    """One raw request on its own connection; what came back before the server closed it."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


INFER = b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    "head",
    [
        # Content-Length beside chunked, disagreeing lengths: the two classic smuggling shapes.
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 5\r\nContent-Length: 64\r\n",
        b"Transfer-Encoding: gzip, chunked, x\r\n",
        b"Content-Length: -1\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "bad-te", "negative-length"],
)
def test_ambiguous_framing_is_refused_and_nothing_is_smuggled(server, head):
    smuggled = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = _exchange(server, INFER + head + b"\r\n0\r\n\r\n" + smuggled)
    assert _status(answer) == 400, answer[:200]
    # The smuggled request behind the ambiguous one was never answered.
    assert answer.count(b"HTTP/1.1 ") == 1, answer[:400]
    _served(server)


def test_a_request_line_that_is_not_http_gets_400_and_the_connection_closes(server):
    answer = _exchange(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert _status(answer) in (0, 400), answer[:200]
    _served(server)


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_deeply_nested_json_gets_a_named_400(server, depth):
    data = b"[" * depth + b"1" + b"]" * depth
    body = b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":' + data + b"}]}"
    answer = requests.post(f"{server.base_url}/v2/models/add_sub/infer", data=body, timeout=60)
    assert answer.status_code == 400, answer.text[:200]
    assert "error" in answer.json()
    _served(server)


def test_invalid_utf8_in_json_gets_a_named_400(server):
    body = (
        b'{"id":"\xff\xfe","inputs":[{"name":"INPUT\xc3","datatype":"FP32","shape":[1,16],"data":[]}]}'
    )
    answer = requests.post(f"{server.base_url}/v2/models/add_sub/infer", data=body, timeout=30)
    assert answer.status_code == 400, answer.text[:200]
    assert "JSON" in answer.json()["error"]
    _served(server)


def _raw_call(channel, method: str, payload: bytes):
    call = channel.unary_unary(
        SERVICE + method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    return call(payload, timeout=30)


def _valid_request() -> bytes:
    request = pb.ModelInferRequest(model_name="add_sub", id="x")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        request.raw_input_contents.append(bytes(64))
    return request.SerializeToString()


@pytest.mark.parametrize(
    "payload",
    [
        _valid_request()[:-7],  # truncated inside a length-delimited field
        b"\x0a\x08add_sub",  # a field length past the end
        b"\x0a\x02\xff\xfe",  # model_name that is not UTF-8
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an over-long varint tag
    ],
    ids=["truncated", "length-past-end", "invalid-utf8", "bad-varint"],
)
@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata"])
def test_undecodable_grpc_messages_get_invalid_argument(server, channel, payload, method):
    with pytest.raises(grpc.RpcError) as raised:
        _raw_call(channel, method, payload)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Unable to parse request" in raised.value.details()
    _served(server)


def test_the_grpc_port_closes_a_connection_that_does_not_speak_http2(server, channel):
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=30) as sock:
        # The server answers (a GOAWAY or an HTTP error) and closes, or resets at once: either
        # way the connection ends (a recv that blocked would time out and fail the test).
        with contextlib.suppress(ConnectionError, OSError):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(4096))
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass
    answer = pb.ModelInferResponse.FromString(_raw_call(channel, "ModelInfer", _valid_request()))
    assert answer.model_name == "add_sub" and len(answer.raw_output_contents) == 2


def test_memory_comes_back_after_the_attacks(server, channel):
    before = hostile.settled_rss(server.pid)
    for _ in range(20):
        body = b"[" * 100_000 + b"]" * 100_000
        requests.post(f"{server.base_url}/v2/models/add_sub/infer", data=body, timeout=60)
        with pytest.raises(grpc.RpcError):
            _raw_call(channel, "ModelInfer", _valid_request()[:-7])
        _exchange(server, INFER + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert hostile.settled_rss(server.pid) - before < 32 * MIB
    _served(server)
