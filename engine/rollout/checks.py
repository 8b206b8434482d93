"""What a roll-out's model and candidate must pass before it starts: a model whose requests can be
split between versions (one response each, no sequence state, not an ensemble), and a candidate
that answers stable's sample inference with the same outputs (names, datatypes, shapes)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from convoy.config import ModelConfig
from convoy.errors import InvalidInput
from convoy.types import Request

from ..check import sample_inputs
from .spec import RolloutSpec

if TYPE_CHECKING:
    from convoy.types import Response

    from ..repository import Model

log = logging.getLogger("convoy.rollout")

#: How long the signature check's sample inference may take per version.
SAMPLE_TIMEOUT_S = 60.0


def check_model(config: ModelConfig) -> None:
    """InvalidInput naming `model` when its requests cannot be split between two versions."""
    name = config.name
    if config.decoupled:
        raise InvalidInput(
            f"model: '{name}' is decoupled (model_transaction_policy.decoupled); a roll-out "
            "compares one response per request"
        )
    if config.sequence_batching is not None:
        raise InvalidInput(
            f"model: '{name}' uses sequence_batching; a roll-out would split a sequence's "
            "requests (and state) between two versions"
        )
    if config.ensemble is not None:
        raise InvalidInput(f"model: '{name}' is an ensemble; roll out its composing models instead")


async def check_signatures(model: Model, spec: RolloutSpec, root: Path) -> None:
    """One sample inference on each version; the candidate must answer it with the same
    outputs (names, datatypes, shapes) as stable."""
    name = model.name
    config = model.config
    # The manager started the roll-out: both versions are set, loaded and ready.
    assert config is not None and spec.stable is not None and spec.candidate is not None
    model_dir = model.private_dir or root / name
    inputs, rows = sample_inputs(config, model_dir / str(spec.stable))
    answers: dict[int, Response | Exception] = {}
    for version in (spec.stable, spec.candidate):
        entry = model.versions[version]
        future = asyncio.get_running_loop().create_future()
        request = Request(
            id="convoy-rollout-signature-check",
            inputs={k: np.array(v) for k, v in inputs.items()},
            requested_outputs=(),
            rows=rows,
            future=future,
            received_ns=time.monotonic_ns(),
        )
        try:
            assert entry.scheduler is not None  # a ready version (not an ensemble: check_model)
            entry.scheduler.submit(request)
            answers[version] = await asyncio.wait_for(future, SAMPLE_TIMEOUT_S)
        except Exception as exc:
            answers[version] = exc
    stable, candidate = answers[spec.stable], answers[spec.candidate]
    if isinstance(stable, BaseException):
        log.warning(
            "roll-out of '%s': stable version %d failed the sample inference (%s); the "
            "candidate's output signature is not checked",
            name,
            spec.stable,
            stable,
        )
        return
    if isinstance(candidate, BaseException):
        raise InvalidInput(
            f"candidate: version {spec.candidate} failed the sample inference version "
            f"{spec.stable} answers: {candidate}"
        )

    def signature(response: Response) -> dict[str, tuple[str, list[int]]]:
        return {n: (str(a.dtype), list(a.shape)) for n, a in sorted(response.outputs.items())}

    ours, theirs = signature(stable), signature(candidate)
    if ours != theirs:
        differences = []
        for output in sorted(set(ours) | set(theirs)):
            if ours.get(output) != theirs.get(output):
                got = theirs.get(output, "missing")
                want = ours.get(output, "missing")
                differences.append(f"'{output}' {got} vs {want}")
        raise InvalidInput(
            f"candidate: version {spec.candidate} has a different output signature from "
            f"version {spec.stable} on the same sample inference: " + "; ".join(differences)
        )
