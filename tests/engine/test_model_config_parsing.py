"""config.pbtxt -> ModelConfig: valid configs are completed, invalid ones name file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from convoy.config import VersionPolicy, VersionPolicyKind
from convoy.engine.model_config import build_model_config, complete_proto, read_config_proto
from convoy.errors import InvalidConfig

VALID = """
name: "m"
backend: "python"
max_batch_size: 8
input [ { name: "IN", data_type: TYPE_FP32, dims: [ -1, 4 ] } ]
output [ { name: "OUT", data_type: TYPE_STRING, dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [ 4, 2 ] }
"""


def _model_dir(tmp_path: Path, config: str | None, name: str = "m", files=("1/model.py",)) -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir()
    for relative in files:
        (model_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / relative).write_text("")
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config)
    return model_dir


def _build(model_dir: Path):
    return build_model_config(read_config_proto(model_dir / "config.pbtxt"), model_dir)


def test_valid_config_becomes_typed_config(tmp_path):
    config = _build(_model_dir(tmp_path, VALID))
    assert config.name == "m"
    assert config.backend == "python"
    assert config.max_batch_size == 8
    assert config.input("IN").dims == (-1, 4)
    assert config.input("IN").datatype == "FP32"
    assert config.output("OUT").datatype == "BYTES"
    assert config.dynamic_batching.max_queue_delay_us == 100
    assert config.dynamic_batching.preferred_batch_sizes == (2, 4)
    assert config.instance_count == 1
    assert config.version_policy == VersionPolicy()


def test_missing_config_takes_name_and_backend_from_the_folder(tmp_path):
    config = _build(_model_dir(tmp_path, None, name="guessed"))
    assert config.name == "guessed"
    assert config.backend == "python"
    assert config.max_batch_size == 0


def test_completed_config_fills_in_what_convoy_decided(tmp_path):
    model_dir = _model_dir(tmp_path, 'input [ { name: "IN", data_type: TYPE_INT8, dims: [ 2 ] } ]')
    proto = read_config_proto(model_dir / "config.pbtxt")
    full = complete_proto(proto, build_model_config(proto, model_dir))
    assert full.name == "m"
    assert full.backend == "python"
    assert full.version_policy.latest.num_versions == 1
    assert len(full.instance_group) == 1


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ('name: "other"', "name"),
        ("max_batch_size: -1", "max_batch_size"),
        ('input [ { name: "IN", data_type: TYPE_FP32, dims: [ -2 ] } ]', "input[0].dims"),
        ("input [ { data_type: TYPE_FP32, dims: [ 1 ] } ]", "input[0].name"),
        ('output [ { name: "O", data_type: TYPE_INVALID, dims: [ 1 ] } ]', "output[0].data_type"),
        ('output [ { name: "O", data_type: TYPE_FP32 } ]', "output[0].dims"),
        (
            'input [ { name: "A", data_type: TYPE_FP32, dims: [ 1 ] },'
            ' { name: "A", data_type: TYPE_FP32, dims: [ 1 ] } ]',
            "input",
        ),
        ("dynamic_batching { }", "dynamic_batching"),
        (
            "max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }",
            "dynamic_batching.preferred_batch_size",
        ),
        ('platform: "tensorflow_savedmodel"', "platform"),
        ("version_policy { specific { } }", "version_policy.specific.versions"),
        ("version_policy { latest { num_versions: 0 } }", "version_policy.latest.num_versions"),
        ("instance_group [ { count: -1 } ]", "instance_group[0].count"),
    ],
)
def test_invalid_config_names_the_file_and_the_field(tmp_path, config, field):
    model_dir = _model_dir(tmp_path, config)
    with pytest.raises(InvalidConfig) as caught:
        _build(model_dir)
    message = str(caught.value)
    assert message.startswith(f"{model_dir / 'config.pbtxt'}: {field}:"), message


def test_unparseable_config_names_the_file_and_the_unknown_field(tmp_path):
    model_dir = _model_dir(tmp_path, "max_batch_sise: 4")
    with pytest.raises(InvalidConfig) as caught:
        _build(model_dir)
    assert str(model_dir / "config.pbtxt") in str(caught.value)
    assert "max_batch_sise" in str(caught.value)


def test_config_without_backend_or_model_file_is_rejected(tmp_path):
    with pytest.raises(InvalidConfig, match="backend"):
        _build(_model_dir(tmp_path, "max_batch_size: 1", files=()))


@pytest.mark.parametrize(
    ("policy", "available", "served"),
    [
        (VersionPolicy(), [1, 3, 2], [3]),
        (VersionPolicy(num_versions=2), [1, 3, 2], [3, 2]),
        (VersionPolicy(kind=VersionPolicyKind.ALL), [1, 2], [2, 1]),
        (VersionPolicy(kind=VersionPolicyKind.SPECIFIC, versions=(1, 5)), [1, 2], [1]),
        (VersionPolicy(), [], []),
    ],
)
def test_version_policy_selects_versions_highest_first(policy, available, served):
    assert policy.select(available) == served


# --- batch_dispatch: Triton's waiting rule by default, latency-first on request -------------


def _dispatch_config(
    extra: str, batching: str = "dynamic_batching { max_queue_delay_microseconds: 100 }"
) -> str:
    return (
        'name: "m"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "IN", data_type: TYPE_FP32, dims: [ 4 ] } ]\n'
        'output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 4 ] } ]\n'
        f"{batching}\n{extra}\n"
    )


def _parameter(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}'


@pytest.mark.parametrize(
    ("extra", "latency_first"),
    [
        ("", False),
        (_parameter("batch_dispatch", "triton"), False),
        (_parameter("batch_dispatch", "latency_first"), True),
        (_parameter("latency_slo_ms", "50"), True),
        (
            _parameter("latency_slo_ms", "50") + "\n" + _parameter("batch_dispatch", "latency_first"),
            True,
        ),
    ],
)
def test_dynamic_batcher_waits_as_triton_does_unless_latency_first_is_asked_for(
    tmp_path, extra, latency_first
):
    config = _build(_model_dir(tmp_path, _dispatch_config(extra)))
    assert config.dynamic_batching.latency_first is latency_first


@pytest.mark.parametrize(
    ("extra", "batching", "expected"),
    [
        (_parameter("batch_dispatch", "fast"), None, "expected 'triton'"),
        (_parameter("batch_dispatch", ""), None, "got ''"),
        (
            _parameter("batch_dispatch", "triton") + "\n" + _parameter("latency_slo_ms", "50"),
            None,
            "cannot go with latency_slo_ms",
        ),
        (_parameter("batch_dispatch", "latency_first"), "", "needs dynamic_batching"),
        (_parameter("batch_dispatch", "sometimes"), "", "expected 'triton'"),
    ],
)
def test_malformed_batch_dispatch_fails_the_load_naming_the_parameter(
    tmp_path, extra, batching, expected
):
    text = _dispatch_config(extra) if batching is None else _dispatch_config(extra, batching)
    with pytest.raises(InvalidConfig) as raised:
        _build(_model_dir(tmp_path, text))
    assert "config.pbtxt: parameters.batch_dispatch:" in str(raised.value)
    assert expected in str(raised.value)
