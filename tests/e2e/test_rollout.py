"""--model-control-mode poll and roll-out without failures: under closed-loop gRPC and HTTP
traffic a new version is added and the old one removed; no request fails and every answer comes
from one of the two versions. Added and removed models are picked up too."""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess, poll, serve_until_stopped, write_identity_model
from tritonclient.utils import InferenceServerException

CONFIG = """
name: "rolling"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 500 }
model_warmup [ { name: "w" batch_size: 2
  inputs { key: "INPUT0" value: { data_type: TYPE_INT32, dims: [ 1 ], zero_data: true } } } ]
"""

VERSION = """
import numpy as np


class Model:
    def execute(self, inputs):
        return {{"OUTPUT0": inputs["INPUT0"] + {add}}}
"""


def _add_version(model_dir, number: int) -> None:
    """Write the version beside the model, then move it in whole (as a deploy job would)."""
    staging = model_dir.parent / f".staging-{number}"
    staging.mkdir()
    (staging / "model.py").write_text(VERSION.format(add=number * 100))
    os.rename(staging, model_dir / str(number))


@pytest.fixture(params=["1", "2"], ids=["one-process", "two-workers"])
def polled(request, tmp_path, frontend):
    repository = tmp_path / "models"
    model_dir = repository / "rolling"
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(CONFIG)
    _add_version(model_dir, 1)
    process = ConvoyProcess(
        repository,
        tmp_path / "server.log",
        ("--model-control-mode", "poll", "--repository-poll-secs", "0.2", "--workers", request.param),
        frontend=frontend,
    )
    yield from serve_until_stopped(process)


class ClosedLoop:
    """Clients that each send the next request as soon as the last one is answered."""

    def __init__(self, server: ConvoyProcess) -> None:
        self.server = server
        self.stop = threading.Event()
        self.answers: list[tuple[str, int, int]] = []  # (version, input, output)
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(wire, index), daemon=True)
            for wire in ("grpc", "http")
            for index in range(2)
        ]

    def _run(self, wire: str, index: int) -> None:
        if wire == "grpc":
            module, client = grpcclient, grpcclient.InferenceServerClient(self.server.grpc_url)
        else:
            module, client = httpclient, httpclient.InferenceServerClient(self.server.http_url)
        value = index * 1000
        try:
            while not self.stop.is_set():
                value += 1
                tensor = module.InferInput("INPUT0", [1, 1], "INT32")
                tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
                try:
                    result = client.infer("rolling", [tensor])
                except InferenceServerException as exc:
                    self.errors.append(f"{wire}: {exc}")
                    continue
                response = result.get_response()
                version = response.model_version if wire == "grpc" else response["model_version"]
                self.answers.append((version, value, int(result.as_numpy("OUTPUT0")[0, 0])))
        finally:
            client.close()

    def __enter__(self) -> ClosedLoop:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def count(self, version: str) -> int:
        return sum(1 for answer in self.answers if answer[0] == version)


def test_new_version_rolls_out_under_load_without_a_failed_request(polled):
    model_dir = polled.repository / "rolling"
    with ClosedLoop(polled) as load:
        poll(lambda: load.count("1") >= 50, "answers from version 1")
        _add_version(model_dir, 2)
        poll(lambda: load.count("2") >= 50, "answers from version 2", timeout=60)
        shutil.rmtree(model_dir / "1")
        poll(
            lambda: polled.log().count("repository poll: model 'rolling' changed") >= 2,
            "the poll to see version 1 removed",
            timeout=60,
        )
        settled = load.count("2")
        poll(lambda: load.count("2") >= settled + 50, "answers after the removal")
    assert load.errors == []
    for version, value, output in load.answers:
        assert version in ("1", "2")
        assert output == value + int(version) * 100, (version, value, output)
    # Once version 2 answered, version 1 never did again.
    first_v2 = next(i for i, a in enumerate(load.answers) if a[0] == "2")
    late_v1 = [a for a in load.answers[first_v2 + 8 :] if a[0] == "1"]
    assert late_v1 == []
    rows = httpclient.InferenceServerClient(polled.http_url).get_model_repository_index()
    assert [(r["version"], r["state"]) for r in rows if r["name"] == "rolling"] == [("2", "READY")]


def test_a_broken_new_version_leaves_the_old_serving_under_load(polled):
    model_dir = polled.repository / "rolling"
    with ClosedLoop(polled) as load:
        poll(lambda: load.count("1") >= 20, "answers from version 1")
        staging = model_dir.parent / ".staging-broken"
        staging.mkdir()
        (staging / "model.py").write_text("raise RuntimeError('version 3 is broken')\n")
        os.rename(staging, model_dir / "3")
        poll(lambda: "version 3 is broken" in polled.log(), "the failed roll-out in the log", 60)
        settled = load.count("1")
        poll(lambda: load.count("1") >= settled + 20, "version 1 still answering")
    assert load.errors == []
    assert {a[0] for a in load.answers} == {"1"}
    rows = httpclient.InferenceServerClient(polled.http_url).get_model_repository_index()
    states = {r["version"]: (r["state"], r["reason"]) for r in rows if r["name"] == "rolling"}
    assert states["1"][0] == "READY"
    assert states["3"][0] == "UNAVAILABLE" and "version 3 is broken" in states["3"][1]


def test_poll_mode_loads_added_models_and_unloads_removed_ones(polled):
    client = httpclient.InferenceServerClient(polled.http_url)
    staging = polled.repository.parent / "staging"
    write_identity_model(staging, "arrived", "INT32")
    os.rename(staging / "arrived", polled.repository / "arrived")
    poll(lambda: client.is_model_ready("arrived"), "the added model to be ready", timeout=60)
    config = polled.repository / "arrived" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 4"))
    poll(
        lambda: client.get_model_config("arrived")["max_batch_size"] == 4,
        "the changed config to be loaded",
        timeout=60,
    )
    shutil.rmtree(polled.repository / "arrived")

    def gone() -> bool:
        return not any(r["name"] == "arrived" for r in client.get_model_repository_index())

    poll(gone, "the removed model to leave the index", timeout=60)
    # Through --workers the front ends hear of a change the poll made within a moment.
    poll(lambda: not client.is_model_ready("arrived"), "the removed model to be unready")
    client.close()
