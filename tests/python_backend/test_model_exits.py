"""A model that ends its own process (os._exit, SIGKILL to itself, os.abort, sys.exit, ...) in
execute() or initialize() takes down only its instance, whatever the isolation setting: in the
server's process the call is refused (runtimes/exit_guard.py) and the instance restarted; in a
worker process the worker dies and is restarted. Other models keep serving throughout."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import ConvoyProcess, poll, serve_until_stopped
from python_backend_models import triton_repository
from tritonclient.utils import InferenceServerException

EXIT_IN_INITIALIZE = """
import os
import signal


class TritonPythonModel:
    def initialize(self, args):
        os.kill(os.getpid(), signal.SIGKILL)

    def execute(self, requests):
        return []
"""


@pytest.fixture(scope="module", params=["thread", "process"])
def exits(request, tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp(f"exits-{request.param}")
    repository = triton_repository(root / "models", ["tp_exit", "tp_add_sub"])
    folder = repository / "tp_exit_init"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text(EXIT_IN_INITIALIZE)
    (folder / "config.pbtxt").write_text(
        (repository / "tp_exit" / "config.pbtxt")
        .read_text()
        .replace('"tp_exit"', '"tp_exit_init"')
        .replace("count: 2", "count: 1")
    )
    process = ConvoyProcess(
        repository, root / "server.log", ("--isolation", request.param), frontend=frontend
    )
    process.isolation = request.param
    # tp_exit_init never loads: wait for liveness.
    yield from serve_until_stopped(process, "live")


def ask(server, how: str) -> int:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        item = grpcclient.InferInput("HOW", [1], "BYTES")
        item.set_data_from_numpy(np.array([how.encode()], dtype=np.object_))
        return int(client.infer("tp_exit", [item]).as_numpy("PID")[0])
    finally:
        client.close()


def serving_again(server) -> int:
    def attempt():
        try:
            return ask(server, "pid")
        except InferenceServerException:
            return 0

    return poll(attempt, "tp_exit serving again", timeout=60)


def add_sub_works(server) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    a = np.ones((1, 4), dtype=np.float32)
    items = [grpcclient.InferInput(n, [1, 4], "FP32") for n in ("INPUT0", "INPUT1")]
    for item in items:
        item.set_data_from_numpy(a)
    np.testing.assert_array_equal(client.infer("tp_add_sub", items).as_numpy("OUTPUT0"), 2 * a)
    client.close()


@pytest.mark.parametrize(
    ("how", "in_process"),
    [
        ("os_exit", "os._exit(3)"),
        ("sigkill", "SIGKILL) (the server's own process)"),
        ("sigterm", "SIGTERM) (the server's own process)"),
        ("raise_signal", "signal.raise_signal(SIGKILL)"),
        ("abort", "os.abort()"),
        ("sys_exit", "sys.exit(4)"),
        ("killpg", "SIGKILL) (the server's process group)"),
    ],
)
def test_a_model_ending_its_process_takes_down_only_its_instance(exits, how, in_process):
    serving_again(exits)
    with pytest.raises(InferenceServerException) as caught:
        ask(exits, how)
    assert caught.value.status() == "StatusCode.INTERNAL"
    if exits.isolation == "thread":
        assert "execute() called " in caught.value.message()
        assert in_process in caught.value.message()
        assert "which would end the server's process; refused" in caught.value.message()
    else:
        assert "worker exited with" in caught.value.message()
    # The server lives on, its other models serve, and the model comes back.
    assert requests.get(f"{exits.base_url}/v2/health/live", timeout=10).status_code == 200
    add_sub_works(exits)
    pid = serving_again(exits)
    assert (pid == exits.pid) == (exits.isolation == "thread")


def test_exiting_from_a_thread_the_model_started_is_refused_there(exits):
    if exits.isolation == "process":
        pytest.skip("in a worker the thread really ends the worker (covered above)")
    serving_again(exits)
    assert ask(exits, "thread_exit") == exits.pid
    assert "os._exit(5)" in exits.log_path.read_text()


def test_a_model_ending_its_process_in_initialize_fails_only_its_load(exits):
    rows = requests.post(f"{exits.base_url}/v2/repository/index", json={}, timeout=30).json()
    row = next(r for r in rows if r["name"] == "tp_exit_init")
    assert row["state"] == "UNAVAILABLE"
    if exits.isolation == "thread":
        assert "loading called os.kill(" in row["reason"]
        assert "SIGKILL) (the server's own process) at line 8 in initialize()" in row["reason"]
    else:
        assert "worker exited with signal 9 (SIGKILL) while loading" in row["reason"]
    add_sub_works(exits)
