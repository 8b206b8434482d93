"""Process isolation: a model with `isolation: process` runs in a worker process; a worker that
crashes (segfault, os._exit, SIGKILL as the OOM killer sends) fails only the batch it was
executing, the model is unready until a fresh worker is up, queued requests are served by it,
and no worker outlives the server."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import ConvoyProcess, copy_model, poll, serve_until_stopped
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

MODEL = "crashing_worker"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    repository = root / "models"
    repository.mkdir()
    copy_model(repository, MODEL)
    bad = repository / "bad_isolation"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text(
        (repository / MODEL / "config.pbtxt")
        .read_text()
        .replace(f'name: "{MODEL}"', 'name: "bad_isolation"')
        .replace('string_value: "process"', 'string_value: "container"')
    )
    process = ConvoyProcess(repository, root / "server.log")
    # bad_isolation never loads, so the server never reports ready: wait for liveness.
    yield from serve_until_stopped(process, "live")


def infer(server: ConvoyProcess, value: int, model: str = MODEL) -> requests.Response:
    body = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 2], "data": [value, 1]}]}
    return requests.post(f"{server.base_url}/v2/models/{model}/infer", data=json.dumps(body), timeout=60)


def worker_pid(server: ConvoyProcess, model: str = MODEL) -> int:
    answer = infer(server, 1, model)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
    assert outputs["OUTPUT0"] == [1, 1]
    return outputs["PID"][0]


def model_ready(server: ConvoyProcess, model: str = MODEL) -> bool:
    return requests.get(f"{server.base_url}/v2/models/{model}/ready", timeout=10).status_code == 200


def wait_ready(server: ConvoyProcess) -> None:
    poll(lambda: model_ready(server), "the restarted worker to report ready")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_model_runs_in_a_worker_process_of_the_server(server):
    pid = worker_pid(server)
    assert pid != server.pid
    assert psutil.Process(pid).ppid() == server.pid


def test_segfault_fails_the_batch_and_a_fresh_worker_serves(server):
    wait_ready(server)
    before = worker_pid(server)
    crashed = infer(server, 11)
    assert crashed.status_code == 500
    assert crashed.json()["error"] == (
        f"model '{MODEL}' worker exited with signal 11 (SIGSEGV) while executing; restarting"
    )
    wait_ready(server)
    after = worker_pid(server)
    assert after != before
    assert gone(before)
    assert requests.get(f"{server.base_url}/v2/health/live", timeout=10).status_code == 200


def test_worker_exit_answers_internal_over_grpc(server):
    wait_ready(server)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = grpcclient.InferInput("INPUT0", [1, 2], "INT32")
        tensor.set_data_from_numpy(np.array([[7, 1]], dtype=np.int32))
        with pytest.raises(InferenceServerException) as raised:
            client.infer(MODEL, [tensor])
        assert raised.value.status() == "StatusCode.INTERNAL"
        assert "worker exited with code 7 while executing; restarting" in raised.value.message()
        poll(lambda: client.is_model_ready(MODEL), "the restarted worker over gRPC")
    finally:
        client.close()


def test_ordinary_error_keeps_the_worker(server):
    wait_ready(server)
    before = worker_pid(server)
    failed = infer(server, 13)
    assert failed.status_code == 500
    assert failed.json()["error"] == (
        f"model '{MODEL}' failed to execute the batch: ValueError: refusing the value 13"
    )
    assert model_ready(server)
    assert worker_pid(server) == before


def test_error_the_model_marks_fatal_restarts_the_worker(server):
    wait_ready(server)
    before = worker_pid(server)
    failed = infer(server, 99)
    assert failed.status_code == 500
    assert "hit a fatal error (Poisoned: CUDA error: device-side assert" in failed.json()["error"]
    assert "Traceback" not in failed.text
    wait_ready(server)
    assert worker_pid(server) != before
    assert gone(before)


def _pending(server: ConvoyProcess) -> float:
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "nv_inference_pending_request_count":
            return sum(s.value for s in family.samples if s.labels.get("model") == MODEL)
    return 0.0


def test_killed_worker_fails_its_batch_and_queued_requests_are_served_by_the_next(server):
    wait_ready(server)
    busy_file = Path(server.repository) / MODEL / "busy"
    busy_file.unlink(missing_ok=True)
    answers: dict[int, requests.Response] = {}

    def send(value: int, key: int) -> None:
        answers[key] = infer(server, value)

    threads = [threading.Thread(target=send, args=(5, 0))]
    threads[0].start()
    busy_pid = int(poll(lambda: busy_file.exists() and busy_file.read_text(), "the busy batch"))
    # The model does not batch dynamically and has one instance: these wait in the queue.
    threads += [threading.Thread(target=send, args=(2, key)) for key in (1, 2, 3)]
    for thread in threads[1:]:
        thread.start()
    poll(lambda: _pending(server) >= 4, "three requests queued behind the busy batch")
    os.kill(busy_pid, signal.SIGKILL)  # what the OOM killer does
    for thread in threads:
        thread.join(60)
    assert answers[0].status_code == 500
    assert "worker exited with signal 9 (SIGKILL) while executing" in answers[0].json()["error"]
    for key in (1, 2, 3):
        assert answers[key].status_code == 200, answers[key].text
        outputs = {o["name"]: o["data"] for o in answers[key].json()["outputs"]}
        assert outputs["OUTPUT0"] == [2, 1]
        assert outputs["PID"][0] != busy_pid


def test_invalid_isolation_parameter_names_the_field(server):
    index = requests.post(f"{server.base_url}/v2/repository/index", timeout=10).json()
    entry = next(row for row in index if row["name"] == "bad_isolation")
    assert entry["state"] == "UNAVAILABLE"
    assert "parameters.isolation: expected 'thread' or 'process', got 'container'" in entry["reason"]
    assert infer(server, 1, "bad_isolation").status_code == 503


def test_workers_exit_when_the_server_is_killed(tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    copy_model(repository, MODEL)
    process = ConvoyProcess(repository, tmp_path / "server.log")
    process.start("ready")
    try:
        pid = worker_pid(process)
    finally:
        process.kill()  # SIGKILL: no shutdown path runs in the server
    poll(lambda: gone(pid), "the worker to exit after its server was killed")


def test_server_flag_isolates_models_without_the_parameter(tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    copy_model(repository, MODEL)
    config = repository / MODEL / "config.pbtxt"
    text = config.read_text()
    config.write_text(text[: text.index("parameters")])
    process = ConvoyProcess(repository, tmp_path / "server.log", extra_args=("--isolation", "process"))
    for running in serve_until_stopped(process, "ready"):
        pid = worker_pid(running)
        assert pid != running.pid
    assert gone(pid)


def test_hung_worker_is_killed_at_the_execution_timeout(tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    copy_model(repository, MODEL)
    config = repository / MODEL / "config.pbtxt"
    config.write_text(
        config.read_text()
        + 'parameters { key: "execution_timeout_ms" value: { string_value: "300" } }\n'
    )
    process = ConvoyProcess(repository, tmp_path / "server.log")
    for running in serve_until_stopped(process, "ready"):
        before = worker_pid(running)
        hung = infer(running, 5)
        assert hung.status_code == 500
        assert "execution timeout (300 ms)" in hung.json()["error"]
        # A hung thread can only be abandoned; a hung worker process is killed.
        poll(lambda pid=before: gone(pid), "the hung worker to be killed")
        wait_ready(running)
        assert worker_pid(running) != before
