"""`convoy check REPOSITORY`: the CI gate, run as a user runs it (a subprocess, no ports)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest
from helpers import REPO_ROOT, copy_model, write_identity_model

from convoy.cli import demo_repository
from convoy.engine.check import gpu_present

FAILS_WARMUP = """
class Model:
    def execute(self, inputs):
        raise ValueError("cannot handle zeros")
"""

WRONG_OUTPUTS = """
import numpy as np


class Model:
    def execute(self, inputs):
        rows = inputs["INPUT0"].shape[0]
        return {"OUTPUT0": np.zeros((rows, 3), dtype=np.int64)}
"""

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 4
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
{extra}
"""

WARMUP = """model_warmup [ { name: "zeros" batch_size: 2
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32, dims: [ 4 ], zero_data: true } } } ]"""


def _model(repository, name: str, source: str, extra: str = "") -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(CONFIG.format(name=name, extra=extra))
    (repository / name / "1" / "model.py").write_text(source)


def _check(repository, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convoy", "check", str(repository), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )


def test_a_good_repository_passes_with_a_table_and_a_junit_report(tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    write_identity_model(repository, "identity_int32", "INT32")
    write_identity_model(repository, "identity_bytes", "BYTES")
    junit = tmp_path / "check.xml"
    done = _check(repository, "--junit", str(junit))
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("add_sub", "identity_int32", "identity_bytes"):
        assert name in done.stdout
    assert "3 of 3 passed" in done.stdout
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "0"


def test_a_broken_repository_fails_naming_each_reason(tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    copy_model(repository, "bad_config")
    _model(repository, "fails_warmup", FAILS_WARMUP, WARMUP)
    _model(repository, "wrong_outputs", WRONG_OUTPUTS)
    junit = tmp_path / "check.xml"
    done = _check(repository, "--json", "--junit", str(junit))
    assert done.returncode == 1, done.stdout + done.stderr
    rows = {row["model"]: row for row in json.loads(done.stdout)}
    assert rows["add_sub"]["result"] == "PASS"
    assert rows["add_sub"]["version"] == "1" and rows["add_sub"]["backend"] == "python"
    assert rows["bad_config"]["result"] == "FAIL"
    assert "input[0].dims" in rows["bad_config"]["reason"]
    assert rows["fails_warmup"]["result"] == "FAIL"
    assert "warm-up" in rows["fails_warmup"]["reason"]
    assert "cannot handle zeros" in rows["fails_warmup"]["reason"]
    assert rows["wrong_outputs"]["result"] == "FAIL"
    assert "output 'OUTPUT0'" in rows["wrong_outputs"]["reason"]
    assert "FP32" in rows["wrong_outputs"]["reason"]
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("failures") == "3"


def test_output_shape_mismatch_is_reported(tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    source = WRONG_OUTPUTS.replace("np.int64", "np.float32")
    _model(repository, "wrong_shape", source)
    done = _check(repository, "--json")
    assert done.returncode == 1
    (row,) = json.loads(done.stdout)
    assert "declared shape [1, 4]" in row["reason"] and "produced [1, 3]" in row["reason"]


@pytest.mark.skipif(gpu_present(), reason="this machine has a GPU")
def test_gpu_models_are_checked_for_config_only_without_a_gpu(tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    _model(repository, "on_gpu", FAILS_WARMUP, "instance_group [ { kind: KIND_GPU } ]")
    done = _check(repository, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads(done.stdout)
    assert row["result"] == "CONFIG ONLY"
    assert "no GPU" in row["reason"]


RAGGED_CONFIG = """
name: "ragged"
backend: "python"
max_batch_size: 4
input [ { name: "RAGGED", data_type: TYPE_FP32, dims: [ -1 ], allow_ragged_batch: true } ]
output [ { name: "SUMS", data_type: TYPE_FP32, dims: [ 1 ] } ]
batch_input [ { kind: BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO, target_name: "OFFSETS",
                data_type: TYPE_INT32, source_input: "RAGGED" } ]
dynamic_batching { }
"""

RAGGED_MODEL = """
import numpy as np


class Model:
    def execute(self, inputs):
        values, offsets = inputs["RAGGED"], inputs["OFFSETS"]
        assert values.ndim == 1, values.shape  # a ragged batch: flat, with its offsets
        sums = [values[a:b].sum() for a, b in zip(offsets[:-1], offsets[1:])]
        return {"SUMS": np.asarray(sums, np.float32)[:, None]}
"""

PADDED_CONFIG = """
name: "padded"
backend: "python"
max_batch_size: 4
input [ { name: "IDS", data_type: TYPE_INT64, dims: [ -1 ] } ]
output [ { name: "REAL", data_type: TYPE_INT64, dims: [ 1 ] } ]
dynamic_batching { }
parameters { key: "padding_inputs" value: { string_value: "IDS" } }
parameters { key: "padding_buckets" value: { string_value: "8,16" } }
parameters { key: "padding_lengths_input" value: { string_value: "LENGTHS:INT32" } }
"""

PADDED_MODEL = """
import numpy as np


class Model:
    def execute(self, inputs):
        lengths = inputs["LENGTHS"]  # fed by the batcher, never by a client
        assert lengths.shape == (inputs["IDS"].shape[0],), lengths.shape
        return {"REAL": lengths.astype(np.int64)[:, None]}
"""


def test_ragged_and_padded_models_are_checked_with_the_batch_the_batcher_makes(tmp_path):
    """The sample inference gets what the batcher would hand the model: a ragged batch with its
    batch inputs, a padded batch with its lengths input."""
    repository = tmp_path / "models"
    for name, config, source in (
        ("ragged", RAGGED_CONFIG, RAGGED_MODEL),
        ("padded", PADDED_CONFIG, PADDED_MODEL),
    ):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(config)
        (repository / name / "1" / "model.py").write_text(source)
    done = _check(repository)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 passed" in done.stdout
