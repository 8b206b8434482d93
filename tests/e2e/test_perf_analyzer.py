"""perf_analyzer (Triton's load generator) runs against Convoy over gRPC and HTTP, and its load
makes the dynamic batcher form batches. Counts only: no timing is asserted."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
from helpers import REPO_ROOT, WITH_WORKERS

RUN_DEADLINE_S = 120


def _perf_analyzer() -> Path | None:
    configured = os.environ.get("PERF_ANALYZER")
    candidates = [Path(configured)] if configured else []
    candidates.append(REPO_ROOT / ".perf_analyzer" / "perf_analyzer")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


PERF_ANALYZER = _perf_analyzer()

pytestmark = [
    pytest.mark.skipif(
        PERF_ANALYZER is None,
        reason="perf_analyzer not found: set PERF_ANALYZER or run .ci/install_perf_analyzer.sh "
        "(installs .perf_analyzer/perf_analyzer)",
    ),
    pytest.mark.frontends(*WITH_WORKERS),
]


def _run(server, protocol: str, concurrency: int, csv_path: Path) -> list[dict]:
    port = server.grpc_port if protocol == "grpc" else server.http_port
    command = [
        str(PERF_ANALYZER),
        "-m", "add_sub",
        "-u", f"127.0.0.1:{port}",
        "-i", protocol,
        "--concurrency-range", str(concurrency),
        "--measurement-mode", "count_windows",
        "--measurement-request-count", "50",
        # Counts are asserted, never timing: accept noisy windows (a shared 2-core machine)
        # rather than fail for want of a "stable" measurement.
        "-r", "10",
        "-s", "100",
        "-f", str(csv_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_DEADLINE_S, cwd=csv_path.parent
    )
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows, f"{csv_path} holds no measurement"
    return rows


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_completes_and_writes_its_csv(server, tmp_path, protocol):
    rows = _run(server, protocol, concurrency=4, csv_path=tmp_path / f"{protocol}.csv")
    (row,) = rows
    assert row["Concurrency"] == "4"
    assert float(row["Inferences/Second"]) > 0


def test_concurrent_load_is_batched_into_fewer_executions_than_inferences(server, http_client, tmp_path):
    def counts():
        (row,) = http_client.get_inference_statistics("add_sub")["model_stats"]
        return row["inference_count"], row["execution_count"]

    inferences_before, executions_before = counts()
    _run(server, "grpc", concurrency=16, csv_path=tmp_path / "c16.csv")
    inferences_after, executions_after = counts()
    inferences = inferences_after - inferences_before
    executions = executions_after - executions_before
    assert inferences > 0
    # Every perf_analyzer request is one row: fewer executions than rows means requests
    # rode together in batches.
    assert 0 < executions < inferences
