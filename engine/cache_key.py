"""Response cache keys: 128-bit BLAKE2b digests of everything that decides a response.

A key covers the model, its resolved version, a revision digest of the version's config and
file contents (so replicas sharing a Redis cache agree, and a changed model never serves old
answers), the requested outputs, the request parameters that can change what the model computes,
the API key when the model keeps per-key entries, and each input's name, datatype, shape and
bytes. Never the request id, priority or timeout: they change when and how a request is
answered, not what. Triton's 64-bit key documents that it can collide; at 128 bits a collision
among 2^40 entries has odds near 2^-49.

Row keys (batched models with row-level caching): the same prefix, then each input's row alone
(its shape without the batch dimension, its bytes), so a row computed inside one request answers
the same row inside any other.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import orjson

from convoy.config import ModelConfig
from convoy.types import Request

DIGEST_BYTES = 16

#: Request parameters that never change what the model computes: scheduling (priority,
#: timeout), encoding (binary_data_output) and streaming flags. Every other parameter is part
#: of the key: model code can read it.
NEUTRAL_PARAMETERS = frozenset(
    {"priority", "timeout", "binary_data_output", "triton_enable_empty_final_response"}
)


def revision_digest(config_bytes: bytes, model_dir: Path, version: int) -> str:
    """A digest of the config as served and the contents of the files it serves: the version
    folder and the model folder's own files (shared code beside the version folders). Contents,
    not modification times, so every replica with the same files computes the same digest."""
    digest = hashlib.blake2b(config_bytes, digest_size=DIGEST_BYTES)
    roots = [model_dir / str(version)]
    files = sorted(p for p in model_dir.iterdir() if p.is_file()) if model_dir.is_dir() else []
    for file in files:
        _file_into(digest, file, file.name)
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(names):
                file = Path(folder) / name
                _file_into(digest, file, str(file.relative_to(model_dir)))
    return digest.hexdigest()


def _file_into(digest: hashlib.blake2b, file: Path, name: str) -> None:
    digest.update(name.encode() + b"\0")
    try:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        digest.update(b"\1unreadable")
    digest.update(b"\0")


def key_prefix(
    model: str, version: int, revision: str, request: Request, principal: str | None
) -> hashlib.blake2b:
    """The digest state of everything but the inputs; copied once per key built from it."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    outputs = ",".join(sorted(request.requested_outputs))
    digest.update(f"{model}\0{version}\0{revision}\0{outputs}\0".encode())
    parameters = request.parameters
    if parameters:
        semantic = {k: v for k, v in parameters.items() if k not in NEUTRAL_PARAMETERS}
        if semantic:
            digest.update(orjson.dumps(semantic, option=orjson.OPT_SORT_KEYS, default=repr))
    digest.update(b"\0")
    if principal is not None:
        digest.update(b"key\0" + principal.encode() + b"\0")
    return digest


def _header(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    return f"{name}\0{datatype}\0{shape}\0".encode()


def _data_into(digest: hashlib.blake2b, array: np.ndarray) -> None:
    if array.dtype.hasobject:
        for element in array.reshape(-1):
            data = element.encode() if isinstance(element, str) else bytes(element)
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    elif array.flags.c_contiguous:
        # (The ignores: ndarray is a buffer, but numpy's stubs say so only for Python 3.12+.)
        digest.update(array)  # type: ignore[arg-type]  # the buffer itself: no copy
    else:
        digest.update(np.ascontiguousarray(array))  # type: ignore[arg-type]


def request_key(prefix: hashlib.blake2b, config: ModelConfig, request: Request) -> bytes:
    """One key for the whole request."""
    digest = prefix.copy()
    for name in sorted(request.inputs):
        spec = config.input(name)
        array = request.inputs[name]
        digest.update(_header(name, spec.datatype if spec else array.dtype.str, array.shape))
        _data_into(digest, array)
    return digest.digest()


def row_keys(prefix: hashlib.blake2b, config: ModelConfig, request: Request) -> list[bytes]:
    """One key per row of a batched request (the first dimension of every input)."""
    names = sorted(request.inputs)
    arrays = [request.inputs[name] for name in names]
    # Every row of an input has the same shape: its header is built once.
    headers = []
    for name, array in zip(names, arrays, strict=True):
        spec = config.input(name)
        headers.append(_header(name, spec.datatype if spec else array.dtype.str, array.shape[1:]))
    tensors = list(zip(headers, arrays, strict=True))
    keys = []
    for row in range(request.rows):
        digest = prefix.copy()
        for header, array in tensors:
            digest.update(header)
            _data_into(digest, array[row])
        keys.append(digest.digest())
    return keys
