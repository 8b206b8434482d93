"""Session fixtures: real `convoy serve` processes on generated model repositories, and clients.

`server` serves models that all load (it must report ready); `broken_server` serves add_sub beside
a model that fails to import and one with an invalid config.pbtxt. Both run Triton's explicit
model control with every model loaded at start (the repository tests load and unload), and
`server` lets clients register shared memory (--allow-client-shm). Both bind port 0, are waited
for by polling their health endpoint with a deadline, and must exit 0 on SIGTERM.
"""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import (
    EXPLICIT,
    FRONTENDS,
    ConvoyProcess,
    Protocol,
    build_broken_repository,
    build_serving_repository,
    serve_until_stopped,
)


@pytest.fixture(scope="session", params=FRONTENDS)
def frontend(request) -> str:
    """The front end a protocol suite's server runs: each test taking it runs once per front
    end (ids: [native], [python])."""
    return request.param


@pytest.fixture(scope="session")
def server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp(f"serving-{frontend}")
    process = ConvoyProcess(
        build_serving_repository(root / "models"),
        root / "server.log",
        (*EXPLICIT, "--allow-client-shm"),
        frontend=frontend,
    )
    yield from serve_until_stopped(process, "ready")


@pytest.fixture(scope="session")
def broken_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp(f"broken-{frontend}")
    process = ConvoyProcess(
        build_broken_repository(root / "models"), root / "server.log", EXPLICIT, frontend=frontend
    )
    # Readiness stays false while a model failed to load, so wait for liveness.
    yield from serve_until_stopped(process, "live")


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


@pytest.fixture(params=["grpc", "http"])
def protocol(request, grpc_client, http_client) -> Protocol:
    """Each test taking this runs once over gRPC and once over HTTP (ids: [grpc], [http])."""
    if request.param == "grpc":
        return Protocol("grpc", grpc_client, grpcclient)
    return Protocol("http", http_client, httpclient)
