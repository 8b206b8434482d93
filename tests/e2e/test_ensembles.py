"""Ensembles through a real server: chains, fan-out/fan-in, errors and cancellation mid-pipeline,
load-time validation messages, availability following the composing models, and ensemble steps
batching together with direct traffic to the same composing model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from ensemble_helpers import FP32_4, ensemble, step_model
from helpers import EXPLICIT, WITH_WORKERS, ConvoyProcess, Protocol, serve_until_stopped
from tritonclient.utils import InferenceServerException


def build_ensemble_repository(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, op in (("plus1", "plus1"), ("scale2", "scale2"), ("fail_negative", "fail_negative")):
        step_model(root, name, op)
    step_model(root, "sum", "sum", inputs=("A", "B"))
    step_model(root, "plus1_b", "plus1")
    step_model(root, "plus1_after_slow", "plus1")
    step_model(root, "slow", "plus1", delay_ms=300)
    step_model(
        root,
        "batch_id",
        "batch_id",
        outputs=(("Y", *FP32_4), ("BATCH_ID", "TYPE_INT64", "[ 1 ]")),
        max_batch_size=32,
        delay_ms=100,
    )
    x_to = lambda t_in, t_out: ({"X": t_in}, {"Y": t_out})  # noqa: E731
    ensemble(root, "ens_chain", [("plus1", -1, *x_to("IN", "T")), ("scale2", 1, *x_to("T", "OUT"))])
    ensemble(
        root,
        "ens_diamond",
        [
            ("sum", -1, {"A": "LEFT", "B": "RIGHT"}, {"Y": "OUT"}),  # listed first: order is data's
            ("plus1", -1, *x_to("IN", "LEFT")),
            ("scale2", -1, *x_to("IN", "RIGHT")),
        ],
        outputs=(("OUT", *FP32_4), ("LEFT", *FP32_4)),
    )
    ensemble(
        root,
        "ens_fail",
        [("fail_negative", -1, *x_to("IN", "T")), ("plus1", -1, *x_to("T", "OUT"))],
    )
    ensemble(
        root,
        "ens_slow",
        [("slow", -1, *x_to("IN", "T")), ("plus1_after_slow", -1, *x_to("T", "OUT"))],
    )
    ensemble(root, "ens_unload", [("plus1_b", -1, *x_to("IN", "OUT"))])
    ensemble(
        root,
        "ens_batch",
        [("batch_id", -1, {"X": "IN"}, {"Y": "OUT", "BATCH_ID": "BATCH"})],
        outputs=(("OUT", *FP32_4), ("BATCH", "TYPE_INT64", "[ 1 ]")),
    )
    ensemble(root, "ens_inflight", [("slow", -1, *x_to("IN", "OUT"))], extra="max_inflight_requests: 1")
    # Each refused at load with a reason naming the step and the tensor.
    ensemble(root, "bad_unmapped", [("sum", -1, {"A": "IN"}, {"Y": "OUT"})])
    ensemble(root, "bad_unknown_input", [("plus1", -1, {"X": "IN", "Z": "IN"}, {"Y": "OUT"})])
    ensemble(root, "bad_no_output", [("plus1", -1, *x_to("IN", "T"))])
    ensemble(
        root,
        "bad_twice",
        [("plus1", -1, *x_to("IN", "OUT")), ("scale2", -1, *x_to("IN", "OUT"))],
    )
    ensemble(
        root,
        "bad_cycle",
        [
            ("plus1", -1, *x_to("T2", "T1")),
            ("scale2", -1, *x_to("T1", "T2")),
            ("sum", -1, {"A": "T1", "B": "IN"}, {"Y": "OUT"}),
        ],
    )
    ensemble(
        root,
        "bad_dtype",
        [("plus1", -1, *x_to("IN", "OUT"))],
        inputs=(("IN", "TYPE_INT32", "[ 4 ]"),),
    )
    ensemble(
        root, "bad_shape", [("plus1", -1, *x_to("IN", "OUT"))], inputs=(("IN", "TYPE_FP32", "[ 3 ]"),)
    )
    ensemble(root, "bad_missing_model", [("no_such_model", -1, *x_to("IN", "OUT"))])
    ensemble(root, "bad_version", [("plus1", 7, *x_to("IN", "OUT"))])
    ensemble(root, "bad_dangling", [("plus1", -1, *x_to("NOWHERE", "OUT"))])
    return root


@pytest.fixture(scope="module")
def ens_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("ensembles")
    process = ConvoyProcess(
        build_ensemble_repository(root / "models"), root / "server.log", EXPLICIT, frontend=frontend
    )
    yield from serve_until_stopped(process, "live")


@pytest.fixture(scope="module")
def grpc(ens_server):
    client = grpcclient.InferenceServerClient(ens_server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(ens_server):
    client = httpclient.InferenceServerClient(ens_server.http_url)
    yield client
    client.close()


@pytest.fixture(params=["grpc", "http"])
def protocol(request, grpc, http) -> Protocol:
    if request.param == "grpc":
        return Protocol("grpc", grpc, grpcclient)
    return Protocol("http", http, httpclient)


X = np.array([[1.0, -2.0, 3.5, 0.0]], dtype=np.float32)


def infer(protocol: Protocol, model: str, array=X, outputs=("OUT",), **kwargs):
    tensor = protocol.input("IN", array, "FP32")
    result = protocol.client.infer(
        model, [tensor], outputs=[protocol.output(o) for o in outputs], **kwargs
    )
    return {name: result.as_numpy(name) for name in outputs}


def index_row(server, model: str) -> dict:
    rows = requests.post(f"{server.base_url}/v2/repository/index", timeout=10).json()
    return next(r for r in rows if r["name"] == model)


@pytest.mark.frontends(*WITH_WORKERS)
def test_chain_runs_each_step_in_order(protocol):
    assert np.array_equal(infer(protocol, "ens_chain")["OUT"], (X + 1) * 2)


@pytest.mark.frontends(*WITH_WORKERS)
def test_fan_out_fan_in(protocol):
    got = infer(protocol, "ens_diamond", outputs=("OUT", "LEFT"))
    assert np.array_equal(got["OUT"], (X + 1) + X * 2)
    assert np.array_equal(got["LEFT"], X + 1)


def test_ensemble_batches_rows(protocol):
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    assert np.array_equal(infer(protocol, "ens_chain", rows)["OUT"], (rows + 1) * 2)


def test_ensemble_metadata_and_config(protocol, ens_server):
    metadata = protocol.client.get_model_metadata("ens_chain")
    platform = metadata.platform if protocol.name == "grpc" else metadata["platform"]
    assert platform == "ensemble"
    config = requests.get(f"{ens_server.base_url}/v2/models/ens_chain/config", timeout=10).json()
    assert config["platform"] == "ensemble"
    assert config["backend"] == ""
    assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == ["plus1", "scale2"]


@pytest.mark.frontends(*WITH_WORKERS)
def test_step_error_ends_the_request_and_names_the_step(protocol, grpc):
    before = grpc.get_inference_statistics("plus1", as_json=True)["model_stats"][0]
    with pytest.raises(InferenceServerException) as caught:
        infer(protocol, "ens_fail")  # X holds -2
    assert caught.value.status() == protocol.status("INTERNAL")
    message = caught.value.message()
    assert "step[0]" in message and "fail_negative" in message and "negative input" in message
    after = grpc.get_inference_statistics("plus1", as_json=True)["model_stats"][0]
    assert after.get("inference_count", "0") == before.get("inference_count", "0")
    # A good request through the same ensemble still works.
    assert np.array_equal(infer(protocol, "ens_fail", np.abs(X))["OUT"], np.abs(X) + 1)


def _count(grpc, model: str, key: str) -> int:
    stats = grpc.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get(key, 0) or 0)


def test_cancelled_request_stops_the_remaining_steps(grpc, ens_server):
    """A client that gives up while step 0 (300 ms) runs: step 1 is never submitted."""
    protocol = Protocol("grpc", grpc, grpcclient)
    pace = threading.Event()
    for _attempt in range(5):
        before_slow = _count(grpc, "slow", "inference_count")
        before_next = _count(grpc, "plus1_after_slow", "inference_count")
        with pytest.raises(InferenceServerException) as caught:
            infer(protocol, "ens_slow", client_timeout=0.1)
        assert "DEADLINE" in str(caught.value.status()).upper()
        # Step 0 finishes anyway (unless the call expired before it reached the server, on a
        # loaded machine: then try again).
        deadline = time.monotonic() + 5
        while _count(grpc, "slow", "inference_count") == before_slow:
            if time.monotonic() > deadline:
                break
            pace.wait(0.05)
        else:
            # Step 0 is done; had the request lived on, step 1 would have been submitted at once.
            stats = grpc.get_inference_statistics("ens_slow", as_json=True)["model_stats"][0]
            assert int(stats["inference_stats"]["fail"].get("count", 0)) >= 1
            # One full request after it: step 1 has then run once (twice if the cancelled
            # request had gone on to it).
            assert np.array_equal(infer(protocol, "ens_slow")["OUT"], X + 2)
            assert _count(grpc, "plus1_after_slow", "inference_count") == before_next + 1
            return
    raise AssertionError("the request never reached step 0 in five tries")


def test_max_inflight_requests_holds_a_step_at_its_limit(grpc, ens_server):
    """max_inflight_requests 1 on a 300 ms step that batches: four requests at once all succeed,
    one at a time through the step (four batches of one, where they would share one)."""
    before = (_count(grpc, "slow", "inference_count"), _count(grpc, "slow", "execution_count"))
    results: list = []
    errors: list = []

    def call() -> None:
        client = grpcclient.InferenceServerClient(ens_server.grpc_url)
        try:
            results.append(infer(Protocol("grpc", client, grpcclient), "ens_inflight")["OUT"])
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(np.array_equal(r, X + 1) for r in results) and len(results) == 4
    rows = _count(grpc, "slow", "inference_count") - before[0]
    batches = _count(grpc, "slow", "execution_count") - before[1]
    assert (rows, batches) == (4, 4)


def test_ensemble_steps_batch_with_direct_traffic(grpc, ens_server):
    """Ensemble requests and direct requests to its composing model, sent together, ride in
    the same batches (the step model reports the batch each row rode in)."""
    batches: dict[str, list[int]] = {"ensemble": [], "direct": []}
    errors: list = []

    def ensemble_call() -> None:
        client = grpcclient.InferenceServerClient(ens_server.grpc_url)
        try:
            got = infer(Protocol("grpc", client, grpcclient), "ens_batch", outputs=("OUT", "BATCH"))
            batches["ensemble"].append(int(got["BATCH"][0, 0]))
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    def direct_call() -> None:
        client = grpcclient.InferenceServerClient(ens_server.grpc_url)
        try:
            tensor = grpcclient.InferInput("X", [1, 4], "FP32")
            tensor.set_data_from_numpy(X)
            result = client.infer("batch_id", [tensor])
            batches["direct"].append(int(result.as_numpy("BATCH_ID")[0, 0]))
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    # Rounds until one batch held both kinds (each batch takes 100 ms: with 8 + 8 callers at
    # once they meet in the first round on any machine; the loop only guards a slow start).
    for _ in range(5):
        threads = [threading.Thread(target=ensemble_call) for _ in range(8)]
        threads += [threading.Thread(target=direct_call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        if set(batches["ensemble"]) & set(batches["direct"]):
            break
    assert set(batches["ensemble"]) & set(batches["direct"])


def test_ensemble_is_unavailable_while_a_composing_model_is(ens_server, grpc):
    protocol = Protocol("grpc", grpc, grpcclient)
    assert grpc.is_model_ready("ens_unload")
    grpc.unload_model("plus1_b")
    try:
        assert not grpc.is_model_ready("ens_unload")
        row = index_row(ens_server, "ens_unload")
        assert row["state"] == "UNAVAILABLE"
        assert "plus1_b" in row["reason"]
        with pytest.raises(InferenceServerException) as caught:
            infer(protocol, "ens_unload")
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        assert "plus1_b" in caught.value.message()
    finally:
        grpc.load_model("plus1_b")
    assert grpc.is_model_ready("ens_unload")
    assert np.array_equal(infer(protocol, "ens_unload")["OUT"], X + 1)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("bad_unmapped", ["step[0]", "'sum'", "input 'B' is not mapped"]),
        ("bad_unknown_input", ["step[0]", "input_map names 'Z'"]),
        ("bad_no_output", ["ensemble output 'OUT'", "not written"]),
        ("bad_twice", ["step[1]", "'OUT'", "step[0] already writes"]),
        ("bad_cycle", ["cycle", "step[0]", "step[1]"]),
        ("bad_dtype", ["step[0]", "input 'X' expects FP32", "'IN'", "INT32"]),
        ("bad_shape", ["step[0]", "input 'X' expects shape [-1, 4]", "[-1, 3]"]),
        ("bad_missing_model", ["step[0]", "no_such_model"]),
        ("bad_version", ["step[0].model_version", "no version 7"]),
        ("bad_dangling", ["'NOWHERE'", "step[0]", "neither an ensemble input"]),
    ],
)
def test_invalid_ensembles_are_refused_at_load_naming_step_and_tensor(ens_server, model, expected):
    row = index_row(ens_server, model)
    assert row["state"] == "UNAVAILABLE"
    for fragment in expected:
        assert fragment in row["reason"], (fragment, row["reason"])


def test_statistics_per_ensemble_and_per_composing_model(grpc):
    protocol = Protocol("grpc", grpc, grpcclient)
    before = {m: _count(grpc, m, "inference_count") for m in ("ens_diamond", "sum", "scale2")}
    infer(protocol, "ens_diamond")
    after = {m: _count(grpc, m, "inference_count") for m in ("ens_diamond", "sum", "scale2")}
    assert all(after[m] == before[m] + 1 for m in after), (before, after)


def test_metrics_count_the_ensemble_and_its_steps(ens_server, grpc):
    infer(Protocol("grpc", grpc, grpcclient), "ens_chain")
    text = requests.get(f"http://127.0.0.1:{ens_server.metrics_port}/metrics", timeout=10).text

    def success(model: str) -> float:
        prefix = f'nv_inference_request_success{{model="{model}",version="1"}} '
        line = next(line for line in text.splitlines() if line.startswith(prefix))
        return float(line.split()[-1])

    assert success("ens_chain") >= 1
    assert success("plus1") >= 1 and success("scale2") >= 1
