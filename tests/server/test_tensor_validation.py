"""Wire tensors against a model's declared inputs: names, datatypes, shapes and byte sizes are
checked before anything is allocated, and every datatype's wire bytes decode to what was sent."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from convoy.config import ModelConfig
from convoy.datatypes import (
    NUMPY_DTYPE,
    bf16_bits_to_float32,
    deserialize_bytes,
    float32_to_bf16_bits,
    serialize_bytes,
    to_wire_bytes,
)
from convoy.errors import InvalidInput
from convoy.server import codec as tensors
from convoy.types import TensorSpec

FIXED_SIZE = [d for d in NUMPY_DTYPE if d != "BYTES"]


def _config(max_batch_size: int = 4, *specs: TensorSpec) -> ModelConfig:
    specs = specs or (TensorSpec("A", "FP32", (3,)), TensorSpec("B", "INT32", (-1,)))
    return ModelConfig(
        name="m",
        backend="python",
        max_batch_size=max_batch_size,
        inputs=specs,
        outputs=(TensorSpec("OUT", "FP32", (3,)),),
    )


def test_unknown_input_lists_the_expected_ones():
    with pytest.raises(InvalidInput, match=r"unexpected input 'C'.*'A', 'B'"):
        tensors.input_spec(_config(), "C")


@pytest.mark.parametrize(
    ("datatype", "shape", "fragment"),
    [
        ("INT32", [1, 3], "expected datatype FP32, got INT32"),
        (None, [1, 3], "got (none)"),
        ("FP32", [1, 4], "expected shape [-1, 3]"),
        ("FP32", [3], "expected shape [-1, 3]"),
        ("FP32", [0, 3], "batch dimension must be >= 1"),
        ("FP32", [5, 3], "batch size 5 exceeds max_batch_size 4"),
        ("FP32", [1, -3], "shape [1,-3] contains one or more invalid dimensions"),
    ],
)
def test_bad_datatype_or_shape_is_rejected_naming_the_input(datatype, shape, fragment):
    config = _config()
    with pytest.raises(InvalidInput) as caught:
        tensors.check_shape(config, config.input("A"), datatype, shape)
    assert "input 'A'" in str(caught.value)
    assert fragment in str(caught.value)


def test_non_batching_model_takes_exactly_its_dims():
    config = _config(0, TensorSpec("A", "FP32", (2, -1)))
    assert tensors.check_shape(config, config.input("A"), "FP32", [2, 7]) == 1
    with pytest.raises(InvalidInput, match=r"expected shape \[2, -1\]"):
        tensors.check_shape(config, config.input("A"), "FP32", [1, 2, 7])


def test_shape_with_too_many_elements_is_rejected():
    config = _config(0, TensorSpec("A", "UINT8", (-1, -1)))
    with pytest.raises(InvalidInput, match="more than"):
        tensors.check_shape(config, config.input("A"), "UINT8", [1 << 16, 1 << 16])


def test_raw_bytes_of_the_wrong_size_are_rejected():
    spec = TensorSpec("A", "FP32", (3,))
    with pytest.raises(InvalidInput, match=r"needs 24 bytes, got 20"):
        tensors.from_raw(spec, "FP32", [2, 3], b"\0" * 20)


def test_bytes_shape_the_data_cannot_hold_is_rejected_before_allocating():
    # 2**40 elements would need 8 TiB of slots; the check must come first.
    with pytest.raises(InvalidInput, match="cannot hold"):
        deserialize_bytes(b"\0" * 8, 1 << 40, "A")


@pytest.mark.parametrize(
    ("buffer", "fragment"),
    [
        (b"\x05\0\0\0abc\0", "declares 5 bytes but only 4 remain"),
        (b"\x01\0\0\0a\x00\0\0\0\0", "beyond the 1 elements"),
    ],
)
def test_malformed_bytes_data_is_rejected(buffer, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        deserialize_bytes(buffer, 1, "A")


def test_missing_required_input_and_mismatched_batches_are_rejected():
    config = _config()
    with pytest.raises(InvalidInput, match="missing required input 'B'"):
        tensors.check_complete(config, {"A": np.zeros((1, 3), np.float32)})
    with pytest.raises(InvalidInput, match="batch dimension 2 differs"):
        tensors.check_complete(
            config, {"A": np.zeros((1, 3), np.float32), "B": np.zeros((2, 1), np.int32)}
        )


def test_optional_input_may_be_left_out():
    config = _config(4, TensorSpec("A", "FP32", (3,)), TensorSpec("B", "FP32", (3,), optional=True))
    assert tensors.check_complete(config, {"A": np.zeros((2, 3), np.float32)}) == 2


def test_unknown_requested_output_lists_the_declared_ones():
    with pytest.raises(InvalidInput, match=r"unexpected requested output 'X'.*'OUT'"):
        tensors.check_requested_outputs(_config(), ["OUT", "X"])


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("BOOL", ["true"]),
        ("BOOL", [0, 1]),
        ("INT32", [1.5, 2]),
        ("INT64", [True, False]),
        ("UINT64", [None, 1]),
        ("FP32", [None, 1.0]),
        ("FP64", ["1.0", "2.0"]),
        ("BF16", [True, False]),
        ("UINT8", [256, 1]),
        ("INT8", [[1], [2, 3]]),
        ("BYTES", [7, 8]),
    ],
)
def test_json_values_of_the_wrong_type_are_rejected(datatype, values):
    spec = TensorSpec("A", datatype, (-1,))
    with pytest.raises(InvalidInput, match="input 'A'"):
        tensors.from_json(spec, datatype, [1, 2], values)


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("BOOL", [[True], [False]]),
        ("UINT64", [2**64 - 1, 0]),
        ("INT64", [-(2**63), 2**63 - 1]),
        ("FP16", [1, 0.5]),
        ("FP64", [[1], [2.5]]),
        ("BF16", [1.0, -2]),
        ("BYTES", ["a", "b"]),
    ],
)
def test_json_values_of_the_right_type_are_accepted(datatype, values):
    spec = TensorSpec("A", datatype, (-1,))
    array = tensors.from_json(spec, datatype, [2, 1], values)
    assert array.shape == (2, 1)


@given(
    datatype=st.sampled_from(FIXED_SIZE),
    data=st.data(),
)
def test_every_fixed_size_datatype_decodes_its_wire_bytes_exactly(datatype, data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), label="shape")
    array = data.draw(hnp.arrays(NUMPY_DTYPE[datatype], shape), label="array")
    spec = TensorSpec("A", datatype, (-1,) * len(shape))
    wire = to_wire_bytes(array, datatype)
    decoded = tensors.from_raw(spec, datatype, list(shape), memoryview(wire))
    assert decoded.shape == shape
    assert decoded.tobytes() == array.tobytes()


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_bytes_elements_round_trip_through_their_wire_format(items):
    array = np.empty(len(items), dtype=object)
    array[:] = items
    decoded = deserialize_bytes(serialize_bytes(array), len(items), "A")
    assert list(decoded) == items


@given(hnp.arrays(np.float32, st.integers(0, 32), elements=st.floats(width=32, allow_nan=False)))
def test_bf16_rounding_is_nearest_and_widening_is_exact(values):
    bits = float32_to_bf16_bits(values)
    widened = bf16_bits_to_float32(bits)
    # Widening then rounding again is the identity: bfloat16 values are float32 values.
    np.testing.assert_array_equal(float32_to_bf16_bits(widened), bits)
    # Rounding moves a finite value by at most half a bfloat16 step: relative 2**-8 for normal
    # values, half the smallest bfloat16 subnormal (2**-133) near zero.
    finite = np.isfinite(widened)
    exact = values[finite].astype(np.float64)
    error = np.abs(widened[finite].astype(np.float64) - exact)
    assert np.all(error <= np.abs(exact) * 2.0**-8 + 2.0**-134)
