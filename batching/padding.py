"""Padded batching: requests of different lengths share one dense batch.

Each request's padded inputs (convoy/padding.py) are copied into a batch whose variable
dimension is the batch's padded length: the bucket of its longest request, or that length
itself without buckets; the rest is the pad value. The model gets each row's real length as
an extra input, and outputs named in `padding_outputs` are trimmed back to each request's own
length.

Batch formation: requests with the same length bucket (and equal non-padded shapes) share a
batch; the oldest request always leads it. When its bucket leaves the batch short, requests of
up to `fill_buckets` shorter buckets fill it (padded up to the leader's bucket), while the
token budget (`max_batch_tokens`: rows x padded length) holds.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from convoy.config import ModelConfig
from convoy.errors import ConvoyError, InferenceFailed, InvalidInput
from convoy.padding import Padding
from convoy.types import Request

from .assemble import BatchBuffers, Collation, split


class PaddedCollation(Collation):
    """Key = (non-padded shapes and dtypes, padded length); merge pads; split trims."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        padding = config.padding
        assert padding is not None  # collation_for picks this collation for padded models only
        self.padding: Padding = padding
        self._padded = {entry.name: entry for entry in padding.inputs}
        self._first = padding.inputs[0]
        self._lengths_dtype = np.dtype(np.int32 if padding.lengths_datatype == "INT32" else np.int64)
        #: The token budget, read by the queue (`BatchBudget`).
        self.max_cost = padding.max_batch_tokens
        self.budget = self
        #: Tokens of the batches executed: [real ones, padded ones] (their sum is what the model
        #: computed); for the metrics, to choose buckets by.
        self.tokens = [0, 0]

    # --- the request ---------------------------------------------------------------------------
    def length(self, request: Request) -> int:
        """A request's real length (the same along every padded input: `admit` checked)."""
        first = self._first
        length: int = request.inputs[first.name].shape[1 + first.axis]
        return length

    def admit(self, request: Request) -> None:
        """Refuse a request whose padded inputs disagree on its length, or that is longer than
        the longest bucket."""
        length = None
        for entry in self.padding.inputs:
            array = request.inputs.get(entry.name)
            if array is None:
                raise InvalidInput(
                    f"input '{entry.name}' is required: model '{self.config.name}' pads it"
                )
            this = array.shape[1 + entry.axis]
            if length is None:
                length, first = this, entry.name
            elif this != length:
                raise InvalidInput(
                    f"input '{entry.name}': length {this} differs from input '{first}' length "
                    f"{length}; padded inputs of model '{self.config.name}' share one length"
                )
        assert length is not None  # padding.inputs is never empty (__init__ reads its first)
        longest = self.padding.max_length
        if longest and length > longest:
            raise InvalidInput(
                f"input '{first}': length {length} exceeds model '{self.config.name}' longest "
                f"padding bucket {longest} (parameters.padding_buckets)"
            )

    def key(self, request: Request) -> Hashable:
        padded = self._padded
        signature = []
        for name, array in request.inputs.items():
            shape = array.shape[1:]
            entry = padded.get(name)
            if entry is not None:
                shape = shape[: entry.axis] + shape[entry.axis + 1 :]
            signature.append((name, shape, array.dtype.str))
        return tuple(signature), self.padding.bucket_for(self.length(request))

    # --- the queue's budget ----------------------------------------------------------------------
    # Keys are `key`'s (shapes, padded length) pairs; Any: BatchBudget takes any Hashable key.
    def joins(self, lead: Any, key: Any) -> bool:
        """A shorter request of the same shapes fills the leader's batch if its bucket is at
        most `fill_buckets` below the leader's (any shorter length without buckets)."""
        fill = self.padding.fill_buckets
        if not fill or key[0] != lead[0] or key[1] >= lead[1]:
            return False
        buckets = self.padding.buckets
        if not buckets:
            return True
        return buckets.index(lead[1]) - buckets.index(key[1]) <= fill

    def cost(self, lead: Any, request: Request) -> int:
        """Tokens a request adds to the batch: its rows at the leader's padded length."""
        padded_length: int = lead[1]
        return request.rows * padded_length

    # --- merge and split ---------------------------------------------------------------------------
    def merge(
        self, requests: list[Request], buffers: BatchBuffers | None = None
    ) -> dict[str, np.ndarray]:
        lengths = [self.length(request) for request in requests]
        padded_length = self.padding.bucket_for(max(lengths))
        rows = 0
        for request in requests:
            rows += request.rows
        first = requests[0].inputs
        lengths_name = self.padding.lengths_input
        if len(requests) == 1 and lengths[0] == padded_length and buffers is None:
            # Nothing to pad: the request's arrays pass through (no copy).
            merged = dict(first)
            if lengths_name:
                merged[lengths_name] = np.full(rows, lengths[0], self._lengths_dtype)
            return merged
        like = {}
        for name, array in first.items():
            shape = list(array.shape[1:])
            entry = self._padded.get(name)
            if entry is not None:
                shape[entry.axis] = padded_length
            like[name] = np.empty((0, *shape), array.dtype)
        if lengths_name:
            like[lengths_name] = np.empty((0,), self._lengths_dtype)
        into = buffers(rows, like) if buffers is not None else None
        if into is None:
            into = {
                name: np.empty((rows, *array.shape[1:]), array.dtype) for name, array in like.items()
            }
        # The one copy on the way in: each request's wire-backed views into the batch buffer,
        # padded inputs into their leading part, the pad value after it.
        start = 0
        for request, length in zip(requests, lengths, strict=True):
            end = start + request.rows
            for name, target in into.items():
                if name == lengths_name:
                    target[start:end] = length
                    continue
                entry = self._padded.get(name)
                if entry is None:
                    target[start:end] = request.inputs[name]
                    continue
                index = [slice(start, end)] + [slice(None)] * (target.ndim - 1)
                index[1 + entry.axis] = slice(0, length)
                target[tuple(index)] = request.inputs[name]
                if length < padded_length:
                    index[1 + entry.axis] = slice(length, None)
                    target[tuple(index)] = entry.value
            start = end
        return into

    def _count_tokens(self, requests: list[Request]) -> None:
        """Add an executed batch's real and pad tokens (rows x length, rows x pad)."""
        lengths = [self.length(request) for request in requests]
        padded_length = self.padding.bucket_for(max(lengths))
        real = rows = 0
        for request, length in zip(requests, lengths, strict=True):
            real += request.rows * length
            rows += request.rows
        self.tokens[0] += real
        self.tokens[1] += rows * padded_length - real
        self._last = (real, rows * padded_length - real)

    _last = (0, 0)

    def batch_tokens(self, requests: list[Request]) -> tuple[int, int] | None:
        """The last split batch's (real, pad) tokens (split counts them; the loop runs both)."""
        return self._last

    def split(
        self, outputs: dict[str, np.ndarray], requests: list[Request], batched: bool
    ) -> list[dict[str, np.ndarray] | ConvoyError]:
        parts = split(outputs, requests, batched, self.config)
        self._count_tokens(requests)
        trimmed = self.padding.outputs
        if not trimmed:
            return parts
        for request, part in zip(requests, parts, strict=True):
            if isinstance(part, ConvoyError):
                continue
            length = self.length(request)
            for entry in trimmed:
                array = part.get(entry.name)
                if array is None:
                    continue
                axis = 1 + entry.axis
                if array.ndim <= axis or array.shape[axis] < length:
                    raise InferenceFailed(
                        f"model '{self.config.name}' returned output '{entry.name}' with shape "
                        f"{list(array.shape)}; parameters.padding_outputs trims its dim "
                        f"{entry.axis} to each request's length, which needs at least {length}"
                    )
                index = [slice(None)] * array.ndim
                index[axis] = slice(0, length)
                # A view of the batch's output: the request gets its own real positions.
                part[entry.name] = array[tuple(index)]
        return parts
