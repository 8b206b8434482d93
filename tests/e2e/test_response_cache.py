"""The response cache end to end: a real server with `--cache-config local,...`, real
tritonclient gRPC and HTTP clients. Hits skip the model (its execution count does not move),
rows are looked up one by one, identical concurrent misses execute once, failures are not
cached, a reload with another config starts from an empty cache, and every answer says where it
came from in the `convoy-cache` response parameter."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess, Protocol, metric_value, open_protocol, poll, serve_until_stopped
from tritonclient.utils import InferenceServerException

DOUBLING = """
import threading
import time

import numpy as np


class Model:
    def initialize(self, config):
        self.delay = float(config["parameters"].get("delay_s", "0"))

    def execute(self, inputs):
        time.sleep(self.delay)
        return {"OUT": inputs["IN"] * 2}
"""

FAILING = """
import numpy as np


class Model:
    def execute(self, inputs):
        if (inputs["IN"] == 13).any():
            raise ValueError("refusing 13")
        return {"OUT": inputs["IN"] * 2}
"""


def _model(repository, name: str, code: str, extra: str) -> None:
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text(code)
    (folder / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "IN", data_type: TYPE_FP32, dims: [ 4 ] } ]\n'
        'output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 4 ] } ]\n' + extra
    )


CACHED = "response_cache { enable: true }\n"


@pytest.fixture(scope="module")
def cached_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("cache")
    repository = root / "models"
    _model(repository, "rows", DOUBLING, CACHED + "dynamic_batching { }\n")
    _model(
        repository,
        "slow",
        DOUBLING,
        CACHED + 'dynamic_batching { }\nparameters { key: "delay_s" value { string_value: "0.3" } }\n',
    )
    _model(repository, "whole", DOUBLING, CACHED)
    _model(repository, "failing", FAILING, CACHED)
    _model(repository, "plain", DOUBLING, "dynamic_batching { }\n")
    _model(repository, "reloaded", DOUBLING, CACHED + "dynamic_batching { }\n")
    process = ConvoyProcess(
        repository,
        root / "server.log",
        (
            "--cache-config",
            "local,size=1048576",
            "--model-control-mode",
            "explicit",
            "--load-model",
            "*",
        ),
        frontend=frontend,
    )
    yield from serve_until_stopped(process)


@pytest.fixture(scope="module", params=["grpc", "http"])
def client(request, cached_server):
    yield from open_protocol(request.param, cached_server)


def _infer(protocol, model: str, array: np.ndarray):
    tensor = protocol.input("IN", array.astype(np.float32), "FP32")
    result = protocol.client.infer(model, [tensor])
    return result.as_numpy("OUT"), _cache_marker(protocol.name, result)


def _cache_marker(name: str, result) -> str | None:
    response = result.get_response()
    if name == "grpc":
        parameter = response.parameters.get("convoy-cache")
        return parameter.string_param if parameter is not None else None
    return (response.get("parameters") or {}).get("convoy-cache")


def _executions(server, model: str) -> float:
    return metric_value(server, "nv_inference_exec_count", model=model)


def _rows(server, model: str) -> float:
    return metric_value(server, "nv_inference_count", model=model)


def _unique(seed: float, rows: int = 1) -> np.ndarray:
    return np.arange(4 * rows, dtype=np.float32).reshape(rows, 4) + seed


def test_a_repeated_request_is_answered_from_the_cache_without_executing(cached_server, client):
    seed = 1000.0 if client.name == "grpc" else 2000.0
    for model in ("rows", "whole"):
        data = _unique(seed, rows=2)
        before = _executions(cached_server, model)
        first, marker = _infer(client, model, data)
        assert marker == "miss"
        np.testing.assert_array_equal(first, data * 2)
        second, marker = _infer(client, model, data)
        assert marker == "hit"
        np.testing.assert_array_equal(second, first)
        assert _executions(cached_server, model) == before + 1


def test_row_level_lookups_compute_only_the_missing_rows(cached_server, client):
    seed = 3000.0 if client.name == "grpc" else 4000.0
    a, b, c = (_unique(seed + i) for i in range(3))
    _infer(client, "rows", np.concatenate([a, b]))
    rows_before = _rows(cached_server, "rows")
    answer, marker = _infer(client, "rows", np.concatenate([b, c, a]))
    assert marker == "partial"
    np.testing.assert_array_equal(answer, np.concatenate([b, c, a]) * 2)
    assert _rows(cached_server, "rows") == rows_before + 1  # only c was computed
    _, marker = _infer(client, "rows", c)
    assert marker == "hit"


def test_a_model_without_the_cache_carries_no_marker(cached_server, client):
    _, marker = _infer(client, "plain", _unique(5000.0))
    assert marker is None


def test_identical_concurrent_misses_execute_once(cached_server):
    data = _unique(6000.0)
    before = _executions(cached_server, "slow")
    coalesced_before = metric_value(cached_server, "convoy_cache_coalesced_total", model="slow")
    answers, errors = [], []

    def send() -> None:
        client = grpcclient.InferenceServerClient(cached_server.grpc_url)
        try:
            tensor = grpcclient.InferInput("IN", [1, 4], "FP32")
            tensor.set_data_from_numpy(data)
            answers.append(client.infer("slow", [tensor]).as_numpy("OUT"))
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(answers) == 8 and all((a == data * 2).all() for a in answers)
    assert _executions(cached_server, "slow") == before + 1
    # Those that arrived while it ran waited for it; any later ones were plain hits.
    hits = metric_value(cached_server, "nv_cache_num_hits_per_model", model="slow")
    assert hits >= 7
    assert metric_value(cached_server, "convoy_cache_coalesced_total", model="slow") >= coalesced_before


def test_failed_requests_are_not_cached(cached_server, client):
    data = np.full((1, 4), 13, dtype=np.float32)

    def failures() -> float:
        name = "nv_inference_request_failure"
        return metric_value(cached_server, name, model="failing", reason="BACKEND")

    before = failures()
    for _ in range(2):
        with pytest.raises(InferenceServerException) as caught:
            _infer(client, "failing", data)
        assert "refusing 13" in str(caught.value)
    assert failures() == before + 2  # both reached the model


def test_statistics_and_metrics_count_hits_and_misses_as_triton(cached_server):
    stats = requests.get(f"http://{cached_server.http_url}/v2/models/whole/stats", timeout=10).json()
    inference = stats["model_stats"][0]["inference_stats"]
    assert inference["cache_hit"]["count"] >= 2 and inference["cache_hit"]["ns"] > 0
    assert inference["cache_miss"]["count"] >= 2 and inference["cache_miss"]["ns"] > 0
    # Hits are successes but not executions or inferences (Triton's rule).
    assert (
        inference["success"]["count"]
        == inference["cache_hit"]["count"] + inference["cache_miss"]["count"]
    )
    execution = stats["model_stats"][0]["execution_count"]
    assert execution == inference["cache_miss"]["count"]
    for name in (
        "nv_cache_num_hits_per_model",
        "nv_cache_num_misses_per_model",
        "nv_cache_hit_duration_per_model",
        "nv_cache_miss_duration_per_model",
    ):
        assert metric_value(cached_server, name, model="whole") > 0, name
    assert metric_value(cached_server, "convoy_cache_entries", model="whole") >= 2
    assert metric_value(cached_server, "convoy_cache_bytes", model="whole") > 0
    assert metric_value(cached_server, "convoy_cache_capacity_bytes") == 1048576
    assert metric_value(cached_server, "convoy_cache_saved_compute_seconds_total", model="whole") > 0
    # Models without the cache export no cache series (as Triton).
    assert metric_value(cached_server, "nv_cache_num_misses_per_model", model="plain") == 0


def test_a_reload_with_another_config_starts_from_an_empty_cache(cached_server):
    client = httpclient.InferenceServerClient(cached_server.http_url)
    protocol = Protocol("http", client, httpclient)
    data = _unique(7000.0)
    _infer(protocol, "reloaded", data)
    assert _infer(protocol, "reloaded", data)[1] == "hit"
    assert metric_value(cached_server, "convoy_cache_entries", model="reloaded") == 1
    config = json.loads(json.dumps(client.get_model_config("reloaded")))
    config["parameters"] = {"delay_s": {"string_value": "0"}}
    client.load_model("reloaded", config=json.dumps(config))
    poll(
        lambda: metric_value(cached_server, "convoy_cache_entries", model="reloaded") == 0,
        "the old revision's entries to be dropped",
    )
    assert _infer(protocol, "reloaded", data)[1] == "miss"
    client.unload_model("reloaded")
    poll(
        lambda: metric_value(cached_server, "convoy_cache_bytes", model="reloaded") == 0,
        "unload to drop",
    )
    client.close()
