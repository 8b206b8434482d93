"""The Prometheus text exposition /metrics serves, apart from the engine's collectors so a
front-end process can write it without importing the engine (engine/metrics.py defines the
families; server/observability/metrics_server.py serves them).

Triton exposes the counters model code defines under their exact names, typed `counter`;
prometheus_client alone would name them `name_total`. `ExactCounter` marks such a family and
`prometheus_text` writes it that way.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric


class ExactCounter(Metric):
    """A counter exposed under its exact name, as Triton exposes counters that model code
    defines: `# TYPE name counter` and samples named `name` in the Prometheus text format
    (`prometheus_text`; prometheus_client alone would type it as `name_total`). OpenMetrics
    requires counters' samples to end in `_total`, so there it stays `unknown`."""

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation, "unknown")


class _Collected:
    """Metrics already collected, as something generate_latest can read."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def prometheus_text(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (0.0.4), as generate_latest writes it, with
    ExactCounter families typed `counter`."""
    parts: list[bytes] = []
    plain: list[Metric] = []
    for metric in registry.collect():
        if not isinstance(metric, ExactCounter):
            plain.append(metric)
            continue
        if plain:
            parts.append(generate_latest(_Collected(plain)))
            plain = []
        text = generate_latest(_Collected([metric]))
        # generate_latest writes this TYPE line for an `unknown` family; the name was checked
        # as a legacy Prometheus name when the family was defined, so it is written as is.
        parts.append(
            text.replace(
                f"# TYPE {metric.name} untyped\n".encode(),
                f"# TYPE {metric.name} counter\n".encode(),
                1,
            )
        )
    if plain:
        parts.append(generate_latest(_Collected(plain)))
    return b"".join(parts)
