"""How to batch: merge requests' inputs into one batch and split the batch's outputs back.

Kept apart from the scheduler (when to batch) so a runtime-specific merger (padding ragged
inputs, pinned staging buffers) can replace it without touching the scheduling logic.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from convoy.errors import InferenceFailed
from convoy.types import Request


def batch_key(request: Request) -> Hashable:
    """Requests may share a batch when every input has the same per-row shape and dtype."""
    return tuple((name, array.shape[1:], array.dtype.str) for name, array in request.inputs.items())


def merge(requests: list[Request]) -> dict[str, np.ndarray]:
    """The batch's inputs. A lone request's arrays pass through untouched (no copy)."""
    if len(requests) == 1:
        return requests[0].inputs
    first = requests[0].inputs
    # The one copy on the way in: each request's wire-backed views into one batch buffer.
    return {name: np.concatenate([r.inputs[name] for r in requests]) for name in first}


def split(
    outputs: dict[str, np.ndarray], requests: list[Request], batched: bool, model: str
) -> list[dict[str, np.ndarray]]:
    """Each request's rows of every output, as views of the batch's outputs."""
    if len(requests) == 1 and not batched:
        return [outputs]
    total = sum(r.rows for r in requests)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            shape = list(array.shape)
            raise InferenceFailed(
                f"model '{model}' returned output '{name}' with shape {shape} for a batch "
                f"of {total} rows; expected first dimension {total}"
            )
    if len(requests) == 1:
        return [outputs]
    parts: list[dict[str, np.ndarray]] = []
    start = 0
    for request in requests:
        end = start + request.rows
        parts.append({name: array[start:end] for name, array in outputs.items()})
        start = end
    return parts
