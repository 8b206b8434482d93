"""What the response cache costs and what it saves.

    python bench/cache.py lookup   # cache cost per request (key + lookup + insert), 1 KiB request
    python bench/cache.py cpu      # server CPU per request, hit vs miss, demo text_embedding
    python bench/cache.py replay [--log FILE]   # hit rate and saved compute on a payload log
    python bench/cache.py all --out bench/reports/cache.md

`lookup` runs the engine's ResponseCache in-process over a local store, with a stand-in model
that answers at once, so what is timed is the cache layer alone: a miss (key, lookup, single-
flight bookkeeping, the sub-request, entry copy, insert) and a hit (key, lookup, answer).

`cpu` and `replay` start `convoy serve` on a copy of the demo text_embedding model with
`response_cache { enable: true }` and `--cache-config local,...`, send requests over HTTP and read
the server's CPU time from /proc (all its threads) and its counters from /metrics.

`replay` replays a payload log (`--payload-log-dir` JSON lines: each line's inputs, in order).
Without `--log` it writes one first: sentences drawn from a Zipf distribution (s = 1.1) over a
vocabulary, so some repeat often and many appear once, as traffic from many users does.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402


# --- lookup: the cache layer in-process ------------------------------------------------------------
def bench_lookup(requests_count: int = 20000) -> dict:
    import asyncio

    from convoy.config import ModelConfig, ResponseCachePolicy
    from convoy.engine.cache_store import LocalStore
    from convoy.engine.repository import ModelVersion
    from convoy.engine.response_cache import ResponseCache
    from convoy.types import Request, Response, TensorSpec

    config = ModelConfig(
        name="m",
        backend="python",
        max_batch_size=8,
        inputs=(TensorSpec("IN", "FP32", (256,)),),
        outputs=(TensorSpec("OUT", "FP32", (256,)),),
        response_cache=ResponseCachePolicy(rows=True),
    )
    entry = ModelVersion(config=config, version=1, state="READY", revision="r")

    def answer(model, sub) -> None:  # the model, answering at once: only the cache is timed
        sub.future.set_result(Response({"OUT": sub.inputs["IN"]}, "m", "1"))

    class Sink:
        def done(self):
            return False

        def set_result(self, result):
            self.result = result

        def set_exception(self, error):
            raise error

    cache = ResponseCache(LocalStore(size=1 << 30), answer, lambda m, r: None)
    rng = np.random.default_rng(0)
    payloads = [rng.random((1, 256), dtype=np.float32) for _ in range(requests_count)]  # 1 KiB each

    def run(arrays, submit) -> float:
        started = time.perf_counter_ns()
        for array in arrays:
            request = Request("", {"IN": array}, (), 1, Sink())
            submit(entry, request)
        return (time.perf_counter_ns() - started) / len(arrays) / 1000

    async def measure() -> tuple[float, float, float]:
        run(payloads[:1000], cache.submit)  # warm the interpreter's caches
        # The harness alone (building each request): subtracted from the figures below.
        harness = min(run(payloads[1000:], lambda e, r: None) for _ in range(3))
        miss = run(payloads[1000:], cache.submit)
        hit = run(payloads[1000:], cache.submit)
        return harness, miss - harness, hit - harness

    harness_us, miss_us, hit_us = asyncio.run(measure())

    # The cache proper (what Triton's cache_miss time covers): key, lookup, copy, insert.
    from convoy.engine.cache_key import key_prefix, row_keys
    from convoy.engine.cache_store import entry_from

    store = LocalStore(size=1 << 30)
    fresh = [rng.random((1, 256), dtype=np.float32) for _ in range(requests_count)]
    started = time.perf_counter_ns()
    for array in fresh:
        request = Request("", {"IN": array}, (), 1, Sink())
        key = row_keys(key_prefix("m", 1, "r", request, None), config, request)[0]
        if store.get(key) is None:
            store.insert(key, "m/1/r", entry_from({"OUT": array}, None, 0))
    proper_us = (time.perf_counter_ns() - started) / len(fresh) / 1000 - harness_us
    return {
        "lookup_plus_insert_us_per_request (key + miss lookup + entry copy + insert)": round(
            proper_us, 2
        ),
        "request_bytes": 1024,
        "requests": requests_count - 1000,
        "miss_us_per_request (key + lookup + sub-request + insert)": round(miss_us, 2),
        "hit_us_per_request (key + lookup + answer)": round(hit_us, 2),
        "harness_us_per_request (subtracted)": round(harness_us, 2),
    }


# --- a server with the cached demo model -----------------------------------------------------------
def _cached_repository(root: Path, cache_rows: bool = True) -> Path:
    from convoy.cli import demo_repository

    target = root / "models" / "text_embedding"
    shutil.copytree(demo_repository() / "text_embedding", target)
    config = target / "config.pbtxt"
    text = config.read_text() + "response_cache { enable: true }\n"
    if not cache_rows:
        text += 'parameters { key: "response_cache_rows" value: { string_value: "false" } }\n'
    config.write_text(text)
    return root / "models"


class Server:
    def __init__(self, repository: Path, log: Path, cache_bytes: int) -> None:
        from helpers import ConvoyProcess

        self.process = ConvoyProcess(repository, log, ("--cache-config", f"local,size={cache_bytes}"))

    def __enter__(self):
        self.process.start("ready")
        self.session = requests.Session()
        self.url = f"http://{self.process.http_url}/v2/models/text_embedding/infer"
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()
        self.process.stop()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def infer(self, sentences: list[str]) -> str:
        body = {
            "inputs": [
                {"name": "TEXT", "datatype": "BYTES", "shape": [len(sentences), 1], "data": sentences}
            ]
        }
        answer = self.session.post(self.url, json=body, timeout=120)
        answer.raise_for_status()
        return answer.json().get("parameters", {}).get("convoy-cache", "")

    def metric(self, name: str, **labels) -> float:
        from helpers import metric_value

        return metric_value(self.process, name, **labels)


def _sentence(rng: random.Random, words: list[str], length: int = 12) -> str:
    return " ".join(rng.choice(words) for _ in range(length))


WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "model",
    "server",
    "batch",
    "cache",
    "request",
    "answer",
    "fast",
    "slow",
    "river",
    "city",
    "night",
    "morning",
    "light",
    "green",
    "blue",
    "train",
    "road",
    "music",
    "paper",
    "window",
    "garden",
    "data",
    "token",
    "vector",
]


def bench_cpu(count: int = 300) -> dict:
    rng = random.Random(1)
    sentences = [f"{i} " + _sentence(rng, WORDS) for i in range(count)]
    with (
        tempfile.TemporaryDirectory() as folder,
        Server(_cached_repository(Path(folder)), Path(folder) / "server.log", 64 << 20) as server,
    ):
        for sentence in sentences[:20]:  # warm the model and the path (these become hits)
            server.infer([sentence])
        fresh = sentences[20:]
        before = server.cpu_seconds()
        markers = [server.infer([s]) for s in fresh]
        miss_cpu = server.cpu_seconds() - before
        assert set(markers) == {"miss"}, set(markers)
        before = server.cpu_seconds()
        markers = [server.infer([s]) for s in fresh]
        hit_cpu = server.cpu_seconds() - before
        assert set(markers) == {"hit"}, set(markers)
    n = len(fresh)
    return {
        "requests": n,
        "miss_cpu_us_per_request": round(miss_cpu / n * 1e6),
        "hit_cpu_us_per_request": round(hit_cpu / n * 1e6),
        "miss_over_hit": round(miss_cpu / hit_cpu, 1) if hit_cpu else None,
    }


# --- replay ----------------------------------------------------------------------------------------
def write_zipf_log(path: Path, count: int, vocabulary: int = 2000, seed: int = 7) -> None:
    """A payload log (the --payload-log-dir format) of `count` one-sentence requests whose
    sentences follow a Zipf law over `vocabulary` sentences (rank r drawn with weight r^-1.1)."""
    rng = random.Random(seed)
    pool = [f"{i} " + _sentence(rng, WORDS) for i in range(vocabulary)]
    weights = [1 / (rank**1.1) for rank in range(1, vocabulary + 1)]
    with path.open("w") as handle:
        for i, sentence in enumerate(rng.choices(pool, weights, k=count)):
            line = {
                "model": "text_embedding",
                "version": "1",
                "id": str(i),
                "status": "success",
                "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": [sentence]}],
            }
            handle.write(json.dumps(line) + "\n")


def _logged_sentences(path: Path) -> list[list[str]]:
    requests_ = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        for tensor in entry["inputs"]:
            if tensor["name"] == "TEXT":
                data = tensor.get("data")
                if data is None:
                    data = [
                        base64.b64decode(x).decode("utf-8", "replace") for x in tensor["data_base64"]
                    ]
                requests_.append(list(data))
    return requests_


def bench_replay(log: Path | None, count: int = 1500, cache_bytes: int = 64 << 20) -> dict:
    synthetic = log is None
    with tempfile.TemporaryDirectory() as folder:
        if log is None:
            log = Path(folder) / "text_embedding.jsonl"
            write_zipf_log(log, count)
        sentences = _logged_sentences(log)
        distinct = len({tuple(s) for s in sentences})
        with Server(
            _cached_repository(Path(folder)), Path(folder) / "server.log", cache_bytes
        ) as server:
            markers: dict[str, int] = {}
            for batch in sentences:
                marker = server.infer(batch)
                markers[marker] = markers.get(marker, 0) + 1
            labels = {"model": "text_embedding"}
            saved = server.metric("convoy_cache_saved_compute_seconds_total", **labels)
            # Compute as the saved estimate counts it: input + infer + output per batch.
            spent = server.metric("convoy_compute_seconds_sum", **labels)
            cached_rows = server.metric("convoy_cache_rows_total", source="cache", **labels)
            computed_rows = server.metric("convoy_cache_rows_total", source="computed", **labels)
            entries = server.metric("convoy_cache_entries", **labels)
            rejected = server.metric("convoy_cache_rejected_total", reason="admission", **labels)
    total = len(sentences)
    return {
        "log": f"synthetic Zipf(1.1) over 2000 sentences, {total} requests" if synthetic else str(log),
        "requests": total,
        "distinct_requests": distinct,
        "hits": markers.get("hit", 0),
        "misses": markers.get("miss", 0),
        "partial": markers.get("partial", 0),
        "hit_rate": round(markers.get("hit", 0) / total, 3),
        "best_possible_hit_rate": round(1 - distinct / total, 3),
        "rows_from_cache": int(cached_rows),
        "rows_computed": int(computed_rows),
        "model_compute_s": round(spent, 2),
        "saved_compute_s": round(saved, 2),
        "saved_share": round(saved / (saved + spent), 3) if saved + spent else None,
        "entries": int(entries),
        "admission_refusals": int(rejected),
        "cache_bytes": cache_bytes,
    }


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Response cache benchmark",
        "",
        f"Machine: {machine['cpu']}, {machine['cores_usable']} usable cores, Python {machine['python']}"
        + (f", GPU {machine['gpu']}" if machine["gpu"] else ", no GPU")
        + f"; {report['when']}.",
        "",
    ]
    for section, values in report["results"].items():
        lines += [f"## {section}", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("lookup", "cpu", "replay", "all"))
    parser.add_argument("--log", type=Path, help="replay: a payload log (JSON lines) to replay")
    parser.add_argument("--requests", type=int, default=1500, help="replay: synthetic log length")
    parser.add_argument("--cache-bytes", type=int, default=64 << 20, help="replay: the cache's size")
    parser.add_argument("--out", type=Path, help="also write the report as markdown here")
    args = parser.parse_args()
    results = {}
    if args.what in ("lookup", "all"):
        results["cache layer per request (in-process, 1 KiB FP32 request, local store)"] = bench_lookup()
    if args.what in ("cpu", "all"):
        results["server CPU per request, text_embedding over HTTP, one sentence"] = bench_cpu()
    if args.what in ("replay", "all"):
        results["payload log replay, text_embedding"] = bench_replay(
            args.log, args.requests, args.cache_bytes
        )
        # A cache holding ~60 of the log's 400-odd distinct answers: what admission keeps.
        results["payload log replay, text_embedding, 128 KiB cache"] = bench_replay(
            args.log, args.requests, 128 << 10
        )
    report = {"machine": describe(), "when": time.strftime("%Y-%m-%d"), "results": results}
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
