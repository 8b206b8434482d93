"""The usage ledger appends per-interval deltas (never totals twice), and `convoy usage`
summarises ledgers per period and key, with a cost column from a compute-second rate."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import orjson

from convoy.batching.usage import UsageMeter
from convoy.engine.ledger import UsageLedger, read_ledger, summarise
from convoy.types import Request


def request(principal: str | None, rows: int, queued_ns: int = 0) -> Request:
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
    finally:
        loop.close()
    return Request(
        id="",
        inputs={"X": np.zeros((rows, 1))},
        requested_outputs=(),
        rows=rows,
        future=future,
        principal=principal,
        queued_ns=queued_ns,
    )


def test_ledger_appends_each_intervals_usage_once(tmp_path):
    meter = UsageMeter()
    ledger = UsageLedger(tmp_path / "usage.jsonl", meter, interval=3600)
    ledger.start()
    # One 4-row batch shared 1:3 by alice and bob (2 s of compute), plus an anonymous request.
    batch = [request("alice", 1, queued_ns=0), request("bob", 3, queued_ns=0), request(None, 2)]
    meter.record_batch("m", "1", batch, 6, 3_000_000_000, 500_000_000, failed=False)
    assert ledger.flush() == 2
    assert ledger.flush() == 0  # nothing new: nothing written
    meter.record_batch("m", "1", [request("alice", 2)], 2, 1_000_000_000, 0, failed=True)
    meter.record_rejection("m", "1", request("alice", 1))
    ledger.close()
    lines = [orjson.loads(line) for line in (tmp_path / "usage.jsonl").read_bytes().splitlines()]
    assert [(e["key"], e["requests"], e["rows"]) for e in lines] == [
        ("alice", 1, 1),
        ("bob", 1, 3),
        ("alice", 2, 2),
    ]
    first_alice, first_bob, second_alice = lines
    assert first_alice["compute_seconds"] == 0.5 and first_bob["compute_seconds"] == 1.5
    assert first_alice["queue_seconds"] == 0.5
    assert (second_alice["failures"], second_alice["rejections"]) == (1, 1)
    assert second_alice["start"] >= first_alice["end"]  # intervals never overlap

    rows = summarise(read_ledger([tmp_path / "usage.jsonl"]), period="all")
    totals = {(r.key, r.model): r.sums for r in rows}
    assert totals[("alice", "m")]["requests"] == 3
    assert totals[("alice", "m")]["compute_seconds"] == 1.5
    assert totals[("bob", "m")]["compute_seconds"] == 1.5


def write_ledger(path, entries) -> None:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in entries))


def entry(start: str, key: str, model: str, compute: float, requests: int = 1) -> dict:
    return {
        "start": start,
        "end": start,
        "key": key,
        "model": model,
        "version": "1",
        "requests": requests,
        "rows": requests,
        "failures": 0,
        "rejections": 0,
        "queue_seconds": 0.0,
        "compute_seconds": compute,
    }


def test_convoy_usage_sums_per_day_and_key_with_cost(tmp_path):
    ledger = tmp_path / "usage.jsonl"
    write_ledger(
        ledger,
        [
            entry("2026-11-24T23:59:00.000+00:00", "alice", "a", 2.0),
            entry("2026-11-25T00:01:00.000+00:00", "alice", "a", 1.0, requests=4),
            entry("2026-11-25T00:02:00.000+00:00", "alice", "b", 0.5),
            entry("2026-11-25T10:00:00.000+00:00", "bob", "a", 3.0),
        ],
    )
    command = [sys.executable, "-m", "convoy", "usage", str(ledger), "--json"]
    answer = subprocess.run(
        [*command, "--by", "key", "--cost-per-compute-second", "0.25", "--since", "2026-11-25"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(answer.stdout)
    assert [(r["period"], r["key"], r["requests"], r["compute_seconds"], r["cost"]) for r in rows] == [
        ("2026-11-25", "alice", 5, 1.5, 0.375),
        ("2026-11-25", "bob", 1, 3.0, 0.75),
    ]
    table = subprocess.run(
        [sys.executable, "-m", "convoy", "usage", str(ledger), "--period", "month"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "2026-11" in table and "alice" in table and "bob" in table


def test_convoy_usage_names_the_bad_line(tmp_path):
    ledger = tmp_path / "usage.jsonl"
    ledger.write_text(json.dumps(entry("2026-11-25T00:00:00+00:00", "a", "m", 1.0)) + "\n{oops\n")
    answer = subprocess.run(
        [sys.executable, "-m", "convoy", "usage", str(ledger)], capture_output=True, text=True
    )
    assert answer.returncode == 2
    assert f"{ledger}:2" in answer.stderr and "Traceback" not in answer.stderr
