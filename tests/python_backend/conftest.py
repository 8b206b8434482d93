"""A real `convoy serve` over the Triton-style models in tests/python_backend/models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess, serve_until_stopped

MODELS = Path(__file__).resolve().parent / "models"


def triton_repository(target: Path, names: list[str] | None = None) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for source in sorted(MODELS.iterdir()):
        if names is None or source.name in names:
            shutil.copytree(source, target / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("python_backend")
    process = ConvoyProcess(triton_repository(root / "models"), root / "server.log")
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
