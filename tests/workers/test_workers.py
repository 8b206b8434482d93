"""`--workers 2` under concurrent load: every response belongs to its request and is right, both
workers take connections, the engine counts each request once, and control-plane changes made
through one worker are what every worker answers next."""

from __future__ import annotations

import itertools
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import WORKERS_FRONTEND, poll
from worker_metrics import per_worker_requests, scrape, worker_pids

pytestmark = pytest.mark.frontends(WORKERS_FRONTEND)

CLIENTS = 12
REQUESTS_PER_CLIENT = 40


def add_sub_successes(process) -> float:
    key = ("nv_inference_request_success", frozenset({"model": "add_sub", "version": "1"}.items()))
    return scrape(process).get(key, 0.0)


def payload(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs no other request carries: the seed is in every element."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((1, 16)) + seed).astype(np.float32)
    b = rng.standard_normal((1, 16)).astype(np.float32)
    return a, b


def check(seed: int, request_id: str, out0, out1, answered_id: str) -> str | None:
    a, b = payload(seed)
    if answered_id != request_id:
        return f"request {request_id} answered as {answered_id}"
    if not (np.array_equal(out0, a + b) and np.array_equal(out1, a - b)):
        return f"request {request_id}: wrong outputs"
    return None


def run_client(flavour: str, process, first_seed: int) -> list[str]:
    """One client with its own connection: REQUESTS_PER_CLIENT unique requests; the problems."""
    problems = []
    if flavour.startswith("grpc"):
        module, client = grpcclient, grpcclient.InferenceServerClient(process.grpc_url)
    else:
        module, client = httpclient, httpclient.InferenceServerClient(process.http_url)
    binary = flavour != "http-json"
    try:
        if flavour == "grpc-stream":
            return stream_client(client, first_seed)
        for seed in range(first_seed, first_seed + REQUESTS_PER_CLIENT):
            a, b = payload(seed)
            inputs = [
                module.InferInput("INPUT0", [1, 16], "FP32"),
                module.InferInput("INPUT1", [1, 16], "FP32"),
            ]
            for tensor, array in zip(inputs, (a, b), strict=True):
                if module is httpclient:
                    tensor.set_data_from_numpy(array, binary_data=binary)
                else:
                    tensor.set_data_from_numpy(array)
            outputs = None
            if module is httpclient:
                outputs = [
                    module.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")
                ]
            result = client.infer("add_sub", inputs, request_id=f"r{seed}", outputs=outputs)
            answered = (
                result.get_response(as_json=True) if module is grpcclient else result.get_response()
            )
            problem = check(
                seed, f"r{seed}", result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), answered["id"]
            )
            if problem:
                problems.append(problem)
    finally:
        client.close()
    return problems


def stream_client(client, first_seed: int) -> list[str]:
    answers: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for seed in range(first_seed, first_seed + REQUESTS_PER_CLIENT):
            a, b = payload(seed)
            inputs = [
                grpcclient.InferInput("INPUT0", [1, 16], "FP32"),
                grpcclient.InferInput("INPUT1", [1, 16], "FP32"),
            ]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            client.async_stream_infer("add_sub", inputs, request_id=f"r{seed}")
        problems = []
        for _ in range(REQUESTS_PER_CLIENT):
            result, error = answers.get(timeout=60)
            if error is not None:
                problems.append(f"stream error: {error}")
                continue
            answered = result.get_response(as_json=True)["id"]
            problem = check(
                int(answered[1:]),
                answered,
                result.as_numpy("OUTPUT0"),
                result.as_numpy("OUTPUT1"),
                answered,
            )
            if problem:
                problems.append(problem)
        return problems
    finally:
        client.stop_stream()


def test_concurrent_clients_of_every_protocol_get_their_own_correct_answers(server):
    before_workers = per_worker_requests(server)
    before_success = add_sub_successes(server)
    flavours = ["grpc", "grpc-stream", "http-binary", "http-json"]
    seeds = itertools.count(1, REQUESTS_PER_CLIENT)
    with ThreadPoolExecutor(CLIENTS) as pool:
        runs = [
            pool.submit(run_client, flavours[n % len(flavours)], server, next(seeds))
            for n in range(CLIENTS)
        ]
        problems = [p for run in runs for p in run.result(timeout=300)]
    assert not problems, problems[:10]
    sent = CLIENTS * REQUESTS_PER_CLIENT
    after_workers = per_worker_requests(server)
    handed = {w: after_workers[w] - before_workers.get(w, 0) for w in after_workers}
    # Counted once in the engine, whichever worker took the connection.
    assert sum(handed.values()) == sent, handed
    assert add_sub_successes(server) - before_success == sent


def test_both_workers_take_connections(server):
    """The kernel spreads connections over the workers' listeners (SO_REUSEPORT) by a hash of
    the client's address: new connections, one request each, until both workers took some."""
    before = per_worker_requests(server)
    assert sorted(before) == ["0", "1"]
    a, b = payload(0)
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": a.ravel().tolist()},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": b.ravel().tolist()},
        ]
    }

    def both_served() -> bool:
        with requests.Session() as fresh:  # a new connection each round
            answer = fresh.post(f"{server.base_url}/v2/models/add_sub/infer", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        now = per_worker_requests(server)
        return all(now[w] > before[w] for w in ("0", "1"))

    poll(both_served, "both workers to serve a request", timeout=60)


def test_each_worker_is_its_own_process(server):
    pids = worker_pids(server)
    assert sorted(pids) == ["0", "1"]
    assert len(set(pids.values())) == 2


@pytest.mark.parametrize("flavour", ["grpc", "http"])
def test_unload_and_load_are_seen_by_every_worker_when_the_call_returns(server, flavour):
    """No polling: once unload/load has answered, any connection (any worker) agrees."""
    control = (
        grpcclient.InferenceServerClient(server.grpc_url)
        if flavour == "grpc"
        else httpclient.InferenceServerClient(server.http_url)
    )

    def ready_on_fresh_connections() -> set[bool]:
        seen = set()
        for _ in range(8):
            with requests.Session() as fresh:
                answer = fresh.get(f"{server.base_url}/v2/models/reloadable/ready", timeout=10)
            seen.add(answer.status_code == 200)
        return seen

    try:
        control.unload_model("reloadable")
        assert ready_on_fresh_connections() == {False}
        control.load_model("reloadable")
        assert ready_on_fresh_connections() == {True}
    finally:
        control.load_model("reloadable")
        control.close()


def test_log_settings_changed_through_one_worker_reach_every_worker(server):
    url = f"{server.base_url}/v2/logging"

    def settings_on_fresh_connections() -> set[int]:
        seen = set()
        for _ in range(8):
            with requests.Session() as fresh:
                seen.add(fresh.get(url, timeout=10).json()["log_verbose_level"])
        return seen

    assert settings_on_fresh_connections() == {0}
    try:
        assert (
            requests.post(url, json={"log_verbose_level": 1}, timeout=10).json()["log_verbose_level"]
            == 1
        )
        poll(lambda: settings_on_fresh_connections() == {1}, "every worker to turn verbose logging on")
    finally:
        requests.post(url, json={"log_verbose_level": 0}, timeout=10)
        poll(lambda: settings_on_fresh_connections() == {0}, "every worker to turn it off again")


def test_trace_settings_changed_through_one_worker_reach_every_worker(server):
    url = f"{server.base_url}/v2/models/add_sub/trace/setting"

    def rates_on_fresh_connections() -> set[str]:
        seen = set()
        for _ in range(8):
            with requests.Session() as fresh:
                seen.add(fresh.get(url, timeout=10).json()["trace_rate"])
        return seen

    assert rates_on_fresh_connections() == {"1"}
    try:
        assert requests.post(url, json={"trace_rate": "7"}, timeout=10).json()["trace_rate"] == "7"
        poll(lambda: rates_on_fresh_connections() == {"7"}, "every worker to see the new rate")
    finally:
        requests.post(url, json={"trace_rate": None}, timeout=10)
        poll(lambda: rates_on_fresh_connections() == {"1"}, "every worker to clear it again")


def test_errors_raised_in_the_engine_keep_their_status_through_a_worker(protocol):
    """The scheduler (in the engine) rejects a priority the model has no level for: the worker
    answers INVALID_ARGUMENT / 400 with the engine's message."""
    a = np.zeros((1, 16), dtype=np.float32)
    inputs = [protocol.input("INPUT0", a, "FP32"), protocol.input("INPUT1", a, "FP32")]
    with pytest.raises(Exception) as raised:
        protocol.client.infer("add_sub", inputs, priority=3)
    assert raised.value.status() == protocol.status("INVALID_ARGUMENT")
    assert "priority" in raised.value.message()


def test_many_requests_in_flight_on_one_worker_connection_pool(server):
    """One HTTP client with 8 connections and 200 requests in flight at once: answers never cross."""
    client = httpclient.InferenceServerClient(server.http_url, concurrency=8)
    try:
        pending = []
        for seed in range(10_000, 10_200):
            a, b = payload(seed)
            inputs = [
                httpclient.InferInput("INPUT0", [1, 16], "FP32"),
                httpclient.InferInput("INPUT1", [1, 16], "FP32"),
            ]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            pending.append((seed, client.async_infer("add_sub", inputs, request_id=f"t{seed}")))
        problems = []
        for seed, call in pending:
            result = call.get_result(timeout=60)
            problem = check(
                seed,
                f"t{seed}",
                result.as_numpy("OUTPUT0"),
                result.as_numpy("OUTPUT1"),
                result.get_response()["id"],
            )
            if problem:
                problems.append(problem)
    finally:
        client.close()
    assert not problems, problems[:10]


@pytest.mark.parametrize(("model", "datatype"), [("identity_fp32", "FP32"), ("identity_bytes", "BYTES")])
def test_large_tensors_cross_the_engine_intact(protocol, model, datatype):
    """Tensors of ~100 KiB and more travel to the engine and back as frames of their own."""
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        array = np.array(
            [rng.bytes(int(n)) for n in rng.integers(0, 64, 8 * 4000)], dtype=object
        ).reshape(8, 4000)
    else:
        array = rng.standard_normal((8, 20_000)).astype(np.float32)
    result = protocol.client.infer(
        model, [protocol.input("INPUT0", array, datatype)], outputs=[protocol.output("OUTPUT0")]
    )
    out = result.as_numpy("OUTPUT0")
    assert out.shape == array.shape
    if datatype == "BYTES":
        assert [bytes(v) for v in out.reshape(-1)] == list(array.reshape(-1))
    else:
        assert out.tobytes() == array.tobytes()
