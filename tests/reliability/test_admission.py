"""Deadline-aware admission over the wire: with work queued ahead, a request whose deadline
cannot be met is answered RESOURCE_EXHAUSTED / 429 at once, with how long to wait before
retrying (HTTP Retry-After, gRPC `grpc-retry-pushback-ms`); the queued requests still finish.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import requests
from capacity_models import write_capacity_model
from helpers import FRONTENDS, ConvoyProcess, metric_value, poll, serve_until_stopped

from convoy.protos import grpc_service_pb2 as pb
from convoy.protos import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.frontends(FRONTENDS[0])

MODEL = "slow"
BATCH_SECONDS = 0.1
QUEUED = 24  # 6 batches of 4 rows ahead: at least 600 ms of work
DEADLINE_US = 50_000


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("admission")
    write_capacity_model(root / "models", MODEL, batch_seconds=BATCH_SECONDS, timeout_us=0)
    config = root / "models" / MODEL / "config.pbtxt"
    config.write_text(
        config.read_text()
        .replace("max_queue_size: 8", "max_queue_size: 64")
        .replace("timeout_action: REJECT", "timeout_action: REJECT\n    allow_timeout_override: true")
    )
    yield from serve_until_stopped(
        ConvoyProcess(root / "models", root / "server.log", frontend=frontend)
    )


def row(request_id: int) -> list[int]:
    return [request_id, request_id + 1, -request_id, 7 * request_id]


def http_infer(server, request_id: int, timeout_us: int | None = None) -> requests.Response:
    body = {
        "id": str(request_id),
        "inputs": [{"name": "IN", "datatype": "INT64", "shape": [1, 4], "data": row(request_id)}],
    }
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    return requests.post(f"{server.base_url}/v2/models/{MODEL}/infer", json=body, timeout=30)


def grpc_request(request_id: int, timeout_us: int | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id=str(request_id))
    tensor = request.inputs.add(name="IN", datatype="INT64", shape=[1, 4])
    tensor.contents.int64_contents.extend(row(request_id))
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def rejection_count(server) -> float:
    return metric_value(server, "convoy_rejections_total", model=MODEL, reason="deadline")


def queue_depth(server) -> float:
    return metric_value(server, "nv_inference_pending_request_count", model=MODEL)


def test_unmeetable_deadline_is_rejected_at_once_and_the_queue_still_drains(slow_server):
    for request_id in range(3):  # the cost model needs a few measured batches
        assert http_infer(slow_server, request_id).status_code == 200
    before = rejection_count(slow_server)
    answers: dict[int, requests.Response] = {}

    def queued(request_id: int) -> None:
        answers[request_id] = http_infer(slow_server, request_id, timeout_us=30_000_000)

    threads = [threading.Thread(target=queued, args=(100 + n,)) for n in range(QUEUED)]
    for thread in threads:
        thread.start()
    try:
        poll(lambda: queue_depth(slow_server) >= QUEUED - 4, "the queue to fill")

        late = http_infer(slow_server, 500, timeout_us=DEADLINE_US)
        assert late.status_code == 429, late.text
        assert "cannot meet the request's deadline" in late.json()["error"]
        assert int(late.headers["retry-after"]) >= 1

        with grpc.insecure_channel(slow_server.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for call in (
                lambda: stub.ModelInfer.with_call(grpc_request(501, timeout_us=DEADLINE_US)),
                # The client's own deadline counts the same way as the timeout parameter.
                lambda: stub.ModelInfer.with_call(grpc_request(502), timeout=DEADLINE_US / 1e6),
            ):
                with pytest.raises(grpc.RpcError) as rejected:
                    call()
                assert rejected.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "cannot meet the request's deadline" in rejected.value.details()
                trailers = dict(rejected.value.trailing_metadata())
                # At least the batches ahead of it: 4 rows per batch, BATCH_SECONDS each.
                assert int(trailers["grpc-retry-pushback-ms"]) >= 1000 * BATCH_SECONDS * 4
    finally:
        for thread in threads:
            thread.join(timeout=60)
    assert rejection_count(slow_server) == before + 3
    assert len(answers) == QUEUED
    for request_id, answer in answers.items():
        assert answer.status_code == 200, answer.text
        output = answer.json()["outputs"][0]["data"]
        assert output == list(np.array(row(request_id)) * 3 + 1)
