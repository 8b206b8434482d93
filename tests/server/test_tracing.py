"""OpenTelemetry tracing on a real server: one "infer add_sub" span per request with "queue",
"compute" and "compute_infer" children lying inside it, parented on the client's W3C
traceparent over HTTP and gRPC. Spans are read from a local OTLP/HTTP receiver and from the
console exporter's JSON lines. Every wait polls with a deadline."""

from __future__ import annotations

import http.server
import json
import secrets
import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess
from tritonclient.utils import InferenceServerException

from convoy.cli import demo_repository

pytest.importorskip("opentelemetry.sdk.trace")

DEADLINE_S = 30.0
CHILDREN = ("queue", "compute", "compute_infer")


def _traceparent() -> tuple[str, str]:
    """A fresh (trace id hex, traceparent header) pair."""
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def _infer(protocol: str, server: ConvoyProcess, traceparent: str) -> None:
    module = httpclient if protocol == "http" else grpcclient
    url = server.http_url if protocol == "http" else server.grpc_url
    client = module.InferenceServerClient(url)
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = module.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(a)
        inputs.append(tensor)
    result = client.infer("add_sub", inputs, headers={"traceparent": traceparent})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)
    client.close()


def _wait_for(spans_of, trace_ids: set[str]) -> dict[str, list[dict]]:
    """{trace id: its spans} once every trace holds a parent and its three children."""
    deadline = time.monotonic() + DEADLINE_S
    pause = threading.Event()  # never set: wait() paces the polling
    while True:
        by_trace: dict[str, list[dict]] = {}
        for span in spans_of():
            by_trace.setdefault(span["trace_id"], []).append(span)
        if all(len(by_trace.get(t, ())) >= 1 + len(CHILDREN) for t in trace_ids):
            return by_trace
        if time.monotonic() > deadline:
            raise AssertionError(f"spans for {trace_ids} not exported in time: {by_trace}")
        pause.wait(0.05)


def _check_trace(spans: list[dict], protocol: str, remote_parent: str) -> None:
    parents = [s for s in spans if s["name"] == "infer add_sub"]
    assert len(parents) == 1, spans
    parent = parents[0]
    assert parent["parent_id"] == remote_parent
    assert parent["attributes"]["convoy.protocol"] == protocol
    assert parent["attributes"]["convoy.model"] == "add_sub"
    assert parent["attributes"]["convoy.status"] == "OK"
    children = {s["name"]: s for s in spans if s is not parent}
    assert sorted(children) == sorted(CHILDREN)
    for child in children.values():
        assert child["parent_id"] == parent["span_id"]
        assert parent["start"] <= child["start"] <= child["end"] <= parent["end"], (parent, child)
    compute, infer = children["compute"], children["compute_infer"]
    assert compute["start"] <= infer["start"] <= infer["end"] <= compute["end"]
    assert children["queue"]["end"] <= compute["start"]


def _traced_requests(server: ConvoyProcess, spans_of) -> None:
    sent = {protocol: _traceparent() for protocol in ("http", "grpc")}
    for protocol, (_, header) in sent.items():
        _infer(protocol, server, header)
    by_trace = _wait_for(spans_of, {trace_id for trace_id, _ in sent.values()})
    for protocol, (trace_id, header) in sent.items():
        _check_trace(by_trace[trace_id], protocol, header.split("-")[2])


@pytest.fixture
def repository(tmp_path):
    root = tmp_path / "models"
    shutil.copytree(demo_repository() / "add_sub", root / "add_sub")
    return root


def test_console_spans_follow_traceparent(repository, tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = ConvoyProcess(repository, tmp_path / "server.log", extra_args=("--trace-console",))
    server.start()

    def spans_of():
        for line in list(server.stdout_lines):
            if line.startswith("{"):
                span = json.loads(line)
                yield {
                    "name": span["name"],
                    "trace_id": span["context"]["trace_id"].removeprefix("0x"),
                    "span_id": span["context"]["span_id"].removeprefix("0x"),
                    "parent_id": (span["parent_id"] or "").removeprefix("0x"),
                    "start": span["start_time"],  # ISO 8601 UTC, same width: sorts as time
                    "end": span["end_time"],
                    "attributes": span["attributes"],
                }

    try:
        _traced_requests(server, spans_of)
    finally:
        assert server.stop() == 0, server.log()


class _OtlpReceiver(http.server.ThreadingHTTPServer):
    """Stores the body of every POST (an OTLP ExportTraceServiceRequest) and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_otlp_spans_follow_traceparent(repository, tmp_path, monkeypatch):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    receiver = _OtlpReceiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = ConvoyProcess(
        repository, tmp_path / "server.log", extra_args=("--trace-otlp-endpoint", endpoint)
    )
    server.start()

    def spans_of():
        for body in list(receiver.bodies):
            export = ExportTraceServiceRequest.FromString(body)
            for resource_spans in export.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        yield {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {
                                a.key: getattr(a.value, a.value.WhichOneof("value"))
                                for a in span.attributes
                            },
                        }

    try:
        _traced_requests(server, spans_of)
    finally:
        assert server.stop() == 0, server.log()
        receiver.shutdown()
        receiver.server_close()


def test_ensemble_request_has_a_span_per_step(tmp_path, monkeypatch):
    from ensemble_helpers import ensemble, step_model

    root = tmp_path / "models"
    root.mkdir()
    step_model(root, "plus1", "plus1")
    step_model(root, "scale2", "scale2")
    ensemble(
        root,
        "ens_chain",
        [("plus1", -1, {"X": "IN"}, {"Y": "T"}), ("scale2", -1, {"X": "T"}, {"Y": "OUT"})],
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = ConvoyProcess(root, tmp_path / "server.log", extra_args=("--trace-console",))
    server.start()
    trace_id, header = _traceparent()
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        tensor = grpcclient.InferInput("IN", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        client.infer("ens_chain", [tensor], headers={"traceparent": header})
        client.close()
        deadline = time.monotonic() + DEADLINE_S
        pause = threading.Event()
        while True:
            spans = [
                json.loads(line)
                for line in list(server.stdout_lines)
                if line.startswith("{") and trace_id in line
            ]
            names = {span["name"] for span in spans}
            if {"infer ens_chain", "step 0 plus1", "step 1 scale2"} <= names:
                break
            assert time.monotonic() < deadline, names
            pause.wait(0.05)
        by_name = {span["name"]: span for span in spans}
        parent = by_name["infer ens_chain"]["context"]["span_id"]
        first, second = by_name["step 0 plus1"], by_name["step 1 scale2"]
        assert first["parent_id"] == parent and second["parent_id"] == parent
        assert first["end_time"] <= second["start_time"]
        inner = [s for s in spans if s["parent_id"] == first["context"]["span_id"]]
        assert sorted(s["name"] for s in inner) == ["compute", "queue"]
    finally:
        assert server.stop() == 0, server.log()


# --- Triton's trace settings API, deciding which requests get spans -------------------------------


@pytest.fixture(scope="module")
def console_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace-api")
    shutil.copytree(demo_repository() / "add_sub", root / "models" / "add_sub")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        server = ConvoyProcess(root / "models", root / "server.log", ("--trace-console",))
        server.start()
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _traced_ids(server: ConvoyProcess) -> list[str]:
    """The request ids of the "infer add_sub" spans printed so far, in order."""
    ids = []
    for line in list(server.stdout_lines):
        if line.startswith("{"):
            span = json.loads(line)
            if span["name"] == "infer add_sub":
                ids.append(span["attributes"]["convoy.request_id"])
    return ids


def _send(server: ConvoyProcess, request_id: str, traceparent: str | None = None) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    a = np.ones((1, 16), dtype=np.float32)
    inputs = [httpclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(a)
    headers = {"traceparent": traceparent} if traceparent else None
    client.infer("add_sub", inputs, request_id=request_id, headers=headers)
    client.close()


def _traced_before_marker(server: ConvoyProcess, marker: str) -> list[str]:
    """Every traced id up to a final request that is traced for sure (it carries a trace
    context): once its span is out, every earlier request's span is out too."""
    _send(server, marker, _traceparent()[1])
    deadline = time.monotonic() + DEADLINE_S
    pause = threading.Event()
    while marker not in _traced_ids(server):
        assert time.monotonic() < deadline, f"no span for {marker}"
        pause.wait(0.05)
    ids = _traced_ids(server)
    return ids[: ids.index(marker)]


def _grpc_settings(response) -> dict:
    return {key: list(value.value) for key, value in response.settings.items()}


def test_trace_settings_answer_on_both_protocols_globally_and_per_model(console_server):
    http = httpclient.InferenceServerClient(console_server.http_url)
    grpc = grpcclient.InferenceServerClient(console_server.grpc_url)
    try:
        expected = {
            "trace_level": ["TIMESTAMPS"],
            "trace_rate": "1",
            "trace_count": "-1",
            "trace_mode": "opentelemetry",
            "bsp_max_queue_size": "2048",
            "bsp_schedule_delay": "100",
            "bsp_max_export_batch_size": "512",
        }
        assert http.get_trace_settings() == expected
        assert http.get_trace_settings(model_name="add_sub") == expected
        as_lists = {k: v if isinstance(v, list) else [v] for k, v in expected.items()}
        assert _grpc_settings(grpc.get_trace_settings()) == as_lists
        assert _grpc_settings(grpc.get_trace_settings(model_name="add_sub")) == as_lists
        for call in (
            lambda: http.get_trace_settings(model_name="does-not-exist"),
            lambda: grpc.update_trace_settings(
                model_name="does-not-exist", settings={"trace_rate": "2"}
            ),
        ):
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert "Request for unknown model : does-not-exist" in caught.value.message()
        with pytest.raises(InferenceServerException) as caught:
            http.update_trace_settings(settings={"trace_file": "model.log"})
        assert (
            caught.value.message() == "trace file location can not be updated through network protocol"
        )
        with pytest.raises(InferenceServerException) as caught:
            grpc.update_trace_settings(settings={"trace_rate": "often"})
        assert caught.value.message() == "Unable to parse 'trace_rate', got: often"
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        http.close()
        grpc.close()


def test_rate_and_count_decide_which_requests_are_traced_and_clearing_restores(console_server):
    http = httpclient.InferenceServerClient(console_server.http_url)
    grpc = grpcclient.InferenceServerClient(console_server.grpc_url)
    try:
        answer = http.update_trace_settings(settings={"trace_rate": "2"})
        assert answer["trace_rate"] == "2"
        model = _grpc_settings(
            grpc.update_trace_settings(model_name="add_sub", settings={"trace_count": "1"})
        )
        assert (model["trace_rate"], model["trace_count"]) == (["2"], ["1"])
        assert http.get_trace_settings()["trace_count"] == "-1"  # the global level's own
        for index in range(5):
            _send(console_server, f"counted-{index}")
        traced = [
            i for i in _traced_before_marker(console_server, "marker-1") if i.startswith("counted-")
        ]
        assert traced == ["counted-1"]  # the second request (rate 2), then the count ran out
        assert http.get_trace_settings(model_name="add_sub")["trace_count"] == "0"
        # Clearing both puts the model back on the global (start-up) settings.
        http.update_trace_settings(model_name="add_sub", settings={"trace_count": None})
        grpc.update_trace_settings(settings={"trace_rate": []})
        assert http.get_trace_settings(model_name="add_sub")["trace_rate"] == "1"
        assert http.get_trace_settings(model_name="add_sub")["trace_count"] == "-1"
        for index in range(2):
            _send(console_server, f"every-{index}")
        traced = [i for i in _traced_before_marker(console_server, "marker-2") if i.startswith("every-")]
        assert traced == ["every-0", "every-1"]
    finally:
        http.close()
        grpc.close()


def test_level_off_traces_nothing_until_it_is_turned_on_again(console_server):
    http = httpclient.InferenceServerClient(console_server.http_url)
    try:
        assert http.update_trace_settings(settings={"trace_level": ["OFF"]})["trace_level"] == ["OFF"]
        _send(console_server, "silent", _traceparent()[1])  # not even a propagated context
        http.update_trace_settings(settings={"trace_level": None})
        assert "silent" not in _traced_before_marker(console_server, "marker-3")
    finally:
        http.close()


def test_a_server_without_an_exporter_refuses_to_turn_tracing_on(http_client, grpc_client):
    assert http_client.get_trace_settings()["trace_level"] == ["OFF"]
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert "nowhere to send traces" in caught.value.message()
