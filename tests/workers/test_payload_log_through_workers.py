"""tests/payload_log/test_payload_log.py through `--workers 2`: requests arrive in the workers,
and the engine, where every request reaches its scheduler, writes the payload log."""

from __future__ import annotations

import pytest
from payload_log.test_payload_log import *  # noqa: F403
from payload_log.test_payload_log import serve_logged
from worker_metrics import WORKERS

# --workers front ends do not serve the catalog (it reads statistics kept in the engine).
del test_catalog_shows_the_sample_rate_and_that_the_log_is_on  # noqa: F821


@pytest.fixture(scope="module")
def logged_server(tmp_path_factory):
    yield from serve_logged(tmp_path_factory.mktemp("payload-log-workers"), WORKERS)
