"""`convoy check REPOSITORY`: the CI gate for a model repository, without opening a port.

For every model folder: parse its config, load every version the policy selects (which runs its
warm-up), send one sample inference through its scheduler (the first warm-up sample's inputs,
or inputs generated from the config), and check every declared output is there with the declared
datatype and shape. A model whose instances want a GPU, on a machine without one, is checked for
its config only, and the report says so.
"""

from __future__ import annotations

import asyncio
import os
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convoy.batching.ragged import ragged_warmup
from convoy.config import InstanceKind, ModelConfig, ServerConfig
from convoy.datatypes import NUMPY_DTYPE
from convoy.engine.model_config import build_model_config, read_config_proto
from convoy.engine.repository import ModelRepository, ModelVersion
from convoy.errors import ConvoyError
from convoy.padding import with_full_lengths
from convoy.runtimes.warmup import warmup_array

#: How long one sample inference may take before the model fails the check.
SAMPLE_TIMEOUT_S = 60.0

PASS = "PASS"
FAIL = "FAIL"
CONFIG_ONLY = "CONFIG ONLY"


@dataclass(frozen=True, slots=True)
class CheckResult:
    model: str
    version: str
    backend: str
    #: Seconds to load (and warm up) the model; 0 when it was not loaded.
    load_s: float
    #: Seconds the sample inference took; 0 when none ran.
    sample_s: float
    result: str  # PASS, FAIL or CONFIG ONLY
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.result != FAIL


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU the runtimes could use."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


async def check_repository(root: Path, has_gpu: bool | None = None) -> list[CheckResult]:
    """One result per model version (or per model when it fails before its versions)."""
    has_gpu = gpu_present() if has_gpu is None else has_gpu
    settings = ServerConfig(model_repository=root, load_all=False, metrics_port=-1)
    results: list[CheckResult] = []
    async with ModelRepository(settings) as repository:
        for name in repository.model_names():
            results.extend(await _check_model(repository, name, has_gpu))
    return results


async def _check_model(repository: ModelRepository, name: str, has_gpu: bool) -> list[CheckResult]:
    model_dir = repository.root / name
    try:
        config = build_model_config(read_config_proto(model_dir / "config.pbtxt"), model_dir)
    except ConvoyError as exc:
        return [CheckResult(name, "", "", 0.0, 0.0, FAIL, str(exc))]
    wants_gpu = any(group.kind is InstanceKind.GPU for group in config.instance_groups)
    if wants_gpu and not has_gpu:
        reason = (
            "config is valid; not loaded: its instance_group asks for KIND_GPU and no GPU is present"
        )
        return [CheckResult(name, "", config.backend, 0.0, 0.0, CONFIG_ONLY, reason)]
    started = time.perf_counter()
    try:
        model = await repository.load(name)
    except ConvoyError as exc:
        return [CheckResult(name, "", config.backend, 0.0, 0.0, FAIL, str(exc))]
    load_s = time.perf_counter() - started
    backend = model.config.backend if model.config is not None else config.backend
    if not model.versions:
        return [CheckResult(name, "", backend, load_s, 0.0, FAIL, model.reason or model.state)]
    results = []
    for number in sorted(model.versions):
        entry = model.versions[number]
        version = str(number)
        if not entry.ready:
            results.append(CheckResult(name, version, backend, load_s, 0.0, FAIL, entry.reason))
            continue
        sample_started = time.perf_counter()
        try:
            await _sample(entry, repository.root / name / version)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ConvoyError) else f"{type(exc).__name__}: {exc}"
            sample_s = time.perf_counter() - sample_started
            results.append(CheckResult(name, version, backend, load_s, sample_s, FAIL, reason))
            continue
        sample_s = time.perf_counter() - sample_started
        results.append(CheckResult(name, version, backend, load_s, sample_s, PASS))
    await repository.unload(name)
    return results


class OutputMismatch(ConvoyError):
    """A sample inference's output does not match the model's declared outputs."""


def sample_inputs(config: ModelConfig, version_path: Path) -> tuple[dict[str, np.ndarray], int]:
    """The first warm-up sample's inputs, else one row of generated inputs (zeros; variable
    dimensions as 1), shaped as the runtime receives them; and the rows they hold."""
    rng = np.random.default_rng(0)
    batching = config.max_batch_size > 0
    inputs = {}
    if config.warmup:
        sample = config.warmup[0]
        rows = sample.batch_size if batching else 1
        for name, warmup_input in sample.inputs.items():
            shape = (rows, *warmup_input.dims) if batching else warmup_input.dims
            inputs[name] = warmup_array(warmup_input, shape, version_path.parent / "warmup", rng)
    else:
        rows = 1
        for spec in config.inputs:
            if spec.optional:
                continue
            dims = tuple(1 if d < 0 else d for d in spec.dims)
            shape = (1, *dims) if batching else dims
            if spec.datatype == "BYTES":
                array = np.full(int(np.prod(shape, dtype=np.int64)), b"0", dtype=object).reshape(shape)
            else:
                array = np.zeros(shape, dtype=NUMPY_DTYPE[spec.datatype])
            inputs[spec.name] = array
    for spec in config.inputs:  # the runtime sees the config's `reshape`, as a front end sends it
        if spec.reshape is not None and spec.name in inputs:
            array = inputs[spec.name]
            inputs[spec.name] = array.reshape((rows, *spec.reshape) if batching else spec.reshape)
    return inputs, rows


async def _sample(entry: ModelVersion, version_path: Path) -> None:
    """One inference on the model's first instance, outputs exactly as the model made them
    (the scheduler would convert a wrong datatype to the declared one on the way out)."""
    config = entry.config
    inputs, rows = sample_inputs(config, version_path)
    instance = entry.instances[0]
    # What the batcher would hand the model: a ragged batch with its batch inputs, a padded
    # one with its lengths input.
    if config.ragged and not instance.executes_requests:
        inputs = ragged_warmup(config)(inputs)
    if config.padding is not None:
        inputs = with_full_lengths(config.padding, inputs)
    outputs = await asyncio.wait_for(instance.infer(inputs), SAMPLE_TIMEOUT_S)
    check_outputs(config, outputs, rows)


def check_outputs(config: ModelConfig, outputs: dict[str, np.ndarray], rows: int) -> None:
    """Every declared output present with the declared datatype and shape."""
    batching = config.max_batch_size > 0
    # A batch_output's shape is its requests' (scattered by their source input), not its dims.
    scattered = {name for b in config.batch_outputs for name in b.target_names}
    for spec in config.outputs:
        array = outputs.get(spec.name)
        if array is None:
            raise OutputMismatch(f"output '{spec.name}': declared but not produced")
        wanted = NUMPY_DTYPE[spec.datatype]
        if spec.datatype == "BYTES":
            ok = array.dtype == object or array.dtype.kind in "SU"
        else:
            ok = array.dtype == wanted
        if not ok:
            raise OutputMismatch(
                f"output '{spec.name}': declared {spec.datatype} ({wanted}), produced {array.dtype}"
            )
        if spec.name in scattered:
            continue
        dims = spec.reshape if spec.reshape is not None else spec.dims
        expected = [rows, *dims] if batching else list(dims)
        shape = list(array.shape)
        matches = len(shape) == len(expected) and all(
            e == -1 or e == s for e, s in zip(expected, shape, strict=True)
        )
        if not matches:
            raise OutputMismatch(
                f"output '{spec.name}': declared shape {expected} "
                f"({'batch first, ' if batching else ''}-1 variable), produced {shape}"
            )


# --- reports -------------------------------------------------------------------------------------
def as_json(results: list[CheckResult]) -> list[dict[str, Any]]:
    return [asdict(r) | {"passed": r.passed} for r in results]


def write_junit(results: list[CheckResult], path: Path) -> None:
    """A JUnit XML report (one test case per model version) for CI test dashboards."""
    failures = sum(not r.passed for r in results)
    skipped = sum(r.result == CONFIG_ONLY for r in results)
    suite = ElementTree.Element(
        "testsuite",
        name="convoy check",
        tests=str(len(results)),
        failures=str(failures),
        skipped=str(skipped),
        time=f"{sum(r.load_s + r.sample_s for r in results):.3f}",
    )
    for r in results:
        case = ElementTree.SubElement(
            suite,
            "testcase",
            classname=r.model,
            name=f"{r.model} v{r.version}" if r.version else r.model,
            time=f"{r.load_s + r.sample_s:.3f}",
        )
        if r.result == FAIL:
            ElementTree.SubElement(case, "failure", message=r.reason).text = r.reason
        elif r.result == CONFIG_ONLY:
            ElementTree.SubElement(case, "skipped", message=r.reason)
    ElementTree.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
