"""The worker channel carries every tensor kind exactly (raw bytes + a JSON header, no pickle of
request data), reports load and execute errors, and the worker exits on close."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import psutil
import pytest
from helpers import poll

from convoy.config import ModelConfig, ModelVersionSource
from convoy.errors import InferenceFailed, InvalidInput, ModelLoadFailed
from convoy.runtimes.isolated import IsolatedRuntime

ECHO = """
import numpy as np
from convoy.errors import InvalidInput


class Model:
    def execute(self, inputs):
        if "RAISE" in inputs:
            raise InvalidInput("input 'RAISE': expected nothing, got a tensor")
        if "BOOM" in inputs:
            raise KeyError("boom")
        out = dict(inputs)
        out["SLICED"] = np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2]  # not contiguous
        return out
"""


def _runtime(tmp_path, source_code: str) -> IsolatedRuntime:
    folder = tmp_path / "echo" / "1"
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(source_code)
    config = ModelConfig(name="echo", backend="python")
    return IsolatedRuntime("python", ModelVersionSource(config, 1, folder), 0)


@pytest.fixture
def runtime(tmp_path):
    runtime = _runtime(tmp_path, ECHO)
    runtime.load()
    yield runtime
    runtime.close()


def test_every_tensor_kind_round_trips_bit_for_bit(runtime):
    inputs = {
        "FP32": np.array([[1.5, -0.0, np.inf], [np.nan, 3.0, -2.0]], dtype=np.float32),
        "BOOL": np.array([True, False, True]),
        "UINT64": np.array([0, 2**64 - 1], dtype=np.uint64),
        "FP16": np.array([65504.0, -1.0], dtype=np.float16),
        "BF16": np.array([1.0, -2.5], dtype=ml_dtypes.bfloat16),
        "BYTES": np.array([[b"", b"abc"], [b"\x00\xff", "gr\u00fc\u00df".encode()]], dtype=object),
        "EMPTY": np.zeros((0, 4), dtype=np.int32),
    }
    outputs = runtime.infer(inputs)
    for name, sent in inputs.items():
        got = outputs[name]
        assert got.shape == sent.shape and got.dtype == sent.dtype, name
        if sent.dtype.kind == "O":
            assert list(got.reshape(-1)) == list(sent.reshape(-1))
        else:
            assert got.tobytes() == sent.tobytes(), name
    np.testing.assert_array_equal(outputs["SLICED"], [[0, 2], [4, 6], [8, 10]])


def test_convoy_errors_keep_their_class_and_others_name_their_type(runtime):
    with pytest.raises(InvalidInput, match="input 'RAISE': expected nothing"):
        runtime.infer({"RAISE": np.zeros(1)})
    with pytest.raises(InferenceFailed, match="failed to execute the batch: KeyError: 'boom'"):
        runtime.infer({"BOOM": np.zeros(1)})
    assert runtime.infer({"X": np.ones(2)})["X"].tolist() == [1.0, 1.0]  # still serving


def test_load_failure_is_reported_and_the_worker_exits(tmp_path):
    runtime = _runtime(tmp_path, "raise ImportError('no such thing')\n")
    with pytest.raises(
        ModelLoadFailed,
        match=r"model.py: import failed at line 1 in <module>\(\): ImportError: no such thing",
    ):
        runtime.load()
    assert runtime.pid is None  # reaped


def test_close_ends_the_worker(tmp_path):
    runtime = _runtime(tmp_path, ECHO)
    runtime.load()
    worker = psutil.Process(runtime.pid)
    runtime.close()
    poll(lambda: not worker.is_running(), "the worker to exit on close")


def test_worker_that_died_idle_is_restarted_before_the_next_batch(runtime):
    first = runtime.pid
    runtime.kill()
    # Dead and waitable (not reaped: WNOWAIT); a zombie leader whose threads still exit is not.
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    poll(lambda: os.waitid(os.P_PID, first, flags) is not None, "the worker to die")
    assert runtime.infer({"X": np.ones(2)})["X"].tolist() == [1.0, 1.0]
    assert runtime.pid != first
