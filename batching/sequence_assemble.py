"""How the sequence batcher builds a batch and takes it apart (batching/sequence.py decides when).

A batch holds the requests' inputs at their rows (with `direct`, a sequence's row is its slot, and
rows of slots with nothing to run are padding), the control inputs the config asks for (START,
END, READY, CORRID) and each implicit state; the outputs are split back per request, the states'
new values kept for the next request of their sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from convoy.config import SequenceBatching, SequenceControl
from convoy.datatypes import NUMPY_DTYPE
from convoy.errors import InferenceFailed


class Member(NamedTuple):
    """One request of a batch, as the batch needs it."""

    inputs: dict[str, np.ndarray]
    #: Its row in the batch.
    row: int
    start: bool
    end: bool
    correlation_id: int | str
    #: Its sequence's kept state, by state input name (empty: none yet).
    state: dict[str, np.ndarray]


def assemble(
    policy: SequenceBatching, batched: bool, rows: int, members: list[Member]
) -> dict[str, np.ndarray]:
    """The batch's inputs: `rows` rows (1 and no batch dimension when the model does not batch)."""
    dense = [m.row for m in members] == list(range(len(members)))
    inputs: dict[str, np.ndarray] = {}
    for name, array in members[0].inputs.items():
        if len(members) == 1 and dense:
            inputs[name] = array  # a lone request passes through untouched
        elif dense:
            # The one copy on the way in: each request's views into one batch buffer.
            inputs[name] = np.concatenate([m.inputs[name] for m in members])
        else:
            buffer = _blank((rows, *array.shape[1:]), array.dtype)
            for member in members:
                buffer[member.row] = member.inputs[name][0]
            inputs[name] = buffer
    for control in policy.controls:
        inputs[control.input_name] = _control(control, batched, rows, members)
    for state in policy.states:
        dtype = NUMPY_DTYPE[state.datatype]
        shape = (rows, *state.dims) if batched else state.dims
        buffer = np.zeros(shape, dtype=dtype)  # START (or a sequence's first request): zeros
        for member in members:
            kept = member.state.get(state.input_name)
            if kept is not None and not member.start:
                if batched:
                    buffer[member.row] = kept
                else:
                    buffer[...] = kept
        inputs[state.input_name] = buffer
    return inputs


def _control(control: SequenceControl, batched: bool, rows: int, members: list[Member]) -> np.ndarray:
    shape = (rows, 1) if batched else (1,)
    if control.kind == "CORRID":
        dtype = object if control.datatype == "BYTES" else NUMPY_DTYPE[control.datatype]
        array = np.full(shape, b"" if dtype is object else 0, dtype=dtype)
        for member in members:
            value = member.correlation_id
            array[member.row if batched else 0] = value.encode() if isinstance(value, str) else value
        return array
    array = np.full(shape, control.false_value, dtype=NUMPY_DTYPE[control.datatype])
    for member in members:
        if control.kind == "START":
            on = member.start
        elif control.kind == "END":
            on = member.end
        else:  # READY: a real request (padding rows keep false)
            on = True
        if on:
            array[member.row if batched else 0] = control.true_value
    return array


def split_outputs(
    policy: SequenceBatching,
    batched: bool,
    model: str,
    outputs: dict[str, np.ndarray],
    rows_of: list[int],
) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per request (in `rows_of` order): its outputs (views of the batch's) without the state
    outputs, and its sequence's new state values (copies) by state input name."""
    if not isinstance(outputs, dict):
        raise InferenceFailed(f"model '{model}' returned {type(outputs).__name__}, not outputs")
    rows = (max(rows_of) + 1) if batched else 1
    if batched:
        for output, array in outputs.items():
            if array.ndim == 0 or array.shape[0] < rows:
                raise InferenceFailed(
                    f"model '{model}' returned output '{output}' with shape {list(array.shape)} "
                    f"for a batch of {rows} rows; expected first dimension {rows}"
                )
    for state in policy.states:
        if state.output_name not in outputs:
            raise InferenceFailed(
                f"model '{model}' did not return output '{state.output_name}' "
                f"(sequence_batching.state '{state.input_name}')"
            )
    parts = []
    for row in rows_of:
        answer = {k: v[row : row + 1] for k, v in outputs.items()} if batched else dict(outputs)
        states = {}
        for state in policy.states:
            kept = answer.pop(state.output_name)
            # A copy: the runtime may reuse its output buffers for the next batch.
            states[state.input_name] = np.array(
                kept[0] if batched else kept, dtype=NUMPY_DTYPE[state.datatype]
            ).reshape(state.dims)
        parts.append((answer, states))
    return parts


def _blank(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A padding-filled batch buffer (zeros; empty bytes for BYTES)."""
    if dtype == np.dtype(object):
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=dtype)
