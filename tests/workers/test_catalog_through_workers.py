"""The catalog's tests that need no browser, run again through `--workers 2`: each front end
builds the page from what the engine tells it (model table, live figures, the index)."""

from __future__ import annotations

import pytest
from catalog.test_catalog import (  # noqa: F401
    capacity_dir,
    test_capacity_figures_of_a_capacity_run_appear_on_the_page,
    test_catalog_answers_only_get,
    test_host_header_sets_the_snippet_addresses_and_a_hostile_one_is_ignored,
    test_live_figures_follow_traffic_and_agree_with_the_statistics_api,
)
from helpers import ConvoyProcess, serve_until_stopped
from worker_metrics import WORKERS

from convoy.cli import demo_repository


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, capacity_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("catalog-workers")
    process = ConvoyProcess(
        demo_repository(), root / "server.log", ("--capacity-report", str(capacity_dir), *WORKERS)
    )
    yield from serve_until_stopped(process)
