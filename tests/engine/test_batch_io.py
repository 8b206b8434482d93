"""Ragged batching config (engine/batch_io.py): allow_ragged_batch, batch_input and batch_output
parsed into typed config, and each mistake refused naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from convoy.config import BatchInput, BatchOutput
from convoy.engine.model_config import build_model_config, read_config_proto
from convoy.errors import InvalidConfig
from convoy.protos import model_config_pb2 as mc

BASE = """
name: "m"
backend: "python"
max_batch_size: 8
input [
  { name: "RAGGED" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true },
  { name: "DENSE" data_type: TYPE_FP32 dims: [ 2 ] }
]
output [
  { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "ROW" data_type: TYPE_FP32 dims: [ 2 ] }
]
batch_input [
  { kind: BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO target_name: [ "OFFSETS", "ALSO" ]
    data_type: TYPE_INT32 source_input: "RAGGED" },
  { kind: BATCH_ITEM_SHAPE target_name: "SHAPES" data_type: TYPE_FP32 source_input: "RAGGED" }
]
batch_output [ { target_name: "OUT" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "RAGGED" } ]
"""


def _build(text: str):
    proto = text_format.Parse(text, mc.ModelConfig())
    return build_model_config(proto, Path("/repo/m"))


def _refused(text: str) -> str:
    with pytest.raises(InvalidConfig) as caught:
        _build(text)
    return str(caught.value)


def test_a_ragged_config_parses_into_typed_batch_inputs_and_outputs():
    config = _build(BASE)
    assert config.ragged
    assert config.input("RAGGED").allow_ragged_batch
    assert config.batch_inputs == (
        BatchInput("BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO", ("OFFSETS", "ALSO"), "INT32", "RAGGED"),
        BatchInput("BATCH_ITEM_SHAPE", ("SHAPES",), "FP32", "RAGGED"),
    )
    assert config.batch_outputs == (BatchOutput("BATCH_SCATTER_WITH_INPUT_SHAPE", ("OUT",), "RAGGED"),)
    # The batch inputs are not inputs clients send.
    assert config.input("OFFSETS") is None


def test_a_config_without_ragged_batching_is_not_ragged():
    plain = BASE.split("batch_input")[0].replace(" allow_ragged_batch: true", "")
    assert not _build(plain).ragged


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'data_type: TYPE_INT32 source_input: "RAGGED"',
            'data_type: TYPE_INT32 source_input: "NOPE"',
            "batch_input[0].source_input: 'NOPE' is not a declared input",
        ),
        (
            'data_type: TYPE_INT32 source_input: "RAGGED"',
            'data_type: TYPE_INT32 source_input: [ "RAGGED", "DENSE" ]',
            "batch_input[0].source_input: expects exactly 1 source input, got 2",
        ),
        (
            "kind: BATCH_ITEM_SHAPE target_name",
            "kind: 42 target_name",
            "batch_input[1].kind: unknown kind 42; expected one of ['BATCH_ELEMENT_COUNT'",
        ),
        (
            "data_type: TYPE_INT32 source_input",
            "data_type: TYPE_INT64 source_input",
            "batch_input[0].data_type: expected TYPE_INT32 or TYPE_FP32, got TYPE_INT64",
        ),
        (
            'target_name: "SHAPES"',
            'target_name: "DENSE"',
            "batch_input[1].target_name: 'DENSE' is also a declared input",
        ),
        (
            'target_name: "SHAPES"',
            'target_name: "OFFSETS"',
            "batch_input[1].target_name: 'OFFSETS' is the target of more than one batch input",
        ),
        (
            '{ target_name: "OUT" kind',
            '{ target_name: "NOPE" kind',
            "batch_output[0].target_name: 'NOPE' is not a declared output",
        ),
        (
            'kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "RAGGED"',
            'kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "GONE"',
            "batch_output[0].source_input: 'GONE' is not a declared input",
        ),
        (
            '{ name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] }',
            '{ name: "OUT" data_type: TYPE_FP32 dims: [ 3, -1 ] }',
            "batch_output[0].source_input: output 'OUT' has a variable dimension at index 2",
        ),
        (
            "max_batch_size: 8",
            "max_batch_size: 0",
            "input[0].allow_ragged_batch: requires max_batch_size > 0",
        ),
        (
            "allow_ragged_batch: true }",
            "allow_ragged_batch: true optional: true }",
            "input[0].optional: a ragged input (allow_ragged_batch) cannot be optional",
        ),
        (
            "allow_ragged_batch: true }",
            "allow_ragged_batch: true reshape { shape: [ -1, 1 ] } }",
            "input[0].reshape: is not supported for a ragged input",
        ),
        (
            'backend: "python"',
            'backend: "python" sequence_batching { }',
            "input[0].allow_ragged_batch: is not supported together with sequence_batching",
        ),
    ],
)
def test_ragged_config_mistakes_are_refused_naming_the_field(old, new, expected):
    assert old in BASE
    assert f"/repo/m/config.pbtxt: {expected}" in _refused(BASE.replace(old, new, 1))


def test_batch_inputs_without_a_ragged_input_still_need_batching():
    text = BASE.replace(" allow_ragged_batch: true", "").replace(
        "max_batch_size: 8", "max_batch_size: 0"
    )
    assert "/repo/m/config.pbtxt: batch_input: requires max_batch_size > 0" in _refused(text)


def test_a_misspelled_kind_is_refused_with_its_line_and_the_enum_named(tmp_path):
    """Protobuf's text parser refuses an enum name it does not know before Convoy sees the
    config: the reason still points at the line, the kind's enum and the name."""
    path = tmp_path / "config.pbtxt"
    path.write_text(
        BASE.replace("kind: BATCH_ITEM_SHAPE target_name", "kind: BATCH_ITEM_SHAPES target_name")
    )
    with pytest.raises(InvalidConfig) as caught:
        read_config_proto(path)
    reason = str(caught.value)
    assert reason.startswith(f"{path}: 16:11 : ")
    assert 'Enum type "inference.BatchInput.Kind" has no value named BATCH_ITEM_SHAPES' in reason
