"""Shared by the roll-out suites: a model whose versions differ in known ways, closed-loop
clients over both protocols that record which version and arm answered each request, and the
admin API's calls.

Versions of every roll-out model (OUTPUT0 for INPUT0 = x):
  1 stable x + 1 | 2 the same as 1 | 3 x + 2 (different outputs) | 4 x + 1 after 40 ms (slower)
  5 OUTPUT0 twice as wide (a different output signature) | 6 x + 1, and fails on rows whose first
  value is negative | 7 the same as 1 (a later good version).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess, poll
from tritonclient.utils import InferenceServerException

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
version_policy {{ {policy} }}
"""

VERSIONS = {
    1: "OUTPUT0 = x + 1",
    2: "OUTPUT0 = x + 1",
    3: "OUTPUT0 = x + 2",
    4: "time.sleep(0.04)\n        OUTPUT0 = x + 1",
    5: "OUTPUT0 = np.concatenate([x, x], axis=1) + 1",
    6: "OUTPUT0 = x + 1\n        if (x[:, 0] < 0).any():\n            raise ValueError('negative row')",
    7: "OUTPUT0 = x + 1",
}

MODEL = """
import time

import numpy as np


class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        {body}
        return {{"OUTPUT0": OUTPUT0}}
"""

#: What each version adds to the input (the versions whose outputs match stable's add 1).
ADDS = {1: 1, 2: 1, 3: 2, 4: 1, 6: 1, 7: 1}


def write_version(model_dir: Path, number: int, body: str | None = None) -> None:
    """Write version `number` beside the model, then move it in whole (as a deploy job does)."""
    staging = model_dir.parent / f".staging-{model_dir.name}-{number}"
    staging.mkdir()
    (staging / "model.py").write_text(MODEL.format(body=body or VERSIONS[number]))
    os.rename(staging, model_dir / str(number))


def write_model(
    repository: Path,
    name: str,
    versions=(1, 2, 3, 4, 5, 6),
    policy: str = "specific { versions: [ 1 ] }",
) -> Path:
    model_dir = repository / name
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(CONFIG.format(name=name, policy=policy))
    for number in versions:
        write_version(model_dir, number)
    return model_dir


def admin(server: ConvoyProcess, method: str, path: str, body=None, headers=None) -> requests.Response:
    return requests.request(
        method, f"{server.base_url}/v2/rollouts{path}", json=body, headers=headers, timeout=120
    )


def status(server: ConvoyProcess, model: str, headers=None) -> dict:
    answer = admin(server, "GET", f"/{model}", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for_state(
    server: ConvoyProcess, model: str, states: tuple[str, ...], timeout: float = 60.0
) -> dict:
    """The roll-out's status once its state is one of `states`; on timeout the failure shows
    the last status and the server's log."""
    last: dict = {}

    def reached():
        nonlocal last
        answer = admin(server, "GET", f"/{model}")
        last = answer.json()
        return answer.status_code == 200 and last["state"] in states and last

    try:
        return poll(reached, f"the roll-out of {model} to be {' or '.join(states)}", timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{json.dumps(last, indent=1)[:4000]}\n{server.log()}") from None


def start(server: ConvoyProcess, model: str, spec: dict, headers=None) -> dict:
    answer = admin(server, "POST", f"/{model}/start", spec, headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


class ClosedLoop:
    """Clients (gRPC and HTTP, two each) that send the next request as soon as the last is
    answered, each as its own caller (header `x-user`, or an API key when given), checking
    every answer against the version that says it served it."""

    def __init__(
        self,
        server: ConvoyProcess,
        model: str,
        users: int = 4,
        keys: list[str] | None = None,
        header: str = "x-user",
    ) -> None:
        self.server = server
        self.model = model
        self.keys = keys
        self.header = header
        self.stop = threading.Event()
        #: (wire, user, version, arm) per answered request, in order.
        self.answers: list[tuple[str, int, int, str | None]] = []
        self.errors: list[str] = []
        self.wrong: list[str] = []
        self.threads = [
            threading.Thread(
                target=self._run, args=("grpc" if user % 2 == 0 else "http", user), daemon=True
            )
            for user in range(users)
        ]

    def _headers(self, user: int) -> dict:
        if self.keys is not None:
            return {"authorization": f"Bearer {self.keys[user % len(self.keys)]}"}
        return {self.header: f"user-{user}"}

    def _run(self, wire: str, user: int) -> None:
        if wire == "grpc":
            module, client = grpcclient, grpcclient.InferenceServerClient(self.server.grpc_url)
        else:
            module, client = httpclient, httpclient.InferenceServerClient(self.server.http_url)
        headers = self._headers(user)
        value = 0.0
        try:
            while not self.stop.is_set():
                value += 1
                x = np.array([[value, user, 0.5, -value]], dtype=np.float32)
                tensor = module.InferInput("INPUT0", [1, 4], "FP32")
                tensor.set_data_from_numpy(x)
                try:
                    result = client.infer(self.model, [tensor], headers=headers)
                except InferenceServerException as exc:
                    self.errors.append(f"{wire} user {user}: {exc}")
                    continue
                response = result.get_response()
                if wire == "grpc":
                    version = int(response.model_version)
                    arm = response.parameters["convoy_rollout_arm"].string_param or None
                else:
                    version = int(response["model_version"])
                    arm = (response.get("parameters") or {}).get("convoy_rollout_arm")
                output = result.as_numpy("OUTPUT0")
                if not np.array_equal(output, x + ADDS.get(version, 0)):
                    self.wrong.append(f"version {version} answered {output} for {x}")
                self.answers.append((wire, user, version, arm))
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

    def versions(self) -> set[int]:
        return {answer[2] for answer in self.answers}

    def count(self, version: int) -> int:
        return sum(1 for answer in list(self.answers) if answer[2] == version)
