"""The catalog's live figures count from server start, not from the first page view: the
engine keeps the recent-window snapshots (engine/recent.py), so they hold through --workers too
(issue 16)."""

from __future__ import annotations

import pytest
import requests
from helpers import ConvoyProcess, poll, serve_until_stopped, write_identity_model

SENT = 12


@pytest.mark.parametrize("workers", ["1", "2"])
def test_requests_before_the_first_page_view_are_in_the_live_window(tmp_path, workers):
    repository = tmp_path / "models"
    repository.mkdir()
    write_identity_model(repository, "echo", "INT32")
    process = ConvoyProcess(repository, tmp_path / "server.log", ("--workers", workers))
    for server in serve_until_stopped(process, "ready"):
        body = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 3], "data": [1, 2, 3]}]}
        for _ in range(SENT):
            answer = requests.post(f"{server.base_url}/v2/models/echo/infer", json=body, timeout=10)
            assert answer.status_code == 200

        def window(server=server):
            # Every call is a "first view" for the page: a front end keeps no snapshots.
            document = requests.get(f"{server.base_url}/catalog.json", timeout=5).json()
            (echo,) = document["models"]
            return echo["versions"][0]["stats"]["window"]

        figures = poll(window, "a live window (half a second after the engine started)")
        assert figures["requests"] == SENT
        assert figures["requests_per_s"] > 0
        assert figures["p50_ms"] is not None
