"""The table of ModelConfig fields Convoy refuses (engine/model_config.py): every entry names a
real field, setting any of them refuses the model naming it, and a config with none of them
set loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from convoy.engine.model_config import UNSUPPORTED_FIELDS, build_model_config
from convoy.errors import InvalidConfig
from convoy.protos import model_config_pb2 as mc

PATHS = [entry.path for entry in UNSUPPORTED_FIELDS]


def _base() -> mc.ModelConfig:
    proto = mc.ModelConfig(name="m", backend="python", max_batch_size=8)
    proto.input.add(name="INPUT0", data_type=mc.TYPE_INT32, dims=[-1])
    proto.output.add(name="OUTPUT0", data_type=mc.TYPE_INT32, dims=[-1])
    proto.instance_group.add(count=1)
    return proto


def _set(message, path: str) -> str:
    """Set `path` in `message` to a non-default value; the spelling a refusal should name."""
    head, _, rest = path.partition(".")
    name = head.removesuffix("[]")
    field = message.DESCRIPTOR.fields_by_name[name]
    if head.endswith("[]"):
        element = getattr(message, name)[0]
        return f"{name}[0].{_set(element, rest)}"
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        getattr(message, name)["key"] = "value"  # the maps refused are string -> string
        return name
    if field.is_repeated:
        container = getattr(message, name)
        if field.message_type is not None:
            container.add()
        elif field.type == FieldDescriptor.TYPE_STRING:
            container.append("x")
        else:
            container.append(1)
        return name
    if field.message_type is not None:
        child = getattr(message, name)
        if rest:
            return f"{name}.{_set(child, rest)}"
        child.SetInParent()
        return name
    if field.type == FieldDescriptor.TYPE_BOOL:
        setattr(message, name, True)
    elif field.type == FieldDescriptor.TYPE_STRING:
        setattr(message, name, "x")
    else:
        setattr(message, name, 1)
    return name


def test_a_config_setting_none_of_them_loads():
    config = build_model_config(_base(), Path("/repo/m"))
    assert config.name == "m"


@pytest.mark.parametrize("path", PATHS)
def test_setting_an_unsupported_field_refuses_the_model_naming_it(path):
    proto = _base()
    spelled = _set(proto, path)
    with pytest.raises(InvalidConfig) as caught:
        build_model_config(proto, Path("/repo/m"))
    assert f"/repo/m/config.pbtxt: {spelled}: is set, but Convoy does not implement it" in str(
        caught.value
    )


def test_the_table_covers_every_model_config_field_convoy_does_not_read():
    """A new ModelConfig field (a newer model_config.proto) must be either read or refused."""
    read = {
        "name",
        "platform",
        "backend",
        "version_policy",
        "max_batch_size",
        "input",
        "output",
        "dynamic_batching",
        "instance_group",
        "default_model_filename",
        "parameters",
        "model_warmup",
        "sequence_batching",
        "ensemble_scheduling",
        "batch_input",
        "batch_output",
        # Read in part: the table lists their unsupported sub-fields.
        "optimization",
        "model_transaction_policy",
        "response_cache",
        "model_metrics",
    }
    refused = {path.split(".")[0].removesuffix("[]") for path in PATHS}
    assert {f.name for f in mc.ModelConfig.DESCRIPTOR.fields} == read | refused


def test_padded_and_ragged_batching_together_are_refused_naming_the_padding():
    proto = _base()
    proto.input[0].allow_ragged_batch = True
    proto.parameters["padding_inputs"].string_value = "INPUT0"
    with pytest.raises(InvalidConfig) as caught:
        build_model_config(proto, Path("/repo/m"))
    assert "parameters.padding_inputs" in str(caught.value)
    assert "ragged batching" in str(caught.value)
