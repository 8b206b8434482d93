"""What Convoy does not run of Triton's python backend is refused at load with a reason naming
the field: decoupled on a backend that answers once per request, decoupled with Convoy's own
`Model`, conda-pack execution environments; a decoupled model whose warm-up fails."""

from __future__ import annotations

import shutil

import pytest
import requests
from helpers import ConvoyProcess, serve_until_stopped
from python_backend_models import MODELS

NATIVE = """
class Model:
    def execute(self, inputs):
        return {"Y": inputs["X"]}
"""
TRITON = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", r.inputs()[0].as_numpy())])
            for r in requests
        ]
"""


def model(repository, name: str, backend: str, extra: str, code: str | None) -> None:
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: 4\n'
        'input [ { name: "X", data_type: TYPE_FP32, dims: [ 2 ] } ]\n'
        'output [ { name: "Y", data_type: TYPE_FP32, dims: [ 2 ] } ]\n' + extra
    )
    if code is not None:
        (folder / "1" / "model.py").write_text(code)


@pytest.fixture(scope="module")
def refusing(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("python_backend_refusals")
    repository = root / "models"
    decoupled = "model_transaction_policy { decoupled: true }\n"
    model(repository, "decoupled_onnx", "onnxruntime", decoupled, None)
    model(repository, "decoupled_native", "python", decoupled, NATIVE)
    conda = (
        'parameters { key: "EXECUTION_ENV_PATH" '
        'value { string_value: "$$TRITON_MODEL_DIRECTORY/env.tar.gz" } }\n'
    )
    model(repository, "conda_env", "python", conda, TRITON)
    model(repository, "fine", "python", "", TRITON)
    not_ready = TRITON + "\n    def is_ready(self):\n        return False\n"
    model(repository, "not_ready", "python", "", not_ready)
    # A decoupled model's warm-up runs too: tp_words answers an empty text with an error.
    words = MODELS / "tp_words"
    shutil.copytree(words, repository / "warmup_fails")
    config = (words / "config.pbtxt").read_text().replace('name: "tp_words"', 'name: "warmup_fails"')
    (repository / "warmup_fails" / "config.pbtxt").write_text(config.replace("random_data", "zero_data"))
    process = ConvoyProcess(repository, root / "server.log", frontend=frontend)
    yield from serve_until_stopped(process, "live")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (
            "decoupled_onnx",
            "model_transaction_policy.decoupled: the onnxruntime backend returns one response "
            "per request",
        ),
        ("decoupled_native", "model_transaction_policy.decoupled needs a TritonPythonModel"),
        ("warmup_fails", "answered its warm-up with: text_input is empty"),
        ("not_ready", "is_ready() returned False after initialize"),
        (
            "conda_env",
            "parameters.EXECUTION_ENV_PATH: conda-pack execution environments are not supported",
        ),
    ],
)
def test_unsupported_feature_is_refused_with_a_reason_naming_the_field(refusing, name, reason):
    rows = requests.post(f"{refusing.base_url}/v2/repository/index", json={}, timeout=30).json()
    row = next(r for r in rows if r["name"] == name)
    assert row["state"] == "UNAVAILABLE"
    assert reason in row["reason"]
    fine = next(r for r in rows if r["name"] == "fine")
    assert fine["state"] == "READY"


def test_finalize_runs_when_the_server_stops(tmp_path):
    repository = tmp_path / "models"
    for name in ("tp_add_sub", "tp_bls_lifecycle"):
        shutil.copytree(MODELS / name, repository / name)
    process = ConvoyProcess(repository, tmp_path / "server.log")
    process.start("ready")
    assert process.stop() == 0
    assert "tp_add_sub finalized" in process.log()
    # BLS from finalize() is refused as Triton refuses it.
    text = "tp_bls_lifecycle finalize BLS: BLS is only supported during the 'execute' function."
    assert text in process.log()
