"""One entry point for Convoy's performance numbers: served vs raw, gRPC and HTTP, same run.

    python bench/run.py                      # every workload, full measurement
    python bench/run.py --quick              # short windows (what CI runs; checks files, not numbers)
    python bench/run.py --workload mlp --concurrency 1 8 32
    python bench/run.py --workload mlp --peers pytriton,mlserver   # Convoy against its peers

For each workload: the raw model in-process at its best batch size (the ceiling), then Convoy
serving it, driven by perf_analyzer with 1-row requests over gRPC, HTTP with binary tensors and
HTTP JSON at each concurrency. For mlp, the peers installed under .peers/ (python -m bench.peers
install) serve the same model with the same batching and are measured the same way, gRPC and
HTTP JSON, each right after Convoy at the same point; MLServer, which perf_analyzer cannot
drive, is measured with bench/loadgen.py, and so is Convoy beside it. Writes
bench/results/<timestamp>.json and .md with ratios (served / raw, Convoy / peer), the targets of
issue #8 and the machine, load average included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from drivers import PROTOCOL_ARGS, find_perf_analyzer, loadgen, perf_analyzer  # noqa: E402
from machine import describe  # noqa: E402
from peers import PEERS, installed, missing_reason  # noqa: E402
from peers import compare as peer_compare  # noqa: E402
from peers.catalogue import PEERS_DIR, installed_versions  # noqa: E402
from peers.launch import serve as serve_peer  # noqa: E402
from workloads import (  # noqa: E402
    MLP_MAX_BATCH_SIZE,
    MLP_MAX_QUEUE_DELAY_US,
    WORKLOADS,
    mlp_weights_path,
)

ROOT = HERE.parent
GPU_WORKLOADS = {"bert_base", "resnet50"}
#: Workloads the peers can serve (bench/peers/ has the model for these only).
PEER_WORKLOADS = {"mlp"}
#: Protocols the peers are compared on: MLServer has no binary tensor extension over HTTP.
PEER_PROTOCOLS = ("grpc", "http_json")


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def measure_raw(raw, batch: int, seconds: float) -> dict:
    raw(batch)  # warm
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        raw(batch)
        count += 1
    elapsed = time.perf_counter() - start
    return {"batch": batch, "rows_per_s": round(count * batch / elapsed), "batches": count}


class Server:
    """`convoy serve` in a subprocess on free ports."""

    def __init__(
        self, repository: Path, log: Path, env: dict[str, str] | None = None, frontend: str = ""
    ) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "convoy",
                "serve",
                "--model-repository",
                str(repository),
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--metrics-port",
                "-1",
                "--host",
                "127.0.0.1",
                "--log-level",
                "WARNING",
                *(("--frontend", frontend) if frontend else ()),
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 120
        for line in self.process.stdout:
            if line.startswith("convoy: serving"):
                fields = dict(part.split("=") for part in line.split() if "=" in part)
                self.http, self.grpc = int(fields["http"]), int(fields["grpc"])
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit(f"convoy did not start; see {log}")

    def port(self, protocol: str) -> int:
        return self.grpc if protocol == "grpc" else self.http

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def set_batch_dispatch(repository: Path, rule: str) -> None:
    """Give every dynamically batched model of the workload `rule` (parameter batch_dispatch)."""
    for config in repository.glob("*/config.pbtxt"):
        text = config.read_text()
        if "dynamic_batching" in text and "batch_dispatch" not in text:
            parameter = f'parameters {{ key: "batch_dispatch" value {{ string_value: "{rule}" }} }}'
            config.write_text(f"{text.rstrip()}\n{parameter}\n")


def select_peers(spec: str | None) -> list[str]:
    """--peers value -> peer names; None (the default) means every peer, measured if installed."""
    if spec is None:
        return list(PEERS)
    if spec.strip() == "none":
        return []
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise SystemExit(
            f"--peers: unknown peer {', '.join(unknown)}; expected some of {', '.join(PEERS)}"
        )
    return names


def start_peers(
    names: list[str],
    peers_dir: Path,
    weights: Path,
    scratch: Path,
    stack: ExitStack,
    env: dict[str, str],
) -> tuple[list[dict], list[tuple[dict, object, object]]]:
    """Start every installed peer among `names` (stopped when `stack` closes). Returns one report
    entry per name (status: measured / not installed / error) and (entry, peer, running) for
    those that started."""
    entries, started = [], []
    for name in names:
        peer = PEERS[name]
        entry = {"name": name, "description": peer.description}
        entries.append(entry)
        if not installed(peer, peers_dir):
            entry["status"] = missing_reason(peer)
            continue
        entry["versions"] = installed_versions(peer, peers_dir)
        entry["driver"] = "perf_analyzer" if peer.perf_analyzer else "loadgen"
        try:
            running = stack.enter_context(
                serve_peer(
                    peer,
                    weights,
                    MLP_MAX_BATCH_SIZE,
                    MLP_MAX_QUEUE_DELAY_US,
                    scratch / f"peer-{name}",
                    peers_dir,
                    env,
                )
            )
        except RuntimeError as exc:  # the launcher's start-up failures name the log
            entry["status"] = f"error: {exc}"
            continue
        entry.update(status="measured", runs=[])
        started.append((entry, peer, running))
    return entries, started


def finish(run: dict, protocol: str, concurrency: int) -> dict:
    """Label a measurement; the 1-minute load average says how busy the shared machine was."""
    run.update(protocol=protocol, concurrency=concurrency, load_1m=round(os.getloadavg()[0], 2))
    return run


@dataclass(frozen=True)
class Point:
    """One measurement point of one workload: protocol x concurrency, driven the same way for
    every server."""

    binary: str
    workload: object
    protocol: str
    concurrency: int
    quick: bool
    scratch: Path

    def perf_analyzer(self, model: str, port: int, tag: str, extra: tuple[str, ...] = ()) -> dict:
        csv_path = self.scratch / f"{tag}-{self.protocol}-{self.concurrency}.csv"
        run = perf_analyzer(
            self.binary,
            model,
            self.protocol,
            port,
            self.concurrency,
            self.workload.shapes,
            self.quick,
            csv_path,
            (*self.workload.perf_args, *extra),
        )
        return finish(run, self.protocol, self.concurrency)

    def loadgen(self, port: int) -> dict:
        run = loadgen(self.protocol, port, self.concurrency, self.quick)
        return finish(run, self.protocol, self.concurrency)


def measure_point(point: Point, server: Server, result: dict, started: list) -> None:
    """Convoy at `point`, then each started peer right after it (and, for peers perf_analyzer
    cannot drive, Convoy and the peer under loadgen), so paired numbers share the machine's load."""
    name = result["name"]
    run = point.perf_analyzer(name, server.port(point.protocol), name)
    if "requests_per_s" in run:
        run["served_over_raw"] = run["requests_per_s"] / result["raw"]["rows_per_s"]
    result["served"].append(run)
    print(json.dumps({"workload": name, **run}), flush=True)
    if point.protocol not in PEER_PROTOCOLS:
        return
    for entry, peer, running in started:
        if peer.perf_analyzer:
            extra = running.perf_args(point.protocol)
            run = point.perf_analyzer(running.model, running.port(point.protocol), peer.name, extra)
            entry["runs"].append(run)
            print(json.dumps({"peer": peer.name, **run}), flush=True)
    loadgen_peers = [
        (entry, peer, running) for entry, peer, running in started if not peer.perf_analyzer
    ]
    if loadgen_peers:
        run = point.loadgen(server.port(point.protocol))
        result.setdefault("served_loadgen", []).append(run)
        print(json.dumps({"workload": name, "driver": "loadgen", **run}), flush=True)
    for entry, peer, running in loadgen_peers:
        run = point.loadgen(running.port(point.protocol))
        entry["runs"].append(run)
        print(json.dumps({"peer": peer.name, "driver": "loadgen", **run}), flush=True)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: other work on the machine skews every number here."""
    return [round(value, 2) for value in os.getloadavg()]


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# Convoy benchmark {report['started']}",
        "",
        f"Machine: {machine.get('gpu') or 'no GPU'}; {machine['cpu']}, {machine['cores']} cores "
        f"(Python {machine['python']}); "
        "client (perf_analyzer) and server share the machine.",
        f"Command: `{report['command']}`",
        f"Environment of every server: {report.get('server_env') or 'as inherited'}.",
        f"Convoy's dynamic batcher: {report.get('batch_dispatch', 'latency_first')} "
        "(peers always batch by Triton's rule).",
        f"Load average (1/5/15 min) at start {report['load_average']['start']}, "
        f"at end {report['load_average']['end']}: other processes share these cores. "
        "(unstable): perf_analyzer found no 3 windows within 25% of each other, so the numbers "
        "are from 3 windows taken with any spread.",
        "",
    ]
    for workload in report["workloads"]:
        raw = workload["raw"]
        lines += [
            f"## {workload['name']}: {workload['description']}",
            "",
            f"Raw in-process: {raw['rows_per_s']:,} rows/s at batch {raw['batch']}.",
            "",
            "| protocol | concurrency | requests/s | p50 µs | p99 µs | served / raw |",
            "|---|---|---|---|---|---|",
        ]
        for run in workload["served"]:
            if "error" in run:
                lines.append(f"| {run['protocol']} | {run['concurrency']} | error | | | |")
                continue
            unstable = " (unstable)" if run.get("unstable") else ""
            lines.append(
                f"| {run['protocol']} | {run['concurrency']} | {run['requests_per_s']:,.0f}{unstable} | "
                f"{run['p50_us']} | {run['p99_us']} | {run['served_over_raw']:.4f} |"
            )
        lines.append("")
        if workload.get("peers"):
            lines += peer_compare.markdown(workload["peers"], workload.get("targets", []))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--workload",
        nargs="*",
        default=None,
        choices=list(WORKLOADS),
        help="default: all (--quick: mlp only)",
    )
    parser.add_argument("--concurrency", nargs="*", type=int, default=None)
    parser.add_argument(
        "--protocol", nargs="*", default=list(PROTOCOL_ARGS), choices=list(PROTOCOL_ARGS)
    )
    parser.add_argument(
        "--peers",
        default=None,
        help=f"comma-separated, from {','.join(PEERS)}; 'none' to skip (default: all, measured "
        "where installed, reported as not installed elsewhere). mlp workload only",
    )
    parser.add_argument("--peers-dir", type=Path, default=PEERS_DIR, help="the peers' virtualenvs")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="OPENBLAS_NUM_THREADS/OMP_NUM_THREADS for every server, Convoy and peers alike "
        "(default: the libraries' own, one thread per core)",
    )
    parser.add_argument(
        "--batch-dispatch",
        choices=["triton", "latency_first"],
        default="triton",
        help="Convoy's dynamic batcher rule for the workloads (default triton, the rule the peers "
        "run: a batch waits max_queue_delay for a fuller one); latency_first measures Convoy's "
        "own and cannot go with peers (their comparisons need the same rule on both sides)",
    )
    parser.add_argument(
        "--frontend",
        choices=["native", "python"],
        default="",
        help="Convoy's front end (default: the server's own choice, native when built)",
    )
    parser.add_argument("--quick", action="store_true", help="short windows; CI checks the files")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    peer_names = select_peers(args.peers)
    if args.batch_dispatch == "latency_first":
        if args.peers not in (None, "none"):
            raise SystemExit(
                "--batch-dispatch latency_first: the peers batch by Triton's rule (wait for the "
                "delay), so a comparison needs --batch-dispatch triton on Convoy's side too"
            )
        peer_names = []
    server_env = {}
    if args.blas_threads is not None:
        server_env = {
            name: str(args.blas_threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
        }
    concurrencies = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    binary = find_perf_analyzer()
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "started": started,
        "command": " ".join(["python", *sys.argv]),
        "machine": describe(),
        "load_average": {"start": load_average()},
        "server_env": server_env,
        "batch_dispatch": args.batch_dispatch,
        "workloads": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convoy-bench-") as scratch:
        scratch = Path(scratch)
        default = [w for w in WORKLOADS if (w in GPU_WORKLOADS) == has_cuda()]
        for name in args.workload or (["mlp"] if args.quick else default):
            workload = WORKLOADS[name]
            repository = scratch / name / "models"
            raw = workload.build(repository)
            set_batch_dispatch(repository, args.batch_dispatch)
            result = {
                "name": name,
                "description": workload.description,
                "raw": measure_raw(raw, workload.raw_batch, 1.0 if args.quick else 5.0),
                "served": [],
            }
            with_peers = peer_names if name in PEER_WORKLOADS else []
            with ExitStack() as stack:
                server = Server(repository, scratch / name / "server.log", server_env, args.frontend)
                stack.callback(server.stop)
                # Every server stays up for the whole run (idle, each costs next to nothing) so
                # Convoy and the peers are measured back to back at each point: on a machine
                # shared with other work, the load drifts within minutes.
                weights = mlp_weights_path(repository, name)
                peers, running_peers = start_peers(
                    with_peers, args.peers_dir, weights, scratch, stack, server_env
                )
                for protocol in args.protocol:
                    for concurrency in concurrencies:
                        point = Point(binary, workload, protocol, concurrency, args.quick, scratch)
                        measure_point(point, server, result, running_peers)
            if peers:
                convoy_runs = {
                    "perf_analyzer": result["served"],
                    "loadgen": result.get("served_loadgen", []),
                }
                for entry in peers:
                    if entry["status"] == "measured":
                        entry["pairs"] = peer_compare.pair(convoy_runs[entry["driver"]], entry["runs"])
                result["peers"] = peers
                result["targets"] = peer_compare.check_targets(result["served"], peers)
            report["workloads"].append(result)
    report["load_average"]["end"] = load_average()
    (args.out / f"{started}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{started}.md").write_text(markdown(report))
    print(markdown(report))
    failed = [
        r for w in report["workloads"] for r in w["served"] + w.get("served_loadgen", []) if "error" in r
    ]
    failed += [
        p
        for w in report["workloads"]
        for p in w.get("peers", [])
        if p["status"].startswith("error") or any("error" in r for r in p.get("runs", []))
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
