"""Hostile input, round 2 (issue 21): each attack runs bounded in time and size against a real
server on loopback, and the test asserts its answer, that the server still answers others, and
that its memory (VmRSS from /proc) comes back within a bound."""

from __future__ import annotations

import shutil
import socket
import threading

import grpc
import hostile
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import EXPLICIT, ConvoyProcess, poll, serve_until_stopped, write_identity_model
from tritonclient.utils import InferenceServerException

from convoy.cli import demo_repository
from convoy.protos import grpc_service_pb2 as pb
from convoy.protos import grpc_service_pb2_grpc as pb_grpc

MIB = 1 << 20
JSON_LIMIT = 4 * MIB


def _repository(root):
    repository = root / "models"
    repository.mkdir()
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    write_identity_model(repository, "identity_fp32", "FP32")
    return repository


@pytest.fixture(scope="module")
def server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("hostile")
    process = ConvoyProcess(
        _repository(root),
        root / "server.log",
        extra_args=("--http-max-json-bytes", str(JSON_LIMIT), "--header-timeout", "1", *EXPLICIT),
        frontend=frontend,
    )
    yield from serve_until_stopped(process)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(
        server.grpc_url,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _add_sub_answers(server) -> None:
    """Another client is still served: a real add_sub inference over HTTP."""
    data = list(range(16))
    body = {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": [1, 16], "data": data}
            for name in ("INPUT0", "INPUT1")
        ]
    }
    answer = requests.post(f"{server.base_url}/v2/models/add_sub/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [2.0 * v for v in data]


# --- memory and stalls -------------------------------------------------------------------------
def test_json_bomb_is_refused_before_it_is_parsed(server):
    outcome = hostile.json_bomb(server.pid, server.base_url, inflated_bytes=128 * MIB, count=2)
    assert outcome.statuses == [400, 400]
    assert outcome.probe_failed == 0
    # Before: +3.2 GiB and every client frozen for 53 s (250 MiB of `0.0,` parsed on the loop).
    assert outcome.rss_peak - outcome.rss_before < 64 * MIB, outcome.line("json bomb")
    assert outcome.rss_after - outcome.rss_before < 16 * MIB, outcome.line("json bomb")
    _add_sub_answers(server)


def test_json_bomb_names_the_limit_from_the_declared_shape(server):
    body = hostile.json_bomb_body(8 * MIB)
    answer = requests.post(
        f"{server.base_url}/v2/models/add_sub/infer",
        data=body,
        headers={"content-encoding": "gzip"},
        timeout=30,
    )
    assert answer.status_code == 400
    assert "add_sub" in answer.json()["error"] and "declared inputs" in answer.json()["error"]


def test_json_for_a_variable_shape_model_is_held_to_the_json_limit(server):
    too_long = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, JSON_LIMIT], "data": [0] * JSON_LIMIT}
        ]
    }
    answer = requests.post(f"{server.base_url}/v2/models/identity_fp32/infer", json=too_long, timeout=30)
    assert answer.status_code == 400
    assert str(JSON_LIMIT) in answer.json()["error"]
    _add_sub_answers(server)


def test_json_holding_far_more_values_than_its_shapes_claim_is_refused_before_parsing(server):
    """A variable-shape model has no declared bound: the body's own shapes are the bound."""
    text = (
        b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":['
        + b"0.0," * 500_000
        + b"0.0]}]}"
    )
    answer = requests.post(f"{server.base_url}/v2/models/identity_fp32/infer", data=text, timeout=30)
    assert answer.status_code == 400
    assert "its shapes claim 16" in answer.json()["error"]


def test_a_large_json_body_within_the_limit_is_served_off_the_loop(server):
    """~1.5 MiB of JSON: decoded on a decode thread, answered correctly."""
    values = np.arange(200_000, dtype=np.float32) / 7
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, values.size], "data": values.tolist()}
        ]
    }
    answer = requests.post(f"{server.base_url}/v2/models/identity_fp32/infer", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    np.testing.assert_array_equal(np.array(answer.json()["outputs"][0]["data"], np.float32), values)


def test_data_longer_than_the_shape_is_refused_without_conversion(server):
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [[0.0] * 4, [1.0] * 50_000]}
        ]
    }
    answer = requests.post(f"{server.base_url}/v2/models/identity_fp32/infer", json=body, timeout=30)
    assert answer.status_code == 400
    assert "needs 4 values, got more than 4" in answer.json()["error"]


def test_rejected_large_grpc_messages_are_freed_at_once(server):
    outcome = hostile.large_grpc_messages(
        server.pid, server.base_url, server.grpc_url, size=96 * MIB, count=4
    )
    assert outcome.statuses == ["INVALID_ARGUMENT"] * 4
    assert outcome.probe_failed == 0
    # Before: three 200 MiB messages left +1.5 GiB until the cyclic collector ran.
    assert outcome.rss_after - outcome.rss_before < 128 * MIB, outcome.line("large gRPC")
    _add_sub_answers(server)


def test_typed_contents_longer_than_the_shape_are_refused_before_conversion(server, stub):
    message = pb.ModelInferRequest(model_name="add_sub")
    first = message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    first.contents.fp32_contents.extend(np.zeros(8 << 20, np.float32))
    second = message.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    second.contents.fp32_contents.extend([0.0] * 16)
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(message, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 16 values, got more than 16" in raised.value.details()
    _add_sub_answers(server)


def test_unload_of_unknown_names_leaves_nothing_behind(server, stub):
    # Names past the length limit are refused before anything is allocated for them ...
    outcome = hostile.unload_unknown_names(server.pid, server.base_url, server.grpc_url, 100, 256 << 10)
    assert set(outcome.statuses) == {"INVALID_ARGUMENT"}
    assert outcome.rss_after - outcome.rss_before < 16 * MIB, outcome.line("unload long names")
    # ... and unknown names within it cost nothing that outlives the request.
    outcome = hostile.unload_unknown_names(server.pid, server.base_url, server.grpc_url, 3000, 200)
    assert set(outcome.statuses) == {"NOT_FOUND"}
    assert outcome.rss_after - outcome.rss_before < 8 * MIB, outcome.line("unload unknown names")
    answer = requests.post(f"{server.base_url}/v2/repository/models/{'u' * 200}/unload", timeout=30)
    assert answer.status_code == 404
    _add_sub_answers(server)


def test_stream_whose_answers_are_never_read_stops_being_read(server):
    outcome = hostile.unread_stream(server.pid, server.base_url, server.grpc_url, count=30_000)
    sent = int(outcome.statuses[0].split()[1])
    assert outcome.probe_failed == 0
    # The server stopped reading (backpressure) long before the client ran out of requests.
    assert sent < 30_000, outcome.line("unread stream")
    assert outcome.rss_after - outcome.rss_before < 64 * MIB, outcome.line("unread stream")
    _add_sub_answers(server)


def test_a_stream_is_still_served_in_full_past_its_backlog(server):
    """Backpressure only paces a stream: 2,000 requests (past the 256 backlog) all answered."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers = []
    done = threading.Event()

    def callback(result, error):
        answers.append(error)
        if len(answers) == 2000:
            done.set()

    client.start_stream(callback)
    try:
        for index in range(2000):
            inputs = []
            for name in ("INPUT0", "INPUT1"):
                tensor = grpcclient.InferInput(name, [1, 16], "FP32")
                tensor.set_data_from_numpy(np.full((1, 16), index, np.float32))
                inputs.append(tensor)
            client.async_stream_infer("add_sub", inputs)
        poll(done.is_set, "2,000 stream answers", timeout=120)
    finally:
        client.stop_stream()
        client.close()
    assert answers == [None] * 2000


# --- request heads and connections ---------------------------------------------------------------
def test_huge_request_head_gets_431(server):
    outcome = hostile.huge_header(server.pid, server.base_url, server.http_port, size=64 * MIB)
    assert outcome.statuses == ["HTTP/1.1 431 Request Header Fields Too Large"]
    assert outcome.rss_peak - outcome.rss_before < 16 * MIB, outcome.line("huge header")
    _add_sub_answers(server)


def test_too_many_headers_get_431(server):
    outcome = hostile.many_headers(server.pid, server.base_url, server.http_port, count=1000)
    assert outcome.statuses == ["HTTP/1.1 431 Request Header Fields Too Large"]
    answer = requests.get(
        f"{server.base_url}/v2/health/live",
        headers={f"x-h{i}": "v" for i in range(50)},
        timeout=30,
    )
    assert answer.status_code == 200


def test_a_connection_that_sends_no_request_head_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as idle:
        assert idle.recv(1) == b""  # closed by the server after --header-timeout (1 s)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as slow:
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n")  # never finished
        assert slow.recv(1) == b""


@pytest.fixture(scope="module")
def capped(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("capped")
    process = ConvoyProcess(
        _repository(root),
        root / "server.log",
        extra_args=("--max-connections", "16", "--header-timeout", "60"),
        frontend=frontend,
    )
    yield from serve_until_stopped(process)


def test_connections_past_the_cap_get_a_fast_503_and_a_log_line(capped):
    held = []
    try:
        for _ in range(16):
            held.append(socket.create_connection(("127.0.0.1", capped.http_port), timeout=30))
        poll(
            lambda: hostile.raw_http(
                "127.0.0.1", capped.http_port, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n"
            ).startswith(b"HTTP/1.1 503"),
            "a 503 for the connection past the cap",
        )
        poll(lambda: "connection limit reached" in capped.log(), "the log line")
    finally:
        for sock in held:
            sock.close()
    poll(
        lambda: requests.get(f"{capped.base_url}/v2/health/live", timeout=30).status_code == 200,
        "an answer once the idle connections are gone",
    )


def test_a_grpc_connection_that_never_handshakes_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=30) as idle:
        while idle.recv(65536):  # the server's preface, then the close (--header-timeout 1 s)
            pass


def test_grpc_connections_past_the_cap_are_refused_at_once(capped):
    """Past the cap a gRPC client gets UNAVAILABLE at once (it used to wait out its deadline),
    and is served again once the idle connections are gone."""
    held = [socket.create_connection(("127.0.0.1", capped.grpc_port), timeout=30) for _ in range(16)]
    try:
        client = grpcclient.InferenceServerClient(capped.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.is_server_live(client_timeout=30)
            assert refused.value.status() == "StatusCode.UNAVAILABLE"
        finally:
            client.close()
    finally:
        for sock in held:
            sock.close()

    def live() -> bool:
        fresh = grpcclient.InferenceServerClient(capped.grpc_url)
        try:
            return fresh.is_server_live(client_timeout=10)
        except InferenceServerException:
            return False
        finally:
            fresh.close()

    poll(live, "gRPC served again after the idle connections closed")


# --- wrong status codes ------------------------------------------------------------------------
BAD_VERSIONS = ["²", "9" * 5000, "1.0", "-1", "9223372036854775808"]


@pytest.mark.parametrize("version", BAD_VERSIONS, ids=["unicode", "5000-digits", "dot", "neg", "int64"])
@pytest.mark.parametrize("action", ["", "/config", "/stats", "/ready"])
def test_bad_versions_get_400_over_http(server, version, action):
    answer = requests.get(f"{server.base_url}/v2/models/add_sub/versions/{version}{action}", timeout=30)
    # Ready answers only 200/503 (Triton's readiness contract); the others name the problem.
    assert answer.status_code == (503 if action == "/ready" else 400), answer.text


@pytest.mark.parametrize("version", BAD_VERSIONS, ids=["unicode", "5000-digits", "dot", "neg", "int64"])
def test_bad_versions_get_invalid_argument_over_grpc(stub, version):
    for call, request in (
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="add_sub", version=version)),
        (stub.ModelConfig, pb.ModelConfigRequest(name="add_sub", version=version)),
        (stub.ModelStatistics, pb.ModelStatisticsRequest(name="add_sub", version=version)),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["a" * 10_000, "add_sub\n", "add sub", "../add_sub", ".."], ids=repr)
def test_bad_model_names_get_invalid_argument(server, stub, name):
    for action in ("load", "unload"):
        answer = requests.post(
            f"{server.base_url}/v2/repository/models/{requests.utils.quote(name, safe='')}/{action}",
            timeout=30,
        )
        # "../add_sub" cannot travel in a path segment: it routes elsewhere (404), never to disk.
        assert answer.status_code in ((400, 404) if name.startswith(".") else (400,)), answer.text
    for call, request in (
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name)),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name)),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(raised.value.details()) < 400
    log = server.log()
    assert "File name too long" not in log and "ERROR convoy" not in log


def test_overlong_model_names_on_model_endpoints_get_invalid_argument(server, stub):
    name = "m" * (256 << 10)
    for call, request in (
        (stub.ModelMetadata, pb.ModelMetadataRequest(name=name)),
        (stub.ModelConfig, pb.ModelConfigRequest(name=name)),
        (stub.ModelStatistics, pb.ModelStatisticsRequest(name=name)),
        (stub.ModelInfer, pb.ModelInferRequest(model_name=name)),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=30)
        # Before: NOT_FOUND echoing the whole name, which overflowed the client's metadata limit
        # (RESOURCE_EXHAUSTED on the client).
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(raised.value.details()) < 400
    assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=30).ready
    answer = requests.get(f"{server.base_url}/v2/models/{'m' * 10_000}/config", timeout=30)
    assert answer.status_code == 400 and len(answer.content) < 400
