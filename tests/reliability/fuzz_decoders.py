"""Atheris target over Convoy's pure decoders: only ConvoyError subclasses may escape.

Run directly (`python tests/reliability/fuzz_decoders.py -runs=20000`) or through
test_fuzz_decoders.py, which bounds it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import orjson

    from convoy.config import ModelConfig
    from convoy.datatypes import deserialize_bytes
    from convoy.errors import ConvoyError
    from convoy.server import codec as tensors
    from convoy.server.http_api.handlers import HttpFrontend
    from convoy.types import TensorSpec

DATATYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16", "X"]


def make_config(datatype: str, batched: bool) -> ModelConfig:
    spec = TensorSpec(name="INPUT0", datatype=datatype, dims=(-1,))
    return ModelConfig(
        name="fuzz",
        backend="python",
        max_batch_size=8 if batched else 0,
        inputs=(spec,),
        outputs=(spec,),
    )


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    datatype = fdp.PickValueInList(DATATYPES[:-1])
    config = make_config(datatype, fdp.ConsumeBool())
    spec = config.inputs[0]
    shape = [fdp.ConsumeIntInRange(-2, 2**33) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    claimed = fdp.PickValueInList(DATATYPES)
    which = fdp.ConsumeIntInRange(0, 4)
    try:
        if which == 0:
            deserialize_bytes(
                fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)), fdp.ConsumeIntInRange(0, 64), "x"
            )
        elif which == 1:
            tensors.check_shape(config, spec, claimed, shape)
            tensors.from_raw(spec, claimed, shape, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
        elif which == 2:
            tensors.check_shape(config, spec, claimed, shape)
            values = [fdp.ConsumeRegularFloat() for _ in range(fdp.ConsumeIntInRange(0, 16))]
            tensors.from_values(spec, claimed, shape, values)
        else:
            split = fdp.ConsumeIntInRange(0, 512)
            rest = fdp.ConsumeBytes(fdp.remaining_bytes())
            try:
                document = orjson.loads(rest[:split])
            except orjson.JSONDecodeError:
                return
            if not isinstance(document, dict):
                return
            HttpFrontend._decode_inputs(config, document, memoryview(rest[split:]))
    except ConvoyError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
