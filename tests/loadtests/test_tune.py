"""`convoy tune`: the search and the choice (pure), the config it writes, and one run end to end
against a real server on loopback.

The tune command runs as a subprocess (as users run it): the load generator's locust
monkey-patches the process it runs in, which must not be pytest's.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from helpers import EXPLICIT, REPO_ROOT, ConvoyProcess, poll

from convoy.engine.model_config import build_model_config, read_config_proto
from convoy.loadtests.capacity import Slo, StepRow
from convoy.loadtests.tune import (
    Candidate,
    SearchSpace,
    Trial,
    TunePlan,
    choose,
    next_users,
    pareto_frontier,
    propose,
    run_tune,
)
from convoy.loadtests.tune_config import (
    TuneConfigError,
    candidate_of,
    from_served,
    read_pbtxt,
    to_json,
    to_pbtxt,
    tunable,
    with_candidate,
)

SLO = Slo(p99_ms=20.0)


def row(users: int, rps: float, p99: float | None, step: int = 1, cpu: float = 10.0) -> StepRow:
    """One ramp level as the capacity runner reports it."""
    meets = p99 is not None and p99 <= SLO.p99_ms
    return StepRow(
        step=step,
        users=users,
        requests=int(rps),
        successes=int(rps),
        rejections=0,
        mismatches=0,
        errors=0,
        elapsed_s=1.0,
        throughput_rps=rps,
        p50_ms=p99 / 2 if p99 is not None else None,
        p90_ms=p99,
        p99_ms=p99,
        mean_ms=p99,
        max_ms=p99,
        error_rate=0.0,
        rejection_rate=0.0,
        meets_slo=meets,
        client_cpu_percent=cpu,
        server_inferences=None,
        server_executions=None,
        server_mean_batch_size=None,
        server_mean_queue_us=None,
        server_pending_requests=None,
        server_gpu_utilization=None,
    )


def trial(index: int, candidate: Candidate, rps: float, p99: float, phase: str = "batch") -> Trial:
    return Trial(index, phase, candidate, (row(4, rps, p99),))


# --- search space and strategy -----------------------------------------------------------------------
def test_search_space_sweeps_powers_of_two_from_the_request_rows_to_the_limit():
    base = Candidate(8, 1)
    assert SearchSpace.of(base, 128, 3).max_batch_sizes == (1, 2, 4, 8, 16, 32, 64, 128)
    assert SearchSpace.of(base, 100, 3, min_batch=4).max_batch_sizes == (4, 8, 16, 32, 64)
    assert SearchSpace.of(base, 128, 3).instance_counts == (1, 2, 3)


def test_a_model_without_batching_only_gets_its_instance_count_searched():
    baseline = Candidate(0, 1, dynamic_batching=False)
    space = SearchSpace.of(baseline, 128, 3)
    assert space.max_batch_sizes == ()
    trials = [trial(1, baseline, 100, 5, "baseline")]
    proposed = []
    while (step := propose(trials, baseline, space)) is not None:
        phase, candidate = step
        proposed.append((phase, candidate))
        trials.append(trial(len(trials) + 1, candidate, 100 * candidate.instance_count, 5, phase))
    assert proposed == [
        ("instances", Candidate(0, 2, 0, (), False)),
        ("instances", Candidate(0, 3, 0, (), False)),
    ]


def simulate(baseline: Candidate, space: SearchSpace, measure) -> list[Trial]:
    """Run the strategy against a model whose (throughput, p99) `measure` gives."""
    trials: list[Trial] = []
    while (step := propose(trials, baseline, space)) is not None:
        phase, candidate = step
        rps, p99 = measure(candidate)
        trials.append(trial(len(trials) + 1, candidate, rps, p99, phase))
        assert len(trials) < 100, "the search does not terminate"
    return trials


def batching_model(candidate: Candidate) -> tuple[float, float]:
    """A fixed 5 ms per batch: throughput grows with the batch and the instances; p99 grows
    with the batch and breaks 20 ms past a batch of 16; queue delay only adds latency."""
    batch = max(candidate.max_batch_size, 1)
    rps = 200.0 * batch * min(candidate.instance_count, 2)
    p99 = 1.2 * batch + candidate.max_queue_delay_us / 1000
    return rps, p99


def test_search_sweeps_batch_then_instances_then_delay_and_preferred_from_the_best():
    baseline = Candidate(4, 1, 1000, (), True)
    space = SearchSpace.of(baseline, 128, 3)
    trials = simulate(baseline, space, batching_model)
    phases = [t.phase for t in trials]
    assert phases[0] == "baseline"
    assert phases == sorted(phases, key=["baseline", "batch", "instances", "delay", "preferred"].index)
    sizes = [t.candidate.max_batch_size for t in trials if t.phase == "batch"]
    # Powers of two in order, stopping at the first size whose p99 breaks the objective (32).
    assert sizes == [1, 2, 4, 8, 16, 32]
    instances = [t.candidate for t in trials if t.phase == "instances"]
    assert all(c.max_batch_size == 16 for c in instances)
    # 2 instances double the throughput; 3 add nothing (stalled), and the sweep stops there.
    assert [c.instance_count for c in instances] == [2, 3]
    later = [t.candidate for t in trials if t.phase in ("delay", "preferred")]
    assert later and all((c.max_batch_size, c.instance_count) == (16, 2) for c in later)
    assert {c.preferred_batch_sizes for c in later if c.preferred_batch_sizes} == {(16,), (8, 16)}
    assert len({t.candidate for t in trials}) == len(trials), "a candidate was measured twice"
    assert choose(trials, SLO).best.candidate == Candidate(16, 2, 0, (), True)


def test_batch_sweep_stops_once_throughput_stops_growing():
    def flat(candidate: Candidate) -> tuple[float, float]:
        return 1000.0, 2.0  # the model is not the limit: batching buys nothing

    baseline = Candidate(8, 1)
    trials = simulate(baseline, SearchSpace.of(baseline, 128, 1), flat)
    sizes = [t.candidate.max_batch_size for t in trials if t.phase == "batch"]
    assert sizes == [1, 2, 4], "two sizes in a row without 5% more throughput end the sweep"


def test_ramp_doubles_users_until_the_objective_breaks_or_throughput_stalls_or_the_cap():
    assert next_users([], start=4, max_users=64) == 4
    assert next_users([row(4, 100, 5)], 4, 64) == 8
    assert next_users([row(4, 100, 5), row(8, 200, 25, step=2)], 4, 64) is None
    assert next_users([row(4, 100, 5), row(8, 102, 6, step=2)], 4, 64) is None
    assert next_users([row(32, 100, 5), row(64, 200, 6, step=2)], 32, 64) is None
    # The load generator saturated: more users would measure the client, not the server.
    assert next_users([row(4, 100, 5, cpu=95.0)], 4, 64) is None


def test_ramp_steps_down_when_its_first_level_breaks_the_objective_and_retries_one_user():
    failed = row(16, 300, 50)
    assert next_users([failed], 16, 64) == 4
    assert next_users([failed, row(4, 200, 8, step=2)], 16, 64) == 8
    # Up again, but never to a level already measured (16 broke the objective).
    assert next_users([failed, row(4, 200, 8, step=2), row(8, 280, 12, step=3)], 16, 64) is None
    assert next_users([failed, row(4, 100, 30, step=2)], 16, 64) == 1
    assert next_users([row(1, 50, 30)], 1, 64) == 1, "one user is measured twice"
    assert next_users([row(1, 50, 30), row(1, 50, 31, step=2)], 1, 64) is None


class FakeServer:
    """Loads candidates (refusing some) and measures a ramp level of whichever is loaded, on a
    clock that advances by what each step would cost."""

    def __init__(self, baseline: Candidate, refuse_instances: int | None = None) -> None:
        self.loaded = baseline
        self.applied: list[Candidate] = []
        self.refuse_instances = refuse_instances
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def apply(self, candidate: Candidate) -> str | None:
        self.now += 1.0  # a load
        if candidate.instance_count == self.refuse_instances:
            return "the server refused the config: not enough memory"
        self.applied.append(candidate)
        self.loaded = candidate
        return None

    def measure(self, users: int, step: int) -> StepRow:
        self.now += PLAN.level_cost_s
        rps, p99 = batching_model(self.loaded)
        # Throughput grows with users up to the candidate's capacity; latency with the queue.
        capacity_users = max(self.loaded.max_batch_size, 1) * self.loaded.instance_count
        scale = min(users, capacity_users) / capacity_users
        return row(users, rps * scale, p99 * max(1.0, users / capacity_users), step=step)


def test_the_search_stops_when_the_budget_cannot_hold_another_candidate():
    baseline = Candidate(1, 1, 0, (), False)
    server = FakeServer(baseline)
    plan = replace(PLAN, budget_s=30.0)
    trials = run_tune(
        server, server.measure, baseline, SearchSpace.of(baseline, 64, 4), plan, clock=server.clock
    )
    assert propose(trials, baseline, SearchSpace.of(baseline, 64, 4)) is not None, "not finished"
    # No candidate starts with less than two levels left; the last may run one level past.
    assert server.now <= plan.budget_s + plan.level_cost_s + 1.0
    assert trials[0].phase == "baseline" and baseline not in server.applied, "measured as served"


def test_a_refused_candidate_is_recorded_and_the_search_goes_on():
    baseline = Candidate(4, 1)
    server = FakeServer(baseline, refuse_instances=2)
    space = SearchSpace.of(baseline, 16, 3)
    trials = run_tune(
        server, server.measure, baseline, space, replace(PLAN, budget_s=1e6), clock=server.clock
    )
    refused = [t for t in trials if t.error is not None]
    assert [t.candidate.instance_count for t in refused] == [2]
    assert (
        refused[0].levels == () and "not enough memory" in choose(trials, SLO).reasons[refused[0].index]
    )
    # The instance sweep ended at the refusal; the delay phase still ran around the best.
    assert any(t.phase == "delay" for t in trials)
    assert propose(trials, baseline, space) is None


# --- frontier and choice ----------------------------------------------------------------------------
def test_frontier_keeps_only_candidates_no_other_beats_on_both_axes():
    a = trial(1, Candidate(1, 1), 100, 2)
    b = trial(2, Candidate(2, 1), 300, 5)
    c = trial(3, Candidate(4, 1), 250, 8)  # beaten by b: less throughput, more latency
    d = trial(4, Candidate(8, 1), 600, 30)
    assert [t.index for t in pareto_frontier([a, b, c, d])] == [1, 2, 4]


def test_choice_is_the_highest_throughput_within_the_objective_and_says_why_for_each():
    trials = [
        trial(1, Candidate(1, 1), 100, 2, "baseline"),
        trial(2, Candidate(2, 1), 300, 5),
        trial(3, Candidate(8, 1), 600, 30),
        Trial(4, "batch", Candidate(16, 1), (), error="the server refused the config: no"),
    ]
    choice = choose(trials, SLO)
    assert choice.best.index == 2
    assert choice.closest is None
    assert choice.reasons[2].startswith("chosen")
    assert "over 20 ms" in choice.reasons[3] and "frontier" in choice.reasons[3]
    assert "33%" in choice.reasons[1]
    assert choice.reasons[4].startswith("not measured: the server refused")
    assert "300 req/s" in choice.summary


def test_no_candidate_within_the_objective_names_the_closest_and_writes_nothing():
    trials = [trial(1, Candidate(1, 1), 100, 40), trial(2, Candidate(2, 1), 300, 25)]
    choice = choose(trials, SLO)
    assert choice.best is None
    assert choice.closest.index == 2
    assert "no candidate met" in choice.summary and "No config written" in choice.summary
    assert "closest" in choice.reasons[2]


# --- the report ------------------------------------------------------------------------------------
PLAN = TunePlan("grpc", 60.0, 2.0, 0.5, 32, None)


def report_of(trials: list[Trial], config_text: str | None) -> str:
    from convoy.loadtests.tune_report import TuneReport, render_html

    report = TuneReport(
        target={"model": "m", "version": "", "url": "127.0.0.1:1", "protocol": "grpc"},
        plan=PLAN,
        slo=SLO,
        baseline=trials[0].candidate,
        trials=trials,
        choice=choose(trials, SLO),
        elapsed_s=42.0,
        server_state="restored: the model serves its original config",
        config_text=config_text,
    )
    return render_html(report.to_json(), report)


def test_report_draws_the_frontier_rings_the_chosen_and_explains_every_candidate():
    trials = [
        trial(1, Candidate(1, 1), 100, 2, "baseline"),
        trial(2, Candidate(2, 1), 300, 5),
        trial(3, Candidate(4, 1), 250, 8),
        trial(4, Candidate(8, 1), 600, 30),
    ]
    html = report_of(trials, "max_batch_size: 2\n")
    assert html.count('class="frontier"') == 1
    assert html.count('class="chosen"') == 1
    assert html.count('class="threshold"') == 1, "the objective is drawn"
    assert "chosen: the highest throughput within the objective" in html
    assert "of the best&#x27;s throughput" in html and "over 20 ms" in html
    assert "<pre>max_batch_size: 2\n</pre>" in html
    assert "restored: the model serves its original config" in html


def test_report_without_a_chosen_candidate_says_no_config_was_written():
    trials = [trial(1, Candidate(1, 1), 100, 40, "baseline"), trial(2, Candidate(2, 1), 90, 30)]
    html = report_of(trials, None)
    assert 'class="chosen"' not in html
    assert "answer none" in html and "no candidate met p99 &lt;= 20 ms" in html
    assert "None written: no candidate met the objective" in html


# --- config.pbtxt --------------------------------------------------------------------------------------
ORIGINAL = """
name: "scorer"
backend: "python"
max_batch_size: 8
input [ { name: "X", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 4 ] } ]
dynamic_batching {
  max_queue_delay_microseconds: 2000
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy { max_queue_size: 64 }
}
instance_group [ { count: 1, kind: KIND_CPU } ]
parameters { key: "mode" value: { string_value: "fast" } }
"""


def test_written_config_round_trips_through_convoys_parser_with_only_the_tuned_fields_changed(
    tmp_path: Path,
):
    model_dir = tmp_path / "scorer"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(ORIGINAL)
    base = read_pbtxt(model_dir / "config.pbtxt")
    assert candidate_of(base) == Candidate(8, 1, 2000, (), True)
    chosen = Candidate(32, 3, 500, (16, 32), True)
    (model_dir / "config.pbtxt").write_text(to_pbtxt(with_candidate(base, chosen), "tuned\nline 2"))

    written = read_config_proto(model_dir / "config.pbtxt")
    config = build_model_config(written, model_dir)
    assert config.max_batch_size == 32
    assert config.instance_count == 3
    assert config.dynamic_batching.max_queue_delay_us == 500
    assert config.dynamic_batching.preferred_batch_sizes == (16, 32)
    # Everything else is the original's.
    assert config.dynamic_batching.priority_levels == 2
    assert config.dynamic_batching.default_priority_level == 1
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert config.parameters == {"mode": "fast"}
    assert [g.kind.name for g in config.instance_groups] == ["CPU"]
    assert [i.name for i in config.inputs] == ["X"]


def test_the_load_override_is_json_of_the_same_config():
    base = from_served(
        {"name": "m", "backend": "python", "max_batch_size": 4, "instance_group": [{"count": 2}]}
    )
    document = json.loads(to_json(with_candidate(base, Candidate(16, 1, 0, (), True))))
    assert document["max_batch_size"] == 16
    assert document["instance_group"] == [{"count": 1}]
    assert "dynamic_batching" in document


def test_ensembles_and_sequence_batching_are_refused_naming_the_field():
    with pytest.raises(TuneConfigError, match="ensemble_scheduling"):
        tunable(from_served({"name": "e", "platform": "ensemble"}))
    with pytest.raises(TuneConfigError, match="sequence_batching"):
        tunable(from_served({"name": "s", "max_batch_size": 4, "sequence_batching": {}}))


# --- end to end ---------------------------------------------------------------------------------------
#: A fixed 5 ms per batch, whatever its size: batching and instances both raise throughput, and
#: the server (not this 2-core machine's load generator) is the limit at small batches.
PACED_CONFIG = """
name: "paced"
backend: "python"
max_batch_size: 1
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] },
        { name: "INPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] },
         { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
dynamic_batching { max_queue_delay_microseconds: 300 }
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
PACED_MODEL = """
import time


class Model:
    def execute(self, inputs):
        time.sleep(0.005)
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
"""


def paced_repository(root: Path) -> Path:
    repository = root / "models"
    (repository / "paced" / "1").mkdir(parents=True)
    (repository / "paced" / "config.pbtxt").write_text(PACED_CONFIG)
    (repository / "paced" / "1" / "model.py").write_text(PACED_MODEL)
    return repository


def convoy_tune(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "convoy", "tune", "--model", "paced", "--check", "add_sub"]
    try:
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"convoy tune did not finish in {timeout} s\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}"
        ) from None


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """`convoy tune --url` against a running server, within a 30 s budget."""
    root = tmp_path_factory.mktemp("tune")
    process = ConvoyProcess(
        paced_repository(root), root / "server.log", ("--log-level", "WARNING", *EXPLICIT)
    )
    process.start("ready")
    try:
        before = requests.get(f"{process.base_url}/v2/models/paced/config", timeout=5).json()
        out = root / "out"
        run = convoy_tune(
            "--url",
            process.grpc_url,
            "--protocol",
            "grpc",
            "--metrics-url",
            f"http://127.0.0.1:{process.metrics_port}/metrics",
            "--slo-p99-ms",
            "200",
            "--budget",
            "30",
            "--duration",
            "0.6",
            "--warmup",
            "0.2",
            "--max-concurrency",
            "16",
            "--max-batch-size-limit",
            "8",
            "--max-instance-count",
            "2",
            "--output",
            str(out),
        )
        after = requests.get(f"{process.base_url}/v2/models/paced/config", timeout=5).json()
        yield run, out, before, after, process
    finally:
        code = process.stop()
        assert code == 0, f"server exited with {code} on SIGTERM\n{process.log()}"


def test_tune_writes_a_loadable_config_and_a_report_with_the_frontier(tuned, tmp_path):
    run, out, _, _, process = tuned
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}\n{process.log()}"
    assert "best: batch" in run.stdout
    report = json.loads((out / "tune.json").read_text())
    candidates = {c["index"]: c for c in report["candidates"]}
    assert report["best"] in candidates and candidates[report["best"]]["meets_slo"]
    assert report["best"] in report["frontier"], "the best is never beaten on both axes"
    assert candidates[1]["phase"] == "baseline" and len(candidates) >= 3
    # The overrides took effect on the server: a candidate with a larger max_batch_size ran
    # batches of more than one request (the server's own metrics).
    batched = [
        level["server_mean_batch_size"]
        for c in report["candidates"]
        if c["config"]["max_batch_size"] > 1
        for level in c["levels"]
        if level["users"] > 1 and level["server_mean_batch_size"] is not None
    ]
    assert batched and max(batched) > 1.2, batched

    # The written config.pbtxt: Convoy parses and validates it, with the chosen settings.
    model_dir = tmp_path / "paced"
    shutil.copytree(Path(process.repository) / "paced", model_dir)
    shutil.copy(out / "config.pbtxt", model_dir / "config.pbtxt")
    config = build_model_config(read_config_proto(model_dir / "config.pbtxt"), model_dir)
    best = candidates[report["best"]]["config"]
    assert config.max_batch_size == best["max_batch_size"]
    assert config.instance_count == best["instance_count"]

    html = (out / "tune.html").read_text()
    assert 'class="frontier"' in html or len(report["frontier"]) == 1
    assert 'class="chosen"' in html
    assert "Pareto frontier" in html and "chosen: the highest throughput" in html
    assert html.count("<tr") >= len(candidates) + 1


def test_tune_leaves_the_servers_model_with_its_original_config(tuned):
    run, _, before, after, process = tuned
    assert run.returncode == 0, run.stderr
    assert "server: restored" in run.stdout
    assert after == before
    answer = requests.post(
        f"{process.base_url}/v2/models/paced/infer",
        json={
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16},
                {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [2.0] * 16},
            ]
        },
        timeout=10,
    )
    assert answer.status_code == 200, answer.text


def test_tune_with_no_candidate_within_the_objective_exits_1_and_writes_no_config(tmp_path):
    """The own-server mode: tune starts `convoy serve` on the repository and stops it."""
    out = tmp_path / "out"
    run = convoy_tune(
        "--model-repository",
        str(paced_repository(tmp_path)),
        "--protocol",
        "http-binary",
        "--slo-p99-ms",
        "0.001",
        "--budget",
        "20",
        "--duration",
        "0.4",
        "--warmup",
        "0.1",
        "--max-candidates",
        "2",
        "--output",
        str(out),
    )
    assert run.returncode == 1, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert "no candidate met p99 <= 0.001 ms" in run.stdout
    assert not (out / "config.pbtxt").exists()
    report = json.loads((out / "tune.json").read_text())
    assert report["best"] is None and report["closest"] in (1, 2)
    assert "None written: no candidate met the objective" in (out / "tune.html").read_text()


def test_candidates_that_batch_one_request_at_a_time_are_measured_once():
    baseline = Candidate(1, 1, 300, (), True)
    trials = simulate(baseline, SearchSpace.of(baseline, 4, 1), batching_model)
    sizes = [t.candidate.max_batch_size for t in trials if t.phase == "batch"]
    assert sizes == [2, 4], "batch 1 with another queue delay behaves as the baseline"


def test_apply_leaves_the_best_config_loaded(tuned, tmp_path):
    _, _, before, _, process = tuned
    out = tmp_path / "out"
    # Candidates start from this file rather than the served config: the parameter travels.
    base_config = tmp_path / "base.pbtxt"
    base_config.write_text(
        PACED_CONFIG + 'parameters { key: "origin" value: { string_value: "base" } }\n'
    )
    run = convoy_tune(
        "--url",
        process.http_url,
        "--protocol",
        "http-json",
        "--metrics-url",
        "",
        "--slo-p99-ms",
        "200",
        "--budget",
        "20",
        "--duration",
        "0.4",
        "--warmup",
        "0.1",
        "--max-candidates",
        "3",
        "--max-concurrency",
        "4",
        "--apply",
        "--base-config",
        str(base_config),
        "--output",
        str(out),
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}\n{process.log()}"
    report = json.loads((out / "tune.json").read_text())
    best = next(c for c in report["candidates"] if c["index"] == report["best"])["config"]
    served = requests.get(f"{process.base_url}/v2/models/paced/config", timeout=5).json()
    assert served["max_batch_size"] == best["max_batch_size"]
    assert [g["count"] for g in served["instance_group"]] == [best["instance_count"]]
    if report["best"] != 1:  # the baseline best: the original config is restored instead
        assert served["parameters"]["origin"]["string_value"] == "base"
        assert f"max_batch_size: {best['max_batch_size']}" in (out / "config.pbtxt").read_text()
        assert 'string_value: "base"' in (out / "config.pbtxt").read_text()
    # Loading without an override goes back to config.pbtxt.
    answer = requests.post(f"{process.base_url}/v2/repository/models/paced/load", json={}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert requests.get(f"{process.base_url}/v2/models/paced/config", timeout=5).json() == before


def test_interrupted_tune_restores_the_model_and_reports_what_it_measured(tuned, tmp_path):
    _, _, before, _, process = tuned
    config_url = f"{process.base_url}/v2/models/paced/config"
    out = tmp_path / "out"
    command = [sys.executable, "-m", "convoy", "tune", "--model", "paced", "--check", "add_sub"]
    command += ["--url", process.http_url, "--protocol", "http-binary", "--metrics-url", ""]
    command += ["--slo-p99-ms", "200", "--budget", "120", "--duration", "1", "--output", str(out)]
    tune = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        # A shell running pytest in the background may have left SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # A candidate is loaded once the served config is no longer the original.
        poll(lambda: requests.get(config_url, timeout=5).json() != before, "a candidate loaded", 90)
        tune.send_signal(signal.SIGINT)
        stdout, stderr = tune.communicate(timeout=120)
    finally:
        if tune.poll() is None:
            tune.kill()
            tune.wait()
    assert tune.returncode == 130, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "server: restored" in stdout
    assert requests.get(config_url, timeout=5).json() == before
    report = json.loads((out / "tune.json").read_text())
    assert report["candidates"][0]["phase"] == "baseline"


def test_unreadable_base_config_is_refused_naming_the_file(tuned, tmp_path):
    _, _, _, _, process = tuned
    missing = tmp_path / "missing.pbtxt"
    run = convoy_tune(
        "--url",
        process.grpc_url,
        "--slo-p99-ms",
        "10",
        "--base-config",
        str(missing),
        "--output",
        str(tmp_path / "out"),
    )
    assert run.returncode == 2, run.stderr
    message = " ".join(run.stderr.split())
    assert "missing.pbtxt" in message and "cannot read" in message, message
