"""Ragged batching in config.pbtxt: `input[].allow_ragged_batch`, `batch_input`, `batch_output`
validated into typed config (Triton's rules, plus what Convoy does not do named as refused).

Errors go through `fail(field, message)`, which prefixes the file: ``batch_input[0].source_input``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from convoy.config import BatchInput, BatchOutput
from convoy.datatypes import CONFIG_TO_V2
from convoy.protos import model_config_pb2 as mc
from convoy.types import TensorSpec

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

    from convoy.errors import InvalidConfig

#: `fail(field, message)`: the error to raise, its message prefixed with the file.
Fail = Callable[[str, str], "InvalidConfig"]

#: BatchInput kinds Convoy computes (every kind Triton defines).
BATCH_INPUT_KINDS = tuple(mc.BatchInput.Kind.keys())
BATCH_OUTPUT_KINDS = tuple(mc.BatchOutput.Kind.keys())
#: Batch input datatypes Triton allows.
BATCH_INPUT_TYPES = ("TYPE_INT32", "TYPE_FP32")


def ragged_batching(
    proto: mc.ModelConfig,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    backend: str,
    fail: Fail,
) -> tuple[tuple[BatchInput, ...], tuple[BatchOutput, ...]]:
    """The config's batch inputs and outputs, after checking them and the ragged inputs."""
    batching = proto.max_batch_size > 0
    ragged_fields = [
        f"input[{i}].allow_ragged_batch" for i, s in enumerate(inputs) if s.allow_ragged_batch
    ]
    if proto.batch_input:
        ragged_fields.append("batch_input")
    if proto.batch_output:
        ragged_fields.append("batch_output")
    if not ragged_fields:
        return (), ()
    first = ragged_fields[0]
    if not batching:
        raise fail(first, "requires max_batch_size > 0 (ragged batching merges requests into batches)")
    if backend == "ensemble":
        raise fail(first, "is not valid for an ensemble (its composing models batch)")
    if proto.HasField("sequence_batching"):
        raise fail(first, "is not supported together with sequence_batching by Convoy")
    for index, spec in enumerate(inputs):
        if not spec.allow_ragged_batch:
            continue
        if spec.optional:
            raise fail(
                f"input[{index}].optional",
                "a ragged input (allow_ragged_batch) cannot be optional: every request of a "
                "ragged batch must carry it",
            )
        if spec.reshape is not None:
            raise fail(
                f"input[{index}].reshape",
                "is not supported for a ragged input (allow_ragged_batch): the model receives "
                "it flattened to one dimension",
            )
    input_names = {spec.name for spec in inputs}
    output_names = {spec.name for spec in outputs}
    batch_inputs = tuple(
        _batch_input(item, f"batch_input[{i}]", input_names, fail)
        for i, item in enumerate(proto.batch_input)
    )
    targets: set[str] = set()
    for i, batch_input in enumerate(batch_inputs):
        for name in batch_input.target_names:
            if name in targets:
                raise fail(
                    f"batch_input[{i}].target_name",
                    f"'{name}' is the target of more than one batch input",
                )
            targets.add(name)
    batch_outputs = []
    scattered: set[str] = set()
    for i, item in enumerate(proto.batch_output):
        field = f"batch_output[{i}]"
        batch_output = _batch_output(item, field, inputs, outputs, output_names, fail)
        for name in batch_output.target_names:
            if name in scattered:
                raise fail(
                    f"{field}.target_name", f"'{name}' is scattered by more than one batch output"
                )
            scattered.add(name)
        batch_outputs.append(batch_output)
    return batch_inputs, tuple(batch_outputs)


def _kind(enum: EnumTypeWrapper, value: int, field: str, known: tuple[str, ...], fail: Fail) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        raise fail(f"{field}.kind", f"unknown kind {value}; expected one of {list(known)}") from None


def _source(item: mc.BatchInput | mc.BatchOutput, field: str, input_names: set[str], fail: Fail) -> str:
    sources = list(item.source_input)
    if len(sources) != 1:
        raise fail(f"{field}.source_input", f"expects exactly 1 source input, got {len(sources)}")
    if sources[0] not in input_names:
        raise fail(
            f"{field}.source_input",
            f"'{sources[0]}' is not a declared input; expected one of {sorted(input_names)}",
        )
    return sources[0]


def _targets(item: mc.BatchInput | mc.BatchOutput, field: str, fail: Fail) -> tuple[str, ...]:
    names = tuple(item.target_name)
    if not names or any(not name for name in names):
        raise fail(f"{field}.target_name", "must name at least one tensor, none empty")
    if len(set(names)) != len(names):
        raise fail(f"{field}.target_name", f"lists a name more than once: {list(names)}")
    return names


def _batch_input(item: mc.BatchInput, field: str, input_names: set[str], fail: Fail) -> BatchInput:
    kind = _kind(mc.BatchInput.Kind, item.kind, field, BATCH_INPUT_KINDS, fail)
    targets = _targets(item, field, fail)
    for name in targets:
        if name in input_names:
            raise fail(
                f"{field}.target_name",
                f"'{name}' is also a declared input; a batch input is filled by the batcher "
                "and must not be listed under input",
            )
    type_name = mc.DataType.Name(item.data_type)
    if type_name not in BATCH_INPUT_TYPES:
        raise fail(f"{field}.data_type", f"expected TYPE_INT32 or TYPE_FP32, got {type_name}")
    source = _source(item, field, input_names, fail)
    return BatchInput(kind, targets, CONFIG_TO_V2[type_name], source)


def _batch_output(
    item: mc.BatchOutput,
    field: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    output_names: set[str],
    fail: Fail,
) -> BatchOutput:
    kind = _kind(mc.BatchOutput.Kind, item.kind, field, BATCH_OUTPUT_KINDS, fail)
    targets = _targets(item, field, fail)
    source = _source(item, field, {spec.name for spec in inputs}, fail)
    source_rank = 1 + len(next(spec for spec in inputs if spec.name == source).dims)
    for name in targets:
        if name not in output_names:
            raise fail(
                f"{field}.target_name",
                f"'{name}' is not a declared output; expected one of {sorted(output_names)}",
            )
        spec = next(spec for spec in outputs if spec.name == name)
        shape = (-1, *spec.dims)
        for index, dim in enumerate(shape):
            if dim == -1 and index >= source_rank:
                raise fail(
                    f"{field}.source_input",
                    f"output '{name}' has a variable dimension at index {index} of "
                    f"{[-1, *spec.dims]} (with the batch dimension), but input '{source}' has "
                    f"only {source_rank} dimensions to take its size from",
                )
    return BatchOutput(kind, targets, source)
