"""Fixtures for `convoy serve --workers 2`. The session servers of tests/conftest.py serve
through two workers when a test's `frontend` is "workers" (the modules here mark themselves
`frontends(WORKERS_FRONTEND)`); the e2e suites whose answers must not depend on the process split
run through workers too, marked in their own files (`frontends(*WITH_WORKERS)`).
"""

from __future__ import annotations

import pytest
from e2e.test_cancellation import GATE_CONFIG, GATE_MODEL
from helpers import (
    ConvoyProcess,
)
from worker_metrics import WORKERS


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
