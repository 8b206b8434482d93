"""text_pooling: the last step of the text_embedding pipeline (python backend).

The encoder's token states, mean-pooled over the real tokens (attention mask) and L2-normalised:
what sentence-transformers does after the encoder.
"""

from __future__ import annotations

import numpy as np


class Model:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hidden = inputs["HIDDEN"].astype(np.float32, copy=False)
        mask = inputs["ATTENTION_MASK"].astype(np.float32)[..., None]
        mean = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norm = np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        return {"EMBEDDING": (mean / norm).astype(np.float32)}
