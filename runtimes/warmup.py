"""Run a model's `model_warmup` samples on an instance before it reports READY."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from convoy.config import ModelConfig, WarmupInput
from convoy.datatypes import NUMPY_DTYPE, deserialize_bytes, element_count
from convoy.errors import ModelLoadFailed
from convoy.padding import with_full_lengths

from .base import RuntimeInstance


def warmup_array(spec: WarmupInput, shape: tuple[int, ...], warmup_dir: Path, rng) -> np.ndarray:
    count = element_count(shape)
    if spec.source == "file":
        path = (warmup_dir / spec.file).resolve()
        if warmup_dir.resolve() not in path.parents:
            raise ModelLoadFailed(f"warm-up file '{spec.file}' is outside {warmup_dir}")
        if not path.is_file():
            raise ModelLoadFailed(f"warm-up file {path} does not exist")
        raw = path.read_bytes()
        if spec.datatype == "BYTES":
            return deserialize_bytes(raw, count, spec.file).reshape(shape)
        dtype = NUMPY_DTYPE[spec.datatype]
        if len(raw) != count * dtype.itemsize:
            raise ModelLoadFailed(
                f"warm-up file {path} holds {len(raw)} bytes; {spec.datatype} {list(shape)} "
                f"needs {count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if spec.datatype == "BYTES":
        fill = (lambda i: b"") if spec.source == "zero" else (lambda i: b"warmup %d" % i)
        array = np.empty(count, dtype=object)
        for i in range(count):
            array[i] = fill(i)
        return array.reshape(shape)
    dtype = NUMPY_DTYPE[spec.datatype]
    if spec.source == "zero":
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.random(size=shape).astype(dtype)


async def run_warmup(
    instance: RuntimeInstance,
    config: ModelConfig,
    version_path: Path,
    prepare: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> None:
    """Execute every warm-up sample `count` times; raises ModelLoadFailed naming the sample.
    `prepare` turns a sample's inputs (batch_size rows) into the batch the model receives, where
    that differs from the rows themselves (ragged batching)."""
    rng = np.random.default_rng(0)
    warmup_dir = version_path.parent / "warmup"
    for sample in config.warmup:
        try:
            inputs = {}
            for name, spec in sample.inputs.items():
                shape = spec.dims
                if config.max_batch_size > 0:
                    shape = (sample.batch_size, *shape)
                inputs[name] = warmup_array(spec, shape, warmup_dir, rng)
            if prepare is not None:
                inputs = prepare(inputs)
            if config.padding is not None:
                inputs = with_full_lengths(config.padding, inputs)
            for _ in range(sample.count):
                await instance.infer(inputs)
        except ModelLoadFailed:
            raise
        except Exception as exc:
            raise ModelLoadFailed(
                f"model '{config.name}' failed warm-up sample '{sample.name}': "
                f"{type(exc).__name__}: {exc}"
            ) from exc
