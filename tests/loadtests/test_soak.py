"""`convoy soak`: windows of checked load with the server's RSS sampled, drift fitted, a JSON and a
Markdown report, and a non-zero exit when RSS grows past the threshold. Runs a few seconds with
tiny windows: the checks are on the report's structure and consistency, never on timings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import psutil
import pytest
from helpers import REPO_ROOT

from convoy.cli import demo_repository
from convoy.loadtests.soak import WindowRow, drift, exceeded, slope_per_hour

LEAKY_CONFIG = """
name: "leaky"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ -1 ] } ]
"""

LEAKY_MODEL = """
class Model:
    \"\"\"Identity that keeps 1 MiB per batch (written, so resident), up to 160 MiB.\"\"\"

    def initialize(self, config):
        self.kept = []

    def execute(self, inputs):
        if len(self.kept) < 160:
            self.kept.append(b"x" * (1 << 20))
        return {"OUTPUT0": inputs["INPUT0"]}
"""


def soak(tmp_path, repository, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "convoy",
            "soak",
            "--model-repository",
            str(repository),
            "--duration",
            "3",
            "--window",
            "1",
            "--users",
            "2",
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
    )
    report = out / "soak.json"
    assert report.exists(), completed.stderr[-4000:]
    return completed, {"json": json.loads(report.read_text()), "markdown": (out / "soak.md").read_text()}


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("soak")
    repository = tmp_path / "models"
    repository.mkdir()
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    return soak(tmp_path, repository)


def test_soak_reports_every_window_with_rss_and_latency(healthy_run):
    completed, report = healthy_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    data = report["json"]
    assert data["target"]["model"] == "add_sub"
    assert data["target"]["rss_source"] == "proc"
    windows = data["windows"]
    assert [w["index"] for w in windows] == [0, 1, 2]
    assert [w["at_s"] for w in windows] == sorted(w["at_s"] for w in windows)
    for window in windows:
        assert window["requests"] > 0
        assert window["successes"] == window["requests"]
        assert window["mismatches"] == window["errors"] == 0
        assert 0 < window["p50_ms"] <= window["p99_ms"]
        assert window["rss_mb"] > 0
        assert window["rss_peak_mb"] >= window["rss_mb"]
    assert data["exceeded"] == []


def test_soak_drift_agrees_with_its_windows(healthy_run):
    _, report = healthy_run
    data = report["json"]
    windows, found = data["windows"], data["drift"]
    assert found["rss_idle_before_mb"] > 0 and found["rss_idle_after_mb"] > 0
    assert found["rss_growth_mb"] == pytest.approx(windows[-1]["rss_mb"] - found["rss_idle_before_mb"])
    assert found["windows_fitted"] == 2  # the first window is warm-up
    assert found["p99_ratio"] == pytest.approx(windows[-1]["p99_ms"] / windows[0]["p99_ms"])
    assert isinstance(found["rss_slope_mb_per_hour"], float)
    markdown = report["markdown"]
    assert markdown.startswith("# convoy soak: add_sub")
    assert markdown.count("\n| ") >= 3 + 6  # three window rows and six drift rows
    assert "within the thresholds" in markdown


def test_soak_started_server_is_stopped(healthy_run):
    _, report = healthy_run
    pid = report["json"]["target"]["server_pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_soak_exits_non_zero_when_the_server_leaks(tmp_path):
    repository = tmp_path / "models"
    (repository / "leaky" / "1").mkdir(parents=True)
    (repository / "leaky" / "config.pbtxt").write_text(LEAKY_CONFIG)
    (repository / "leaky" / "1" / "model.py").write_text(LEAKY_MODEL)
    completed, report = soak(
        tmp_path, repository, "--model", "leaky", "--check", "none", "--max-rss-growth-mb", "80"
    )
    assert completed.returncode == 1
    data = report["json"]
    assert data["drift"]["rss_growth_mb"] > 80
    assert data["exceeded"] and data["exceeded"][0].startswith("RSS grew")
    assert "convoy soak: RSS grew" in completed.stderr


def test_slope_is_fitted_by_least_squares_per_hour():
    assert slope_per_hour([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == pytest.approx(7200.0)
    assert slope_per_hour([(0.0, 1.0), (10.0, 1.0), (20.0, 1.0)]) == pytest.approx(0.0)
    assert slope_per_hour([(5.0, 1.0)]) is None


def test_drift_leaves_out_the_warmup_window_and_checks_thresholds():
    def row(index: int, rss: float, p99: float) -> WindowRow:
        return WindowRow(index, index * 60.0, 10, 10, 0, 0, 0, 1.0, 1.0, p99, rss, rss)

    # A jump in the warm-up window, then 1 MB a minute: 60 MB/hour.
    windows = [row(0, 150.0, 4.0), row(1, 200.0, 2.0), row(2, 201.0, 2.0), row(3, 202.0, 3.0)]
    found = drift(windows, idle_before=100.0, idle_after=190.0)
    assert found.windows_fitted == 3
    assert found.rss_slope_mb_per_hour == pytest.approx(60.0)
    assert found.rss_slope_last_half_mb_per_hour == pytest.approx(60.0)
    assert found.rss_growth_mb == pytest.approx(102.0)
    assert found.p99_ratio == pytest.approx(0.75)
    assert exceeded(found, max_growth_mb=150, max_slope=None) == []
    assert len(exceeded(found, max_growth_mb=100, max_slope=50)) == 2
