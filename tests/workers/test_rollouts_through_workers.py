"""The roll-out suite again through `--workers 2`: the split happens in the engine process, the
split key travels with each request from whichever front end took it, and the admin API and
restarts behave as in one process."""

from __future__ import annotations

import pytest
from e2e.test_rollout_lifecycle import (  # noqa: F401
    test_a_restart_mid_roll_out_resumes_or_aborts_as_each_roll_out_says,
    test_rollout_json_declares_a_roll_out_and_a_new_version_folder_becomes_the_candidate,
)
from e2e.test_rollouts import (  # noqa: F401
    MODELS,
    test_a_candidate_with_different_outputs_is_rolled_back_by_the_agreement_guard,
    test_a_good_candidate_is_promoted_step_by_step_and_each_caller_stays_on_one_arm,
    test_abort_after_promotion_reverts_to_the_previous_stable_at_once,
    test_bad_roll_outs_are_refused_naming_the_field,
    test_the_catalog_shows_both_arms_side_by_side,
)
from helpers import ConvoyProcess, serve_until_stopped
from rollout_helpers import write_model
from worker_metrics import WORKERS


@pytest.fixture
def server_args() -> tuple[str, ...]:
    return WORKERS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollouts-workers")
    for name in MODELS:
        write_model(root / "models", name)
    process = ConvoyProcess(
        root / "models",
        root / "server.log",
        (
            *WORKERS,
            "--rollout-state",
            str(root / "rollouts.json"),
            "--payload-log-dir",
            str(root / "payloads"),
            "--access-log",
            str(root / "access.log"),
        ),
    )
    process.payloads = root / "payloads"
    process.access_log = root / "access.log"
    yield from serve_until_stopped(process)
