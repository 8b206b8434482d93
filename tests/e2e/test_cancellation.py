"""Clients that give up and queues that fill: the request leaves the queue and costs no compute,
and a full queue answers at once with RESOURCE_EXHAUSTED / 429."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import WITH_WORKERS, ConvoyProcess, poll
from tritonclient.utils import InferenceServerException

GATE_MODEL = '''
import time
from pathlib import Path

import numpy as np


class Model:
    """Echo that holds each batch until the file `open` exists beside the model folder."""

    def initialize(self, config):
        self.root = Path(config["path"]).parent

    def execute(self, inputs):
        (self.root / "started").touch()
        while not (self.root / "open").exists():
            time.sleep(0.005)
        return {"OUT": inputs["IN"].copy()}
'''

GATE_CONFIG = """
name: "gate"
backend: "python"
max_batch_size: 8
input [ { name: "IN", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 4 ] } ]
dynamic_batching {
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 2 }
}
"""


@pytest.fixture
def gate_server(tmp_path, frontend):
    model = tmp_path / "models" / "gate"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(GATE_CONFIG)
    (model / "1" / "model.py").write_text(GATE_MODEL)
    process = ConvoyProcess(tmp_path / "models", tmp_path / "server.log", frontend=frontend)
    process.start("ready")
    try:
        yield process, model
    finally:
        (model / "open").touch()
        assert process.stop() == 0, process.log()


def stats(process: ConvoyProcess) -> dict:
    answer = requests.get(f"{process.base_url}/v2/models/gate/stats", timeout=10).json()
    return answer["model_stats"][0]


def json_body(value: float) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "IN", "datatype": "FP32", "shape": [1, 4], "data": [value] * 4}]}
    ).encode()


def start_blocking_request(process: ConvoyProcess, model: Path) -> threading.Thread:
    """Occupy the model's only instance with a request held at the gate."""
    result: dict = {}

    def call():
        url = f"{process.base_url}/v2/models/gate/infer"
        result["response"] = requests.post(url, data=json_body(1.0), timeout=60)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.result = result
    poll(lambda: (model / "started").exists(), "the first batch to start", timeout=20.0)
    return thread


@pytest.mark.frontends(*WITH_WORKERS)
def test_http_client_disconnect_removes_request_from_queue(gate_server):
    process, model = gate_server
    first = start_blocking_request(process, model)
    body = json_body(2.0)
    with socket.create_connection(("127.0.0.1", process.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/gate/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    # The hung-up request is counted as failed (cancelled) while the gate is still closed.
    poll(
        lambda: stats(process)["inference_stats"]["fail"]["count"] == 1, "the cancellation", timeout=20.0
    )
    (model / "open").touch()
    first.join(timeout=30)
    assert first.result["response"].status_code == 200
    final = stats(process)
    assert final["execution_count"] == 1, "the cancelled request must never reach the model"
    assert final["inference_count"] == 1


@pytest.mark.frontends(*WITH_WORKERS)
def test_grpc_deadline_removes_request_from_queue(gate_server):
    process, model = gate_server
    first = start_blocking_request(process, model)
    client = grpcclient.InferenceServerClient(process.grpc_url)
    tensor = grpcclient.InferInput("IN", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), 3.0, dtype=np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("gate", [tensor], client_timeout=0.3)
    assert "DEADLINE_EXCEEDED" in str(raised.value.status())
    poll(
        lambda: stats(process)["inference_stats"]["fail"]["count"] == 1, "the cancellation", timeout=20.0
    )
    (model / "open").touch()
    first.join(timeout=30)
    assert stats(process)["execution_count"] == 1


@pytest.mark.frontends(*WITH_WORKERS)
def test_full_queue_rejects_with_resource_exhausted_and_429(gate_server):
    process, model = gate_server
    first = start_blocking_request(process, model)
    url = f"{process.base_url}/v2/models/gate/infer"
    answers: list[requests.Response] = []
    threads = []
    for value in range(5):  # the instance is busy and max_queue_size is 2: three must bounce
        thread = threading.Thread(
            target=lambda v=value: answers.append(requests.post(url, data=json_body(v), timeout=60)),
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    poll(lambda: len(answers) >= 3, "three immediate rejections", timeout=20.0)
    assert [a.status_code for a in answers] == [429, 429, 429]
    for answer in answers:
        assert answer.headers.get("Retry-After")
        assert "queue is full" in answer.json()["error"]
    client = grpcclient.InferenceServerClient(process.grpc_url)
    tensor = grpcclient.InferInput("IN", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("gate", [tensor])
    assert "RESOURCE_EXHAUSTED" in str(raised.value.status())
    assert "queue is full" in raised.value.message()
    (model / "open").touch()
    first.join(timeout=30)
    for thread in threads:
        thread.join(timeout=30)
    # The two queued requests are served once the gate opens: nothing lost, nothing unanswered.
    assert sorted(a.status_code for a in answers) == [200, 200, 429, 429, 429]
