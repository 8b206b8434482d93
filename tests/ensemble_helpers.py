"""Writing ensemble test repositories: step models (tests/models/ensemble_ops) and ensembles."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import MODEL_SOURCES

FP32_4 = ("TYPE_FP32", "[ 4 ]")


def tensor_list(tensors) -> str:
    return ", ".join(
        f'{{ name: "{name}", data_type: {dtype}, dims: {dims} }}' for name, dtype, dims in tensors
    )


def step_model(
    root: Path,
    name: str,
    op: str,
    inputs=("X",),
    outputs=(("Y", *FP32_4),),
    max_batch_size: int = 8,
    delay_ms: int = 0,
) -> None:
    model_dir = root / name
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(MODEL_SOURCES / "ensemble_ops" / "model.py", model_dir / "1" / "model.py")
    (model_dir / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f"input [ {tensor_list((i, *FP32_4) for i in inputs)} ]\n"
        f"output [ {tensor_list(outputs)} ]\n"
        "dynamic_batching { max_queue_delay_microseconds: 20000 }\n"
        f'parameters {{ key: "op" value {{ string_value: "{op}" }} }}\n'
        f'parameters {{ key: "delay_ms" value {{ string_value: "{delay_ms}" }} }}\n'
    )


def ensemble(
    root: Path,
    name: str,
    steps,
    inputs=(("IN", *FP32_4),),
    outputs=(("OUT", *FP32_4),),
    max_batch_size: int = 8,
    extra: str = "",
) -> None:
    """`steps`: (model, version, {model input: tensor}, {model output: tensor})."""
    (root / name).mkdir(parents=True)
    rendered = []
    for model, version, input_map, output_map in steps:
        maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in input_map.items())
        maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in output_map.items())
        rendered.append(f'{{ model_name: "{model}" model_version: {version}{maps} }}')
    (root / name / "config.pbtxt").write_text(
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
        f"input [ {tensor_list(inputs)} ]\noutput [ {tensor_list(outputs)} ]\n"
        f"ensemble_scheduling {{ {extra} step [ {', '.join(rendered)} ] }}\n"
    )
