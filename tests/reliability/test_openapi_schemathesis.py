"""schemathesis against the served /openapi.json: responses match the documented schemas and
content types, and no request makes the server answer 500 without a JSON error body."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FRONTENDS

pytestmark = pytest.mark.frontends(FRONTENDS[0])

pytest.importorskip("schemathesis")

#: Model-failure 5xx answers are legitimate, so not_a_server_error is left out; a 500 without a
#: JSON {"error": ...} body still fails content_type_conformance / response_schema_conformance.
CHECKS = "response_schema_conformance,content_type_conformance"


def test_openapi_document_holds_under_schemathesis(reliability_server, tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None
    done = subprocess.run(
        [
            cli,
            "run",
            f"{reliability_server.base_url}/openapi.json",
            "--url",
            reliability_server.base_url,
            "--checks",
            CHECKS,
            "--max-examples",
            "30",
            "--seed",
            "1",
            "--request-timeout",
            "10",
            # Loading and unloading models would disturb the other tests on this server.
            "--exclude-path-regex",
            "repository/models|logging",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
