"""/metrics after known traffic: exact counters and histogram counts, the same numbers as the
statistics API, the access log and JSON server log, Triton's LogSettings API over gRPC and HTTP,
and perf_analyzer's server-side breakdown. Nothing waits a fixed time: every wait polls with a
deadline."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import REPO_ROOT, WITH_WORKERS, ConvoyProcess, copy_model, poll
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from convoy.cli import demo_repository

pytestmark = pytest.mark.frontends(*WITH_WORKERS)

DEADLINE_S = 30.0

METERED_MODEL = '''
import time
from pathlib import Path


class Model:
    """Echo. A batch holding a negative value waits for the file `open` beside the model
    folder (noting `started` first); one holding 13 raises."""

    def initialize(self, config):
        self.root = Path(config["path"]).parent

    def execute(self, inputs):
        values = inputs["IN"]
        if (values == 13).any():
            raise ValueError("refusing the value 13")
        if (values < 0).any():
            (self.root / "started").touch()
            deadline = time.monotonic() + 60
            while not (self.root / "open").exists() and time.monotonic() < deadline:
                time.sleep(0.005)
        return {"OUT": values.copy()}
'''

METERED_CONFIG = """
name: "metered"
backend: "python"
max_batch_size: 8
input [ { name: "IN", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 4 ] } ]
dynamic_batching {
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 1 }
}
# The dispatch reasons counted below are the latency-first batcher's (queue_drained,
# instance_freed); Triton's rule would count every batch delay_expired.
parameters { key: "batch_dispatch" value { string_value: "latency_first" } }
"""


@pytest.fixture(scope="module")
def metered(tmp_path_factory, frontend):
    """A server with `metered` and add_sub, a JSON log and an access log file."""
    yield from serve_metered(tmp_path_factory.mktemp("metrics"), frontend=frontend)


def serve_metered(root, extra_args: tuple[str, ...] = (), frontend: str = ""):
    """Fixture body: (server, the metered model's folder, the access log), stopped after."""
    repository = root / "models"
    model = repository / "metered"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(METERED_CONFIG)
    (model / "1" / "model.py").write_text(METERED_MODEL)
    copy_model(repository, "fails_on_value")
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    access_log = root / "access.log"
    process = ConvoyProcess(
        repository,
        root / "server.log",
        extra_args=("--log-format", "json", "--access-log", str(access_log), *extra_args),
        frontend=frontend,
    )
    process.start("ready")
    try:
        yield process, model, access_log
    finally:
        (model / "open").touch()
        assert process.stop() == 0, process.log()


Samples = dict[tuple[str, frozenset], float]


def scrape(process: ConvoyProcess) -> Samples:
    text = requests.get(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, model: str = "metered", **labels) -> float:
    key = (name, frozenset({"model": model, "version": "1", **labels}.items()))
    assert key in samples, f"no sample {name} {labels} for {model}"
    return samples[key]


def infer_body(number: float) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "IN", "datatype": "FP32", "shape": [1, 4], "data": [number] * 4}]}
    ).encode()


def post(process: ConvoyProcess, number: float) -> requests.Response:
    url = f"{process.base_url}/v2/models/metered/infer"
    return requests.post(url, data=infer_body(number), timeout=60)


def post_in_background(process: ConvoyProcess, number: float) -> tuple[threading.Thread, dict]:
    answer: dict = {}
    thread = threading.Thread(
        target=lambda: answer.setdefault("response", post(process, number)), daemon=True
    )
    thread.start()
    return thread, answer


def hang_up_while_queued(process: ConvoyProcess, number: float) -> None:
    """Send a whole request, wait until it waits in the model's queue, then close the connection
    without reading the answer. (Closed at once, the server may see the hang-up before the request
    reaches the queue: then it is dropped unsubmitted and nothing is cancelled.)"""
    body = infer_body(number)
    with socket.create_connection(("127.0.0.1", process.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/metered/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        poll(
            lambda: value(scrape(process), "convoy_queue_depth", priority="1") == 1,
            "the request to hang up on to queue",
        )


def grpc_infer(client, number: float, model: str = "metered", request_id: str = ""):
    tensor = grpcclient.InferInput("IN", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), number, dtype=np.float32))
    return client.infer(model, [tensor], request_id=request_id)


def test_metrics_count_known_traffic_exactly(metered):
    process, model, _ = metered
    client = grpcclient.InferenceServerClient(process.grpc_url)
    # Five successes one after another: three over HTTP, two over gRPC.
    for number in (1.0, 2.0, 3.0):
        assert post(process, number).status_code == 200
    for number in (4.0, 5.0):
        grpc_infer(client, number)
    # The model's only instance is held at the gate by a sixth request...
    held, held_answer = post_in_background(process, -1.0)
    poll(lambda: (model / "started").exists(), "the held batch to start")
    # ...while a client hangs up on its queued request (CANCELED)...
    hang_up_while_queued(process, 6.0)
    poll(
        lambda: value(scrape(process), "nv_inference_request_failure", reason="CANCELED") == 1,
        "the hung-up request to be cancelled",
    )
    # ...a seventh request fills the one-request queue, and an eighth bounces (REJECTED).
    queued, queued_answer = post_in_background(process, 7.0)
    poll(
        lambda: value(scrape(process), "convoy_queue_depth", priority="1") == 1,
        "the seventh request to queue",
    )
    assert value(scrape(process), "nv_inference_pending_request_count") == 2
    assert post(process, 8.0).status_code == 429
    (model / "open").touch()
    for thread in (held, queued):
        thread.join(timeout=DEADLINE_S)
    assert held_answer["response"].status_code == 200
    assert queued_answer["response"].status_code == 200
    # A batch the model fails (BACKEND).
    assert post(process, 13.0).status_code == 500

    samples = scrape(process)
    expected = {
        "nv_inference_request_success": 7,
        "nv_inference_count": 7,
        "nv_inference_exec_count": 7,
        "nv_inference_pending_request_count": 0,
        "convoy_request_latency_seconds_count": 7,
        "convoy_request_latency_seconds_bucket": 7,  # le="+Inf"
        "convoy_compute_seconds_count": 7,
        "convoy_batch_size_count": 7,
        "convoy_batch_size_sum": 7,
        # Queue wait counts every request that reached the model, the failed one too.
        "convoy_queue_wait_seconds_count": 8,
    }
    got = {
        name: value(samples, name, le="+Inf") if name.endswith("_bucket") else value(samples, name)
        for name in expected
    }
    assert got == expected
    # Every batch held one row.
    assert value(samples, "convoy_batch_size_bucket", le="1.0") == 7
    failures = {
        reason: value(samples, "nv_inference_request_failure", reason=reason)
        for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER")
    }
    assert failures == {"REJECTED": 1, "CANCELED": 1, "BACKEND": 1, "OTHER": 0}
    rejections = {
        reason: value(samples, "convoy_rejections_total", reason=reason)
        for reason in ("queue_full", "timeout")
    }
    assert rejections == {"queue_full": 1, "timeout": 0}
    dispatches = {
        reason: value(samples, "convoy_batch_dispatch_total", reason=reason)
        for reason in (
            "full",
            "preferred_size",
            "delay_expired",
            "queue_drained",
            "instance_freed",
            "unbatched",
        )
    }
    # Each request found the model idle except the seventh, which waited for the instance.
    assert dispatches == {
        "full": 0,
        "preferred_size": 0,
        "delay_expired": 0,
        "queue_drained": 6,
        "instance_freed": 1,
        "unbatched": 0,
    }
    assert value(samples, "convoy_queue_depth", priority="1") == 0
    assert value(samples, "nv_inference_request_duration_us") > 0
    assert value(samples, "nv_inference_compute_infer_duration_us") > 0
    assert samples[("nv_cpu_memory_total_bytes", frozenset())] > 0


def _statistics(process: ConvoyProcess, protocol: str) -> list[dict]:
    if protocol == "grpc":
        client = grpcclient.InferenceServerClient(process.grpc_url)
        return client.get_inference_statistics(as_json=True)["model_stats"]
    answer = requests.get(f"{process.base_url}/v2/models/stats", timeout=10)
    return answer.json()["model_stats"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_statistics_api_and_metrics_agree(metered, protocol):
    process, _, _ = metered
    client = grpcclient.InferenceServerClient(process.grpc_url)
    grpc_infer(client, 9.0)  # traffic whatever order the tests run in
    rows = _statistics(process, protocol)
    samples = scrape(process)
    assert {row["name"] for row in rows} == {"metered", "add_sub", "fails_on_value"}
    for row in rows:
        model = row["name"]
        stats = row["inference_stats"]

        count = {stage: int(d.get("count", 0)) for stage, d in stats.items()}
        micros = {stage: int(d.get("ns", 0)) // 1000 for stage, d in stats.items()}
        failures = sum(
            value(samples, "nv_inference_request_failure", model, reason=reason)
            for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER")
        )
        from_api = {
            "success": count["success"],
            "fail": count["fail"],
            "inference_count": int(row.get("inference_count", 0)),
            "execution_count": int(row.get("execution_count", 0)),
            "request_us": micros["success"],
            "queue_us": micros["queue"],
            "input_us": micros["compute_input"],
            "infer_us": micros["compute_infer"],
            "output_us": micros["compute_output"],
            "latency_histogram_count": count["success"],
            "queue_histogram_count": count["queue"],
        }
        from_metrics = {
            "success": value(samples, "nv_inference_request_success", model),
            "fail": failures,
            "inference_count": value(samples, "nv_inference_count", model),
            "execution_count": value(samples, "nv_inference_exec_count", model),
            "request_us": value(samples, "nv_inference_request_duration_us", model),
            "queue_us": value(samples, "nv_inference_queue_duration_us", model),
            "input_us": value(samples, "nv_inference_compute_input_duration_us", model),
            "infer_us": value(samples, "nv_inference_compute_infer_duration_us", model),
            "output_us": value(samples, "nv_inference_compute_output_duration_us", model),
            "latency_histogram_count": value(samples, "convoy_request_latency_seconds_count", model),
            "queue_histogram_count": value(samples, "convoy_queue_wait_seconds_count", model),
        }
        assert from_metrics == from_api, model
        assert value(samples, "convoy_batch_size_count", model) == from_api["execution_count"]
        assert value(samples, "convoy_batch_size_sum", model) == from_api["inference_count"]
        latency_sum_ns = value(samples, "convoy_request_latency_seconds_sum", model) * 1e9
        assert latency_sum_ns == pytest.approx(int(stats["success"].get("ns", 0)), abs=1)


def _access_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_access_log_has_a_json_line_per_inference_request(metered):
    process, _, access_log = metered
    body = {
        "id": "access-http-1",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16},
        ],
    }
    url = f"{process.base_url}/v2/models/add_sub/infer"
    assert requests.post(url, json=body, timeout=10).status_code == 200
    missing = f"{process.base_url}/v2/models/no_such_model/infer"
    assert requests.post(missing, json={**body, "id": "x"}, timeout=10).status_code == 404
    client = grpcclient.InferenceServerClient(process.grpc_url)
    with pytest.raises(InferenceServerException):
        grpc_infer(client, 1.0, model="no_such_model", request_id="access-grpc-404")
    grpc_infer(client, 1.0, request_id="access-grpc-1")

    def lines_by_id():
        return {line.get("request_id", ""): line for line in _access_lines(access_log)}

    wanted = {"access-http-1", "access-grpc-404", "access-grpc-1"}
    poll(lambda: wanted <= lines_by_id().keys(), "the access log lines")
    found = lines_by_id()
    http_line = found["access-http-1"]
    grpc_missing = found["access-grpc-404"]
    grpc_line = found["access-grpc-1"]
    assert {k: http_line[k] for k in ("protocol", "model", "version", "status")} == {
        "protocol": "http",
        "model": "add_sub",
        "version": "1",
        "status": "200",
    }
    assert {k: grpc_line[k] for k in ("protocol", "model", "version", "status")} == {
        "protocol": "grpc",
        "model": "metered",
        "version": "1",
        "status": "OK",
    }
    assert grpc_missing["status"] == "NOT_FOUND"
    for line in (http_line, grpc_line, grpc_missing):
        assert line["logger"] == "convoy.access"
        assert isinstance(line["duration_us"], int) and line["duration_us"] >= 0
        assert line["timestamp"] and line["level"] == "INFO"
    # The unknown model's HTTP request is logged without an id (its body was never read as a
    # request), by the status it got.
    assert any(
        line["model"] == "no_such_model" and line["status"] == "404"
        for line in _access_lines(access_log)
    )


def test_server_log_is_json_lines(metered):
    process, _, _ = metered
    lines = [line for line in process.log_path.read_text().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    ready = [
        e for e in entries if e["message"] == "model 'metered' ready (versions [1], backend python)"
    ]
    assert len(ready) == 1
    assert set(ready[0]) >= {"timestamp", "level", "logger", "message"}
    assert ready[0]["logger"] == "convoy.repository"
    assert ready[0]["level"] == "INFO"


def test_failed_batch_traceback_stays_in_the_server_log(metered):
    process, _, _ = metered
    url = f"{process.base_url}/v2/models/metered/infer"
    answer = requests.post(url, data=infer_body(13.0), timeout=10)
    assert answer.status_code == 500
    assert "Traceback" not in answer.text

    def logged():
        entries = [
            json.loads(line)
            for line in process.log_path.read_text().splitlines()
            if line.startswith("{")
        ]
        return [e for e in entries if "refusing the value 13" in e.get("traceback", "")]

    (entry, *_) = poll(logged, "the failed batch's traceback in the log")
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "convoy.batching"


# --- LogSettings ---------------------------------------------------------------------------------

TRITON_DEFAULTS = {
    "log_file": "",
    "log_info": True,
    "log_warning": True,
    "log_error": True,
    "log_verbose_level": 0,
    "log_format": "text",
}


def _settings(protocol, changes=None) -> dict:
    """Read (or update) the log settings; gRPC's SettingValue messages flattened to values."""
    if protocol.name == "grpc":
        if changes is None:
            answer = protocol.client.get_log_settings(as_json=True)
        else:
            answer = protocol.client.update_log_settings(changes, as_json=True)
        return {key: next(iter(v.values())) for key, v in answer["settings"].items()}
    if changes is None:
        return protocol.client.get_log_settings()
    return protocol.client.update_log_settings(changes)


def test_log_settings_read_and_change(protocol):
    assert _settings(protocol) == TRITON_DEFAULTS
    try:
        changed = _settings(protocol, {"log_verbose_level": 1, "log_warning": False})
        assert changed == {**TRITON_DEFAULTS, "log_verbose_level": 1, "log_warning": False}
        assert _settings(protocol) == changed
    finally:
        restored = _settings(protocol, {"log_verbose_level": 0, "log_warning": True})
    assert restored == TRITON_DEFAULTS


def test_bad_log_setting_returns_invalid_argument(protocol):
    with pytest.raises(InferenceServerException) as caught:
        _settings(protocol, {"log_format": "xml"})
    assert caught.value.status() == protocol.status("INVALID_ARGUMENT")
    assert caught.value.message().startswith("invalid argument for log_format, got: xml")
    assert _settings(protocol) == TRITON_DEFAULTS


def test_log_file_cannot_be_changed_over_the_network_in_tritons_words(protocol):
    with pytest.raises(InferenceServerException) as caught:
        _settings(protocol, {"log_file": "log_file.log", "log_info": False})
    assert caught.value.status() == protocol.status("UNIMPLEMENTED")
    assert caught.value.message() == "log file location can not be updated through network protocol"
    assert _settings(protocol) == TRITON_DEFAULTS


# --- perf_analyzer's server-side breakdown -------------------------------------------------------


def _perf_analyzer() -> Path | None:
    configured = os.environ.get("PERF_ANALYZER")
    candidate = Path(configured) if configured else REPO_ROOT / ".perf_analyzer" / "perf_analyzer"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def test_perf_analyzer_shows_server_queue_and_compute(server, tmp_path):
    perf_analyzer = _perf_analyzer()
    if perf_analyzer is None:
        pytest.skip("perf_analyzer not found (.perf_analyzer/perf_analyzer)")
    command = [
        str(perf_analyzer),
        "-m", "add_sub",
        "-u", server.grpc_url,
        "-i", "grpc",
        "--concurrency-range", "2",
        "--measurement-mode", "count_windows",
        "--measurement-request-count", "50",
        "-r", "10",
        "-s", "100",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    server_section = done.stdout[done.stdout.index("Server:") :]
    assert re.search(r"Inference count: \d+", server_section), done.stdout
    breakdown = re.search(
        r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue \d+ usec \+ "
        r"compute input \d+ usec \+ compute infer \d+ usec \+ compute output \d+ usec\)",
        server_section,
    )
    assert breakdown, done.stdout


def test_grafana_dashboard_queries_only_metrics_the_server_exports(metered):
    process, _, _ = metered
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "convoy.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queried = {name for query in queries for name in re.findall(r"\b(?:nv|convoy)_\w+", query)}
    exported = {name for name, _ in scrape(process)}
    # Families that exist only where their feature runs (tests/deploy checks they are declared):
    # GPU gauges where NVML sees a GPU, cache series for cached models, token series for
    # padded or ragged ones.
    conditional = (
        "nv_gpu_",
        "nv_energy_",
        "nv_cache_",
        "convoy_cache_",
        "convoy_batch_tokens",
        "convoy_padding_",
    )
    missing = {name for name in queried - exported if not name.startswith(conditional)}
    assert not missing, f"the dashboard queries metrics /metrics lacks: {sorted(missing)}"
    assert {"convoy_request_latency_seconds_bucket", "nv_gpu_utilization"} <= queried
