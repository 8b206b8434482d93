"""A batch that hangs past the execution timeout fails only its own requests; the instance is
replaced (the model reports unready meanwhile) and the model serves again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import ConvoyProcess, poll, serve_until_stopped
from tritonclient.utils import InferenceServerException

HANG_MODEL = '''
import time
from pathlib import Path

import numpy as np


class Model:
    """Echo; a batch holding the value -1 hangs until the file `release` exists."""

    def initialize(self, config):
        self.root = Path(config["path"]).parent

    def execute(self, inputs):
        if (inputs["IN"] == -1).any():
            while not (self.root / "release").exists():
                time.sleep(0.005)
        return {"OUT": inputs["IN"] * 2}
'''

HANG_CONFIG = """
name: "hang"
backend: "python"
max_batch_size: 4
input [ { name: "IN", data_type: TYPE_FP32, dims: [ 2 ] } ]
output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 2 ] } ]
dynamic_batching { }
parameters { key: "execution_timeout_ms" value: { string_value: "300" } }
"""


@pytest.fixture
def hang_server(tmp_path, frontend):
    model = tmp_path / "models" / "hang"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(HANG_CONFIG)
    (model / "1" / "model.py").write_text(HANG_MODEL)
    process = ConvoyProcess(tmp_path / "models", tmp_path / "server.log", frontend=frontend)
    try:
        yield from serve_until_stopped(process, "ready")
    finally:
        (model / "release").touch()


def infer(process: ConvoyProcess, value: float) -> requests.Response:
    body = {"inputs": [{"name": "IN", "datatype": "FP32", "shape": [1, 2], "data": [value, value]}]}
    return requests.post(f"{process.base_url}/v2/models/hang/infer", data=json.dumps(body), timeout=60)


def test_hung_batch_fails_its_requests_and_the_instance_is_replaced(hang_server):
    process = hang_server
    assert infer(process, 1.0).json()["outputs"][0]["data"] == [2.0, 2.0]
    hung = infer(process, -1.0)
    assert hung.status_code == 500
    assert "execution timeout (300 ms)" in hung.json()["error"]
    assert "Traceback" not in hung.text
    # A fresh instance comes up (loaded and warmed on a new thread) and serves again.
    poll(
        lambda: requests.get(f"{process.base_url}/v2/models/hang/ready", timeout=10).status_code == 200,
        "the replacement instance",
    )
    assert infer(process, 3.0).json()["outputs"][0]["data"] == [6.0, 6.0]
    stats = requests.get(f"{process.base_url}/v2/models/hang/stats", timeout=10).json()
    inference = stats["model_stats"][0]["inference_stats"]
    assert inference["success"]["count"] == 2
    assert inference["fail"]["count"] == 1


def test_hung_batch_answers_internal_over_grpc(hang_server):
    process = hang_server
    client = grpcclient.InferenceServerClient(process.grpc_url)
    tensor = grpcclient.InferInput("IN", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.full((1, 2), -1.0, dtype=np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("hang", [tensor])
    assert "INTERNAL" in str(raised.value.status())
    assert "execution timeout" in raised.value.message()
