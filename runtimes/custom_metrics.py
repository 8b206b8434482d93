"""Metric families that model code defines (Triton's pb_utils.MetricFamily), exported on /metrics.

Model threads update series; the metrics server's thread reads them at scrape time. Each series
holds plain floats behind one lock per family (updates are rare next to inference work).
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field

from convoy.errors import InvalidInput

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(eq=False)
class Series:
    family: Family
    labels: tuple[tuple[str, str], ...]
    buckets: tuple[float, ...] = ()
    total: float = 0.0
    count: int = 0
    bucket_counts: list[int] = field(default_factory=list)

    def increment(self, value: float) -> None:
        if self.family.kind == "counter" and value < 0:
            raise InvalidInput(f"metric '{self.family.name}': a counter cannot decrease ({value})")
        if self.family.kind == "histogram":
            raise InvalidInput(
                f"metric '{self.family.name}': a histogram takes observe(), not increment()"
            )
        with self.family.lock:
            self.total += value

    def set(self, value: float) -> None:
        if self.family.kind != "gauge":
            raise InvalidInput(f"metric '{self.family.name}': only a gauge can be set")
        with self.family.lock:
            self.total = float(value)

    def observe(self, value: float) -> None:
        if self.family.kind != "histogram":
            raise InvalidInput(f"metric '{self.family.name}': only a histogram takes observe()")
        with self.family.lock:
            self.total += value
            self.count += 1
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    self.bucket_counts[index] += 1

    def value(self) -> float:
        return self.total


@dataclass(eq=False)
class Family:
    name: str
    description: str
    kind: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    series: dict[tuple[tuple[str, str], ...], Series] = field(default_factory=dict)

    def child(self, labels: dict, buckets=None) -> Series:
        for key in labels:
            if not isinstance(key, str) or not _LABEL.match(key):
                raise InvalidInput(f"metric '{self.name}': label name {key!r} is not valid")
        if buckets is not None and self.kind != "histogram":
            raise InvalidInput(
                f"metric '{self.name}': buckets are only for a histogram, not a {self.kind}"
            )
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self.lock:
            found = self.series.get(key)
            if found is None:
                bounds: tuple[float, ...] = ()
                if self.kind == "histogram":
                    if not buckets:
                        raise InvalidInput(f"metric '{self.name}': a histogram needs buckets")
                    bounds = tuple(sorted(float(b) for b in buckets))
                    if bounds[-1] != math.inf:
                        bounds = (*bounds, math.inf)
                found = Series(self, key, bounds, bucket_counts=[0] * len(bounds))
                self.series[key] = found
            return found


class CustomMetrics:
    """Every family model code registered in this server, by name, plus what model code in
    worker processes reported (`apply_snapshot`); `merged()` sums them per series."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.families: dict[str, Family] = {}
        #: Worker (instance name) -> its latest snapshot (see `snapshot`).
        self._remote: dict[str, list] = {}

    def snapshot(self) -> list:
        """Plain data for a process boundary: [name, description, kind, [[labels, total, count,
        finite bucket bounds, bucket counts], ...]] per family."""
        out = []
        for family in list(self.families.values()):
            with family.lock:
                series = [
                    [list(s.labels), s.total, s.count, list(s.buckets[:-1]), list(s.bucket_counts)]
                    for s in family.series.values()
                ]
            out.append([family.name, family.description, family.kind, series])
        return out

    def apply_snapshot(self, source: str, snapshot: list) -> None:
        """A worker's families (replacing what that worker reported before)."""
        with self._lock:
            self._remote[source] = snapshot

    def merged(self) -> list[tuple[str, str, str, dict]]:
        """(name, description, kind, {labels: [total, count, bounds, bucket counts]}) for every
        family, local and reported, series with the same labels summed."""
        merged: dict[str, tuple[str, str, dict]] = {}
        with self._lock:
            remote = list(self._remote.values())
        for snapshot in [self.snapshot(), *remote]:
            for name, description, kind, series in snapshot:
                _, _, by_labels = merged.setdefault(name, (description, kind, {}))
                for labels, total, count, bounds, counts in series:
                    key = tuple(tuple(pair) for pair in labels)
                    found = by_labels.get(key)
                    if found is None:
                        by_labels[key] = [total, count, list(bounds), list(counts)]
                    else:
                        found[0] += total
                        found[1] += count
                        if len(found[3]) == len(counts):
                            found[3] = [a + b for a, b in zip(found[3], counts, strict=True)]
        return [(name, d, k, series) for name, (d, k, series) in merged.items()]

    def family(self, name: str, description: str, kind: str) -> Family:
        if not _NAME.match(name or ""):
            raise InvalidInput(f"metric family name {name!r} is not a valid Prometheus name")
        if name.startswith("nv_") or name.startswith("convoy_"):
            raise InvalidInput(
                f"metric family name '{name}': the nv_ and convoy_ prefixes are the server's"
            )
        with self._lock:
            found = self.families.get(name)
            if found is None:
                found = self.families[name] = Family(name, description, kind)
            elif found.kind != kind:
                raise InvalidInput(
                    f"metric family '{name}' already exists as a {found.kind}, not a {kind}"
                )
            return found
