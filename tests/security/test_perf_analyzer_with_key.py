"""perf_analyzer against a keyed server: with `-H 'authorization: Bearer <key>'` it is served and
the caller's statistics move; without a key it cannot even read the model's metadata."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from security_helpers import start_keyed

RUN_DEADLINE_S = 120


def _perf_analyzer() -> Path | None:
    configured = os.environ.get("PERF_ANALYZER")
    candidate = Path(configured) if configured else REPO_ROOT / ".perf_analyzer" / "perf_analyzer"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


PERF_ANALYZER = _perf_analyzer()

pytestmark = pytest.mark.skipif(
    PERF_ANALYZER is None, reason="perf_analyzer not found (.perf_analyzer/perf_analyzer)"
)


@pytest.fixture(scope="module")
def keyed_for_load(tmp_path_factory, frontend):
    yield from start_keyed(tmp_path_factory.mktemp("perf"), frontend=frontend)


def run(server, protocol: str, *headers: str) -> subprocess.CompletedProcess:
    port = server.process.grpc_port if protocol == "grpc" else server.process.http_port
    command = [
        str(PERF_ANALYZER),
        "-m", "add_sub",
        "-u", f"127.0.0.1:{port}",
        "-i", protocol,
        "--concurrency-range", "2",
        "--measurement-mode", "count_windows",
        "--measurement-request-count", "50",
        "-r", "10",
        "-s", "100",
        *(item for header in headers for item in ("-H", header)),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_DEADLINE_S)


def success_count(server) -> int:
    import requests

    answer = requests.get(
        f"{server.process.base_url}/v2/models/add_sub/stats", headers=server.headers("admin"), timeout=10
    ).json()
    return sum(row["inference_stats"]["success"]["count"] for row in answer["model_stats"])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_with_a_bearer_header_is_served(keyed_for_load, protocol):
    before = success_count(keyed_for_load)
    done = run(keyed_for_load, protocol, f"authorization: Bearer {keyed_for_load.keys['team_a']}")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert success_count(keyed_for_load) - before >= 50


def test_perf_analyzer_without_a_key_is_refused(keyed_for_load):
    done = run(keyed_for_load, "grpc")
    assert done.returncode != 0
    assert "missing API key" in done.stdout + done.stderr
