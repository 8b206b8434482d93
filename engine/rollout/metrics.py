"""Prometheus families of the roll-outs, read at scrape time from what they already count (the
request path never calls the Prometheus client)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from convoy.batching.stats import Histogram

from .controller import RUNNING
from .stats import ABS_ERROR_BOUNDS, COSINE_BOUNDS

if TYPE_CHECKING:
    from .manager import RolloutManager

STATES = ("running", "ready", "promoted", "rolled_back", "aborted", "reverted")
MIRROR_OUTCOMES = ("sent", "completed", "failed", "dropped_budget", "dropped_queue", "unpaired")


def _buckets(
    bounds: Sequence[float], counts: Sequence[int], scale: float = 1.0
) -> list[tuple[str, int]]:
    out = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        go_bound = floatToGoString(round(bound * scale, 12))  # type: ignore[no-untyped-call]  # untyped upstream
        out.append((go_bound, running))
    out.append(("+Inf", running + counts[-1]))
    return out


def _latency(histogram: Histogram[int]) -> tuple[list[tuple[str, int]], float]:
    counts = list(histogram.buckets)
    return _buckets(histogram.bounds, counts, 1e-9), histogram.total * 1e-9


class RolloutCollector(Collector):
    def __init__(self, manager: RolloutManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        rollouts = list(self.manager.rollouts.values())
        state = GaugeMetricFamily(
            "convoy_rollout_state",
            "1 for the state each model's roll-out is in",
            labels=("model", "state"),
        )
        weight = GaugeMetricFamily(
            "convoy_rollout_candidate_weight",
            "Share of requests naming no version the candidate serves now (0 in a shadow step)",
            labels=("model", "candidate"),
        )
        step = GaugeMetricFamily(
            "convoy_rollout_step", "The step the roll-out is at (1 = first)", labels=("model",)
        )
        latency = HistogramMetricFamily(
            "convoy_rollout_latency_seconds",
            "Roll-out requests per arm, routed to answered: served to clients, or mirrored",
            labels=("model", "arm", "version", "traffic"),
        )
        requests = CounterMetricFamily(
            "convoy_rollout_requests",
            "Roll-out requests per arm by outcome (served to clients, or mirrored)",
            labels=("model", "arm", "traffic", "outcome"),
        )
        pairs = CounterMetricFamily(
            "convoy_rollout_pairs",
            "Paired comparisons of the candidate's outputs with stable's, by result",
            labels=("model", "result"),
        )
        output_pairs = CounterMetricFamily(
            "convoy_rollout_output_pairs",
            "Paired comparisons per output tensor, by result",
            labels=("model", "output", "result"),
        )
        abs_error = HistogramMetricFamily(
            "convoy_rollout_max_abs_error",
            "Largest absolute difference between the arms' outputs, per compared pair (floats)",
            labels=("model", "output"),
        )
        cosine = HistogramMetricFamily(
            "convoy_rollout_cosine_similarity",
            "Smallest row cosine similarity between the arms' outputs, per compared pair (floats)",
            labels=("model", "output"),
        )
        mirrors = CounterMetricFamily(
            "convoy_rollout_mirrors",
            "Mirrored requests: sent, completed, failed, dropped over the budget or the queue "
            "bound, or left unpaired (the client's request failed)",
            labels=("model", "outcome"),
        )
        for rollout in rollouts:
            model = rollout.model
            for name in STATES:
                state.add_metric([model, name], 1.0 if rollout.state == name else 0.0)
            weight.add_metric([model, str(rollout.candidate)], rollout.weight)
            step.add_metric([model], rollout.step_index + 1 if rollout.state in RUNNING else 0)
            totals = rollout.totals
            for arm in ("stable", "candidate"):
                version = str(rollout.stable if arm == "stable" else rollout.candidate)
                for traffic, mirrored in (("served", False), ("mirrored", True)):
                    buckets, total = _latency(rollout.histograms.of(arm, mirrored))
                    latency.add_metric([model, arm, version, traffic], buckets, total)
                    window = totals.window(arm, mirrored)
                    successes = window.requests - window.errors
                    requests.add_metric([model, arm, traffic, "success"], successes)
                    requests.add_metric([model, arm, traffic, "error"], window.errors)
            paired = totals.pairs
            pairs.add_metric([model, "agree"], paired.agree)
            pairs.add_metric([model, "disagree"], paired.pairs - paired.agree)
            for output, counts in sorted(list(paired.outputs.items())):  # one copy: the loop adds
                output_pairs.add_metric([model, output, "agree"], counts.agree)
                output_pairs.add_metric([model, output, "disagree"], counts.pairs - counts.agree)
                if sum(counts.abs_error):
                    abs_error.add_metric(
                        [model, output],
                        _buckets(ABS_ERROR_BOUNDS, counts.abs_error),
                        counts.abs_error_sum,
                    )
                if sum(counts.cosine):
                    cosine.add_metric(
                        [model, output], _buckets(COSINE_BOUNDS, counts.cosine), counts.cosine_sum
                    )
            counted = totals.mirrors.describe()
            for outcome in MIRROR_OUTCOMES:
                mirrors.add_metric([model, outcome], counted[outcome])
        yield from (
            state,
            weight,
            step,
            latency,
            requests,
            pairs,
            output_pairs,
            abs_error,
            cosine,
            mirrors,
        )
