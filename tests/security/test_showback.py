"""Showback end to end: two keys whose requests share batches are charged the batches' compute
time in proportion to their rows, on /metrics and in the usage ledger `convoy usage` reads."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests
from helpers import ConvoyProcess, metric_value, poll
from security_helpers import bearer, create_key

ROUNDS = 6
#: Each round, a `blocker` request holds the model (0.3 s) while one 1-row request of `small` and
#: one 3-row request of `large` queue behind it; the freed instance takes both in one batch.
#: Latency-first dispatch: the blocker goes alone at once (Triton's rule would hold it for the
#: delay, and the pair would join it).
SHARED_CONFIG = """
name: "shared"
backend: "python"
max_batch_size: 4
input [ { name: "IN", data_type: TYPE_INT64, dims: [ 2 ] } ]
output [ { name: "OUT", data_type: TYPE_INT64, dims: [ 2 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000000 }
parameters { key: "batch_dispatch" value { string_value: "latency_first" } }
"""
SHARED_MODEL = """
import time


class Model:
    def execute(self, inputs):
        time.sleep(0.3 if (inputs["IN"] < 0).any() else 0.02)  # the blocker, or compute to share
        return {"OUT": inputs["IN"] + 1}
"""


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("showback")
    model = root / "models" / "shared"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(SHARED_CONFIG)
    (model / "1" / "model.py").write_text(SHARED_MODEL)
    keys_file = root / "keys.json"
    keys = {name: create_key(keys_file, name, "*") for name in ("small", "large", "blocker")}
    ledger = root / "usage.jsonl"
    process = ConvoyProcess(
        root / "models",
        root / "server.log",
        extra_args=("--api-keys", str(keys_file), "--usage-ledger", str(ledger)),
        frontend=frontend,
    )
    process.start("ready")
    try:
        yield process, keys, ledger
    finally:
        process.kill()


def infer(server, key: str, rows: int, tag: int) -> None:
    data = np.arange(abs(tag) * 100, abs(tag) * 100 + 2 * rows).reshape(rows, 2)
    if tag < 0:
        data = -data - 1  # negative inputs: the model holds this batch
    body = {"inputs": [{"name": "IN", "datatype": "INT64", "shape": [rows, 2], "data": data.tolist()}]}
    answer = requests.post(
        f"{server.base_url}/v2/models/shared/infer", json=body, headers=bearer(key), timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == (data + 1).ravel().tolist()


def test_keys_sharing_batches_split_compute_by_rows(shared_server):
    server, keys, ledger = shared_server
    for round_ in range(ROUNDS):
        blocker = threading.Thread(target=infer, args=(server, keys["blocker"], 1, -1 - round_))
        blocker.start()
        poll(
            lambda: (
                metric_value(
                    server, "nv_inference_pending_request_count", bearer(keys["small"]), model="shared"
                )
                >= 1
            ),
            "the blocker to hold the model",
        )
        pair = [
            threading.Thread(target=infer, args=(server, keys["small"], 1, 2 * round_)),
            threading.Thread(target=infer, args=(server, keys["large"], 3, 2 * round_ + 1)),
        ]
        for thread in pair:
            thread.start()
        for thread in (blocker, *pair):
            thread.join(timeout=60)
    stats = requests.get(
        f"{server.base_url}/v2/models/shared/stats", headers=bearer(keys["small"]), timeout=5
    ).json()
    # One batch per blocker and one per pair: every pair shared a batch.
    assert stats["model_stats"][0]["execution_count"] == 2 * ROUNDS

    def usage(name: str, key: str) -> float:
        scrape = bearer(keys["small"])  # with keys, /metrics needs one
        return metric_value(server, f"convoy_usage_{name}_total", scrape, key=key, model="shared")

    assert (usage("requests", "small"), usage("rows", "small")) == (ROUNDS, ROUNDS)
    assert (usage("requests", "large"), usage("rows", "large")) == (ROUNDS, 3 * ROUNDS)
    small, large = usage("compute_seconds", "small"), usage("compute_seconds", "large")
    assert small >= ROUNDS * 0.02 / 4
    assert large == pytest.approx(3 * small, abs=1e-6)

    assert server.stop() == 0  # the ledger's last interval is written on the way out
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    by_key = {key: [e for e in lines if e["key"] == key] for key in ("small", "large")}
    assert sum(e["rows"] for e in by_key["large"]) == 3 * ROUNDS
    assert sum(e["compute_seconds"] for e in by_key["large"]) == pytest.approx(large, abs=1e-6)
    summary = subprocess.run(
        [sys.executable, "-m", "convoy", "usage", str(ledger), "--json", "--period", "all",
         "--cost-per-compute-second", "10"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = {r["key"]: r for r in json.loads(summary.stdout)}
    assert rows["small"]["requests"] == ROUNDS
    assert rows["large"]["cost"] == pytest.approx(10 * large, abs=1e-5)
