"""A real `convoy serve` over the Triton-style models in tests/python_backend/models."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess, serve_until_stopped
from python_backend_models import triton_repository


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("python_backend")
    process = ConvoyProcess(triton_repository(root / "models"), root / "server.log", frontend=frontend)
    yield from serve_until_stopped(process, "ready")


@pytest.fixture(scope="session")
def grpc_client(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def http_client(triton_server):
    client = httpclient.InferenceServerClient(triton_server.http_url, concurrency=4)
    yield client
    client.close()
