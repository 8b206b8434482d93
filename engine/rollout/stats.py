"""What a roll-out measures: each arm's latency and errors, the pairs' agreement, and the two tests
an A/B step ends with. Updated on the engine's loop as outcomes arrive; read by the gate checks,
the status/report and the metrics exporter (plain ints and lists, copied whole)."""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convoy.batching.stats import LATENCY_BOUNDS_NS, Histogram

from .compare import OutputVerdict, PairVerdict

#: Latencies kept per arm and step for quantiles and the A/B test (a uniform sample beyond it).
RESERVOIR = 20_000
#: Points the agreement-over-time series keeps (its buckets double in width past it).
TIMELINE_POINTS = 240
#: Bucket upper bounds of the per-pair comparison histograms (largest absolute error; smallest
#: row cosine similarity).
ABS_ERROR_BOUNDS = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
COSINE_BOUNDS = (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 1.0)


class Reservoir:
    """A uniform sample of at most `capacity` values (Algorithm R, seeded: reproducible)."""

    __slots__ = ("_random", "capacity", "count", "values")

    def __init__(self, capacity: int = RESERVOIR, seed: int = 0) -> None:
        self.capacity = capacity
        self.values: list[int] = []
        self.count = 0
        self._random = random.Random(seed)

    def add(self, value: int) -> None:
        self.count += 1
        if len(self.values) < self.capacity:
            self.values.append(value)
            return
        slot = self._random.randrange(self.count)
        if slot < self.capacity:
            self.values[slot] = value

    def quantile_ms(self, q: float) -> float | None:
        if not self.values:
            return None
        return float(np.quantile(np.asarray(self.values, dtype=np.float64), q)) / 1e6


@dataclass(slots=True)
class ArmWindow:
    """One arm's outcomes of one kind (served to clients, or mirrored) over a span."""

    requests: int = 0
    errors: int = 0
    latencies: Reservoir = field(default_factory=Reservoir)

    def success(self, latency_ns: int) -> None:
        self.requests += 1
        self.latencies.add(latency_ns)

    def failure(self) -> None:
        self.requests += 1
        self.errors += 1

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def describe(self) -> dict[str, Any]:
        lat = self.latencies
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p50_ms": lat.quantile_ms(0.5),
            "p90_ms": lat.quantile_ms(0.9),
            "p99_ms": lat.quantile_ms(0.99),
        }


@dataclass(slots=True)
class OutputTotals:
    """One output's comparisons over a span."""

    pairs: int = 0
    agree: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    min_cosine: float | None = None
    top1_sum: float = 0.0
    topk_sum: float = 0.0
    top_pairs: int = 0
    #: Per-pair histograms (bucket counts over ABS_ERROR_BOUNDS / COSINE_BOUNDS, plus one past
    #: the last bound) and sums, for Prometheus.
    abs_error: list[int] = field(default_factory=lambda: [0] * (len(ABS_ERROR_BOUNDS) + 1))
    abs_error_sum: float = 0.0
    cosine: list[int] = field(default_factory=lambda: [0] * (len(COSINE_BOUNDS) + 1))
    cosine_sum: float = 0.0

    def add(self, verdict: OutputVerdict) -> None:
        self.pairs += 1
        self.agree += verdict.agrees
        if verdict.max_abs is not None:
            assert verdict.max_rel is not None  # compare.py measures both or neither
            self.max_abs = max(self.max_abs or 0.0, verdict.max_abs)
            self.max_rel = max(self.max_rel or 0.0, verdict.max_rel)
            self.abs_error[bisect_left(ABS_ERROR_BOUNDS, verdict.max_abs)] += 1
            if math.isfinite(verdict.max_abs):
                self.abs_error_sum += verdict.max_abs
        if verdict.cosine is not None:
            self.min_cosine = (
                verdict.cosine if self.min_cosine is None else min(self.min_cosine, verdict.cosine)
            )
            self.cosine[bisect_left(COSINE_BOUNDS, verdict.cosine)] += 1
            self.cosine_sum += verdict.cosine
        if verdict.top1 is not None:
            assert verdict.topk is not None  # compare.py measures both or neither
            self.top1_sum += verdict.top1
            self.topk_sum += verdict.topk
            self.top_pairs += 1

    def describe(self) -> dict[str, Any]:
        out = {
            "pairs": self.pairs,
            "agreement": self.agree / self.pairs if self.pairs else None,
            "max_abs_error": self.max_abs,
            "max_rel_error": self.max_rel,
            "min_cosine": self.min_cosine,
        }
        if self.top_pairs:
            out["top1_agreement"] = self.top1_sum / self.top_pairs
            out["topk_agreement"] = self.topk_sum / self.top_pairs
        return out


@dataclass(slots=True)
class PairWindow:
    """Compared pairs over a span: how many agreed, per output too."""

    pairs: int = 0
    agree: int = 0
    outputs: dict[str, OutputTotals] = field(default_factory=dict)

    def add(self, verdict: PairVerdict) -> None:
        self.pairs += 1
        self.agree += verdict.agrees
        for output in verdict.outputs:
            totals = self.outputs.get(output.name)
            if totals is None:
                totals = self.outputs[output.name] = OutputTotals()
            totals.add(output)

    @property
    def agreement(self) -> float | None:
        return self.agree / self.pairs if self.pairs else None

    def describe(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "agreeing": self.agree,
            "agreement": self.agreement,
            "outputs": {name: t.describe() for name, t in sorted(self.outputs.items())},
        }


@dataclass(slots=True)
class MirrorCounts:
    """Mirrored requests by what became of them."""

    sent: int = 0
    completed: int = 0
    failed: int = 0
    dropped_budget: int = 0
    dropped_queue: int = 0
    #: The client's own request failed (or was cancelled): nothing to pair it with.
    unpaired: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "completed": self.completed,
            "failed": self.failed,
            "dropped_budget": self.dropped_budget,
            "dropped_queue": self.dropped_queue,
            "unpaired": self.unpaired,
        }


@dataclass(slots=True)
class StepStats:
    """Everything one step measured (a step starts with empty windows: new weights, new data)."""

    stable_served: ArmWindow = field(default_factory=ArmWindow)
    candidate_served: ArmWindow = field(default_factory=ArmWindow)
    stable_mirrored: ArmWindow = field(default_factory=ArmWindow)
    candidate_mirrored: ArmWindow = field(default_factory=ArmWindow)
    pairs: PairWindow = field(default_factory=PairWindow)
    mirrors: MirrorCounts = field(default_factory=MirrorCounts)

    def window(self, arm: str, mirrored: bool) -> ArmWindow:
        if arm == "stable":
            return self.stable_mirrored if mirrored else self.stable_served
        return self.candidate_mirrored if mirrored else self.candidate_served

    def candidate_window(self, shadow: bool) -> ArmWindow:
        """What the candidate's guards read: its mirrored requests in a shadow step (it serves
        no client), the requests it served otherwise."""
        return self.candidate_mirrored if shadow else self.candidate_served

    def describe(self) -> dict[str, Any]:
        return {
            "stable": {
                "served": self.stable_served.describe(),
                "mirrored": self.stable_mirrored.describe(),
            },
            "candidate": {
                "served": self.candidate_served.describe(),
                "mirrored": self.candidate_mirrored.describe(),
            },
            "pairs": self.pairs.describe(),
            "mirrors": self.mirrors.describe(),
        }


@dataclass(slots=True)
class ArmHistograms:
    """The whole roll-out's latency distribution per arm and kind (for the report and
    Prometheus): fixed buckets, so they never grow."""

    stable_served: Histogram[int] = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_NS))
    candidate_served: Histogram[int] = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_NS))
    stable_mirrored: Histogram[int] = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_NS))
    candidate_mirrored: Histogram[int] = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_NS))

    def of(self, arm: str, mirrored: bool) -> Histogram[int]:
        histogram: Histogram[int] = getattr(self, f"{arm}_{'mirrored' if mirrored else 'served'}")
        return histogram


class Timeline:
    """Agreement over time: pairs and agreeing pairs per time bucket since the roll-out began.
    Buckets start at `width_s` and double (merging neighbours) whenever there would be more
    than TIMELINE_POINTS of them, so a week-long roll-out keeps as few points as a short one."""

    def __init__(self, width_s: float = 1.0) -> None:
        self.width_s = width_s
        #: [pairs, agreeing] per bucket, oldest first.
        self.buckets: list[list[int]] = []

    def add(self, elapsed_s: float, agrees: bool) -> None:
        index = int(max(elapsed_s, 0.0) // self.width_s)
        while index >= TIMELINE_POINTS:
            self._coarsen()
            index = int(max(elapsed_s, 0.0) // self.width_s)
        while len(self.buckets) <= index:
            self.buckets.append([0, 0])
        bucket = self.buckets[index]
        bucket[0] += 1
        bucket[1] += agrees

    def _coarsen(self) -> None:
        merged = []
        for start in range(0, len(self.buckets), 2):
            pair = self.buckets[start : start + 2]
            merged.append([sum(b[0] for b in pair), sum(b[1] for b in pair)])
        self.buckets = merged
        self.width_s *= 2

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "t_s": index * self.width_s,
                "width_s": self.width_s,
                "pairs": pairs,
                "agreement": agreeing / pairs if pairs else None,
            }
            for index, (pairs, agreeing) in enumerate(self.buckets)
        ]


# --- the tests an A/B step ends with -----------------------------------------------------------------
def _two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def mann_whitney(x: list[int] | np.ndarray, y: list[int] | np.ndarray) -> tuple[float, float]:
    """Mann-Whitney U of `x` against `y` (U of x: pairs where x > y, ties counting half) and its
    two-sided p-value by the normal approximation with tie and continuity corrections (the
    samples here are hundreds or more). (U, 1.0) when either sample is empty or all are tied."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    joined = np.concatenate([a, b])
    order = np.argsort(joined, kind="mergesort")
    ranks = np.empty(joined.size, dtype=np.float64)
    sorted_values = joined[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    n = n1 + n2
    tie_term = float(((counts.astype(np.float64) ** 3) - counts).sum())
    variance = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance <= 0:
        return u1, 1.0
    mean = n1 * n2 / 2.0
    z = (abs(u1 - mean) - 0.5) / math.sqrt(variance)
    return u1, min(1.0, _two_sided_p(max(z, 0.0)))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): exact while the expected counts are small, else the
    normal approximation with continuity correction (n p (1 - p) >= 9)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    variance = n * p * (1 - p)
    if variance >= 9:
        z = (k - 0.5 - n * p) / math.sqrt(variance)
        return 0.5 * math.erfc(z / math.sqrt(2.0))
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    total = 0.0
    for i in range(k, n + 1):
        term = math.exp(base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        total += term
        if term < total * 1e-17 and i > n * p:
            break
    return min(total, 1.0)


def rate_excess(errors_a: int, n_a: int, errors_b: int, n_b: int, margin: float) -> float:
    """One-sided p-value that a's rate exceeds b's by more than `margin` (unpooled z); 0 when
    there is no spread and it does, 1 when there is none and it does not."""
    if n_a == 0 or n_b == 0:
        return 1.0
    rate_a, rate_b = errors_a / n_a, errors_b / n_b
    spread = math.sqrt(rate_a * (1 - rate_a) / n_a + rate_b * (1 - rate_b) / n_b)
    excess = rate_a - rate_b - margin
    if spread == 0:
        return 0.0 if excess > 0 else 1.0
    return 0.5 * math.erfc((excess / spread) / math.sqrt(2.0))


def two_proportions(errors_a: int, n_a: int, errors_b: int, n_b: int) -> tuple[float, float]:
    """Two-proportion z test (pooled): (z of a's rate minus b's, two-sided p). (0, 1) when it
    cannot tell (an empty sample, or no or only errors in both)."""
    if n_a == 0 or n_b == 0:
        return 0.0, 1.0
    pooled = (errors_a + errors_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 0.0, 1.0
    z = (errors_a / n_a - errors_b / n_b) / spread
    return z, _two_sided_p(z)
