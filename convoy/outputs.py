"""What a request gets back: the outputs it asked for (every declared output the model produced
when it asked for none), in the datatypes its model declares. The scheduler shapes a batch's
outputs with these; a decoupled model's streamed responses are shaped with them too."""

from __future__ import annotations

import numpy as np

from convoy.config import ModelConfig
from convoy.datatypes import NUMPY_DTYPE
from convoy.errors import ConvoyError, InferenceFailed


def select_outputs(
    outputs: dict[str, np.ndarray], requested: tuple[str, ...], config: ModelConfig
) -> dict[str, np.ndarray] | ConvoyError:
    """One request's own outputs: the ones it asked for, in the declared datatypes, or the
    error naming one the model did not produce."""
    outputs = declared_types(outputs, config)
    default = tuple(s.name for s in config.outputs if s.name in outputs) or tuple(outputs)
    return select_names(outputs, requested or default, config.name)


def declared_types(outputs: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Outputs whose dtype differs from the declared one, converted once for the whole batch."""
    converted = None
    for name, array in outputs.items():
        spec = config.output(name)
        if spec is None or spec.datatype == "BYTES":
            continue
        wanted = NUMPY_DTYPE[spec.datatype]
        if array.dtype != wanted:
            if converted is None:
                converted = dict(outputs)
            converted[name] = np.asarray(array).astype(wanted)
    return outputs if converted is None else converted


def missing(outputs: dict[str, np.ndarray], names: tuple[str, ...], model: str) -> ConvoyError | None:
    for name in names:
        if name not in outputs:
            return InferenceFailed(f"model '{model}' did not produce output '{name}'")
    return None


def select_names(
    outputs: dict[str, np.ndarray], names: tuple[str, ...], model: str
) -> dict[str, np.ndarray] | ConvoyError:
    if tuple(outputs) == names:
        return outputs
    return missing(outputs, names, model) or {name: outputs[name] for name in names}
