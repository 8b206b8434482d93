"""sequence_batching and ensemble_scheduling in config.pbtxt: parsed into the typed config, and
every field Convoy does not implement refused with a reason naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from convoy.engine.model_config import build_model_config, read_config_proto
from convoy.errors import InvalidConfig

SEQUENCE = """
name: "m"
backend: "python"
max_batch_size: 8
input [ {{ name: "IN", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
sequence_batching {{ {block} }}
"""
START = '{ name: "S", control [ { kind: CONTROL_SEQUENCE_START, fp32_false_true: [ 0, 1 ] } ] }'
CORRID = '{ name: "C", control [ { kind: CONTROL_SEQUENCE_CORRID, data_type: TYPE_STRING } ] }'
ENSEMBLE = """
name: "m"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
"""


def _build(tmp_path: Path, text: str):
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.py").write_text("")
    (model_dir / "config.pbtxt").write_text(text)
    return build_model_config(read_config_proto(model_dir / "config.pbtxt"), model_dir)


def test_sequence_batching_becomes_typed_config(tmp_path):
    block = (
        "max_sequence_idle_microseconds: 5000 "
        "oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2 ] } "
        f"control_input [ {START}, {CORRID} ] "
        'state [ { input_name: "A", output_name: "B", data_type: TYPE_FP32, dims: [ 2, 3 ] } ]'
    )
    policy = _build(tmp_path, SEQUENCE.format(block=block)).sequence_batching
    assert policy.strategy == "oldest"
    assert policy.max_sequence_idle_us == 5000
    assert policy.max_candidate_sequences == 4
    assert policy.preferred_batch_sizes == (2,)
    assert policy.control("START").datatype == "FP32"
    assert policy.control("CORRID").datatype == "BYTES"
    assert policy.states[0].dims == (2, 3)


def test_iterative_sequence_is_for_python_models(tmp_path):
    policy = _build(tmp_path, SEQUENCE.format(block="iterative_sequence: true")).sequence_batching
    assert policy.iterative
    onnx = SEQUENCE.format(block="iterative_sequence: true").replace('"python"', '"onnxruntime"')
    with pytest.raises(InvalidConfig, match="iterative_sequence: needs a python-backend"):
        _build(tmp_path / "onnx", onnx)


def test_sequence_batching_defaults_to_direct_and_one_second_idle(tmp_path):
    policy = _build(tmp_path, SEQUENCE.format(block="")).sequence_batching
    assert (policy.strategy, policy.max_sequence_idle_us) == ("direct", 1_000_000)


@pytest.mark.parametrize(
    ("block", "field"),
    [
        (
            'iterative_sequence: true state [ { input_name: "A", output_name: "B", '
            "data_type: TYPE_FP32, dims: [ 1 ] } ]",
            "sequence_batching.iterative_sequence",
        ),
        ("oldest { preserve_ordering: true }", "sequence_batching.oldest.preserve_ordering"),
        ("oldest { preferred_batch_size: [ 9 ] }", "sequence_batching.oldest.preferred_batch_size"),
        ("direct { minimum_slot_utilization: 2 }", "minimum_slot_utilization"),
        (
            'control_input [ { name: "S", control [ { kind: CONTROL_SEQUENCE_START } ] } ]',
            "sequence_batching.control_input[0].control[0]",
        ),
        (
            'control_input [ { name: "S", control [ { kind: CONTROL_SEQUENCE_START, '
            "int32_false_true: [ 0, 1 ] }, { kind: CONTROL_SEQUENCE_END, "
            "int32_false_true: [ 0, 1 ] } ] } ]",
            "sequence_batching.control_input[0].control",
        ),
        (
            'control_input [ { name: "C", control [ { kind: CONTROL_SEQUENCE_CORRID, '
            "data_type: TYPE_FP32 } ] } ]",
            "sequence_batching.control_input[0].control[0].data_type",
        ),
        (
            'control_input [ { name: "IN", control [ { kind: CONTROL_SEQUENCE_START, '
            "int32_false_true: [ 0, 1 ] } ] } ]",
            "sequence_batching.control_input[0].name",
        ),
        (
            f"control_input [ {START}, {START} ]",
            "sequence_batching.control_input[1].name",
        ),
        (
            'state [ { input_name: "A", output_name: "B", data_type: TYPE_FP32, dims: [ -1 ] } ]',
            "sequence_batching.state[0].dims",
        ),
        (
            'state [ { input_name: "A", output_name: "B", data_type: TYPE_FP32, dims: [ 1 ] '
            "use_growable_memory: true } ]",
            "sequence_batching.state[0].use_growable_memory",
        ),
        (
            'state [ { input_name: "A", output_name: "B", data_type: TYPE_STRING, dims: [ 1 ] } ]',
            "sequence_batching.state[0].data_type",
        ),
    ],
)
def test_unsupported_sequence_fields_name_the_field(tmp_path, block, field):
    with pytest.raises(InvalidConfig) as caught:
        _build(tmp_path, SEQUENCE.format(block=block))
    assert f": {field}" in str(caught.value) or field in str(caught.value)


def test_ensemble_becomes_typed_config(tmp_path):
    config = _build(
        tmp_path,
        ENSEMBLE + 'ensemble_scheduling { max_inflight_requests: 3 step [ { model_name: "a" '
        'model_version: -1 input_map { key: "X" value: "IN" } '
        'output_map { key: "Y" value: "OUT" } } ] }',
    )
    assert config.backend == "ensemble"
    assert config.ensemble.max_inflight_requests == 3
    step = config.ensemble.steps[0]
    assert (step.model_name, step.model_version) == ("a", -1)
    assert (step.input_map, step.output_map) == ({"X": "IN"}, {"Y": "OUT"})


@pytest.mark.parametrize(
    ("tail", "field"),
    [
        ("", "ensemble_scheduling: platform 'ensemble' needs"),
        ("ensemble_scheduling { }", "ensemble_scheduling.step"),
        ("ensemble_scheduling { step [ { model_version: 1 } ] }", "step[0].model_name"),
        (
            'ensemble_scheduling { step [ { model_name: "a" model_namespace: "n" } ] }',
            "ensemble_scheduling.step[0].model_namespace",
        ),
        (
            'ensemble_scheduling { step [ { model_name: "a" model_version: -2 } ] }',
            "ensemble_scheduling.step[0].model_version",
        ),
    ],
)
def test_invalid_ensemble_configs_name_the_field(tmp_path, tail, field):
    with pytest.raises(InvalidConfig) as caught:
        _build(tmp_path, ENSEMBLE + tail)
    assert field in str(caught.value)


def test_ensemble_scheduling_needs_the_ensemble_platform(tmp_path):
    text = SEQUENCE.format(block="").split("sequence_batching")[0]
    text += 'ensemble_scheduling { step [ { model_name: "a" } ] }'
    with pytest.raises(InvalidConfig) as caught:
        _build(tmp_path, text)
    assert "ensemble_scheduling: is only valid with platform" in str(caught.value)
