"""An ensemble's graph checked at load, as Triton checks it: every composing input mapped, every
ensemble output written, no tensor written twice, no cycle, datatypes and shapes compatible.
Errors name the step and the tensor. engine/ensemble.py executes the plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from convoy.config import EnsembleStep, ModelConfig
from convoy.errors import InvalidConfig
from convoy.types import TensorSpec


@dataclass(frozen=True, slots=True)
class PlannedStep:
    index: int
    step: EnsembleStep
    #: Ensemble tensors the step reads and writes.
    reads: tuple[str, ...]
    writes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EnsemblePlan:
    steps: tuple[PlannedStep, ...]
    #: Ensemble tensor -> steps that read it.
    readers: dict[str, tuple[int, ...]]


def _full_shape(spec: TensorSpec, batching: bool) -> tuple[int, ...]:
    return (-1, *spec.dims) if batching else spec.dims


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def plan_ensemble(
    config: ModelConfig, composing: Callable[[int, EnsembleStep], ModelConfig], where: str
) -> EnsemblePlan:
    """Validate the ensemble's graph against its composing models' configs (`composing(index,
    step)`); errors name the step and the tensor."""
    assert config.ensemble is not None

    def fail(message: str) -> InvalidConfig:
        return InvalidConfig(f"{where}: ensemble_scheduling: {message}")

    batching = config.max_batch_size > 0
    #: Ensemble tensor -> (V2 datatype, full shape, who wrote it).
    known: dict[str, tuple[str, tuple[int, ...], str]] = {
        spec.name: (spec.datatype, _full_shape(spec, batching), "ensemble input")
        for spec in config.inputs
    }
    optional_inputs = {spec.name for spec in config.inputs if spec.optional}
    producers: dict[str, int] = {}
    planned: list[PlannedStep] = []
    models: list[ModelConfig] = []
    for index, step in enumerate(config.ensemble.steps):
        label = f"step[{index}] (model '{step.model_name}')"
        model = composing(index, step)
        models.append(model)
        step_batching = model.max_batch_size > 0
        if batching and model.max_batch_size < config.max_batch_size:
            raise fail(
                f"{label}: max_batch_size {model.max_batch_size} is less than the ensemble's "
                f"{config.max_batch_size}"
            )
        for name in step.input_map:
            if model.input(name) is None:
                raise fail(
                    f"{label}: input_map names '{name}', which is not an input of the model "
                    f"(inputs: {[s.name for s in model.inputs]})"
                )
        for spec in model.inputs:
            if spec.name not in step.input_map and not spec.optional:
                raise fail(f"{label}: input '{spec.name}' is not mapped in input_map")
        for name in step.output_map:
            if model.output(name) is None:
                raise fail(
                    f"{label}: output_map names '{name}', which is not an output of the "
                    f"model (outputs: {[s.name for s in model.outputs]})"
                )
        for output_name, tensor in step.output_map.items():
            if tensor in known or tensor in producers:
                first = known[tensor][2] if tensor in known else f"step[{producers[tensor]}]"
                raise fail(
                    f"{label}: output '{output_name}' writes ensemble tensor '{tensor}', "
                    f"which {first} already writes"
                )
            producers[tensor] = index
        planned.append(
            PlannedStep(
                index,
                step,
                tuple(dict.fromkeys(step.input_map.values())),
                tuple(step.output_map.values()),
            )
        )
    for tensor in {t for p in planned for t in p.reads}:
        if tensor not in known and tensor not in producers:
            reading = [f"step[{p.index}]" for p in planned if tensor in p.reads]
            raise fail(
                f"ensemble tensor '{tensor}' read by {', '.join(reading)} is neither an "
                "ensemble input nor written by any step"
            )
    # Order the steps (Kahn): a step is ready once every tensor it reads is known.
    order: list[int] = []
    done: set[str] = set(known)
    remaining = list(planned)
    while remaining:
        ready = [p for p in remaining if all(t in done for t in p.reads)]
        if not ready:
            cycle = ", ".join(f"step[{p.index}] (model '{p.step.model_name}')" for p in remaining)
            raise fail(f"the steps form a cycle: {cycle} each wait for another's output")
        for p in ready:
            remaining.remove(p)
            order.append(p.index)
            model = models[p.index]
            step_batching = model.max_batch_size > 0
            label = f"step[{p.index}] (model '{p.step.model_name}')"
            for input_name, tensor in p.step.input_map.items():
                input_spec = model.input(input_name)
                assert input_spec is not None  # input_map was checked against the model above
                datatype, shape, writer = known[tensor]
                if datatype != input_spec.datatype:
                    raise fail(
                        f"{label}: input '{input_name}' expects {input_spec.datatype}, but "
                        f"ensemble tensor '{tensor}' ({writer}) is {datatype}"
                    )
                if not _compatible(shape, _full_shape(input_spec, step_batching)):
                    raise fail(
                        f"{label}: input '{input_name}' expects shape "
                        f"{list(_full_shape(input_spec, step_batching))}, but ensemble tensor "
                        f"'{tensor}' ({writer}) has shape {list(shape)}"
                    )
                if tensor in optional_inputs and not input_spec.optional:
                    raise fail(
                        f"{label}: input '{input_name}' is required, but ensemble input "
                        f"'{tensor}' that feeds it is optional"
                    )
            for output_name, tensor in p.step.output_map.items():
                output_spec = model.output(output_name)
                assert output_spec is not None  # output_map was checked against the model above
                known[tensor] = (output_spec.datatype, _full_shape(output_spec, step_batching), label)
                done.add(tensor)
    for spec in config.outputs:
        if spec.name not in producers:
            raise fail(f"ensemble output '{spec.name}' is not written by any step's output_map")
        datatype, shape, writer = known[spec.name]
        if datatype != spec.datatype:
            raise fail(
                f"ensemble output '{spec.name}' is declared {spec.datatype}, but {writer} "
                f"writes {datatype}"
            )
        if not _compatible(shape, _full_shape(spec, batching)):
            raise fail(
                f"ensemble output '{spec.name}' is declared with shape "
                f"{list(_full_shape(spec, batching))}, but {writer} writes {list(shape)}"
            )
    readers: dict[str, list[int]] = {}
    for p in planned:
        for tensor in p.reads:
            readers.setdefault(tensor, []).append(p.index)
    return EnsemblePlan(steps=tuple(planned), readers={k: tuple(v) for k, v in readers.items()})
