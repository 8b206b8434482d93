"""bench/frontends.py works end to end (`--quick`): both front ends measured in one run, server
CPU per request split by thread (the native threads only on the native front end), a ratio per
protocol, JSON and Markdown written. Numbers are not checked here; they live in bench/reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PERF_ANALYZER = ROOT / ".perf_analyzer" / "perf_analyzer"

pytest.importorskip("convoy.server._native", reason="the native front end is not built")


@pytest.mark.skipif(
    not PERF_ANALYZER.exists(), reason="perf_analyzer not installed (.ci/install_perf_analyzer.sh)"
)
def test_quick_run_measures_both_front_ends_with_cpu_by_thread(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "frontends.py"),
            "--quick",
            "--concurrency",
            "4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (report,) = [json.loads(path.read_text()) for path in tmp_path.glob("frontends-*.json")]
    runs = {(run["frontend"], run["protocol"]): run for run in report["runs"]}
    assert set(runs) == {(f, p) for f in ("python", "native") for p in ("grpc", "http")}
    for (frontend, _), run in runs.items():
        assert "error" not in run, run
        cpu = run["cpu_us_per_request"]
        assert cpu["total"] > 0 and run["served"] > 0
        assert (cpu["native"] > 0) == (frontend == "native"), run
    assert {ratio["protocol"] for ratio in report["ratios"]} == {"grpc", "http"}
    assert list(tmp_path.glob("frontends-*.md"))
