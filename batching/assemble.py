"""How to batch: merge requests' inputs into one batch and split the batch's outputs back.

Kept apart from the scheduler (when to batch): a model's `Collation` decides which requests may
share a batch, what each costs against the batch's budget, how their inputs are merged and how
the batch's outputs go back. `collation_for(config)` picks it from the model's config; the
dense one below serves every model whose requests share a batch only when their per-row
shapes are equal.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

from convoy.config import ModelConfig
from convoy.errors import ConvoyError, InferenceFailed
from convoy.outputs import declared_types, missing, select_names
from convoy.types import Request

from .queue import BatchBudget

#: A runtime's `batch_buffers(rows, like)`: the buffers to assemble a batch into, or None.
BatchBuffers = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray] | None]


def batch_key(request: Request) -> Hashable:
    """Requests may share a batch when every input has the same per-row shape and dtype (the
    dtype object itself: equal dtypes compare and hash alike, and `.str` builds a string)."""
    return tuple([(name, array.shape[1:], array.dtype) for name, array in request.inputs.items()])


def merge(requests: list[Request], buffers: BatchBuffers | None = None) -> dict[str, np.ndarray]:
    """The batch's inputs. A lone request's arrays pass through untouched (no copy) unless the
    runtime has buffers of its own (`buffers(rows, like)`, e.g. pinned memory), which every
    batch is assembled into."""
    first = requests[0].inputs
    if buffers is not None:
        rows = 0
        for request in requests:
            rows += request.rows
        into = buffers(rows, first)
        if into is not None:
            # The one copy on the way in: each request's wire-backed views straight into the
            # runtime's buffer.
            for name, target in into.items():
                if len(requests) == 1:
                    np.copyto(target, first[name])
                else:
                    np.concatenate([r.inputs[name] for r in requests], out=target)
            return into
    if len(requests) == 1:
        return first
    # The one copy on the way in: each request's wire-backed views into one batch buffer.
    return {name: np.concatenate([r.inputs[name] for r in requests]) for name in first}


def split(
    outputs: dict[str, np.ndarray], requests: list[Request], batched: bool, config: ModelConfig
) -> list[dict[str, np.ndarray] | ConvoyError]:
    """Each request's outputs, as views of the batch's outputs: the ones it asked for (every
    declared output the model produced when it asked for none), in the datatype the config
    declares. A request whose output is missing gets an error in its place."""
    model = config.name
    outputs = declared_types(outputs, config)
    default = tuple(s.name for s in config.outputs if s.name in outputs) or tuple(outputs)
    if len(requests) == 1 and not batched:
        return [select_names(outputs, requests[0].requested_outputs or default, model)]
    total = sum(r.rows for r in requests)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            shape = list(array.shape)
            raise InferenceFailed(
                f"model '{model}' returned output '{name}' with shape {shape} for a batch "
                f"of {total} rows; expected first dimension {total}"
            )
    if len(requests) == 1:
        return [select_names(outputs, requests[0].requested_outputs or default, model)]
    parts: list[dict[str, np.ndarray] | ConvoyError] = []
    start = 0
    for request in requests:
        end = start + request.rows
        names = request.requested_outputs or default
        absent = missing(outputs, names, model)
        parts.append(absent or {name: outputs[name][start:end] for name in names})
        start = end
    return parts


class Collation:
    """How one model's requests become a batch and its outputs go back: dense rows.

    Subclasses (ragged, padded) override what differs. `key` and `merge` run per batch: `key`
    on the loop while the batch is formed, `merge` and `split` wherever the scheduler runs them
    (merge on the instance's thread, split on the loop)."""

    #: What a batch may cost beyond its rows, and which unequal requests fill it (the queue's
    #: `BatchBudget`); None: rows only, equal keys only.
    budget: BatchBudget | None = None

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def admit(self, request: Request) -> None:
        """Raise InvalidInput for a request this collation cannot batch (checked at submit)."""

    def key(self, request: Request) -> Hashable:
        """Requests with equal keys may share a batch."""
        return batch_key(request)

    def merge(
        self, requests: list[Request], buffers: BatchBuffers | None = None
    ) -> dict[str, np.ndarray]:
        return merge(requests, buffers)

    def split(
        self, outputs: dict[str, np.ndarray], requests: list[Request], batched: bool
    ) -> list[dict[str, np.ndarray] | ConvoyError]:
        return split(outputs, requests, batched, self.config)

    def batch_tokens(self, requests: list[Request]) -> tuple[int, int] | None:
        """(the requests' own tokens, pad tokens) of an executed batch, for the batch-token
        histograms; None for dense batches (their size is their rows)."""
        return None


def collation_for(config: ModelConfig) -> Collation:
    """The collation a model's config asks for."""
    if config.ragged:
        from .ragged import RaggedCollation  # imports this module

        return RaggedCollation(config)
    if config.padding is not None:
        from .padding import PaddedCollation  # here: batching/padding.py imports this module

        return PaddedCollation(config)
    return Collation(config)
