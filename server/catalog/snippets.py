"""Copy-paste client code for one model, generated from its metadata: curl (HTTP JSON), Python
tritonclient over gRPC and over HTTP, and plain Python `requests`.

Each snippet sends the same example request (a batch of one where the model batches, every
variable dimension 1, numbers that differ per input, strings for BYTES) and prints the outputs.
Names go through repr()/shlex.quote, so odd model or tensor names cannot break the code.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from urllib.parse import quote

#: numpy dtype names per Open Inference Protocol datatype, for the tritonclient snippets.
NUMPY_NAMES = {
    "BOOL": "np.bool_",
    "UINT8": "np.uint8",
    "UINT16": "np.uint16",
    "UINT32": "np.uint32",
    "UINT64": "np.uint64",
    "INT8": "np.int8",
    "INT16": "np.int16",
    "INT32": "np.int32",
    "INT64": "np.int64",
    "FP16": "np.float16",
    "FP32": "np.float32",
    "FP64": "np.float64",
    "BF16": "np.float32",  # tritonclient takes float32 values for BF16 over JSON
    "BYTES": "np.object_",
}
#: Above this many elements an input's values are written as one repeated value.
LITERAL_LIMIT = 64


@dataclass(frozen=True)
class ExampleInput:
    name: str
    datatype: str
    shape: list[int]
    #: Flat row-major values (Python bool / int / float / str).
    values: list

    def python_values(self) -> str:
        """The values as a Python expression (a literal, or `[v] * n` when long)."""
        if len(self.values) > LITERAL_LIMIT and len(set(map(repr, self.values))) == 1:
            return f"[{self.values[0]!r}] * {len(self.values)}"
        return repr(self.values)


def example_inputs(metadata: dict) -> list[ExampleInput]:
    """One example tensor per declared input: -1 dims become 1, distinct small values per input."""
    examples = []
    for position, spec in enumerate(metadata["inputs"]):
        shape = [1 if d < 0 else d for d in spec["shape"]]
        count = math.prod(shape)
        examples.append(
            ExampleInput(
                spec["name"], spec["datatype"], shape, _values(spec["datatype"], count, position)
            )
        )
    return examples


def _values(datatype: str, count: int, position: int) -> list:
    scale = min(position, 8) + 1
    if count > LITERAL_LIMIT:  # one repeated value keeps long inputs short to paste
        count_values = [scale] * count
    else:
        count_values = [(i % 7 + 1) * scale for i in range(count)]
    if datatype == "BYTES":
        return [f"example text {v}" for v in count_values]
    if datatype == "BOOL":
        return [v % 2 == 1 for v in count_values]
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        return [float(v) for v in count_values]
    return count_values


#: Where the snippets read the caller's API key from when the server requires one.
KEY_VARIABLE = "CONVOY_API_KEY"


def snippets(
    metadata: dict, http_base: str, grpc_address: str, with_key: bool = False
) -> dict[str, str]:
    """{"curl", "python_grpc", "python_http", "python_requests"} for the model in `metadata`
    (the Open Inference Protocol model metadata), against this server's HTTP base URL
    (http://host:port) and gRPC address (host:port). `with_key`: the server wants API keys, so
    each snippet sends `Authorization: Bearer $CONVOY_API_KEY` (never a key itself)."""
    examples = example_inputs(metadata)
    model = metadata["name"]
    outputs = [o["name"] for o in metadata["outputs"]]
    infer_url = f"{http_base}/v2/models/{quote(model, safe='')}/infer"
    return {
        "curl": _curl(infer_url, examples, with_key),
        "python_grpc": _tritonclient("grpc", grpc_address, model, examples, outputs, with_key),
        "python_http": _tritonclient(
            "http", http_base.split("://", 1)[1], model, examples, outputs, with_key
        ),
        "python_requests": _requests(infer_url, examples, with_key),
    }


def _json_body(examples: list[ExampleInput]) -> dict:
    return {
        "inputs": [
            {"name": e.name, "datatype": e.datatype, "shape": e.shape, "data": e.values}
            for e in examples
        ]
    }


def _curl(infer_url: str, examples: list[ExampleInput], with_key: bool) -> str:
    body = json.dumps(_json_body(examples), separators=(",", ":"))
    key = f'  -H "Authorization: Bearer ${KEY_VARIABLE}" \\\n' if with_key else ""
    return (
        f"curl -sS -X POST {shlex.quote(infer_url)} \\\n"
        "  -H 'Content-Type: application/json' \\\n"
        f"{key}"
        f"  -d {shlex.quote(body)}\n"
    )


def _key_lines(with_key: bool) -> list[str]:
    if not with_key:
        return []
    return ["import os", "", f'headers = {{"authorization": "Bearer " + os.environ["{KEY_VARIABLE}"]}}']


def _tritonclient(
    flavour: str, address: str, model: str, examples, outputs: list[str], with_key: bool
) -> str:
    lines = [
        *_key_lines(with_key),
        "import numpy as np",
        f"import tritonclient.{flavour} as {flavour}client",
        "",
        f"client = {flavour}client.InferenceServerClient({address!r})",
        "inputs = []",
    ]
    for e in examples:
        lines += [
            f"data = np.array({e.python_values()}, dtype={NUMPY_NAMES[e.datatype]})"
            f".reshape({e.shape!r})",
            f"tensor = {flavour}client.InferInput({e.name!r}, {e.shape!r}, {e.datatype!r})",
            "tensor.set_data_from_numpy(data)",
            "inputs.append(tensor)",
        ]
    lines += [
        f"result = client.infer({model!r}, inputs{', headers=headers' if with_key else ''})",
        f"for name in {outputs!r}:",
        "    print(name, result.as_numpy(name).tolist())",
        "client.close()",
    ]
    return "\n".join(lines) + "\n"


def _requests(infer_url: str, examples: list[ExampleInput], with_key: bool) -> str:
    lines = [*_key_lines(with_key), "import requests", "", "payload = {", '    "inputs": [']
    for e in examples:
        lines.append(
            f'        {{"name": {e.name!r}, "datatype": {e.datatype!r}, "shape": {e.shape!r}, '
            f'"data": {e.python_values()}}},'
        )
    lines += [
        "    ]",
        "}",
        f"answer = requests.post({infer_url!r}, json=payload, timeout=30"
        f"{', headers=headers' if with_key else ''})",
        "answer.raise_for_status()",
        'for output in answer.json()["outputs"]:',
        '    print(output["name"], output["data"])',
    ]
    return "\n".join(lines) + "\n"
