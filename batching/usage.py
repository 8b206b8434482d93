"""Showback: what each caller used, per model version, down to its share of every batch.

A gateway in front of the server sees requests, not batches: it cannot tell that one key's rows
rode in a batch with three others'. The scheduler can, so it apportions each batch's compute time
to the requests in it by their rows, and adds it to their caller's totals here.

Only requests that carry a principal (the API key's name, set by the front ends when keys are
configured) are counted. A roll-out's mirrored requests (shadow work: the candidate's copies of
clients' requests, and stable's copies in canary comparisons) are counted apart, under the
caller whose request was mirrored, so a team sees what its candidate costs. Updated on the event
loop thread; read by the metrics exporter and the
usage ledger from theirs (new keys are added under a lock; counters are plain attribute updates).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

from convoy.types import Request


@dataclass(slots=True)
class UsageTotals:
    """Cumulative usage of one principal on one model version."""

    requests: int = 0
    rows: int = 0
    #: Requests that failed once admitted (the model raised, timed out while executing).
    failures: int = 0
    #: Requests turned away: by the queue (full, deadline cannot be met, queue timeout) or by
    #: the API key's quota (429).
    rejections: int = 0
    queue_ns: int = 0
    #: This principal's share of the compute time of the batches its requests rode in.
    compute_ns: int = 0
    #: Response cache: requests answered wholly from it, rows it answered, and the compute
    #: those rows would have cost (estimated from the model's measured cost per row).
    cache_hits: int = 0
    cached_rows: int = 0
    saved_compute_ns: int = 0

    def copy(self) -> UsageTotals:
        return UsageTotals(*(getattr(self, f.name) for f in fields(self)))

    def minus(self, earlier: UsageTotals) -> UsageTotals:
        return UsageTotals(*(getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)))

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


#: (principal, model, version)
UsageKey = tuple[str, str, str]


class UsageMeter:
    def __init__(self) -> None:
        self._totals: dict[UsageKey, UsageTotals] = {}
        #: Shadow work (mirrored requests), per the caller whose request was mirrored.
        self._shadow: dict[UsageKey, UsageTotals] = {}
        self._lock = threading.Lock()

    def _entry(self, key: UsageKey, shadow: bool = False) -> UsageTotals:
        table = self._shadow if shadow else self._totals
        totals = table.get(key)
        if totals is None:
            with self._lock:
                totals = table.setdefault(key, UsageTotals())
        return totals

    def record_batch(
        self,
        model: str,
        version: str,
        batch: list[Request],
        rows: int,
        compute_ns: int,
        dispatched_ns: int,
        failed: bool,
    ) -> None:
        """A batch finished (or failed): each request's caller gets `rows_i / rows` of its
        compute time, its queue time, and a request and its rows."""
        for request in batch:
            principal = request.principal
            if principal is None:
                continue
            totals = self._entry((principal, model, version), request.mirror)
            totals.requests += 1
            totals.rows += request.rows
            totals.failures += failed
            totals.queue_ns += max(dispatched_ns - request.queued_ns, 0)
            totals.compute_ns += compute_ns * request.rows // rows

    def record_rejection(self, model: str, version: str, request: Request) -> None:
        if request.principal is not None:
            totals = self._entry((request.principal, model, version))
            totals.requests += 1
            totals.rejections += 1

    def record_cache(
        self, model: str, version: str, request: Request, rows: int, saved_ns: int, hit: bool
    ) -> None:
        """Rows of `request` answered by the response cache; a whole hit is also a request
        (a partial answer's request is counted with its computed rows' batch)."""
        if request.principal is None:
            return
        totals = self._entry((request.principal, model, version))
        if hit:
            totals.requests += 1
            totals.cache_hits += 1
        totals.rows += rows
        totals.cached_rows += rows
        totals.saved_compute_ns += saved_ns

    def snapshot(self, shadow: bool = False) -> dict[UsageKey, UsageTotals]:
        """A consistent-enough copy for exporters (each entry copied field by field); `shadow`:
        the mirrored requests' usage instead of the clients' own."""
        with self._lock:
            items = list((self._shadow if shadow else self._totals).items())
        return {key: totals.copy() for key, totals in items}
