"""Per-request response checks: the answer must belong to the request that was sent.

Every response is checked generically against the model metadata (id echo, model name, output
names, datatypes, shapes and batch dimension); models with a known behaviour also get their
values checked by an oracle (add_sub: OUTPUT0 == INPUT0 + INPUT1). A mismatch raises
`ResponseMismatch`, which the load-test user reports as a locust failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ResponseMismatch
from .payloads import ModelSpec


@dataclass(frozen=True)
class InferResponse:
    """What a protocol client got back, in plain types (protocol-independent)."""

    id: str
    model_name: str
    #: output name -> (datatype, array)
    outputs: dict[str, tuple[str, np.ndarray]]


Oracle = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None]


def _expect_equal(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    if got.shape != expected.shape:
        raise ResponseMismatch(
            f"output '{name}': expected shape {list(expected.shape)}, got {list(got.shape)}"
        )
    if np.issubdtype(expected.dtype, np.floating):
        same = np.allclose(got.astype(np.float64), expected.astype(np.float64), rtol=1e-5, atol=1e-6)
    else:
        same = np.array_equal(got, expected)
    if not same:
        where = np.argwhere(got != expected)
        at = tuple(int(i) for i in where[0]) if len(where) else ()
        raise ResponseMismatch(
            f"output '{name}': values differ from the expected result "
            f"(first at {list(at)}: got {got[at]!r}, expected {expected[at]!r})"
        )


def add_sub_oracle(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1 (Convoy's add_sub, Triton's simple)."""
    a, b = inputs["INPUT0"], inputs["INPUT1"]
    _expect_equal("OUTPUT0", outputs["OUTPUT0"], a + b)
    if "OUTPUT1" in outputs:
        _expect_equal("OUTPUT1", outputs["OUTPUT1"], a - b)


def identity_oracle(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """OUTPUT0 is INPUT0, element for element (text compared as bytes)."""
    sent, got = inputs["INPUT0"], outputs["OUTPUT0"]
    if sent.dtype == np.object_:
        as_bytes = [v.encode() if isinstance(v, str) else bytes(v) for v in got.reshape(-1)]
        if got.shape != sent.shape or as_bytes != list(sent.reshape(-1)):
            raise ResponseMismatch("output 'OUTPUT0': the text echoed back differs from INPUT0")
        return
    _expect_equal("OUTPUT0", got, sent)


def unit_norm_oracle(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """Every EMBEDDING row is L2-normalised (the text_embedding demo)."""
    norms = np.linalg.norm(outputs["EMBEDDING"].astype(np.float64), axis=-1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ResponseMismatch(
            f"output 'EMBEDDING': expected unit-norm rows, got norms {norms.tolist()[:4]}"
        )


#: oracle name -> (check, the input and output names it needs).
ORACLES: dict[str, tuple[Oracle, frozenset[str], frozenset[str]]] = {
    "add_sub": (add_sub_oracle, frozenset({"INPUT0", "INPUT1"}), frozenset({"OUTPUT0"})),
    "identity": (identity_oracle, frozenset({"INPUT0"}), frozenset({"OUTPUT0"})),
    "unit_norm": (unit_norm_oracle, frozenset(), frozenset({"EMBEDDING"})),
}

#: model name -> oracle name, for `--check auto`.
MODEL_ORACLES = {"add_sub": "add_sub", "simple": "add_sub", "text_embedding": "unit_norm"}


def choose_oracle(model: ModelSpec, check: str) -> Oracle | None:
    """The value check for `--check` (auto: by model name; none: structural checks only)."""
    if check == "none":
        return None
    name = check
    if check == "auto":
        name = MODEL_ORACLES.get(model.name, "identity" if model.name.startswith("identity") else "")
        if not name:
            return None
    if name not in ORACLES:
        raise ValueError(f"--check {check!r}: expected auto, none or one of {sorted(ORACLES)}")
    oracle, needs_in, needs_out = ORACLES[name]
    have_in = {t.name for t in model.inputs}
    have_out = {t.name for t in model.outputs}
    if not (needs_in <= have_in and needs_out <= have_out):
        if check == "auto":
            return None
        raise ValueError(
            f"--check {name}: model '{model.name}' lacks inputs {sorted(needs_in - have_in)} "
            f"or outputs {sorted(needs_out - have_out)}"
        )
    return oracle


def check_response(
    model: ModelSpec,
    request_id: str,
    inputs: dict[str, np.ndarray],
    response: InferResponse,
    oracle: Oracle | None,
) -> None:
    """Raise ResponseMismatch unless `response` answers this request of `model`."""
    if response.id != request_id:
        raise ResponseMismatch(f"expected the response to echo id {request_id!r}, got {response.id!r}")
    if response.model_name and response.model_name != model.name:
        raise ResponseMismatch(f"expected model_name {model.name!r}, got {response.model_name!r}")
    expected_names = {t.name for t in model.outputs}
    if set(response.outputs) != expected_names:
        raise ResponseMismatch(
            f"expected outputs {sorted(expected_names)}, got {sorted(response.outputs)}"
        )
    batch = next(iter(inputs.values())).shape[0] if model.batched else None
    arrays = {}
    for spec in model.outputs:
        datatype, array = response.outputs[spec.name]
        if datatype != spec.datatype:
            raise ResponseMismatch(f"output '{spec.name}': expected {spec.datatype}, got {datatype}")
        shape = array.shape
        fits = len(shape) == len(spec.shape) and all(
            want < 0 or got == want for got, want in zip(shape, spec.shape, strict=True)
        )
        if not fits or (batch is not None and shape[0] != batch):
            raise ResponseMismatch(
                f"output '{spec.name}': expected shape {list(spec.shape)}"
                + (f" with batch {batch}" if batch is not None else "")
                + f", got {list(shape)}"
            )
        arrays[spec.name] = array
    if oracle is not None:
        oracle(inputs, arrays)
