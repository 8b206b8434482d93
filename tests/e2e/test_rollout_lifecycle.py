"""Roll-outs across a server's life: a restart mid-roll-out resumes it (callers on the arms they
were on) or aborts it, as each roll-out's on_restart says, and never splits traffic silently;
rollout.json declares one; in poll mode a new version folder becomes the candidate instead of
replacing stable; with API keys starting one needs a management key, and showback counts the
candidate's shadow work apart."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import (
    FRONTENDS,
    REPO_ROOT,
    WORKERS_FRONTEND,
    ConvoyProcess,
    metric_value,
    poll,
    serve_until_stopped,
)
from rollout_helpers import (
    ClosedLoop,
    admin,
    start,
    status,
    wait_for_state,
    write_model,
    write_version,
)

#: A server for the length of a `with` block (SIGTERM at its end, exit code 0 required).
serving = contextlib.contextmanager(serve_until_stopped)


def _arm_of_users(server: ConvoyProcess, model: str, users: range) -> dict[int, tuple[str, str]]:
    """(version, arm) answering each user's request (header x-user), over gRPC."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    seen = {}
    for user in users:
        tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        response = client.infer(model, [tensor], headers={"x-user": f"user-{user}"}).get_response()
        seen[user] = (response.model_version, response.parameters["convoy_rollout_arm"].string_param)
    client.close()
    return seen


@pytest.mark.frontends(FRONTENDS[0], WORKERS_FRONTEND)
def test_a_restart_mid_roll_out_resumes_or_aborts_as_each_roll_out_says(tmp_path, frontend):
    repository = tmp_path / "models"
    write_model(repository, "resumed")
    write_model(repository, "aborted")
    state = tmp_path / "rollouts.json"
    arguments = ("--rollout-state", str(state))
    first = ConvoyProcess(repository, tmp_path / "first.log", arguments, frontend=frontend)
    split = {"steps": [50, 100], "bake_seconds": 600, "split": {"header": "x-user"}}
    with serving(first) as process:
        start(process, "resumed", {"stable": 1, "candidate": 2, **split})
        start(process, "aborted", {"stable": 1, "candidate": 2, "on_restart": "abort", **split})
        before = _arm_of_users(process, "resumed", range(40))
    assert {arm for _, arm in before.values()} == {"stable", "candidate"}
    assert json.loads(state.read_text())["rollouts"]["resumed"]["state"] == "running"

    second = ConvoyProcess(repository, tmp_path / "second.log", arguments, frontend=frontend)
    with serving(second) as process:
        # The first answers after the restart: the same caller, the same arm and version.
        assert _arm_of_users(process, "resumed", range(40)) == before
        resumed = status(process, "resumed")
        assert resumed["state"] == "running" and resumed["step"]["label"] == "50%"
        assert [h["action"] for h in resumed["history"]] == ["start", "resume"]
        assert (
            "server restarted mid-roll-out; resumed at step 1 (50%)" in resumed["history"][-1]["reason"]
        )
        aborted = status(process, "aborted")
        assert aborted["state"] == "aborted" and aborted["candidate_weight"] == 0
        assert aborted["reason"] == "server restarted mid-roll-out (on_restart: abort)"
        client = httpclient.InferenceServerClient(process.http_url)
        tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        for user in range(20):
            answer = client.infer("aborted", [tensor], headers={"x-user": f"user-{user}"})
            assert answer.get_response()["model_version"] == "1"
        client.close()
        # The candidate of the aborted roll-out stays loaded for inspection.
        rows = requests.post(f"{process.base_url}/v2/repository/index", timeout=10).json()
        assert {(r["name"], r["version"]) for r in rows} >= {("aborted", "2"), ("resumed", "2")}


def test_a_roll_out_through_the_api_needs_a_state_file(tmp_path):
    write_model(tmp_path / "models", "m")
    process = ConvoyProcess(tmp_path / "models", tmp_path / "server.log")
    with serving(process) as server:
        answer = admin(server, "POST", "/m/start", {"stable": 1, "candidate": 2})
        assert answer.status_code == 400
        assert answer.json()["error"].startswith(
            "rollout start: the server runs without --rollout-state FILE"
        )


@pytest.mark.frontends(FRONTENDS[0], WORKERS_FRONTEND)
def test_rollout_json_declares_a_roll_out_and_a_new_version_folder_becomes_the_candidate(
    tmp_path, frontend
):
    repository = tmp_path / "models"
    declared = write_model(repository, "declared", versions=(1, 2), policy="latest { num_versions: 1 }")
    (declared / "rollout.json").write_text(
        json.dumps(
            {
                "stable": 1,
                "candidate": 2,
                "mode": "shadow",
                "bake_seconds": 1,
                # About declaring and picking up a candidate: the latency guard (its own tests
                # in test_rollouts.py) would judge this shared host's stalls here.
                "guards": {"min_samples": 15, "max_p99_ratio": None},
            }
        )
    )
    polled = write_model(repository, "polled", versions=(1,), policy="latest { num_versions: 1 }")
    (polled / "rollout.json").write_text(
        json.dumps(
            {
                "new_versions": "candidate",
                "mode": "shadow",
                "bake_seconds": 1,
                # About declaring and picking up a candidate: the latency guard (its own tests
                # in test_rollouts.py) would judge this shared host's stalls here.
                "guards": {"min_samples": 15, "max_p99_ratio": None},
            }
        )
    )
    broken = write_model(repository, "broken", versions=(1, 2))
    (broken / "rollout.json").write_text(json.dumps({"stable": 1, "candidate": 2, "steps": [50, 10]}))
    process = ConvoyProcess(
        repository,
        tmp_path / "server.log",
        ("--model-control-mode", "poll", "--repository-poll-secs", "0.2"),
        frontend=frontend,
    )
    with serving(process, "live") as server:
        rows = requests.post(f"{server.base_url}/v2/repository/index", timeout=10).json()
        (broken_row,) = [r for r in rows if r["name"] == "broken"]
        assert broken_row["state"] == "UNAVAILABLE"
        assert broken_row["reason"] == (
            "broken/rollout.json: steps[1]: steps out of order: 10% after 50%; expected the "
            "candidate's share to grow at every step"
        )
        # Declared: version 2 is the newest, yet stable serves until the roll-out promotes it.
        with ClosedLoop(server, "declared", users=2) as load:
            final = wait_for_state(server, "declared", ("promoted",))
            promoted_at = len(load.answers)
            poll(lambda: len(load.answers) > promoted_at + 10, "answers after the promotion")
        assert load.errors == [] and load.wrong == []
        # While it ran every answer was routed to stable; version 2 answered only once promoted.
        assert {(a[2], a[3]) for a in load.answers} == {(1, "stable"), (2, None)}
        assert {a[2] for a in load.answers[-5:]} == {2}
        assert final["history"][0]["reason"].startswith("rollout.json: version 1 -> 2")

        # Poll mode: a new version with different outputs is shadowed, never served, rolled back.
        with ClosedLoop(server, "polled", users=2) as load:
            poll(lambda: load.count(1) >= 10, "answers from version 1")
            write_version(polled, 3)
            rolled = wait_for_state(server, "polled", ("rolled_back",))
            assert rolled["candidate"] == 3 and "agreement" in rolled["reason"]
            # A later good version becomes the next candidate and is promoted.
            write_version(polled, 7)
            poll(lambda: status(server, "polled")["candidate"] == 7, "version 7 the candidate")
            wait_for_state(server, "polled", ("promoted",))
            done_at = len(load.answers)
            poll(lambda: len(load.answers) > done_at + 10, "answers after the promotion")
        assert load.errors == [] and load.wrong == []
        assert load.count(3) == 0
        assert {a[2] for a in load.answers[-5:]} == {7}


def _create_key(path, name: str, manage: bool) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "convoy", "keys", "create", "--file", str(path), "--name", name,
         "--models", "*", *(["--manage"] if manage else [])],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    return done.stdout.split()[0]


def test_with_api_keys_a_roll_out_needs_a_management_key_and_shadow_work_is_counted_apart(tmp_path):
    keys = tmp_path / "keys.json"
    caller = _create_key(keys, "caller", manage=False)
    operator = _create_key(keys, "operator", manage=True)
    write_model(tmp_path / "models", "metered")
    ledger = tmp_path / "usage.jsonl"
    process = ConvoyProcess(
        tmp_path / "models",
        tmp_path / "server.log",
        ("--api-keys", str(keys), "--rollout-state", str(tmp_path / "state.json"),
         "--usage-ledger", str(ledger), "--usage-interval", "0.2"),
    )  # fmt: skip
    spec = {"stable": 1, "candidate": 2, "mode": "shadow", "bake_seconds": 600}
    with serving(process) as server:
        as_caller = {"authorization": f"Bearer {caller}"}
        as_operator = {"authorization": f"Bearer {operator}"}
        refused = admin(server, "POST", "/metered/start", spec, as_caller)
        assert refused.status_code == 403
        start(server, "metered", spec, as_operator)
        assert status(server, "metered", as_caller)["state"] == "running"  # reading needs scope only
        with ClosedLoop(server, "metered", users=2, keys=[caller]) as load:
            poll(lambda: status(server, "metered", as_caller)["totals"]["pairs"]["pairs"] >= 20, "pairs")
        assert load.errors == [] and load.versions() == {1}
        shadow = metric_value(
            server,
            "convoy_usage_shadow_requests_total",
            as_operator,
            key="caller",
            model="metered",
            version="2",
        )
        assert shadow >= 20
        assert (
            metric_value(
                server,
                "convoy_usage_shadow_compute_seconds_total",
                as_operator,
                key="caller",
                version="2",
            )
            > 0
        )
        served = metric_value(
            server, "convoy_usage_requests_total", as_operator, key="caller", version="1"
        )
        assert served >= 20
        assert (
            metric_value(server, "convoy_usage_requests_total", as_operator, key="caller", version="2")
            == 0
        )
        admin(server, "POST", "/metered/abort", headers=as_operator)
    summary = subprocess.run(
        [sys.executable, "-m", "convoy", "usage", str(ledger), "--json", "--period", "all"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    rows = {(r["key"], r["model"], r["traffic"]): r for r in json.loads(summary.stdout)}
    assert rows[("caller", "metered", "shadow")]["requests"] >= 20
    assert rows[("caller", "metered", "served")]["requests"] >= 20
