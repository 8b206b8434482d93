"""SIGTERM under sustained load: readiness goes false first, requests already on their way are
served, every answer that comes back is correct, and the process exits 0.

HTTP requests each open a fresh connection ("Connection: close"), so a refused connect (the
listener is gone: the request was never accepted) is told apart from a connection dropped
after the request was sent (a lost request).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from capacity_models import write_capacity_model
from helpers import FRONTENDS, ConvoyProcess, metric_value, poll
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.frontends(FRONTENDS[0])

LOAD_THREADS = 6
MAX_REQUESTS_PER_THREAD = 400
LOAD_DEADLINE_S = 60.0
SHUTDOWN_ATTEMPTS = 5

#: Outcomes tolerated for requests sent after SIGTERM: served, told UNAVAILABLE / 503, the
#: connection refused (listener closed), and the two cut-offs at listener close that the last
#: test bounds (gRPC CANCELLED, HTTP reset after the request was sent).
ACCEPTED_AFTER_SIGTERM = {"ok", "unavailable", "refused", "dropped", "cancelled"}
#: Shutdowns (of SHUTDOWN_ATTEMPTS) in which gRPC's core may cancel a just-arrived call.
GRPC_CUT_OFF_RUNS_TOLERATED = 1


def http_call(process: ConvoyProcess, request_id: int) -> str:
    row = [request_id, request_id + 1, request_id * 7, -request_id]
    body = {
        "id": str(request_id),
        "inputs": [{"name": "IN", "datatype": "INT64", "shape": [1, 4], "data": row}],
    }
    url = f"{process.base_url}/v2/models/slow/infer"
    try:
        answer = requests.post(url, json=body, headers={"Connection": "close"}, timeout=30)
    except requests.Timeout as exc:
        return f"hung: {exc!r}"
    except requests.ConnectionError as exc:
        text = repr(exc)
        if "ConnectionRefusedError" in text or "Connection refused" in text:
            return "refused"
        return f"dropped: {text}"
    if answer.status_code == 503:
        return "unavailable"
    if answer.status_code != 200:
        return f"other: HTTP {answer.status_code} {answer.text[:200]}"
    document = answer.json()
    data = document["outputs"][0]["data"]
    if document.get("id") != str(request_id) or data != [3 * v + 1 for v in row]:
        return f"wrong: {document}"
    return "ok"


def grpc_call(client, request_id: int) -> str:
    row = np.array([[request_id, request_id + 1, request_id * 7, -request_id]], dtype=np.int64)
    tensor = grpcclient.InferInput("IN", [1, 4], "INT64")
    tensor.set_data_from_numpy(row)
    try:
        result = client.infer("slow", [tensor], request_id=str(request_id), client_timeout=30)
    except InferenceServerException as exc:
        if str(exc.status()) == "StatusCode.UNAVAILABLE":
            return "unavailable"
        if str(exc.status()) == "StatusCode.CANCELLED":
            return f"cancelled: {exc.message()}"
        return f"other: {exc.status()} {exc.message()}"
    if not np.array_equal(result.as_numpy("OUT"), row * 3 + 1):
        return f"wrong: {result.as_numpy('OUT')!r}"
    return "ok"


def start_slow_server(root: Path, frontend: str = "") -> ConvoyProcess:
    # 150 ms batches and no queue timeout: requests are still executing when SIGTERM lands.
    write_capacity_model(root / "models", "slow", batch_seconds=0.15, timeout_us=0)
    config = root / "models" / "slow" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_queue_size: 8", "max_queue_size: 64"))
    process = ConvoyProcess(root / "models", root / "server.log", frontend=frontend)
    process.start("ready")
    return process


@pytest.fixture
def slow_server(tmp_path, frontend):
    process = start_slow_server(tmp_path, frontend)
    try:
        yield process
    finally:
        process.kill()


@dataclass
class ShutdownRun:
    code: int
    log: str
    sigterm_at: float
    exited_at: float
    results: list[tuple[float, str]]  # (time the request was sent, outcome)
    readiness: list[tuple[float, str]]  # (time, "200" / "503" / "closed") at each change

    def describe(self, rows) -> str:
        return "; ".join(
            f"sent {1000 * (sent - self.sigterm_at):+.0f} ms from SIGTERM (exit at "
            f"{1000 * (self.exited_at - self.sigterm_at):.0f} ms): {outcome}"
            for sent, outcome in rows[:5]
        )


def sigterm_under_load(process: ConvoyProcess) -> ShutdownRun:
    """Closed-loop load from HTTP and gRPC threads plus a readiness watcher; SIGTERM mid-way."""
    stop = threading.Event()
    results: list[tuple[float, str]] = []
    readiness: list[tuple[float, str]] = []

    def load(worker: int) -> None:
        client = grpcclient.InferenceServerClient(process.grpc_url) if worker % 2 else None
        give_up = time.monotonic() + LOAD_DEADLINE_S
        for n in range(MAX_REQUESTS_PER_THREAD):
            if stop.is_set() or time.monotonic() > give_up:
                break
            request_id = worker * 10_000 + n
            sent = time.monotonic()
            outcome = grpc_call(client, request_id) if client else http_call(process, request_id)
            results.append((sent, outcome))
            if outcome == "refused":
                break  # the listener is gone for good
        if client is not None:
            client.close()

    def watch_readiness() -> None:
        give_up = time.monotonic() + LOAD_DEADLINE_S
        while not stop.is_set() and time.monotonic() < give_up:
            try:
                code = requests.get(f"{process.base_url}/v2/health/ready", timeout=5).status_code
                state = str(code)
            except requests.ConnectionError:
                state = "closed"
            if not readiness or readiness[-1][1] != state:
                readiness.append((time.monotonic(), state))
            if state == "closed":
                return
            stop.wait(0.005)

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(LOAD_THREADS)]
    threads.append(threading.Thread(target=watch_readiness, daemon=True))
    for thread in threads:
        thread.start()
    poll(lambda: sum(r[1] == "ok" for r in results) >= 30, "sustained load to be served")
    sigterm_at = time.monotonic()
    code = process.stop()  # SIGTERM, then wait for the exit
    exited_at = time.monotonic()
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    return ShutdownRun(code, process.log(), sigterm_at, exited_at, results, readiness)


def test_sigterm_under_load_drains_accepted_requests_and_exits_zero(slow_server):
    run = sigterm_under_load(slow_server)
    assert run.code == 0, f"server exited with {run.code} on SIGTERM\n{run.log}"
    wrong = [r for r in run.results if r[1].startswith("wrong")]
    assert not wrong, run.describe(wrong)
    # Requests sent before SIGTERM were on their way: each is served (gRPC's graceful stop).
    before = [r for r in run.results if r[0] < run.sigterm_at]
    failed = [r for r in before if r[1] != "ok"]
    assert not failed, run.describe(failed)
    # Later ones may also find the listener gone (refused), or be cut off as it closes (below).
    after = [r for r in run.results if r[0] >= run.sigterm_at]
    unexplained = [r for r in after if r[1].split(":")[0] not in ACCEPTED_AFTER_SIGTERM]
    assert not unexplained, run.describe(unexplained)
    states = [state for _, state in run.readiness]
    assert states[0] == "200", states
    assert "503" in states, f"readiness never went false before the server exited: {states}"
    went_false = next(t for t, s in run.readiness if s == "503")
    assert run.sigterm_at <= went_false <= run.exited_at
    counts = {}
    for _, outcome in run.results:
        kind = (
            outcome.split(":")[0] if outcome != "other: StatusCode.CANCELLED CANCELLED" else "cancelled"
        )
        counts[kind] = counts.get(kind, 0) + 1
    print(
        f"\nshutdown: {len(run.results)} requests {counts}; readiness {states}; "
        f"503 after {1000 * (went_false - run.sigterm_at):.0f} ms, exit after "
        f"{1000 * (run.exited_at - run.sigterm_at):.0f} ms"
    )


def test_requests_arriving_during_shutdown_get_unavailable_not_cut_off(tmp_path, frontend):
    """Late arrivals are answered UNAVAILABLE / 503 or find the port closed, over several
    shutdowns. HTTP: never a connection reset after the request was sent (the listener drops new
    SYNs and drains its accept queue before it closes). gRPC: its core cancels calls it received
    but had not yet handed to the server when the server stops; Convoy holds its refusals until
    the clients go quiet, which closes that window in nearly every shutdown (before, nearly every
    shutdown under this load cut some call off), but cannot close it entirely."""
    http_cut_off, grpc_cut_off_runs, grpc_cut_off = [], 0, []
    totals: dict[str, int] = {}
    for attempt in range(SHUTDOWN_ATTEMPTS):
        process = start_slow_server(tmp_path / str(attempt), frontend)
        try:
            run = sigterm_under_load(process)
        finally:
            process.kill()
        assert run.code == 0, run.log
        for _, outcome in run.results:
            totals[outcome.split(":")[0]] = totals.get(outcome.split(":")[0], 0) + 1
        http_cut_off += [r for r in run.results if r[1].startswith("dropped")]
        cancelled = [r for r in run.results if r[1].startswith("cancelled")]
        grpc_cut_off += cancelled
        grpc_cut_off_runs += bool(cancelled)
        unexplained = [r for r in run.results if r[1].split(":")[0] not in ACCEPTED_AFTER_SIGTERM]
        assert not unexplained, run.describe(unexplained)
    print(
        f"\nlate arrivals over {SHUTDOWN_ATTEMPTS} shutdowns: {totals}; gRPC calls cancelled in "
        f"{grpc_cut_off_runs} shutdowns"
    )
    assert not http_cut_off, run.describe(http_cut_off)
    assert grpc_cut_off_runs <= GRPC_CUT_OFF_RUNS_TOLERATED, run.describe(grpc_cut_off)


def test_http_requests_in_flight_at_sigterm_are_served_with_connection_close(slow_server):
    """A request being computed when SIGTERM lands gets its answer (not 503), and the answer
    tells the client this connection is done (`Connection: close`)."""
    answers: list[requests.Response] = []
    url = f"{slow_server.base_url}/v2/models/slow/infer"

    def send(request_id: int) -> None:
        body = {"inputs": [{"name": "IN", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        with requests.Session() as session:  # keep-alive, as real clients do
            answers.append(session.post(url, json={**body, "id": str(request_id)}, timeout=30))

    threads = [threading.Thread(target=send, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    poll(
        lambda: metric_value(slow_server, "nv_inference_pending_request_count", model="slow") > 0,
        "requests to be executing",
    )
    slow_server.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=60)
    assert slow_server.stop() == 0
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert all(a.json()["outputs"][0]["data"] == [4, 7, 10, 13] for a in answers)
    assert any(a.headers.get("connection") == "close" for a in answers)
