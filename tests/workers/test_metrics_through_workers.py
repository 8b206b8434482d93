"""tests/e2e/test_metrics.py through `--workers 2`: the engine's /metrics stays the one source
(each request counted once, whichever worker took it), the statistics API agrees with it, the
access log (written by every worker to the same file) has one line per request, and every
process logs JSON lines."""

from __future__ import annotations

import shutil

import pytest
from e2e.test_metrics import *  # noqa: F403
from e2e.test_metrics import METERED_CONFIG, METERED_MODEL
from helpers import ConvoyProcess, copy_model
from worker_metrics import WORKERS

from convoy.cli import demo_repository


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    """test_metrics' server (`metered` and add_sub, JSON log, access log file) behind two workers."""
    root = tmp_path_factory.mktemp("metrics-workers")
    repository = root / "models"
    model = repository / "metered"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(METERED_CONFIG)
    (model / "1" / "model.py").write_text(METERED_MODEL)
    copy_model(repository, "fails_on_value")
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    access_log = root / "access.log"
    process = ConvoyProcess(
        repository,
        root / "server.log",
        extra_args=("--log-format", "json", "--access-log", str(access_log), *WORKERS),
    )
    process.start("ready")
    try:
        yield process, model, access_log
    finally:
        (model / "open").touch()
        assert process.stop() == 0, process.log()
