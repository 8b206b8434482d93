"""What a model takes and returns (from its V2 metadata), and random request payloads that fit it.

The load generator learns everything from the server it targets, so it works against any
Open Inference Protocol server: `-1` in a shape becomes the batch size for the first dimension
of a batching model and a configurable length elsewhere; BYTES inputs get random text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: V2 datatype -> numpy dtype (BYTES and BF16 are special-cased in `random_tensor`).
NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

#: Words random BYTES inputs are made of: plain text, as a text model would see.
_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "convoy",
    "batches",
    "every",
    "request",
    "into",
    "one",
    "tensor",
    "and",
    "the",
    "scheduler",
    "waits",
    "a",
    "little",
    "for",
    "company",
    "before",
    "the",
    "model",
    "runs",
    "on",
    "whole",
    "batches",
    "latency",
    "throughput",
    "replica",
    "queue",
    "server",
    "client",
    "metric",
    "sentence",
    "embedding",
    "vector",
    "number",
]


class ModelSpecError(ValueError):
    """The model's metadata cannot be turned into a payload (unknown datatype, bad shape)."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the model metadata states it; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A model's name, version and tensors; `max_batch_size > 0` means dimension 0 is the batch."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @classmethod
    def from_metadata(cls, metadata: dict, config: dict | None, version: str = "") -> ModelSpec:
        """Build from /v2/models/{m} metadata and, where the server has it, the model config.

        Without a config (a plain KServe V2 server), a leading -1 is taken to be the batch.
        """

        def tensors(key: str) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"]))
                for t in metadata.get(key, [])
            )

        inputs, outputs = tensors("inputs"), tensors("outputs")
        if not inputs:
            raise ModelSpecError(f"model '{metadata.get('name')}': metadata lists no inputs")
        if config is not None:
            max_batch_size = int(config.get("max_batch_size", 0))
        else:
            max_batch_size = 1 if all(t.shape[:1] == (-1,) for t in inputs) else 0
        return cls(str(metadata["name"]), version, inputs, outputs, max_batch_size)


@dataclass(frozen=True)
class PayloadOptions:
    """How to fill the -1 dimensions and how long random text is."""

    batch_size: int = 1
    variable_length: int = 16
    #: input name -> its shape without the batch dimension (perf_analyzer's --shape).
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    text_words: int = 12


def request_shape(model: ModelSpec, tensor: TensorSpec, options: PayloadOptions) -> tuple[int, ...]:
    """The concrete shape one request sends for `tensor`."""
    dims = list(tensor.shape)
    if model.batched and not dims:
        raise ModelSpecError(f"input '{tensor.name}': expected a batch dimension, got shape []")
    if tensor.name in options.shapes:
        given = list(options.shapes[tensor.name])
        dims = [options.batch_size, *given] if model.batched else given
    elif model.batched:
        dims[0] = options.batch_size
    return tuple(options.variable_length if d < 0 else d for d in dims)


def random_tensor(
    rng: np.random.Generator, datatype: str, shape: tuple[int, ...], text_words: int
) -> np.ndarray:
    """Random values of `datatype`: small integers (sums stay in range), normal floats, text."""
    if datatype == "BYTES":
        count = int(np.prod(shape, dtype=np.int64))
        lengths = rng.integers(1, max(text_words, 1) + 1, size=count)
        words = rng.choice(len(_WORDS), size=int(lengths.sum()))
        items, start = [], 0
        for length in lengths:
            items.append(" ".join(_WORDS[w] for w in words[start : start + length]).encode())
            start += length
        return np.array(items, dtype=np.object_).reshape(shape)
    if datatype == "BF16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise ModelSpecError("BF16 inputs need the ml_dtypes package") from exc
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise ModelSpecError(f"unsupported datatype {datatype!r}")
    if dtype is np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    low = 0 if np.issubdtype(dtype, np.unsignedinteger) else -50
    return rng.integers(low, 50, size=shape).astype(dtype)


class PayloadGenerator:
    """Fresh random inputs for every request, so answers cannot be cached or replayed."""

    def __init__(self, model: ModelSpec, options: PayloadOptions, seed: int | None = None) -> None:
        self.model = model
        self.options = options
        self._rng = np.random.default_rng(seed)
        self._shapes = {t.name: request_shape(model, t, options) for t in model.inputs}

    def next(self) -> dict[str, np.ndarray]:
        return {
            t.name: random_tensor(self._rng, t.datatype, self._shapes[t.name], self.options.text_words)
            for t in self.model.inputs
        }


def parse_shape_option(text: str) -> tuple[str, tuple[int, ...]]:
    """`NAME:D1,D2` (perf_analyzer's --shape) -> (NAME, (D1, D2))."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise ValueError(f"--shape {text!r}: expected NAME:D1,D2,...")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError as exc:
        raise ValueError(f"--shape {text!r}: dimensions must be integers") from exc
    if any(d <= 0 for d in shape):
        raise ValueError(f"--shape {text!r}: dimensions must be positive")
    return name, shape
