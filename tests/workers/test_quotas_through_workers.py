"""tests/security/test_quotas.py through `--workers 2`: a key's quota holds server-wide (the
engine counts it, whichever worker took the request), with the same answers and counter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The security tests import their helpers by bare name, from their own folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))

from security.test_quotas import *  # noqa: F403
from security.test_quotas import serve_limited
from worker_metrics import WORKERS


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    yield from serve_limited(tmp_path_factory.mktemp("quotas-workers"), WORKERS)
