"""Reading the engine's /metrics in the worker tests: per-worker requests and processes."""

from __future__ import annotations

import requests
from helpers import WORKER_FLAGS
from prometheus_client.parser import text_string_to_metric_families

WORKERS = WORKER_FLAGS


def scrape(process) -> dict[tuple[str, frozenset], float]:
    text = requests.get(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def per_worker_requests(process) -> dict[str, float]:
    """Inference requests each worker slot handed to the engine: {"0": n, "1": m}."""
    return {
        dict(labels)["worker"]: value
        for (name, labels), value in scrape(process).items()
        if name == "convoy_worker_requests_total"
    }


def worker_pids(process) -> dict[str, int]:
    """The pid of each serving worker: {"0": pid, ...}."""
    return {
        dict(labels)["worker"]: int(dict(labels)["pid"])
        for (name, labels), value in scrape(process).items()
        if name == "convoy_worker_up" and value == 1
    }
