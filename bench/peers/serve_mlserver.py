"""The benchmark MLP as an MLServer custom model (imported by .peers/mlserver's `mlserver start`).

Adaptive batching (max_batch_size / max_batch_time in model-settings.json, written by the
launcher) merges requests before `predict`, as Convoy's dynamic batcher does.
"""

from __future__ import annotations

from mlp import OUTPUT, forward, load_layers
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class MLPModel(MLModel):
    async def load(self) -> bool:
        self._layers = load_layers(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0])
        outputs = forward(self._layers, rows)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(OUTPUT, outputs)],
        )
