"""Paired comparison: the candidate's outputs for a request against stable's for the same request.

Per output tensor, by its rule (spec.OutputCompare):
- exact (integers, strings, booleans; any output asked for it): the pair agrees when the two
  tensors are equal, shape and every element;
- float (floats by default): agrees within tolerance (|c - s| <= atol + rtol * |s|, NaNs equal);
- logits / probabilities: agrees when the top-1 class is the same at every position (along
  `axis`, per row); the top-k overlap is measured too;
- embedding: agrees when every row's cosine similarity reaches `min_cosine`.
Floats also get the largest absolute error, the largest relative error (|c - s| / max(|c|, |s|),
so it lies in [0, 2]) and the smallest row cosine similarity, whatever their rule. A pair agrees
when every output it carries agrees; an output one side lacks, or shapes that differ, disagree.
Runs on the engine's loop when a pair completes: numpy on the request's own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from convoy.datatypes import bf16_bits_to_float32

from .spec import FLOAT_DATATYPES, OutputCompare


@dataclass(frozen=True, slots=True)
class OutputVerdict:
    """How one output of a pair compared. Measures that do not apply to its kind are None."""

    name: str
    kind: str
    agrees: bool
    max_abs: float | None = None
    max_rel: float | None = None
    #: Smallest cosine similarity over the output's rows.
    cosine: float | None = None
    #: Share of positions whose top-1 class matched; mean top-k overlap (0..1).
    top1: float | None = None
    topk: float | None = None
    #: Why it disagrees when it is not a value difference (missing, shape).
    note: str = ""


@dataclass(frozen=True, slots=True)
class PairVerdict:
    agrees: bool
    outputs: tuple[OutputVerdict, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "agrees": self.agrees,
            "outputs": {
                o.name: {
                    k: v
                    for k, v in (
                        ("kind", o.kind),
                        ("agrees", o.agrees),
                        ("max_abs", o.max_abs),
                        ("max_rel", o.max_rel),
                        ("cosine", o.cosine),
                        ("top1", o.top1),
                        ("topk", o.topk),
                        ("note", o.note),
                    )
                    if v not in (None, "")
                }
                for o in self.outputs
            },
        }


def compare_pair(
    rules: dict[str, OutputCompare],
    datatypes: dict[str, str],
    stable: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    batched: bool,
) -> PairVerdict:
    """Compare every output either side returned (`batched`: the first dimension is rows)."""
    verdicts = []
    for name in sorted(set(stable) | set(candidate)):
        rule = rules.get(name) or OutputCompare(
            "float" if datatypes.get(name) in FLOAT_DATATYPES else "exact"
        )
        if name not in stable or name not in candidate:
            side = "candidate" if name not in candidate else "stable"
            verdicts.append(OutputVerdict(name, rule.kind, False, note=f"missing from {side}"))
            continue
        verdicts.append(
            _compare(name, rule, datatypes.get(name, ""), stable[name], candidate[name], batched)
        )
    return PairVerdict(all(v.agrees for v in verdicts), tuple(verdicts))


def _floats(array: np.ndarray, datatype: str) -> np.ndarray:
    if datatype == "BF16" and array.dtype == np.uint16:
        array = bf16_bits_to_float32(array)
    return np.asarray(array, dtype=np.float64)


def _compare(
    name: str, rule: OutputCompare, datatype: str, s: np.ndarray, c: np.ndarray, batched: bool
) -> OutputVerdict:
    if s.shape != c.shape:
        return OutputVerdict(
            name, rule.kind, False, note=f"shape {list(c.shape)} vs stable {list(s.shape)}"
        )
    is_float = datatype in FLOAT_DATATYPES or (s.dtype.kind == "f" and c.dtype.kind == "f")
    if not is_float:
        return OutputVerdict(name, rule.kind, bool(np.array_equal(s, c)))
    fs, fc = _floats(s, datatype), _floats(c, datatype)
    both_nan = np.isnan(fs) & np.isnan(fc)
    diff = np.where(both_nan, 0.0, np.abs(fc - fs))
    diff = np.nan_to_num(diff, nan=np.inf)
    scale = np.maximum(np.maximum(np.abs(fs), np.abs(fc)), 1e-30)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(np.where(both_nan, 0.0, np.minimum(diff / scale, 2.0)).max()) if diff.size else 0.0
    cosine = _min_cosine(fs, fc, batched)
    top1 = topk = None
    if rule.kind == "exact":
        agrees = bool(np.array_equal(s, c, equal_nan=True))
    elif rule.kind == "float":
        agrees = bool(np.allclose(fc, fs, atol=rule.atol, rtol=rule.rtol, equal_nan=True))
    elif rule.kind in ("logits", "probabilities"):
        top1, topk = _top_agreement(fs, fc, rule.axis, rule.top_k)
        agrees = top1 == 1.0
    else:  # embedding
        agrees = cosine is not None and cosine >= rule.min_cosine
    return OutputVerdict(name, rule.kind, agrees, max_abs, max_rel, cosine, top1, topk)


def _min_cosine(s: np.ndarray, c: np.ndarray, batched: bool) -> float | None:
    """The smallest cosine similarity over rows (the whole tensor when it is not batched)."""
    if s.size == 0:
        return None
    rows = s.shape[0] if batched and s.ndim > 1 else 1
    a = np.nan_to_num(s.reshape(rows, -1))
    b = np.nan_to_num(c.reshape(rows, -1))
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    return float(np.clip(cos, -1.0, 1.0).min())


def _top_agreement(s: np.ndarray, c: np.ndarray, axis: int, k: int) -> tuple[float, float]:
    """(share of positions with the same top-1 class, mean overlap of the top-k classes)."""
    if s.ndim == 0:
        return (1.0 if s == c else 0.0), (1.0 if s == c else 0.0)
    axis = axis if axis >= 0 else s.ndim + axis
    if not 0 <= axis < s.ndim:
        axis = s.ndim - 1
    a = np.moveaxis(np.nan_to_num(s, nan=-np.inf), axis, -1)
    b = np.moveaxis(np.nan_to_num(c, nan=-np.inf), axis, -1)
    classes = a.shape[-1]
    if classes == 0 or a.size == 0:
        return 1.0, 1.0
    a = a.reshape(-1, classes)
    b = b.reshape(-1, classes)
    top1 = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    k = min(k, classes)
    ta = np.argpartition(-a, k - 1, axis=1)[:, :k]
    tb = np.argpartition(-b, k - 1, axis=1)[:, :k]
    overlap = (ta[:, :, None] == tb[:, None, :]).any(axis=2).sum(axis=1) / k
    return top1, float(overlap.mean())
