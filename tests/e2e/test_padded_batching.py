"""Padded batching through a real server (issue 20): concurrent tritonclient requests of
different lengths share dense, bucketed batches; each gets back values computed from its own
real tokens, its token outputs trimmed to its own length; bad padding parameters are refused
at load naming the parameter; requests a padded model cannot batch are refused by name."""

from __future__ import annotations

import queue
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import ConvoyProcess, metric_value, open_protocol, poll, serve_until_stopped
from tritonclient.utils import InferenceServerException

BUCKETS = (8, 16, 32, 64)
TOKEN_BUDGET = 256
IDS_PAD = -1

MODEL = """
import time

import numpy as np


class Model:
    def execute(self, inputs):
        ids, mask, lengths = inputs["input_ids"], inputs["attention_mask"], inputs["lengths"]
        rows, padded = ids.shape
        assert lengths.dtype == np.int32 and lengths.shape == (rows,), lengths.shape
        real = np.arange(padded)[None, :] < lengths[:, None]
        # A wrong pad (value, extent or lengths) fails the batch, and the test with it.
        assert (ids[~real] == -1).all() and (mask[~real] == 0).all(), "bad padding"
        assert (mask[real] == 1).all() and (ids[real] > 0).all(), "bad tokens"
        time.sleep(0.01)  # stands in for compute, so that concurrent requests queue up
        return {
            "token_out": ids * 3,
            "row_sum": np.where(real, ids, 0).sum(axis=1, keepdims=True),
            "padded_length": np.full((rows, 1), padded, np.int64),
            "batch_rows": np.full((rows, 1), rows, np.int64),
        }
"""

PADDED_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 16
input [
  {{ name: "input_ids", data_type: TYPE_INT64, dims: [ -1 ] }},
  {{ name: "attention_mask", data_type: TYPE_INT64, dims: [ -1 ] }}
]
output [
  {{ name: "token_out", data_type: TYPE_INT64, dims: [ -1 ] }},
  {{ name: "row_sum", data_type: TYPE_INT64, dims: [ 1 ] }},
  {{ name: "padded_length", data_type: TYPE_INT64, dims: [ 1 ] }},
  {{ name: "batch_rows", data_type: TYPE_INT64, dims: [ 1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 20000 }}
"""

PARAMETERS = {
    "padding_inputs": f"input_ids={IDS_PAD}, attention_mask=0",
    "padding_buckets": ",".join(map(str, BUCKETS)),
    "padding_lengths_input": "lengths:INT32",
    "padding_outputs": "token_out",
    "max_batch_tokens": str(TOKEN_BUDGET),
}

#: model name -> (parameter changes, the parameter its refusal names, what it says)
REFUSED = {
    "padded_typo": ({"padding_bucket": "8,16"}, "padding_bucket", "not a Convoy padding parameter"),
    "padded_budget_typo": (
        {"max_batch_token": "64"},
        "max_batch_token",
        "did you mean 'max_batch_tokens'",
    ),
    "padded_unsorted": ({"padding_buckets": "16,8"}, "padding_buckets", "strictly increasing"),
    "padded_undeclared": ({"padding_inputs": "tokens"}, "padding_inputs", "not a declared input"),
}


TRITON_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([]) for _ in requests]
"""


WARMED_MODEL = """
import numpy as np


class Model:
    def execute(self, inputs):
        lengths = inputs["lengths"]  # a warm-up sample gets it too (rows at full length)
        rows = inputs["input_ids"].shape[0]
        return {name: np.zeros((rows, 1), np.int64) + lengths[:, None] for name in
                ("row_sum", "padded_length", "batch_rows")} | {"token_out": inputs["input_ids"]}
"""

WARMUP = """
model_warmup [ {
  name: "five_tokens"
  batch_size: 2
  inputs { key: "input_ids" value: { data_type: TYPE_INT64 dims: [ 5 ] zero_data: true } }
  inputs { key: "attention_mask" value: { data_type: TYPE_INT64 dims: [ 5 ] zero_data: true } }
} ]
"""


def _write(repository: Path, name: str, parameters: dict[str, str], source: str = MODEL) -> None:
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text(textwrap.dedent(source))
    lines = [PADDED_CONFIG.format(name=name)]
    for key, value in parameters.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    (folder / "config.pbtxt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module", params=["single-process", "workers"])
def server(request, tmp_path_factory):
    """One process, and `--workers 2` (an engine behind two front-end processes): the batching
    happens in the engine either way."""
    root = tmp_path_factory.mktemp(f"padded-{request.param}")
    repository = root / "models"
    repository.mkdir()
    _write(repository, "padded", PARAMETERS)
    for name, (changes, _, _) in REFUSED.items():
        _write(repository, name, {**PARAMETERS, **changes})
    _write(repository, "padded_per_request", PARAMETERS, TRITON_MODEL)
    _write(repository, "padded_warmed", PARAMETERS, WARMED_MODEL)
    _write(repository, "padded_isolated", {**PARAMETERS, "isolation": "process"})
    with (repository / "padded_warmed" / "config.pbtxt").open("a") as config:
        config.write(WARMUP)
    extra = ("--workers", "2") if request.param == "workers" else ()
    process = ConvoyProcess(repository, root / "server.log", extra)
    yield from serve_until_stopped(process, "live")


@pytest.fixture(params=["grpc", "http"])
def protocol(request, server):
    yield from open_protocol(request.param, server, http_concurrency=16)


def tokens(tag: int, length: int) -> np.ndarray:
    """One row of positive token ids naming its request and position."""
    return (tag * 1000 + np.arange(1, length + 1, dtype=np.int64))[None, :]


def infer_concurrently(protocol, lengths: list[int], first_tag: int) -> list[dict[str, np.ndarray]]:
    """Send one request per length at once; each one's outputs (or the exception it got).

    gRPC: the client's async_infer. HTTP: one thread and client (connection) per request:
    tritonclient's gevent async_infer sends over one or two pooled connections here
    (geventhttpclient 2.6), so its requests would reach the server one after another."""
    answers: queue.SimpleQueue = queue.SimpleQueue()

    def inputs_of(module, index: int, length: int) -> list:
        ids = tokens(first_tag + index, length)
        inputs = [
            module.InferInput("input_ids", list(ids.shape), "INT64"),
            module.InferInput("attention_mask", list(ids.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.ones_like(ids))
        return inputs

    def over_http(index: int, length: int) -> None:
        client = protocol.module.InferenceServerClient(protocol.url)
        try:
            answers.put((index, client.infer("padded", inputs_of(protocol.module, index, length)), None))
        except InferenceServerException as error:
            answers.put((index, None, error))
        finally:
            client.close()

    threads = []
    for index, length in enumerate(lengths):
        if protocol.name == "grpc":
            protocol.client.async_infer(
                "padded",
                inputs_of(protocol.module, index, length),
                lambda result, error, index=index: answers.put((index, result, error)),
            )
        else:
            thread = threading.Thread(target=over_http, args=(index, length), daemon=True)
            thread.start()
            threads.append(thread)
    results: list = [None] * len(lengths)
    for _ in lengths:
        index, result, error = answers.get(timeout=60)
        results[index] = (
            error
            if error is not None
            else {
                name: result.as_numpy(name)
                for name in ("token_out", "row_sum", "padded_length", "batch_rows")
            }
        )
    for thread in threads:
        thread.join(timeout=60)
    return results


def bucket_of(length: int) -> int:
    return next(bucket for bucket in BUCKETS if bucket >= length)


def padding_tokens(server) -> tuple[float, float]:
    """convoy_padding_tokens_total of model 'padded': (real, pad)."""
    labels = {"model": "padded", "version": "1"}
    return tuple(
        metric_value(server, "convoy_padding_tokens_total", kind=kind, **labels)
        for kind in ("real", "pad")
    )


def test_concurrent_requests_of_different_lengths_get_their_own_trimmed_results(protocol, server):
    rng = np.random.default_rng(20 if protocol.name == "grpc" else 21)
    seen_shared = []
    # What the requests say they were padded to, against what /metrics counts.
    own_tokens = [0, 0]
    before = padding_tokens(server)

    def one_round():
        lengths = [int(n) for n in rng.integers(1, 65, size=24)]
        first_tag = int(rng.integers(1, 1000)) * 100
        results = infer_concurrently(protocol, lengths, first_tag)
        for index, (length, result) in enumerate(zip(lengths, results, strict=True)):
            assert isinstance(result, dict), result
            ids = tokens(first_tag + index, length)
            # Its own tokens, trimmed back to its own length (never a neighbour's, never pad).
            np.testing.assert_array_equal(result["token_out"], ids * 3)
            assert int(result["row_sum"][0, 0]) == int(ids.sum())
            padded = int(result["padded_length"][0, 0])
            assert padded in BUCKETS and padded >= bucket_of(length)
            own_tokens[0] += length
            own_tokens[1] += padded - length
            rows = int(result["batch_rows"][0, 0])
            if rows > 1:
                # A shared batch keeps the token budget (rows x padded length).
                assert rows * padded <= TOKEN_BUDGET
                seen_shared.append((length, padded, rows))
        # Evidence of padded batching: requests shared batches, some padded past their length.
        return any(rows > 1 and padded > length for length, padded, rows in seen_shared)

    poll(one_round, "a shared batch padding a request past its own length", timeout=120)
    stats = protocol.statistics("padded")["1"]
    assert stats["execution_count"] < stats["inference_count"]
    after = padding_tokens(server)
    assert (after[0] - before[0], after[1] - before[1]) == tuple(own_tokens)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_padding_parameters_are_refused_at_load_naming_the_parameter(server, name):
    _, key, says = REFUSED[name]
    index = requests.post(f"{server.base_url}/v2/repository/index", timeout=10).json()
    row = next(row for row in index if row["name"] == name)
    assert row["state"] == "UNAVAILABLE"
    assert f"{name}/config.pbtxt: parameters.{key}: " in row["reason"]
    assert says in row["reason"]


def test_a_model_that_executes_requests_one_by_one_cannot_be_padded(server):
    index = requests.post(f"{server.base_url}/v2/repository/index", timeout=10).json()
    row = next(row for row in index if row["name"] == "padded_per_request")
    assert row["state"] == "UNAVAILABLE"
    assert (
        "padded_per_request/config.pbtxt: parameters.padding_inputs: a TritonPythonModel"
        in (row["reason"])
    )


def test_warm_up_samples_get_the_lengths_input(protocol):
    assert protocol.client.is_model_ready("padded_warmed")
    ids = tokens(3, 6)
    inputs = [
        protocol.input("input_ids", ids, "INT64"),
        protocol.input("attention_mask", np.ones_like(ids), "INT64"),
    ]
    assert int(protocol.client.infer("padded_warmed", inputs).as_numpy("row_sum")[0, 0]) == 6


def test_a_padded_model_in_a_worker_process_gets_its_padded_batch(protocol):
    ids = tokens(5, 13)
    inputs = [
        protocol.input("input_ids", ids, "INT64"),
        protocol.input("attention_mask", np.ones_like(ids), "INT64"),
    ]
    result = protocol.client.infer("padded_isolated", inputs)
    np.testing.assert_array_equal(result.as_numpy("token_out"), ids * 3)
    assert int(result.as_numpy("row_sum")[0, 0]) == int(ids.sum())
    assert int(result.as_numpy("padded_length")[0, 0]) == 16


def _infer_one(protocol, ids: np.ndarray, mask: np.ndarray):
    inputs = [
        protocol.input("input_ids", ids, "INT64"),
        protocol.input("attention_mask", mask, "INT64"),
    ]
    return protocol.client.infer("padded", inputs)


def test_a_request_longer_than_the_longest_bucket_is_invalid_argument(protocol):
    ids = tokens(1, 65)
    with pytest.raises(InferenceServerException) as caught:
        _infer_one(protocol, ids, np.ones_like(ids))
    assert caught.value.status() == protocol.status("INVALID_ARGUMENT")
    assert "length 65 exceeds" in caught.value.message()
    assert "longest padding bucket 64" in caught.value.message()


def test_padded_inputs_of_different_lengths_are_invalid_argument(protocol):
    ids = tokens(1, 10)
    with pytest.raises(InferenceServerException) as caught:
        _infer_one(protocol, ids, np.ones((1, 9), np.int64))
    assert caught.value.status() == protocol.status("INVALID_ARGUMENT")
    assert "input 'attention_mask': length 9 differs from input 'input_ids' length 10" in (
        caught.value.message()
    )


def test_a_lone_request_is_padded_to_its_bucket(protocol):
    ids = tokens(7, 11)
    result = _infer_one(protocol, ids, np.ones_like(ids))
    np.testing.assert_array_equal(result.as_numpy("token_out"), ids * 3)
    assert int(result.as_numpy("padded_length")[0, 0]) == 16
