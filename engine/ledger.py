"""The usage ledger: per-principal showback written as an append-only JSON-lines file, and the
summary `convoy usage` prints from it.

Every `interval` seconds a thread takes the usage meter's totals, subtracts what it wrote last
time and appends one line per (key, model, version) that used anything in the interval; a roll-out's
shadow work (mirrored requests) gets lines of its own with `"traffic": "shadow"`. Lines are never
rewritten, so the file can be shipped or tailed while the server runs; a restart starts a
new run of intervals (the meter's totals start at zero again) and the sums stay right.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from convoy.batching.usage import UsageKey, UsageMeter, UsageTotals

log = logging.getLogger("convoy.usage")

#: Ledger fields summed by `convoy usage` (seconds are floats, the rest counts).
SUMMED = (
    "requests",
    "rows",
    "failures",
    "rejections",
    "queue_seconds",
    "compute_seconds",
    "cache_hits",
    "saved_compute_seconds",
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def ledger_line(start: str, end: str, key: UsageKey, used: UsageTotals, shadow: bool = False) -> bytes:
    principal, model, version = key
    extra = {"traffic": "shadow"} if shadow else {}
    return (
        orjson.dumps(
            {
                **extra,
                "start": start,
                "end": end,
                "key": principal,
                "model": model,
                "version": version,
                "requests": used.requests,
                "rows": used.rows,
                "failures": used.failures,
                "rejections": used.rejections,
                "queue_seconds": used.queue_ns / 1e9,
                "compute_seconds": used.compute_ns / 1e9,
                "cache_hits": used.cache_hits,
                "saved_compute_seconds": used.saved_compute_ns / 1e9,
            }
        )
        + b"\n"
    )


class UsageLedger:
    """Appends the meter's per-interval deltas to `path` from its own thread."""

    def __init__(self, path: Path, meter: UsageMeter, interval: float = 60.0) -> None:
        self.path = Path(path)
        self.meter = meter
        self.interval = interval
        #: What the last flush saw, by (shadow, key).
        self._written: dict[tuple[bool, UsageKey], UsageTotals] = {}
        self._since = _now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="convoy-usage-ledger", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> int:
        """Append the usage since the last flush; returns the lines written."""
        end = _now()
        lines = []
        for shadow in (False, True):
            for key, totals in self.meter.snapshot(shadow).items():
                used = totals.minus(self._written.get((shadow, key), UsageTotals()))
                if used:
                    lines.append(ledger_line(self._since, end, key, used, shadow))
                self._written[(shadow, key)] = totals
        if lines:
            try:
                with self.path.open("ab") as out:
                    out.write(b"".join(lines))
            except OSError:
                log.exception("cannot append to the usage ledger %s", self.path)
                return 0
        self._since = end
        return len(lines)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.flush()


# --- `convoy usage` ---------------------------------------------------------------------------

PERIODS = {"hour": 13, "day": 10, "month": 7, "all": 0}


@dataclass
class UsageRow:
    period: str
    key: str
    model: str
    #: "served" (clients' own requests) or "shadow" (a roll-out's mirrored copies of them).
    traffic: str = "served"
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUMMED, 0))

    def cost(self, rate: float) -> float:
        return self.sums["compute_seconds"] * rate


def read_ledger(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        with Path(path).open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a ledger line ({exc})") from exc


def summarise(
    entries: Iterable[dict[str, Any]],
    period: str = "day",
    by_model: bool = True,
    since: str = "",
    until: str = "",
) -> list[UsageRow]:
    """Sum ledger lines per period (of their interval's start, UTC), key, (optionally) model and
    traffic (shadow work in rows of its own)."""
    width = PERIODS[period]
    rows: dict[tuple[str, str, str, str], UsageRow] = {}
    for entry in entries:
        start = entry["start"]
        if (since and start < since) or (until and start >= until):
            continue
        slot = start[:width] if width else "all"
        model = entry["model"] if by_model else "*"
        traffic = entry.get("traffic", "served")
        row = rows.get((slot, entry["key"], model, traffic))
        if row is None:
            row = rows[(slot, entry["key"], model, traffic)] = UsageRow(
                slot, entry["key"], model, traffic
            )
        for name in SUMMED:
            row.sums[name] += entry.get(name, 0)
    return [rows[k] for k in sorted(rows)]
