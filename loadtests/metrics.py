"""The server's own view of a step, from its Prometheus endpoint scraped before and after.

Parses the text format generically and uses Triton's metric names where they exist
(nv_inference_count, nv_inference_exec_count, nv_inference_queue_duration_us,
nv_inference_request_success, nv_inference_pending_request_count, nv_gpu_utilization) plus
Convoy's convoy_batch_dispatch_total{reason}. Any family may be missing: its numbers are None.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

#: The metric families the report reads; the report lists which of them the server exposed.
SERVER_METRICS = (
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_success",
    "nv_inference_queue_duration_us",
    "nv_inference_pending_request_count",
    "nv_gpu_utilization",
    "convoy_batch_dispatch_total",
)

#: (sample name without _total, frozenset of (label, value)) -> value
Samples = dict[tuple[str, frozenset], float]


def _key(name: str) -> str:
    """Counters are named with and without `_total` (Triton: nv_inference_count; the parser
    adds _total to every counter sample): compare names without it."""
    return name.removesuffix("_total")


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every sample of one scrape."""

    samples: Samples

    @classmethod
    def parse(cls, text: str) -> MetricsSnapshot:
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(_key(sample.name), frozenset(sample.labels.items()))] = float(sample.value)
        return cls(samples)

    def has(self, name: str) -> bool:
        return any(sample_name == _key(name) for sample_name, _ in self.samples)

    def total(self, name: str, model: str | None = None, **labels: str) -> float | None:
        """Sum of `name` over samples whose labels match (model matched only where labelled)."""
        found = None
        for (sample_name, sample_labels), value in self.samples.items():
            if sample_name != _key(name):
                continue
            as_dict = dict(sample_labels)
            if model is not None and as_dict.get("model", model) != model:
                continue
            if any(as_dict.get(k) != v for k, v in labels.items()):
                continue
            found = (found or 0.0) + value
        return found

    def by_label(self, name: str, label: str, model: str | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for (sample_name, sample_labels), value in self.samples.items():
            as_dict = dict(sample_labels)
            if sample_name != _key(name) or label not in as_dict:
                continue
            if model is not None and as_dict.get("model", model) != model:
                continue
            out[as_dict[label]] = out.get(as_dict[label], 0.0) + value
        return out


def scrape(url: str | None, timeout_s: float = 5.0) -> MetricsSnapshot | None:
    """One scrape of `url`, or None when there is no URL or the endpoint does not answer."""
    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            return MetricsSnapshot.parse(answer.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class ServerStepMetrics:
    """What the server counted during one step; None where it exposes no such metric."""

    inferences: float | None
    executions: float | None
    successes: float | None
    mean_batch_size: float | None
    mean_queue_us: float | None
    pending_requests: float | None
    gpu_utilization: float | None
    dispatch_reasons: dict[str, float]

    @classmethod
    def between(
        cls, before: MetricsSnapshot | None, after: MetricsSnapshot | None, model: str
    ) -> ServerStepMetrics:
        if before is None or after is None:
            return cls(None, None, None, None, None, None, None, {})

        def delta(name: str) -> float | None:
            start, end = before.total(name, model), after.total(name, model)
            return None if start is None or end is None else end - start

        inferences = delta("nv_inference_count")
        executions = delta("nv_inference_exec_count")
        successes = delta("nv_inference_request_success")
        queue_us = delta("nv_inference_queue_duration_us")
        mean_batch = inferences / executions if inferences is not None and executions else None
        mean_queue = queue_us / successes if queue_us is not None and successes else None
        gpu = after.by_label("nv_gpu_utilization", "gpu_uuid")
        start_reasons = before.by_label("convoy_batch_dispatch_total", "reason", model)
        reasons = {
            reason: value - start_reasons.get(reason, 0.0)
            for reason, value in after.by_label("convoy_batch_dispatch_total", "reason", model).items()
        }
        return cls(
            inferences=inferences,
            executions=executions,
            successes=successes,
            mean_batch_size=mean_batch,
            mean_queue_us=mean_queue,
            pending_requests=after.total("nv_inference_pending_request_count", model),
            gpu_utilization=sum(gpu.values()) / len(gpu) if gpu else None,
            dispatch_reasons={k: v for k, v in sorted(reasons.items()) if v},
        )
