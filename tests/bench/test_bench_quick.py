"""The benchmark runner works end to end (`--quick`): it writes parseable JSON and Markdown with
a served/raw ratio for each run, and names each peer it could not measure with the command that
installs it. Numbers are not checked here; they live in bench/ reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PERF_ANALYZER = ROOT / ".perf_analyzer" / "perf_analyzer"


@pytest.mark.skipif(
    not PERF_ANALYZER.exists(), reason="perf_analyzer not installed (.ci/install_perf_analyzer.sh)"
)
def test_quick_benchmark_writes_json_and_markdown_reports(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--concurrency",
            "2",
            "--out",
            str(tmp_path),
            # No peer virtualenvs there (as in CI): the report must say so, not skip them.
            "--peers-dir",
            str(tmp_path / "no-peers"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    reports = list(tmp_path.glob("*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["machine"]["cores"] >= 1
    for workload in report["workloads"]:
        assert workload["raw"]["rows_per_s"] > 0
        protocols = {run["protocol"] for run in workload["served"]}
        assert protocols == {"grpc", "http", "http_json"}
        for run in workload["served"]:
            assert run["requests_per_s"] > 0
            assert run["served_over_raw"] == pytest.approx(
                run["requests_per_s"] / workload["raw"]["rows_per_s"]
            )
        assert [(p["name"], p["status"]) for p in workload["peers"]] == [
            ("pytriton", "not installed (run `python -m bench.peers install pytriton`)"),
            ("mlserver", "not installed (run `python -m bench.peers install mlserver`)"),
        ]
        assert "served_loadgen" not in workload  # only measured beside a peer that needs it
    markdown = reports[0].with_suffix(".md").read_text()
    assert "served / raw" in markdown
    assert "**mlserver** (Seldon MLServer 1.7" in markdown
    assert "not installed (run `python -m bench.peers install mlserver`)" in markdown
