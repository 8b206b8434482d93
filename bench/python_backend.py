"""Triton python-backend models on Convoy: what the TritonPythonModel path and a BLS hop cost.

One `convoy serve` holds three models with the demo add_sub's config (FP32 [16], max batch 64,
2 ms queue delay):
- add_sub: Convoy's native `Model` (merged batches);
- triton_add_sub: the same computation as a TritonPythonModel (per-request execute);
- bls_add_sub: a TritonPythonModel that forwards each request to triton_add_sub with
  `pb_utils.InferenceRequest(...).exec()` (one BLS hop).

perf_analyzer drives each over gRPC at concurrency 32 (1-row requests), the two add_subs
alternating ROUNDS times (order swapped each round) so drift on a shared machine shows; then
the server's CPU time per request (from /proc, all its threads; the lowest of ROUNDS runs) is
measured for add_sub, triton_add_sub and bls_add_sub: bls_add_sub minus triton_add_sub is the
CPU a BLS hop costs. Last, one request to bls_loop makes 2000 sequential BLS calls to
triton_add_sub: the server's CPU per call (hop + inner execution, no client or gRPC cost).

First, in-process, the runtime step alone (CPU per request: native merge/execute/split vs the
Triton per-request execute), the one place the two paths differ.

    .venv/bin/python bench/python_backend.py [--rounds 2] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from drivers import find_perf_analyzer, perf_analyzer  # noqa: E402

from convoy.cli import demo_repository  # noqa: E402

TRITON_ADD_SUB = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("OUTPUT0", a + b), pb_utils.Tensor("OUTPUT1", a - b)]
                )
            )
        return responses
"""

BLS_ADD_SUB = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            inner = pb_utils.InferenceRequest(
                model_name="triton_add_sub",
                inputs=request.inputs(),
                requested_output_names=["OUTPUT0", "OUTPUT1"],
            )
            answer = inner.exec()
            if answer.has_error():
                responses.append(pb_utils.InferenceResponse(error=answer.error()))
            else:
                responses.append(pb_utils.InferenceResponse(answer.output_tensors()))
        return responses
"""


BLS_LOOP = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            calls = int(json.loads(request.parameters()).get("calls", 1000))
            inputs = request.inputs()
            for _ in range(calls):
                inner = pb_utils.InferenceRequest(
                    model_name="triton_add_sub", inputs=inputs, requested_output_names=["OUTPUT0"]
                )
                answer = inner.exec()
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
            responses.append(pb_utils.InferenceResponse(answer.output_tensors() * 2))
        return responses
"""


def build_repository(root: Path) -> Path:
    repository = root / "models"
    repository.mkdir()
    source = demo_repository() / "add_sub"
    shutil.copytree(source, repository / "add_sub")
    config = (source / "config.pbtxt").read_text()
    models = (("triton_add_sub", TRITON_ADD_SUB), ("bls_add_sub", BLS_ADD_SUB), ("bls_loop", BLS_LOOP))
    for name, code in models:
        (repository / name / "1").mkdir(parents=True)
        text = config.replace('name: "add_sub"', f'name: "{name}"')
        if name != "triton_add_sub":  # a warm-up would call a model that may still be loading
            text = text[: text.index("model_warmup")]
        (repository / name / "config.pbtxt").write_text(text)
        (repository / name / "1" / "model.py").write_text(code)
    return repository


def runtime_cost(repository: Path, batch: int = 32, batches: int = 2000) -> dict:
    """In-process CPU per request of the runtime step alone (no server): the native Model
    (merge, execute, split) vs the TritonPythonModel (per-request execute), batches of `batch`
    one-row requests; best of three runs. This is the part the two paths differ in."""
    import numpy as np

    from convoy.batching.assemble import merge, split
    from convoy.config import ModelConfig, ModelVersionSource
    from convoy.runtimes.python import PythonRuntime
    from convoy.types import Request, TensorSpec

    specs = tuple(TensorSpec(n, "FP32", (16,)) for n in ("INPUT0", "INPUT1"))
    outs = tuple(TensorSpec(n, "FP32", (16,)) for n in ("OUTPUT0", "OUTPUT1"))

    def runtime(name: str) -> PythonRuntime:
        config = ModelConfig(name, "python", max_batch_size=64, inputs=specs, outputs=outs)
        loaded = PythonRuntime(ModelVersionSource(config, 1, repository / name / "1"), 0)
        loaded.load()
        return loaded

    class Pending:
        def done(self) -> bool:
            return False

        def cancelled(self) -> bool:
            return False

    requests_ = [
        Request(
            str(i), {n: np.ones((1, 16), np.float32) for n in ("INPUT0", "INPUT1")}, (), 1, Pending()
        )
        for i in range(batch)
    ]
    native, triton = runtime("add_sub"), runtime("triton_add_sub")

    def best(step) -> float:
        runs = []
        for _ in range(3):
            start = time.process_time()
            for _ in range(batches):
                step()
            runs.append((time.process_time() - start) * 1e6 / (batches * batch))
        return round(min(runs), 2)

    return {
        "native_us_per_request": best(
            lambda: split(native.infer(merge(requests_)), requests_, True, "x")
        ),
        "triton_us_per_request": best(lambda: triton.infer_requests(requests_, None)),
    }


def start(repository: Path, log: Path) -> tuple[subprocess.Popen, int, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "convoy", "serve", "--model-repository", str(repository),
         "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "-1"],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip
    for line in process.stdout:
        if line.startswith("convoy: serving"):
            fields = dict(part.split("=") for part in line.split() if "=" in part)
            http, grpc = int(fields["http"]), int(fields["grpc"])
            break
    else:
        raise SystemExit(f"server did not start:\n{log.read_text()[-2000:]}")
    deadline = time.monotonic() + 60
    while requests.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit("server not ready")
        time.sleep(0.1)
    return process, http, grpc


def successes(http: int, model: str) -> int:
    stats = requests.get(f"http://127.0.0.1:{http}/v2/models/{model}/stats", timeout=10).json()
    return stats["model_stats"][0]["inference_stats"]["success"]["count"]


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="perf_analyzer window")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    binary = find_perf_analyzer()
    shapes = ()
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        repository = build_repository(root)
        runtime = runtime_cost(repository)
        print(json.dumps({"runtime_step": runtime}), flush=True)
        process, http, grpc = start(repository, root / "server.log")
        extra = ("-p", str(int(args.seconds * 1000)), "-r", "4", "-s", "50")

        def run(model: str, tag: str) -> dict:
            return perf_analyzer(
                binary, model, "grpc", grpc, args.concurrency, shapes, False, root / f"{tag}.csv", extra
            )

        try:
            report: dict = {
                "concurrency": args.concurrency,
                "rounds": [],
                "cpu": {},
                "runtime_step": runtime,
            }
            for round_index in range(args.rounds):
                row = {}
                order = ("add_sub", "triton_add_sub")
                for model in order if round_index % 2 == 0 else order[::-1]:
                    result = run(model, f"{model}-{round_index}")
                    row[model] = result.get("requests_per_s", result.get("error"))
                    row[f"{model}_p50_us"] = result.get("p50_us")
                report["rounds"].append(row)
                print(json.dumps(row), flush=True)
            # Server CPU per request: steadier than requests/s on a machine shared with others.
            samples: dict[str, list[float]] = {}
            for round_index in range(args.rounds):
                for model in ("add_sub", "triton_add_sub", "bls_add_sub"):
                    before_cpu, before_count = cpu_seconds(process.pid), successes(http, model)
                    run(model, f"cpu-{model}-{round_index}")
                    after_cpu, after_count = cpu_seconds(process.pid), successes(http, model)
                    served = max(after_count - before_count, 1)
                    samples.setdefault(model, []).append((after_cpu - before_cpu) * 1e6 / served)
                    print(json.dumps({model: round(samples[model][-1], 1)}), flush=True)
            # One request making CALLS sequential BLS calls: server CPU per call (the hop and
            # the inner model's execution), without any client or gRPC cost in it.
            calls = 2000
            body = {
                "parameters": {"calls": calls},
                "inputs": [
                    {"name": n, "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
                    for n in ("INPUT0", "INPUT1")
                ],
            }
            per_call = []
            for _ in range(3):
                before_cpu = cpu_seconds(process.pid)
                answer = requests.post(
                    f"http://127.0.0.1:{http}/v2/models/bls_loop/infer", json=body, timeout=300
                )
                answer.raise_for_status()
                per_call.append((cpu_seconds(process.pid) - before_cpu) * 1e6 / calls)
            report["bls_call_cpu_us"] = round(min(per_call), 1)
            print(json.dumps({"bls_call_cpu_us": per_call}), flush=True)
            for model, values in samples.items():
                report["cpu"][model] = {"cpu_us_per_request": round(min(values), 1), "all": values}
            ratios = [
                r["triton_add_sub"] / r["add_sub"]
                for r in report["rounds"]
                if isinstance(r["add_sub"], float) and isinstance(r["triton_add_sub"], float)
            ]
            report["triton_vs_native"] = [round(x, 3) for x in ratios]
            cpu = report["cpu"]
            report["bls_hop_cpu_us"] = round(
                cpu["bls_add_sub"]["cpu_us_per_request"] - cpu["triton_add_sub"]["cpu_us_per_request"], 1
            )
            report["triton_vs_native_cpu"] = round(
                cpu["triton_add_sub"]["cpu_us_per_request"] / cpu["add_sub"]["cpu_us_per_request"], 3
            )
            report["cpu_count"] = os.cpu_count()
            print(json.dumps(report, indent=2))
        finally:
            process.terminate()
            process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
