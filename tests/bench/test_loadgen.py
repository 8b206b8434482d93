"""bench/loadgen.py (the client that drives MLServer, and Convoy beside it) against a real
Convoy serving the mlp workload: it counts answered requests and reports failures instead of
hiding them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ConvoyProcess, serve_until_stopped
from workloads import build_mlp

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def mlp_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("loadgen")
    build_mlp(root / "models")
    yield from serve_until_stopped(ConvoyProcess(root / "models", root / "server.log"))


def loadgen(protocol: str, url: str, *extra: str) -> tuple[int, dict]:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "loadgen.py"),
            "--protocol",
            protocol,
            "--url",
            url,
            "--concurrency",
            "4",
            "--seconds",
            "0.5",
            "--warmup",
            "0.2",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_loadgen_counts_answered_requests_and_latency_percentiles(mlp_server, protocol):
    url = mlp_server.grpc_url if protocol == "grpc" else mlp_server.http_url
    code, result = loadgen(protocol, url)
    assert code == 0, result
    assert result["errors"] == 0
    assert result["requests"] > 0
    assert result["requests_per_s"] == pytest.approx(result["requests"] / 0.5)
    assert 0 < result["p50_us"] <= result["p99_us"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_loadgen_reports_server_errors_and_exits_non_zero(mlp_server, protocol):
    url = mlp_server.grpc_url if protocol == "grpc" else mlp_server.http_url
    code, result = loadgen(protocol, url, "--model", "no_such_model")
    assert code == 1
    assert result["requests"] == 0
    assert result["errors"] > 0
    assert "no_such_model" in result["first_error"]
