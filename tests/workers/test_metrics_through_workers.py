"""tests/e2e/test_metrics.py through `--workers 2`: the engine's /metrics stays the one source
(each request counted once, whichever worker took it), the statistics API agrees with it, the
access log (written by every worker to the same file) has one line per request, and every
process logs JSON lines."""

from __future__ import annotations

import pytest
from e2e.test_metrics import *  # noqa: F403
from e2e.test_metrics import serve_metered
from worker_metrics import WORKERS


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    """test_metrics' server (`metered` and add_sub, JSON log, access log file) behind two workers."""
    yield from serve_metered(tmp_path_factory.mktemp("metrics-workers"), WORKERS)
