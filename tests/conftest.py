"""Session fixtures: real `convoy serve` processes on generated model repositories, and clients.

`server` serves models that all load (it must report ready); `broken_server` serves add_sub beside
a model that fails to import and one with an invalid config.pbtxt. Both run Triton's explicit
model control with every model loaded at start (the repository tests load and unload), and
`server` lets clients register shared memory (--allow-client-shm). Both bind port 0, are waited
for by polling their health endpoint with a deadline, and must exit 0 on SIGTERM.

Each starts once per `frontend` its tests run with: the native and the Python front end, and for
suites marked `frontends(*WITH_WORKERS)` also `--workers 2` (an engine behind two front-end
processes), so one suite checks that every answer is the same whichever process split serves it.
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


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "frontends(*names): the `frontend` values a test runs with (default: FRONTENDS); "
        "WITH_WORKERS adds a --workers 2 server",
    )


def pytest_generate_tests(metafunc):
    """`frontend`, the front end a protocol suite's server runs: each test that reaches it
    (through its server fixture) runs once per name its closest `frontends` marker gives, else
    once per FRONTENDS entry (ids: [native], [python], [workers]). Session-scoped, so each
    server fixture starts once per front end."""
    if "frontend" not in metafunc.fixturenames or _parametrizes_frontend_itself(metafunc):
        return
    marker = metafunc.definition.get_closest_marker("frontends")
    names = marker.args if marker is not None else FRONTENDS
    metafunc.parametrize("frontend", names, scope="session")


def _parametrizes_frontend_itself(metafunc) -> bool:
    """A test with its own @pytest.mark.parametrize("frontend", ...) picks its front ends."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",")]
        if "frontend" in names:
            return True
    return False


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
