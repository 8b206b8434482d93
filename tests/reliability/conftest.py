"""Fixtures for the reliability tests: a server over a small repository of capacity-bounded models
(capacity_models.py).

The long tail here (fuzzing, overload, admission, shutdown, schemathesis) runs against the first
front end only (each module's `frontends(FRONTENDS[0])` marker), the native one by default, to
keep CI inside its time: the Python front end's handling of these did not change with the native
one beside it."""

from __future__ import annotations

import pytest
from capacity_models import write_capacity_model
from helpers import ConvoyProcess, serve_until_stopped, write_identity_model


@pytest.fixture(scope="session")
def reliability_server(tmp_path_factory, frontend):
    """One server for the overload and fuzzing tests (each leaves it serving)."""
    root = tmp_path_factory.mktemp("reliability")
    repository = root / "models"
    repository.mkdir()
    write_capacity_model(repository, "capacity", batch_seconds=0.02)
    for datatype in ("FP32", "BYTES", "INT64", "BOOL", "FP16", "BF16"):
        write_identity_model(repository, f"identity_{datatype.lower()}", datatype)
    process = ConvoyProcess(repository, root / "server.log", frontend=frontend)
    yield from serve_until_stopped(process, "ready")
