"""The peers serve Convoy's exact model: bench/peers/mlp.py on the mlp workload's weights.npz
computes, bit for bit, what Convoy's python backend computes for the same rows."""

from __future__ import annotations

import numpy as np
import pytest
from peers.mlp import forward, load_layers
from workloads import build_mlp, load_runtime, mlp_weights_path


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repository = tmp_path_factory.mktemp("peer-models") / "models"
    build_mlp(repository)
    return repository


@pytest.mark.parametrize("rows", [1, 7, 256])
def test_peer_forward_equals_convoy_runtime_output_bit_for_bit(repository, rows):
    runtime = load_runtime(repository, "mlp")
    batch = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
    expected = runtime.infer({"INPUT0": batch.copy()})["OUTPUT0"]
    got = forward(load_layers(mlp_weights_path(repository)), batch.copy())
    assert got.dtype == np.float32
    assert got.shape == (rows, 16)
    assert got.tobytes() == expected.tobytes()


def test_peer_forward_applies_relu_between_layers(repository):
    """A zero-bias check that the hidden ReLUs are there: a purely linear net is odd, f(-x) = -f(x)."""
    layers = load_layers(mlp_weights_path(repository))
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    assert not np.allclose(forward(layers, -x), -forward(layers, x))
