"""Fixtures for `convoy serve --workers 2`: the session servers of tests/conftest.py, each run as
an engine behind two front-end worker processes, and clients on them.

The names match the root fixtures on purpose: e2e suites imported into this folder
(test_e2e_through_workers.py) then run unchanged against the workers.
"""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from e2e.test_cancellation import GATE_CONFIG, GATE_MODEL
from helpers import (
    EXPLICIT,
    ConvoyProcess,
    Protocol,
    build_broken_repository,
    build_serving_repository,
    serve_until_stopped,
)
from worker_metrics import WORKERS


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers-serving")
    process = ConvoyProcess(
        build_serving_repository(root / "models"),
        root / "server.log",
        (*WORKERS, *EXPLICIT, "--allow-client-shm"),
    )
    yield from serve_until_stopped(process, "ready")


@pytest.fixture(scope="session")
def broken_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers-broken")
    process = ConvoyProcess(
        build_broken_repository(root / "models"), root / "server.log", (*WORKERS, *EXPLICIT)
    )
    yield from serve_until_stopped(process, "live")


# Redefined (not inherited) so that they bind to this folder's `server`, not a cached root one.
@pytest.fixture(scope="session")
def grpc_client(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def http_client(server):
    client = httpclient.InferenceServerClient(server.http_url, concurrency=4)
    yield client
    client.close()


@pytest.fixture
def gate_server(tmp_path):
    """test_cancellation's gate model (holds each batch until a file exists) behind two workers."""
    model = tmp_path / "models" / "gate"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(GATE_CONFIG)
    (model / "1" / "model.py").write_text(GATE_MODEL)
    process = ConvoyProcess(tmp_path / "models", tmp_path / "server.log", WORKERS)
    process.start("ready")
    try:
        yield process, model
    finally:
        (model / "open").touch()
        code = process.stop()
        assert code == 0, process.log()


@pytest.fixture(params=["grpc", "http"])
def protocol(request, grpc_client, http_client) -> Protocol:
    if request.param == "grpc":
        return Protocol("grpc", grpc_client, grpcclient)
    return Protocol("http", http_client, httpclient)
