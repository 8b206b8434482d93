"""The benchmark MLP as a plain function, numpy only, so every peer runs Convoy's exact math.

Mirrors the `mlp` workload's model.py (bench/workloads.py): x @ w + b per layer, ReLU in place
after the first two. Loaded from the same weights.npz the Convoy repository holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

Layers = list[tuple[np.ndarray, np.ndarray]]

INPUT = "INPUT0"
OUTPUT = "OUTPUT0"
IN_FEATURES = 64
OUT_FEATURES = 16


def load_layers(weights: Path | str) -> Layers:
    arrays = np.load(weights)
    return [(arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(3)]


def forward(layers: Layers, x: np.ndarray) -> np.ndarray:
    """[batch, 64] float32 rows in, [batch, 16] float32 out."""
    for index, (w, b) in enumerate(layers):
        x = x @ w + b
        if index < 2:
            np.maximum(x, 0, out=x)
    return x
