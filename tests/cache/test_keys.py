"""Response cache keys: what changes an answer changes the key, nothing else does."""

from __future__ import annotations

import os

import numpy as np

from convoy.config import ModelConfig
from convoy.engine.cache_key import key_prefix, request_key, revision_digest, row_keys
from convoy.types import DetachedFuture, Request, TensorSpec

CONFIG = ModelConfig(
    name="m",
    backend="python",
    max_batch_size=8,
    inputs=(TensorSpec("A", "FP32", (4,)), TensorSpec("T", "BYTES", (1,))),
    outputs=(TensorSpec("OUT", "FP32", (4,)),),
)


def request(a=None, text=(b"x",), request_id="1", priority=0, timeout_us=0, parameters=None, outputs=()):
    a = np.arange(4, dtype=np.float32)[None] if a is None else a
    t = np.array(list(text), dtype=object).reshape(len(text), 1)
    return Request(
        request_id,
        {"A": a, "T": t},
        outputs,
        a.shape[0],
        DetachedFuture(),
        priority=priority,
        timeout_us=timeout_us,
        parameters=parameters or {},
    )


def key(r: Request, revision="rev", principal=None) -> bytes:
    return request_key(key_prefix("m", 1, revision, r, principal), CONFIG, r)


def test_keys_are_128_bits_and_ignore_id_priority_and_timeout():
    base = key(request())
    assert len(base) == 16
    assert key(request(request_id="other", priority=2, timeout_us=500)) == base
    assert key(request(parameters={"priority": 1, "timeout": 9, "binary_data_output": True})) == base


def test_inputs_outputs_parameters_revision_and_key_change_the_key():
    base = key(request())
    changed = [
        key(request(a=np.arange(4, dtype=np.float32)[None] + 1)),
        key(request(text=(b"y",))),
        key(request(outputs=("OUT",))),
        key(request(parameters={"temperature": 0.5})),
        key(request(), revision="other"),
        key(request(), principal="team-a"),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_bytes_elements_are_length_prefixed():
    assert key(request(text=(b"ab", b"c"), a=np.zeros((2, 4), np.float32))) != key(
        request(text=(b"a", b"bc"), a=np.zeros((2, 4), np.float32))
    )


def test_a_row_has_the_same_key_in_any_request():
    two = request(a=np.arange(8, dtype=np.float32).reshape(2, 4), text=(b"x", b"y"))
    one = request(a=np.arange(4, 8, dtype=np.float32)[None], text=(b"y",))
    prefix = key_prefix("m", 1, "rev", two, None)
    assert (
        row_keys(prefix, CONFIG, two)[1]
        == row_keys(key_prefix("m", 1, "rev", one, None), CONFIG, one)[0]
    )


def test_the_revision_follows_file_contents_not_modification_times(tmp_path):
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text("max_batch_size: 8\n")
    (model / "1" / "model.py").write_text("x = 1\n")
    first = revision_digest(b"config", model, 1)
    os.utime(model / "1" / "model.py", (1, 1))
    assert revision_digest(b"config", model, 1) == first
    (model / "1" / "model.py").write_text("x = 2\n")
    assert revision_digest(b"config", model, 1) != first
    assert revision_digest(b"other config", model, 1) != revision_digest(b"config", model, 1)
