"""`convoy capacity` and `convoy loadtest` against a real server on loopback.

The load generator runs as a subprocess (as users run it): locust monkey-patches the process it
runs in, which must not be pytest's. Every run is bounded by a duration and a request budget.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys

import pytest
import requests
from helpers import REPO_ROOT, ConvoyProcess

from convoy.cli import demo_repository

#: A model that answers add_sub's question wrongly: OUTPUT0 = INPUT0 + INPUT1 + 1.
OFF_BY_ONE_CONFIG = """
name: "off_by_one"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] },
        { name: "INPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] },
         { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
"""
OFF_BY_ONE_MODEL = """
class Model:
    def execute(self, inputs):
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b + 1, "OUTPUT1": a - b}
"""

#: add_sub behind a queue of one and a 50 ms model: concurrent users get load-shed.
SMALL_QUEUE_CONFIG = """
name: "small_queue"
backend: "python"
max_batch_size: 1
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] },
        { name: "INPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] },
         { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
dynamic_batching { default_queue_policy { max_queue_size: 1 } }
"""
SMALL_QUEUE_MODEL = """
import time


class Model:
    def execute(self, inputs):
        time.sleep(0.05)
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
"""

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)

STEPS = (1, 4)
TARGET_RPS = 5000
HEADROOM = 0.3

#: add_sub that costs a fixed 5 ms per batch of one: the server, not the load generator, is the
#: limit, so `convoy capacity` sizes from it (a step where the client saturates is client-bound
#: and gives no replica count, see test_reporting.py).
PACED_CONFIG = """
name: "paced_add_sub"
backend: "python"
max_batch_size: 1
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] },
        { name: "INPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] },
         { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
"""
PACED_MODEL = """
import time


class Model:
    def execute(self, inputs):
        time.sleep(0.005)
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
"""


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("loadtests")
    repository = root / "models"
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    for name, config, model in (
        ("off_by_one", OFF_BY_ONE_CONFIG, OFF_BY_ONE_MODEL),
        ("small_queue", SMALL_QUEUE_CONFIG, SMALL_QUEUE_MODEL),
        ("paced_add_sub", PACED_CONFIG, PACED_MODEL),
    ):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(config)
        (repository / name / "1" / "model.py").write_text(model)
    process = ConvoyProcess(repository, root / "server.log", ("--log-level", "WARNING"))
    process.start("ready")
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, f"server exited with {code} on SIGTERM\n{process.log()}"


def convoy(server: ConvoyProcess, *args: str) -> subprocess.CompletedProcess:
    """Run a `convoy` load command against `server` only (every endpoint given explicitly)."""
    command = [
        sys.executable,
        "-m",
        "convoy",
        *args,
        "--http-url",
        server.http_url,
        "--grpc-url",
        server.grpc_url,
        "--metrics-url",
        f"http://127.0.0.1:{server.metrics_port}/metrics",
        "--timeout",
        "10",
    ]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{' '.join(args[:3])} did not finish in 60 s\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}"
            f"\n{server.log()}"
        ) from None


@pytest.fixture(scope="module")
def capacity_report(load_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("capacity")
    run = convoy(
        load_server,
        "capacity",
        "--model",
        "paced_add_sub",
        "--check",
        "add_sub",
        "--steps",
        ",".join(map(str, STEPS)),
        "--duration",
        "2",
        "--warmup",
        "0.3",
        "--max-requests",
        "20000",
        "--slo-p99-ms",
        "1000",
        "--target-rps",
        str(TARGET_RPS),
        "--headroom",
        str(HEADROOM),
        "--out",
        str(out),
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}\n{load_server.log()}"
    return out, run


def server_successes(server: ConvoyProcess, model: str) -> int:
    stats = requests.get(f"{server.base_url}/v2/models/{model}/stats", timeout=5).json()
    return sum(int(row["inference_stats"]["success"]["count"]) for row in stats["model_stats"])


def test_capacity_writes_report_files_that_agree_with_each_other(capacity_report):
    out, run = capacity_report
    data = json.loads((out / "capacity.json").read_text())
    with (out / "capacity.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["users"]) for r in rows] == list(STEPS)
    assert [int(r["successes"]) for r in rows] == [s["successes"] for s in data["steps"]]
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert data["target"]["model"] == "paced_add_sub"
    assert "convoy capacity: paced_add_sub over grpc" in run.stdout
    assert f"needs {data['recommendation']['replicas']} replicas" in run.stdout


def test_capacity_steps_are_consistent_and_have_no_mismatches(capacity_report, load_server):
    out, _ = capacity_report
    data = json.loads((out / "capacity.json").read_text())
    for step in data["steps"]:
        assert step["mismatches"] == 0 and step["errors"] == 0, data["failures"]
        assert step["successes"] > 0 and step["throughput_rps"] > 0
        assert step["requests"] == step["successes"] + step["rejections"] + step["errors"]
        assert step["p50_ms"] <= step["p90_ms"] <= step["p99_ms"] <= step["max_ms"]
        assert step["meets_slo"]
        if step["server_inferences"] is not None:
            # Scrapes bracket the window: each edge may hold one in-flight request per user.
            assert step["server_inferences"] >= step["successes"] - step["users"]
            assert step["server_mean_batch_size"] >= 1
    assert server_successes(load_server, "paced_add_sub") >= sum(s["successes"] for s in data["steps"])


def test_capacity_recommends_replicas_from_the_best_step_within_the_slo(capacity_report):
    out, _ = capacity_report
    data = json.loads((out / "capacity.json").read_text())
    best = max(data["steps"], key=lambda s: s["throughput_rps"])
    rec = data["recommendation"]
    assert rec["best_step"] == best["step"]
    assert rec["per_replica_rps"] == best["throughput_rps"]
    assert rec["replicas"] == math.ceil(TARGET_RPS / (best["throughput_rps"] * (1 - HEADROOM)))


def test_every_user_type_sends_checked_requests_within_the_budget(load_server, tmp_path):
    protocols = ("http-json", "http-binary", "grpc", "grpc-stream")
    result_path = tmp_path / "loadtest.json"
    run = convoy(
        load_server,
        "loadtest",
        "--model",
        "add_sub",
        "--protocol",
        ",".join(protocols),
        "--users",
        "4",
        "--duration",
        "20",
        "--max-requests",
        "200",
        "--json",
        str(result_path),
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    data = json.loads(result_path.read_text())
    assert set(data["by_protocol"]) == set(protocols)
    for protocol, summary in data["by_protocol"].items():
        assert summary["successes"] >= 1, protocol
        assert summary["mismatches"] == summary["errors"] == summary["rejections"] == 0, data["failures"]
    assert data["total"]["requests"] <= 200


def test_wrong_answers_are_reported_as_mismatches_and_fail_the_run(load_server, tmp_path):
    result_path = tmp_path / "loadtest.json"
    run = convoy(
        load_server,
        "loadtest",
        "--model",
        "off_by_one",
        "--check",
        "add_sub",
        "--protocol",
        "http-json,grpc",
        "--users",
        "2",
        "--max-requests",
        "20",
        "--json",
        str(result_path),
    )
    assert run.returncode == 1, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    data = json.loads(result_path.read_text())
    assert data["total"]["successes"] == 0
    assert data["total"]["mismatches"] == data["total"]["requests"] > 0
    assert any("OUTPUT0" in message for message in data["failures"])


def test_load_shedding_counts_as_rejections_on_every_protocol(load_server, tmp_path):
    protocols = ("http-binary", "grpc", "grpc-stream")
    result_path = tmp_path / "loadtest.json"
    run = convoy(
        load_server,
        "loadtest",
        "--model",
        "small_queue",
        "--check",
        "add_sub",
        "--protocol",
        ",".join(protocols),
        "--users",
        "9",
        "--duration",
        "20",
        "--max-requests",
        "90",
        "--json",
        str(result_path),
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    data = json.loads(result_path.read_text())
    for protocol in protocols:
        summary = data["by_protocol"][protocol]
        # 429, RESOURCE_EXHAUSTED and a streamed "queue is full" are rejections, not errors.
        assert summary["errors"] == summary["mismatches"] == 0, data["failures"]
        assert summary["requests"] == summary["successes"] + summary["rejections"]
    assert data["total"]["rejections"] > 0


def test_loadtest_refuses_an_unknown_model_with_a_message(load_server):
    run = convoy(load_server, "loadtest", "--model", "no_such_model", "--max-requests", "1")
    assert run.returncode == 2
    assert "no_such_model" in run.stderr


def test_html_report_renders_in_headless_chromium(capacity_report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out, _ = capacity_report
    screenshot = tmp_path / "report.png"
    run = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,1500",
            f"--screenshot={screenshot}",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    image = screenshot.read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    # A blank page compresses to a few kB; tables and four charts do not.
    assert len(image) > 30_000, len(image)
