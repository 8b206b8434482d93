"""The pytorch backend with padded batching: the lengths input reaches the module, padded rows
compute what each request alone computes, the CUDA graph plan (batch bucket x length bucket
under the token budget, limited) and which graph a batch replays; on a CUDA device, replay
equals eager at every planned shape. Imports nothing but torch, numpy and convoy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convoy.config import InstanceGroup, InstanceKind, ModelConfig, ModelVersionSource
from convoy.errors import InvalidConfig, ModelLoadFailed
from convoy.padding import parse_padding
from convoy.runtimes.cuda_graphs import StaticInput, choose_graph, graph_plan, static_tensors
from convoy.runtimes.pytorch import TorchRuntime
from convoy.types import TensorSpec

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
HAS_CUDA = torch.cuda.is_available()
RNG = np.random.default_rng(3)
WIDTH = 8


class TinyEncoder(torch.nn.Module):
    """Token embeddings (masked) and their mean over each row's real length."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(1000, WIDTH)

    def forward(self, input_ids, attention_mask, lengths):
        tokens = self.embed(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = tokens.sum(dim=1) / lengths.unsqueeze(-1).to(torch.float32).clamp(min=1)
        return tokens, pooled


INPUTS = (TensorSpec("input_ids", "INT64", (-1,)), TensorSpec("attention_mask", "INT64", (-1,)))
OUTPUTS = (TensorSpec("token_embeddings", "FP32", (-1, WIDTH)), TensorSpec("pooled", "FP32", (WIDTH,)))
PARAMETERS = {
    "padding_inputs": "input_ids, attention_mask",
    "padding_buckets": "8,16,32",
    "padding_lengths_input": "lengths",
    "padding_outputs": "token_embeddings:0",
    "max_batch_tokens": "128",
}


def _fail(field: str, message: str) -> InvalidConfig:
    return InvalidConfig(f"{field}: {message}")


def _source(tmp_path: Path, name: str, gpu: bool = False, **parameters: str) -> ModelVersionSource:
    folder = tmp_path / name / "1"
    folder.mkdir(parents=True)
    torch.jit.script(TinyEncoder().eval()).save(str(folder / "model.pt"))
    merged = {**PARAMETERS, **parameters}
    kind = InstanceKind.GPU if gpu else InstanceKind.CPU
    config = ModelConfig(
        name=name,
        backend="pytorch",
        max_batch_size=16,
        inputs=INPUTS,
        outputs=OUTPUTS,
        instance_groups=(InstanceGroup("g", 1, kind, (0,) if gpu else ()),),
        parameters=merged,
        padding=parse_padding(merged, INPUTS, OUTPUTS, 16, _fail),
    )
    return ModelVersionSource(config, 1, folder)


@pytest.fixture
def loaded():
    runtimes: list[TorchRuntime] = []

    def load(source: ModelVersionSource) -> TorchRuntime:
        runtime = TorchRuntime(source, 0)
        runtimes.append(runtime)
        runtime.load()
        return runtime

    yield load
    for runtime in runtimes:
        runtime.close()


def padded_batch(lengths: list[int], padded: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """A padded batch (pad 0) with a lengths input, and each row's own unpadded tokens."""
    rows = [RNG.integers(1, 1000, size=n) for n in lengths]
    ids = np.zeros((len(rows), padded), np.int64)
    mask = np.zeros((len(rows), padded), np.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
        mask[index, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "lengths": np.array(lengths, np.int64)}, rows


def alone(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        ids = torch.from_numpy(row[None, :])
        tokens, pooled = TinyEncoder()(ids, torch.ones_like(ids), torch.tensor([len(row)]))
    return tokens.numpy()[0], pooled.numpy()[0]


def check_rows(outputs: dict[str, np.ndarray], rows: list[np.ndarray]) -> None:
    for index, row in enumerate(rows):
        tokens, pooled = alone(row)
        np.testing.assert_allclose(outputs["pooled"][index], pooled, rtol=1e-5, atol=1e-6)
        own = outputs["token_embeddings"][index, : len(row)]
        np.testing.assert_allclose(own, tokens, rtol=1e-5, atol=1e-6)


# --- the plan (CPU) -------------------------------------------------------------------------------
def test_plan_without_padding_is_one_graph_per_batch_bucket():
    assert graph_plan(12) == [(1, 0), (2, 0), (4, 0), (8, 0), (12, 0)]
    assert graph_plan(0) == [(0, 0)]


def test_plan_is_batch_buckets_times_length_buckets_within_the_token_budget():
    plan = graph_plan(16, (8, 16, 32), max_batch_tokens=128)
    # 128 tokens: at most 16 rows of 8, 8 of 16, 4 of 32.
    expected = [(r, 8) for r in (1, 2, 4, 8, 16)] + [(r, 16) for r in (1, 2, 4, 8)]
    assert sorted(plan) == sorted(expected + [(r, 32) for r in (1, 2, 4)])
    # A budget between buckets keeps the bucket that holds the most rows a batch can have.
    assert max(r for r, n in graph_plan(16, (32,), max_batch_tokens=100)) == 4
    assert len(graph_plan(16, (8, 16, 32))) == 15


def test_plan_limit_keeps_the_cheapest_graphs():
    plan = graph_plan(16, (8, 16, 32), max_batch_tokens=128, limit=4)
    assert plan == [(1, 8), (1, 16), (2, 8), (1, 32)]


def test_a_batch_replays_the_smallest_graph_of_its_length_or_runs_eagerly():
    captured = [(1, 8), (4, 8), (16, 8), (1, 16), (2, 16)]
    assert captured[choose_graph(captured, 3, 8)] == (4, 8)
    assert captured[choose_graph(captured, 1, 16)] == (1, 16)
    assert choose_graph(captured, 3, 16) is None  # no graph with room: eager
    assert choose_graph(captured, 1, 32) is None  # length without a graph: eager
    assert choose_graph([(1, 0), (8, 0)], 5, 0) == 1


def test_graph_buffers_take_the_length_bucket_and_the_lengths_input_holds_it():
    inputs = [
        StaticInput((-1,), torch.int64),
        StaticInput((-1, 3), torch.float32),
        StaticInput((), torch.int32, lengths=True),
    ]
    ids, features, lengths = static_tensors(inputs, 4, 16, torch.device("cpu"))
    assert ids.shape == (4, 16) and features.shape == (4, 16, 3) and lengths.shape == (4,)
    assert lengths.dtype == torch.int32 and (lengths == 16).all() and (ids == 0).all()
    (unbatched,) = static_tensors([StaticInput((2, 5), torch.float32)], 0, 0, torch.device("cpu"))
    assert unbatched.shape == (2, 5)


# --- the runtime on the CPU -----------------------------------------------------------------------
def test_padded_rows_compute_what_each_request_alone_computes(tmp_path, loaded):
    runtime = loaded(_source(tmp_path, "enc"))
    inputs, rows = padded_batch([3, 16, 9, 1], 16)
    check_rows(runtime.infer(inputs), rows)


def test_a_batch_without_the_lengths_input_counts_every_row_full(tmp_path, loaded):
    runtime = loaded(_source(tmp_path, "enc"))
    inputs, rows = padded_batch([8, 8], 8)
    del inputs["lengths"]  # as model_warmup sends it
    check_rows(runtime.infer(inputs), rows)


def test_bad_cuda_graph_limit_fails_load_naming_it(tmp_path, loaded):
    with pytest.raises(ModelLoadFailed, match=r"parameters\.cuda_graph_limit: expected a positive"):
        loaded(_source(tmp_path, "enc", cuda_graph_limit="none"))


@pytest.mark.parametrize("typo", ["cuda_graph_limt", "cuda_graph", "intra_op_threads_count"])
def test_a_misspelt_pytorch_parameter_fails_load_naming_it(tmp_path, loaded, typo):
    with pytest.raises(ModelLoadFailed, match=rf"parameters\.{typo}: not a pytorch backend parameter"):
        loaded(_source(tmp_path, "enc", **{typo: "4"}))


def test_graphs_for_padded_dims_need_buckets(tmp_path, loaded):
    with pytest.raises(ModelLoadFailed, match=r"parameters\.cuda_graphs is true .*padding_buckets"):
        loaded(_source(tmp_path, "enc", cuda_graphs="true", padding_buckets="none"))
    loaded(_source(tmp_path, "bucketed", cuda_graphs="true"))  # padded dims bucketed: accepted


# --- on a CUDA device ----------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["", "5"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_graphs_per_batch_and_length_bucket_replay_equal_to_each_request_alone(tmp_path, loaded, limit):
    parameters = {"cuda_graph_limit": limit} if limit else {}
    runtime = loaded(_source(tmp_path, "enc", gpu=True, **parameters))
    planned = graph_plan(16, (8, 16, 32), max_batch_tokens=128, limit=int(limit or 0))
    assert sorted(runtime.graph_captures) == sorted(planned)
    for lengths, padded in [([5], 8), ([3, 8, 1], 8), ([12, 16, 9, 2, 11], 16), ([30, 4], 32)]:
        for _ in range(2):  # the second replay runs on buffers the first left dirty
            inputs, rows = padded_batch(lengths, padded)
            check_rows(runtime.infer(inputs), rows)
