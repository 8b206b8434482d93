"""The engine supervises its workers: a worker killed is restarted and serves again, requests it
had queued leave the queue, and workers never outlive their engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

import pytest
import requests
from e2e.test_cancellation import json_body, start_blocking_request, stats
from helpers import ConvoyProcess, poll, serve_until_stopped
from worker_metrics import WORKERS, per_worker_requests, scrape, worker_pids

from convoy.cli import demo_repository


def process_gone(pid: int) -> bool:
    """Exited (a zombie waiting for a reaper counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone, or going while being read
        return True
    return "\nState:\tZ" in status


@pytest.fixture
def add_sub_server(tmp_path):
    shutil.copytree(demo_repository() / "add_sub", tmp_path / "models" / "add_sub")
    process = ConvoyProcess(tmp_path / "models", tmp_path / "server.log", WORKERS)
    yield from serve_until_stopped(process, "ready")


def infer_fresh(process) -> int:
    """One add_sub request on a new connection; its HTTP status."""
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [2.0] * 16},
        ]
    }
    with requests.Session() as fresh:
        answer = fresh.post(f"{process.base_url}/v2/models/add_sub/infer", json=body, timeout=10)
    return answer.status_code


def test_killed_worker_is_restarted_and_serves_again(add_sub_server):
    process = add_sub_server
    before = worker_pids(process)
    os.kill(before["0"], signal.SIGKILL)
    poll(lambda: process_gone(before["0"]), "the killed worker to be gone")
    restarted = poll(
        lambda: (pids := worker_pids(process)).get("0") not in (None, before["0"]) and pids,
        "worker 0 to be restarted",
    )
    assert restarted["1"] == before["1"], "the other worker must not be touched"
    restarts = scrape(process)[("convoy_worker_restarts_total", frozenset({"worker": "0"}.items()))]
    assert restarts == 1
    assert f"worker 0 (pid {before['0']}) exited with -9; restarting" in process.log()
    # The new worker 0 takes connections again (the kernel hashes new connections over both).
    served = per_worker_requests(process)["0"]
    poll(
        lambda: infer_fresh(process) == 200 and per_worker_requests(process)["0"] > served,
        "the restarted worker to serve a request",
        timeout=60,
    )


def test_workers_exit_when_the_engine_is_killed(tmp_path):
    shutil.copytree(demo_repository() / "add_sub", tmp_path / "models" / "add_sub")
    process = ConvoyProcess(tmp_path / "models", tmp_path / "server.log", WORKERS)
    process.start("ready")
    pids = worker_pids(process)
    assert len(pids) == 2
    process.kill()  # SIGKILL: the engine gets no chance to stop them
    poll(lambda: all(process_gone(pid) for pid in pids.values()), "both workers to exit", timeout=20)
    # Nobody listens on the ports any more.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", process.http_port), timeout=5).close()


def failures(process) -> int | None:
    """The gate model's failed requests; None when the connection is refused or reset while the
    killed worker's listener is being torn down (SO_REUSEPORT hands it connections until then)."""
    try:
        return stats(process)["inference_stats"]["fail"]["count"]
    except requests.ConnectionError:
        return None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_requests_queued_by_a_worker_that_dies_leave_the_queue(gate_server):
    process, model = gate_server
    before = per_worker_requests(process)
    first = start_blocking_request(process, model)
    poll(lambda: sum(per_worker_requests(process).values()) > sum(before.values()), "first request")
    first_by = next(w for w, n in per_worker_requests(process).items() if n > before[w])
    before = per_worker_requests(process)
    # A second request waits in the queue behind the first; find the worker that took it.
    body = json_body(2.0)
    queued = socket.create_connection(("127.0.0.1", process.http_port), timeout=10)
    queued.sendall(
        b"POST /v2/models/gate/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    taken_by = poll(
        lambda: next((w for w, n in per_worker_requests(process).items() if n > before[w]), None),
        "the queued request to reach the engine",
    )
    killed = worker_pids(process)[taken_by]
    os.kill(killed, signal.SIGKILL)
    # (Connections the kernel hands its listener before the process is gone get reset.)
    poll(lambda: process_gone(killed), "the killed worker to be gone")
    # Its client is gone with the worker: the engine takes the request out of the queue.
    poll(lambda: failures(process) == 1, "the cancellation", timeout=20)
    assert queued.recv(1024) == b"", "the dead worker's connection must be closed, not answered"
    queued.close()
    (model / "open").touch()
    first.join(timeout=30)
    poll(lambda: stats(process)["execution_count"] == 1, "the first batch to finish")
    # The blocking request was answered, unless it rode on the killed worker too.
    if first_by == taken_by:
        assert "response" not in first.result
    else:
        assert first.result["response"].status_code == 200
    poll(lambda: len(worker_pids(process)) == 2, "the worker to be restarted")
    answer = requests.post(f"{process.base_url}/v2/models/gate/infer", data=json_body(5.0), timeout=30)
    assert answer.status_code == 200
    assert json.loads(answer.text)["outputs"][0]["data"] == [5.0] * 4
    # The queue went from the first batch straight to this one: the orphan never ran.
    final = stats(process)
    assert (final["execution_count"], final["inference_count"]) == (2, 2)


def test_sigterm_drains_requests_in_flight_then_exits_zero(gate_server):
    """SIGTERM to the engine: readiness goes false on every worker (answers say `Connection:
    close`), the requests already queued are still answered, then everything exits 0."""
    process, model = gate_server
    first = start_blocking_request(process, model)
    pids = worker_pids(process)
    queued = []  # two more behind the first, on their own connections (max_queue_size is 2)
    for value in (2.0, 3.0):
        thread = threading.Thread(
            target=lambda v=value: queued.append(
                requests.post(f"{process.base_url}/v2/models/gate/infer", data=json_body(v), timeout=60)
            ),
            daemon=True,
        )
        thread.start()
    pending = (
        "nv_inference_pending_request_count",
        frozenset({"model": "gate", "version": "1"}.items()),
    )
    poll(lambda: scrape(process).get(pending) == 3, "one request executing and two queued")
    stopping = threading.Thread(target=lambda: setattr(stopping, "code", process.stop()), daemon=True)
    stopping.start()

    def unready_on_fresh_connection() -> bool:
        try:
            with requests.Session() as fresh:
                ready = fresh.get(f"{process.base_url}/v2/health/ready", timeout=10)
        except requests.ConnectionError:
            return True  # the listener has closed: no new connection is taken
        return ready.status_code == 503 and ready.headers.get("connection") == "close"

    # Both workers (new connections hash over both) are unready while the queued requests wait.
    for _ in range(6):
        poll(unready_on_fresh_connection, "readiness false (or the listener closed)")
    (model / "open").touch()
    stopping.join(timeout=60)
    assert stopping.code == 0, process.log()
    assert first.result["response"].status_code == 200
    poll(lambda: len(queued) == 2, "the queued requests to be answered")
    assert sorted(a.status_code for a in queued) == [200, 200]
    assert all(process_gone(pid) for pid in pids.values())
