"""Ragged batching (Triton's `allow_ragged_batch`, `batch_input`, `batch_output`).

Requests whose ragged inputs differ in shape share a batch; every other input must still match
per row. The model receives:
- each ragged input flattened and concatenated across the batch's requests: one dimension, the
  total element count (as Triton's ONNX Runtime, PyTorch and TensorRT backends feed it);
- every other input concatenated along the batch dimension, as in a dense batch;
- each `batch_input`, computed from the shapes of its source input in every request (below),
  under each of its target names.

Outputs go back along the batch dimension (each request its rows), except the targets of a
`batch_output` (BATCH_SCATTER_WITH_INPUT_SHAPE): the output is read as one flat run of elements,
each request taking as many as its shape holds, that shape being the output's declared shape
with every variable dimension set to the same dimension of the request's source input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import numpy as np

from convoy.config import BatchInput, ModelConfig
from convoy.datatypes import NUMPY_DTYPE
from convoy.errors import ConvoyError, InferenceFailed
from convoy.outputs import declared_types, missing
from convoy.types import DetachedFuture, Request

from .assemble import BatchBuffers, Collation


def batch_input_tensor(batch_input: BatchInput, shapes: list[tuple[int, ...]]) -> np.ndarray:
    """The tensor of one batch input for requests whose source input has `shapes` (each with
    its batch dimension), in the batch's request order."""
    dtype = NUMPY_DTYPE[batch_input.datatype]
    kind = batch_input.kind
    counts = [math.prod(shape) for shape in shapes]
    if kind == "BATCH_ELEMENT_COUNT":
        return np.asarray(counts, dtype=dtype)
    if kind == "BATCH_ACCUMULATED_ELEMENT_COUNT":
        return np.cumsum(counts, dtype=np.int64).astype(dtype)
    if kind == "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO":
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(dtype)
    if kind == "BATCH_MAX_ELEMENT_COUNT_AS_SHAPE":
        # Only the shape carries information (Triton leaves the data uninitialised).
        return np.zeros(max(counts), dtype=dtype)
    if kind in ("BATCH_ITEM_SHAPE", "BATCH_ITEM_SHAPE_FLATTEN"):
        # One row per batch item (a request of batch 2 counts twice): its shape without the
        # batch dimension.
        rows = [shape[1:] for shape in shapes for _ in range(shape[0])]
        width = len(shapes[0]) - 1
        items = np.asarray(rows, dtype=dtype).reshape(len(rows), width)
        return items if kind == "BATCH_ITEM_SHAPE" else items.reshape(-1)
    raise InferenceFailed(f"batch input kind '{kind}' is not implemented")


class RaggedCollation(Collation):
    """Merge and split for a model with ragged inputs, batch inputs or batch outputs."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._ragged = frozenset(s.name for s in config.inputs if s.allow_ragged_batch)
        #: output name -> (source input, declared shape with the batch dimension)
        self._scatter: dict[str, tuple[str, tuple[int, ...]]] = {}
        for batch_output in config.batch_outputs:
            for name in batch_output.target_names:
                spec = config.output(name)
                dims = spec.dims if spec is not None else (-1,)
                self._scatter[name] = (batch_output.source_input, (-1, *dims))

    def batch_tokens(self, requests: list[Request]) -> tuple[int, int] | None:
        """Elements of the batch's first ragged input (flattened: nothing is padded)."""
        if not self._ragged:
            return None
        name = min(self._ragged)
        return sum(request.inputs[name].size for request in requests if name in request.inputs), 0

    def key(self, request: Request) -> Hashable:
        """Per-row shapes must match, except the ragged inputs'."""
        ragged = self._ragged
        return tuple(
            (name, None if name in ragged else array.shape[1:], array.dtype.str)
            for name, array in request.inputs.items()
        )

    def merge(
        self, requests: list[Request], buffers: BatchBuffers | None = None
    ) -> dict[str, np.ndarray]:
        """The batch's inputs. The runtime's dense batch buffers are not used: a ragged batch
        has no fixed row shape to stage into."""
        first = requests[0].inputs
        merged: dict[str, np.ndarray] = {}
        for name in first:
            if name in self._ragged:
                # The one copy on the way in (none for a lone request: a flat view).
                parts = [r.inputs[name].reshape(-1) for r in requests]
            else:
                parts = [r.inputs[name] for r in requests]
            merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        for batch_input in self.config.batch_inputs:
            shapes = [r.inputs[batch_input.source_input].shape for r in requests]
            tensor = batch_input_tensor(batch_input, shapes)
            for target in batch_input.target_names:
                merged[target] = tensor
        return merged

    def split(
        self, outputs: dict[str, np.ndarray], requests: list[Request], batched: bool
    ) -> list[dict[str, np.ndarray] | ConvoyError]:
        config = self.config
        model = config.name
        outputs = declared_types(outputs, config)
        default = tuple(s.name for s in config.outputs if s.name in outputs) or tuple(outputs)
        total = sum(r.rows for r in requests)
        # Where each request's part of each output starts and its shape (scattered outputs).
        scattered: dict[str, tuple[np.ndarray, list[tuple[int, ...]]]] = {}
        for name, array in outputs.items():
            target = self._scatter.get(name)
            if target is not None:
                source, template = target
                shapes = [_scatter_shape(template, r.inputs[source].shape) for r in requests]
                needed = sum(math.prod(shape) for shape in shapes)
                if array.size != needed:
                    raise InferenceFailed(
                        f"model '{model}' returned output '{name}' with {array.size} elements "
                        f"(shape {list(array.shape)}); scattered by input '{source}' its requests "
                        f"need {needed}"
                    )
                scattered[name] = (np.ascontiguousarray(array).reshape(-1), shapes)
            elif array.ndim == 0 or array.shape[0] != total:
                raise InferenceFailed(
                    f"model '{model}' returned output '{name}' with shape {list(array.shape)} "
                    f"for a batch of {total} rows; expected first dimension {total}"
                )
        parts: list[dict[str, np.ndarray] | ConvoyError] = []
        row = 0
        offsets = dict.fromkeys(scattered, 0)
        for index, request in enumerate(requests):
            names = request.requested_outputs or default
            own: dict[str, np.ndarray] = {}
            for name, (flat, shapes) in scattered.items():
                shape = shapes[index]
                start = offsets[name]
                offsets[name] = start + math.prod(shape)
                own[name] = flat[start : offsets[name]].reshape(shape)
            end = row + request.rows
            absent = missing(outputs, names, model)
            if absent is not None:
                parts.append(absent)
            else:
                parts.append({n: own[n] if n in own else outputs[n][row:end] for n in names})
            row = end
        return parts


def _scatter_shape(template: tuple[int, ...], source: tuple[int, ...]) -> tuple[int, ...]:
    """The output's declared shape with each variable dimension taken from the source's."""
    return tuple(source[i] if dim == -1 else dim for i, dim in enumerate(template))


def ragged_warmup(config: ModelConfig) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """For `model_warmup`: a sample's inputs (batch_size rows) as the ragged batch the model
    receives, each row one request (as Triton warms a batching model up)."""
    collation = RaggedCollation(config)

    def prepare(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(inputs.values())).shape[0]
        idle = DetachedFuture()
        requests = [
            Request(f"warmup {row}", {n: a[row : row + 1] for n, a in inputs.items()}, (), 1, idle)
            for row in range(rows)
        ]
        return collation.merge(requests)

    return prepare
