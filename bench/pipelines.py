"""Ensembles and sequences under load (perf_analyzer against a real `convoy serve`).

    python bench/pipelines.py ensemble     # server CPU per request: 3-step ensemble vs its steps
    python bench/pipelines.py sequences    # 256 concurrent sequences on one `oldest` model
    python bench/pipelines.py all --seconds 3

ensemble: three cheap python steps (x + 1 each) chained in an ensemble. perf_analyzer drives the
ensemble, then each step model directly, at the same concurrency; the server process's CPU time
(/proc, user + system, every thread) over the run divided by the requests the statistics API
counted gives CPU per request. Overhead = ensemble - (step 1 + step 2 + step 3): each direct
step also pays a gRPC decode and encode, which the ensemble pays once.

sequences: an implicit-state accumulator with `oldest` (max_batch_size 64, 256 candidate
sequences, max_queue_delay 5 ms), once as a cheap python step and once taking 10 ms a batch;
perf_analyzer at concurrency 256 keeps 256 sequences open. Mean batch size =
inference_count / execution_count from the statistics API over the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEP = ROOT / "tests" / "models" / "ensemble_ops" / "model.py"
ACCUMULATOR = ROOT / "tests" / "models" / "sequence_accumulator" / "model.py"

STEP_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 64
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ 4 ] }} ]
dynamic_batching {{ }}
parameters {{ key: "op" value {{ string_value: "plus1" }} }}
"""
ENSEMBLE_CONFIG = """name: "ens3"
platform: "ensemble"
max_batch_size: 64
input [ { name: "IN", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "s1" model_version: -1
    input_map { key: "X" value: "IN" } output_map { key: "Y" value: "T1" } },
  { model_name: "s2" model_version: -1
    input_map { key: "X" value: "T1" } output_map { key: "Y" value: "T2" } },
  { model_name: "s3" model_version: -1
    input_map { key: "X" value: "T2" } output_map { key: "Y" value: "OUT" } }
] }
"""
SEQUENCE_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 64
input [ {{ name: "INPUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  oldest {{ max_candidate_sequences: 256 max_queue_delay_microseconds: 5000 }}
  control_input [
    {{ name: "START", control [ {{ kind: CONTROL_SEQUENCE_START, int32_false_true: [ 0, 1 ] }} ] }}
  ]
  state [ {{ input_name: "ACC_IN", output_name: "ACC_OUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
}}
parameters {{ key: "delay_ms" value {{ string_value: "{delay_ms}" }} }}
"""


def build(root: Path) -> Path:
    for name in ("s1", "s2", "s3"):
        (root / name / "1").mkdir(parents=True)
        shutil.copy(STEP, root / name / "1" / "model.py")
        (root / name / "config.pbtxt").write_text(STEP_CONFIG.format(name=name))
    (root / "ens3").mkdir()
    (root / "ens3" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    # A cheap step, and one whose batch takes 10 ms (a stand-in for a GPU model).
    for name, delay_ms in (("seq", 0), ("seq_10ms", 10)):
        (root / name / "1").mkdir(parents=True)
        shutil.copy(ACCUMULATOR, root / name / "1" / "model.py")
        config = SEQUENCE_CONFIG.format(name=name, delay_ms=delay_ms)
        (root / name / "config.pbtxt").write_text(config)
    return root


class Server:
    def __init__(self, repository: Path, log: Path) -> None:
        command = [
            sys.executable, "-m", "convoy", "serve", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "-1",
            "--log-level", "WARNING",
        ]  # fmt: skip
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.http = self.grpc = 0
        for line in self.process.stdout:
            if line.startswith("convoy: serving"):
                fields = dict(part.split("=") for part in line.split() if "=" in part)
                self.http, self.grpc = int(fields["http"]), int(fields["grpc"])
                break
        if not self.http:
            raise SystemExit(f"convoy did not start; see {log}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if requests.get(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=5).ok:
                return
            time.sleep(0.2)
        raise SystemExit(f"convoy never became ready; see {log}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def counts(self, model: str) -> tuple[int, int]:
        stats = requests.get(f"http://127.0.0.1:{self.http}/v2/models/{model}/stats", timeout=10)
        entry = stats.json()["model_stats"][0]
        return int(entry["inference_count"]), int(entry["execution_count"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def perf_analyzer(server: Server, model: str, concurrency: int, seconds: float, extra=()) -> dict:
    binary = os.environ.get("PERF_ANALYZER") or str(ROOT / ".perf_analyzer" / "perf_analyzer")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "pa.csv"
        command = [
            binary, "-m", model, "-u", f"127.0.0.1:{server.grpc}", "-i", "grpc",
            "--concurrency-range", str(concurrency), "-p", str(int(seconds * 1000)),
            "-r", "6", "-s", "50", "-f", str(out), *extra,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        unstable = done.returncode != 0 and "stable measurement" in done.stdout + done.stderr
        if unstable:
            # A busy shared machine: accept any window rather than report nothing; flagged.
            command += ["-s", "100"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not out.exists():
            return {"error": (done.stdout + done.stderr)[-600:]}
        row = next(csv.DictReader(out.open()))
        return {
            "requests_per_s": round(float(row["Inferences/Second"]), 1),
            "p50_us": int(row["p50 latency"]),
            "unstable": unstable,
        }


def measure(server: Server, model: str, concurrency: int, seconds: float, extra=()) -> dict:
    """perf_analyzer on `model`, with the server's CPU time and the model's counts around it."""
    cpu0, (rows0, batches0) = server.cpu_seconds(), server.counts(model)
    result = perf_analyzer(server, model, concurrency, seconds, extra)
    cpu1, (rows1, batches1) = server.cpu_seconds(), server.counts(model)
    rows, batches = rows1 - rows0, batches1 - batches0
    result.update(
        requests=rows,
        batches=batches,
        cpu_us_per_request=round((cpu1 - cpu0) * 1e6 / max(rows, 1), 1),
        mean_batch_size=round(rows / max(batches, 1), 2),
    )
    return result


def ensemble(server: Server, seconds: float, concurrency: int) -> dict:
    runs = {m: measure(server, m, concurrency, seconds) for m in ("ens3", "s1", "s2", "s3")}
    steps = sum(runs[m]["cpu_us_per_request"] for m in ("s1", "s2", "s3"))
    return {
        "concurrency": concurrency,
        "runs": runs,
        "sum_of_steps_cpu_us": round(steps, 1),
        "ensemble_overhead_cpu_us": round(runs["ens3"]["cpu_us_per_request"] - steps, 1),
    }


def sequences(server: Server, seconds: float, concurrency: int) -> dict:
    extra = ("--sequence-length", "20", "--sequence-id-range", "1:100000")
    return {
        "concurrency": concurrency,
        "runs": {m: measure(server, m, concurrency, seconds, extra) for m in ("seq", "seq_10ms")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("ensemble", "sequences", "all"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8, help="ensemble benchmark")
    parser.add_argument("--sequences", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        repository = build(Path(scratch) / "models")
        server = Server(repository, Path(scratch) / "server.log")
        try:
            report = {}
            if args.which in ("ensemble", "all"):
                report["ensemble"] = ensemble(server, args.seconds, args.concurrency)
            if args.which in ("sequences", "all"):
                report["sequences"] = sequences(server, args.seconds, args.sequences)
        finally:
            server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
