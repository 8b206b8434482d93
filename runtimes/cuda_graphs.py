"""CUDA graphs for the pytorch backend: one graph captured per batch-size bucket, replayed with the
batch padded up to its bucket.

Eager PyTorch is launch-bound at small batches (DESIGN.md: a BERT-base encoder takes 3.8 ms eager
and 0.52 ms as a graph at batch 1). A graph replays a fixed kernel sequence on fixed buffers, so
each bucket owns static input tensors a batch is copied into and static outputs read back. Rows
past the batch are padding (left over from earlier batches) whose results are dropped: like any
batched model, the module must compute each row independently of the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger("convoy.runtimes.pytorch")

#: Eager runs before each capture: lazy initialisation (cuBLAS handles, the TorchScript profiling
#: executor's optimised plan, autotuning) must happen outside the graph.
WARMUP_RUNS = 3


def bucket_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below max_batch_size, then max_batch_size itself: 1, 2, 4, ..., max."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch_size)
    return sizes


@dataclass(frozen=True, slots=True)
class StaticInput:
    """One input's shape without the batch dimension (its full shape when unbatched) and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class _Bucket:
    rows: int  # 0 for a model that does not batch
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class CudaGraphs:
    """The graphs of one module on one device and stream, one per batch-size bucket."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self._stream = stream
        self._buckets: list[_Bucket] = []  # ascending rows

    @property
    def bucket_rows(self) -> list[int]:
        return [bucket.rows for bucket in self._buckets]

    def capture(
        self,
        run: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]],
        inputs: Sequence[StaticInput],
        sizes: Sequence[int],
        device: torch.device,
    ) -> None:
        """Capture `run` (inputs in call order -> outputs in config order) once per size in `sizes`
        (batch rows; [0] for an unbatched model). A size that fails to capture (out of memory, an
        operation graphs cannot hold) is skipped with a warning and runs eagerly."""
        # One memory pool for all buckets: their intermediates are dead between replays. Largest
        # first, so the smaller ones fit in the blocks it leaves.
        pool = torch.cuda.graph_pool_handle()
        for rows in sorted(sizes, reverse=True):
            try:
                self._buckets.append(self._capture_one(run, inputs, rows, device, pool))
            except Exception as exc:
                log.warning(
                    "CUDA graph capture for %d rows failed (%s: %s); batches of that size run eagerly",
                    rows,
                    type(exc).__name__,
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else "",
                )
        self._buckets.sort(key=lambda bucket: bucket.rows)

    def _capture_one(self, run, inputs, rows: int, device: torch.device, pool) -> _Bucket:
        lead = (rows,) if rows else ()
        static = tuple(
            torch.zeros(lead + spec.shape, dtype=spec.dtype, device=device) for spec in inputs
        )
        with torch.cuda.stream(self._stream):
            for _ in range(WARMUP_RUNS):
                run(static)
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=self._stream):
            outputs = tuple(run(static))
        self._stream.synchronize()
        for index, output in enumerate(outputs):
            if rows and (output.dim() == 0 or output.shape[0] != rows):
                raise ValueError(
                    f"output {index} has shape {list(output.shape)} for {rows} rows; graphs need "
                    "outputs whose first dimension is the batch"
                )
        return _Bucket(rows, graph, static, outputs)

    def bucket_for(self, rows: int) -> _Bucket | None:
        """The smallest captured bucket that holds `rows` rows (0: the unbatched graph)."""
        for bucket in self._buckets:
            if bucket.rows >= rows:
                return bucket
        return None

    def replay(self, bucket: _Bucket, inputs: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
        """Copy the batch (pinned host tensors) into the bucket's inputs, replay, and return views
        of its outputs' first `rows` rows. Call on the stream the graphs were captured on; the
        views are valid until the next replay of any bucket."""
        for static, tensor in zip(bucket.inputs, inputs, strict=True):
            target = static[:rows] if bucket.rows else static
            target.copy_(tensor, non_blocking=True)
        bucket.graph.replay()
        if not bucket.rows:
            return list(bucket.outputs)
        return [output[:rows] for output in bucket.outputs]

    def close(self) -> None:
        self._buckets.clear()
