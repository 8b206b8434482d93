"""When the dynamic batcher sends a batch, through a real server: Triton's rule by default (a
batch waits up to max_queue_delay for max_batch_size, even while the instance is idle), Convoy's
latency-first dispatch with the parameter batch_dispatch: latency_first."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from helpers import MODEL_SOURCES, ConvoyProcess, metric_value, poll, serve_until_stopped

#: A minute: a test that passes never waits it out (the batch fills first); a batcher that sent
#: a lone request early would be seen doing so.
HOLD_US = 60_000_000

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 2
input [ {{ name: "INPUT0", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_INT32, dims: [ 1 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay} }}
{extra}
"""
LATENCY_FIRST = 'parameters { key: "batch_dispatch" value { string_value: "latency_first" } }'


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("batching")
    repository = root / "models"
    for name, extra in (("held", ""), ("eager", LATENCY_FIRST)):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(
            CONFIG.format(name=name, delay=HOLD_US, extra=extra)
        )
        shutil.copy(MODEL_SOURCES / "identity" / "model.py", repository / name / "1" / "model.py")
    yield from serve_until_stopped(ConvoyProcess(repository, root / "server.log", frontend=frontend))


def _infer(server, model: str, value: int) -> int:
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        tensor = httpclient.InferInput("INPUT0", [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
        return int(client.infer(model, [tensor]).as_numpy("OUTPUT0")[0, 0])
    finally:
        client.close()


def _stats(server, model: str) -> dict:
    answer = requests.get(f"{server.base_url}/v2/models/{model}/stats", timeout=10)
    return answer.json()["model_stats"][0]


def _dispatches(server, model: str, reason: str) -> float:
    return metric_value(server, "convoy_batch_dispatch_total", model=model, reason=reason)


def test_idle_instance_holds_a_lone_request_until_a_second_fills_the_batch(batching_server):
    answers = {}
    first = threading.Thread(target=lambda: answers.setdefault(1, _infer(batching_server, "held", 1)))
    first.start()
    # Queued, with the model's only instance idle: Triton's batcher waits for the batch to fill.
    poll(
        lambda: metric_value(batching_server, "convoy_queue_depth", model="held", priority="1") == 1,
        "the first request to queue",
    )
    assert _stats(batching_server, "held")["execution_count"] == 0
    assert _infer(batching_server, "held", 2) == 2
    first.join(timeout=60)
    assert answers == {1: 1}
    stats = _stats(batching_server, "held")
    assert stats["execution_count"] == 1
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(2, 1)]
    assert _dispatches(batching_server, "held", "full") == 1


def test_latency_first_sends_a_lone_request_at_once(batching_server):
    for value in (5, 6, 7):  # one after another: each finds the model idle and goes alone
        assert _infer(batching_server, "eager", value) == value
    stats = _stats(batching_server, "eager")
    assert stats["execution_count"] == 3
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(1, 3)]
    assert _dispatches(batching_server, "eager", "queue_drained") == 3
