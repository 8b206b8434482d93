"""CUDA graphs for the pytorch backend: one graph captured per batch-size bucket (per batch bucket
and length bucket for a padded model), replayed with the batch padded up to its bucket.

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


def graph_plan(
    max_batch_size: int, lengths: Sequence[int] = (), max_batch_tokens: int = 0, limit: int = 0
) -> list[tuple[int, int]]:
    """The (rows, length) of each graph to capture, fewest tokens first. Without `lengths` (no
    padded dim) one per batch bucket, length 0. With them, every batch bucket x length bucket a
    batch can use: under a token budget a batch at length L has at most budget // L rows (a
    lone request may have more and runs eagerly), so buckets past the one holding that many
    are not captured. `limit` (0: none) keeps the cheapest graphs (rows x length): those are
    where a launch-bound GPU gains most; batches of the dropped ones run eagerly."""
    if max_batch_size <= 0:
        return [(0, 0)]
    sizes = bucket_sizes(max_batch_size)
    plan: list[tuple[int, int]] = []
    for length in lengths or (0,):
        most = max_batch_size
        if max_batch_tokens and length:
            most = max(1, min(max_batch_size, max_batch_tokens // length))
        needed = next(size for size in sizes if size >= most)
        plan.extend((rows, length) for rows in sizes if rows <= needed)
    plan.sort(key=lambda entry: (entry[0] * max(entry[1], 1), entry[0]))
    return plan[:limit] if limit else plan


def choose_graph(captured: Sequence[tuple[int, int]], rows: int, length: int) -> int | None:
    """Index into `captured` ((rows, length) ascending by rows within a length) of the graph a
    batch of `rows` rows at padded `length` replays: the smallest with room at exactly that
    length; None runs the batch eagerly."""
    best = None
    for index, (bucket_rows, bucket_length) in enumerate(captured):
        if bucket_length != length or bucket_rows < rows:
            continue
        if best is None or bucket_rows < captured[best][0]:
            best = index
    return best


@dataclass(frozen=True, slots=True)
class StaticInput:
    """One input's shape without the batch dimension (its full shape when unbatched) and dtype.
    A -1 dim is a padded one: it takes each graph's length. `lengths`: the input receiving each
    row's real length (filled with the graph's length at capture)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    lengths: bool = False


def static_tensors(
    inputs: Sequence[StaticInput], rows: int, length: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """One graph's input buffers: `rows` rows (none for an unbatched model), padded dims at
    `length`; a lengths input holds the graph's length (a model may divide by it), the rest 0."""
    lead = (rows,) if rows else ()
    static = []
    for spec in inputs:
        shape = lead + tuple(length if dim == -1 else dim for dim in spec.shape)
        fill = length if spec.lengths else 0
        static.append(torch.full(shape, fill, dtype=spec.dtype, device=device))
    return tuple(static)


@dataclass(frozen=True, slots=True)
class _Bucket:
    rows: int  # 0 for a model that does not batch
    length: int  # the padded dims' length; 0 without any
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class CudaGraphs:
    """The graphs of one module on one device and stream, one per batch-size bucket (and length
    bucket, for a padded model)."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self._stream = stream
        self._buckets: list[_Bucket] = []  # ascending (length, rows)

    @property
    def bucket_rows(self) -> list[int]:
        return [bucket.rows for bucket in self._buckets]

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(rows, length) of each captured graph."""
        return [(bucket.rows, bucket.length) for bucket in self._buckets]

    def capture(
        self,
        run: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]],
        inputs: Sequence[StaticInput],
        plan: Sequence[int | tuple[int, int]],
        device: torch.device,
    ) -> None:
        """Capture `run` (inputs in call order -> outputs in config order) once per entry of
        `plan`: batch rows ([0] for an unbatched model), or (rows, length) for a padded model
        (`graph_plan`). An entry that fails to capture (out of memory, an operation graphs
        cannot hold) is skipped with a warning and runs eagerly."""
        entries = [entry if isinstance(entry, tuple) else (entry, 0) for entry in plan]
        # One memory pool for all buckets: their intermediates are dead between replays. Largest
        # first, so the smaller ones fit in the blocks it leaves.
        pool = torch.cuda.graph_pool_handle()
        for rows, length in sorted(entries, key=lambda e: e[0] * max(e[1], 1), reverse=True):
            try:
                self._buckets.append(self._capture_one(run, inputs, rows, length, device, pool))
            except Exception as exc:
                log.warning(
                    "CUDA graph capture for %d rows%s failed (%s: %s); batches of that size run eagerly",
                    rows,
                    f" at length {length}" if length else "",
                    type(exc).__name__,
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else "",
                )
        self._buckets.sort(key=lambda bucket: (bucket.length, bucket.rows))

    def _capture_one(self, run, inputs, rows: int, length: int, device: torch.device, pool) -> _Bucket:
        static = static_tensors(inputs, rows, length, device)
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
        return _Bucket(rows, length, graph, static, outputs)

    def bucket_for(self, rows: int, length: int = 0) -> _Bucket | None:
        """The smallest captured bucket that holds `rows` rows (0: the unbatched graph) at
        padded `length` (0: no padded dim); None: run eagerly."""
        index = choose_graph(self.captured, rows, length)
        return None if index is None else self._buckets[index]

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
