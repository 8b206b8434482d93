"""/catalog and /catalog.json against real servers, read through headless Chromium (the DOM after
the page's scripts ran): the demo models and their inputs, client snippets that run as pasted
and print the right answer, live figures that follow traffic, capacity figures from a real
`convoy capacity` run, hostile names escaped, a failed model shown with its reason."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import requests
from helpers import (
    FRONTENDS,
    REPO_ROOT,
    WORKERS_FRONTEND,
    ConvoyProcess,
    copy_model,
    poll,
    serve_until_stopped,
)

from convoy.cli import demo_repository

pytestmark = pytest.mark.frontends(FRONTENDS[0])

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Virtual time: the page's 5 s refresh fires without the test waiting for it.
    "--virtual-time-budget=8000",
)
SNIPPETS = ("curl", "python_grpc", "python_http", "python_requests")
#: A folder name that is legal on disk and full of markup; the repository lists it, unloadable.
HOSTILE_FOLDER = "odd <img id=\"pwned\" src=x onerror=\"document.title='PWNED'\"> & 'name'"
HOSTILE_PARAMETER = "</pre><script>document.title='PWNED'</script><b id=\"bold\">x</b>"


class CatalogDom(HTMLParser):
    """Text of the rendered page: each section's text, snippets, and every element id seen."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.snippets: dict[tuple[str, str], str] = {}
        self.ids: set[str] = set()
        self.title = ""
        #: Set by the page's script once it re-read /catalog.json and updated the figures.
        self.refreshed = ""
        self._section: str | None = None
        self._snippet: tuple[str, str] | None = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "body":
            self.refreshed = attrs.get("data-refreshed", "")
        if tag == "section" and "data-model" in attrs:
            self._section = attrs["data-model"]
            self.sections[self._section] = ""
        if tag == "code" and "data-snippet" in attrs:
            self._snippet = (attrs["data-model"], attrs["data-snippet"])
            self.snippets[self._snippet] = ""
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        if tag == "code":
            self._snippet = None
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._section is not None:
            self.sections[self._section] += data + " "
        if self._snippet is not None:
            self.snippets[self._snippet] += data
        if self._in_title:
            self.title += data


def rendered(url: str, tmp_path) -> CatalogDom:
    """The page's DOM after its scripts ran, as headless Chromium serialises it."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    run = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    dom = CatalogDom()
    dom.feed(run.stdout)
    dom.raw = run.stdout
    return dom


@pytest.fixture(scope="module")
def capacity_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("capacity") / "report"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, capacity_dir, frontend):
    root = tmp_path_factory.mktemp("catalog")
    process = ConvoyProcess(
        demo_repository(),
        root / "server.log",
        ("--capacity-report", str(capacity_dir)),
        frontend=frontend,
    )
    yield from serve_until_stopped(process)


@pytest.fixture(scope="module")
def demo_page(demo_server, tmp_path_factory):
    return rendered(f"{demo_server.base_url}/catalog", tmp_path_factory.mktemp("chromium"))


def test_page_lists_every_demo_model_with_its_inputs_and_outputs(demo_server, demo_page):
    index = requests.post(f"{demo_server.base_url}/v2/repository/index", timeout=5).json()
    assert {row["name"] for row in index} == {"add_sub", "text_embedding"}
    assert set(demo_page.sections) == {"add_sub", "text_embedding"}
    for name, text in demo_page.sections.items():
        metadata = requests.get(f"{demo_server.base_url}/v2/models/{name}", timeout=5).json()
        assert "READY" in text
        assert f"platform {metadata['platform']}" in " ".join(text.split())
        for tensor in metadata["inputs"] + metadata["outputs"]:
            assert f"{tensor['name']} {tensor['datatype']} {json.dumps(tensor['shape'])}" in " ".join(
                text.split()
            )
        assert "model config (JSON)" in text
        assert set(SNIPPETS) <= {kind for model, kind in demo_page.snippets if model == name}
    # The page's script fetched /catalog.json and updated the live figures without an error.
    assert demo_page.refreshed


def printed_outputs(kind: str, stdout: str) -> dict[str, np.ndarray]:
    """{output name: flat values} from what a snippet printed."""
    if kind == "curl":
        answer = json.loads(stdout)
        return {o["name"]: np.array(o["data"]).reshape(-1) for o in answer["outputs"]}
    found = {}
    for line in stdout.splitlines():
        name, _, values = line.partition(" ")
        found[name] = np.array(ast.literal_eval(values)).reshape(-1)
    return found


def run_snippet(kind: str, code: str) -> subprocess.CompletedProcess:
    command = ["bash", "-c", code] if kind == "curl" else [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


@pytest.mark.parametrize("kind", SNIPPETS)
def test_add_sub_snippet_runs_as_pasted_and_prints_sum_and_difference(demo_server, demo_page, kind):
    code = demo_page.snippets[("add_sub", kind)]
    assert str(demo_server.http_port) in code or str(demo_server.grpc_port) in code
    run = run_snippet(kind, code)
    assert run.returncode == 0, f"{code}\n{run.stderr}"
    document = requests.get(f"{demo_server.base_url}/catalog.json", timeout=5).json()
    (add_sub,) = [m for m in document["models"] if m["name"] == "add_sub"]
    examples = {e["name"]: np.array(e["data"], dtype=np.float32) for e in add_sub["example_inputs"]}
    # The snippet sent the page's example inputs: the curl one carries them in its body.
    if kind == "curl":
        assert json.dumps(add_sub["example_inputs"][0]["data"], separators=(",", ":")) in code
    outputs = printed_outputs(kind, run.stdout)
    assert not np.array_equal(examples["INPUT0"], examples["INPUT1"])
    np.testing.assert_array_equal(outputs["OUTPUT0"], examples["INPUT0"] + examples["INPUT1"])
    np.testing.assert_array_equal(outputs["OUTPUT1"], examples["INPUT0"] - examples["INPUT1"])


@pytest.mark.parametrize("kind", ["python_grpc", "curl"])
def test_text_embedding_snippet_prints_a_unit_length_embedding(demo_server, demo_page, kind):
    code = demo_page.snippets[("text_embedding", kind)]
    run = run_snippet(kind, code)
    assert run.returncode == 0, f"{code}\n{run.stderr}"
    metadata = requests.get(f"{demo_server.base_url}/v2/models/text_embedding", timeout=5).json()
    (output,) = metadata["outputs"]
    embedding = printed_outputs(kind, run.stdout)[output["name"]]
    assert embedding.shape == (output["shape"][-1],)
    assert abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-3


@pytest.mark.frontends(FRONTENDS[0], WORKERS_FRONTEND)
def test_live_figures_follow_traffic_and_agree_with_the_statistics_api(demo_server):
    url = f"{demo_server.base_url}/catalog.json"

    def add_sub_stats() -> dict:
        document = requests.get(url, timeout=5).json()
        (model,) = [m for m in document["models"] if m["name"] == "add_sub"]
        return model["versions"][0]["stats"]

    before = add_sub_stats()
    sent = 25
    body = {
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
            for n in ("INPUT0", "INPUT1")
        ]
    }
    for _ in range(sent):
        answer = requests.post(f"{demo_server.base_url}/v2/models/add_sub/infer", json=body, timeout=10)
        assert answer.status_code == 200
    after = poll(
        lambda: (s := add_sub_stats())["window"] is not None and s["window"]["requests"] >= sent and s,
        "a window of live figures covering the requests just sent",
    )
    statistics = requests.get(f"{demo_server.base_url}/v2/models/add_sub/stats", timeout=5).json()
    assert after["requests"] == before["requests"] + sent
    assert after["requests"] == statistics["model_stats"][0]["inference_stats"]["success"]["count"]
    window = after["window"]
    assert window["requests_per_s"] == pytest.approx(window["requests"] / window["seconds"], rel=0.1)
    assert 0 < window["p50_ms"] <= window["p99_ms"]
    assert after["p50_ms"] <= after["p99_ms"]


@pytest.mark.frontends(FRONTENDS[0], WORKERS_FRONTEND)
def test_capacity_figures_of_a_capacity_run_appear_on_the_page(demo_server, capacity_dir, tmp_path):
    document = requests.get(f"{demo_server.base_url}/catalog.json", timeout=5).json()
    assert all(m["capacity"] is None for m in document["models"])  # no report yet
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "convoy",
            "capacity",
            "--model",
            "add_sub",
            "--steps",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--slo-p99-ms",
            "1000",
            "--target-rps",
            "1000",
            "--out",
            str(capacity_dir),
            "--http-url",
            demo_server.http_url,
            "--grpc-url",
            demo_server.grpc_url,
            "--metrics-url",
            f"http://127.0.0.1:{demo_server.metrics_port}/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((capacity_dir / "capacity.json").read_text())
    document = requests.get(f"{demo_server.base_url}/catalog.json", timeout=5).json()
    capacity = {m["name"]: m["capacity"] for m in document["models"]}
    assert capacity["text_embedding"] is None
    shown = capacity["add_sub"]
    recommendation = report["recommendation"]
    assert shown["per_replica_rps"] == recommendation["per_replica_rps"] > 0
    assert shown["replicas"] == recommendation["replicas"]
    assert shown["summary"] == recommendation["summary"]
    page = rendered(f"{demo_server.base_url}/catalog", tmp_path)
    assert recommendation["summary"] in " ".join(page.sections["add_sub"].split())
    assert f"{recommendation['per_replica_rps']:,.0f}" in page.sections["add_sub"]


@pytest.mark.frontends(FRONTENDS[0], WORKERS_FRONTEND)
def test_host_header_sets_the_snippet_addresses_and_a_hostile_one_is_ignored(demo_server):
    url = f"{demo_server.base_url}/catalog.json"
    named = requests.get(url, headers={"Host": "inference.example:8123"}, timeout=5).json()
    assert named["server"] == {
        "name": "convoy",
        "version": named["server"]["version"],
        "http": "http://inference.example:8123",
        "grpc": f"inference.example:{demo_server.grpc_port}",
    }
    hostile = requests.get(url, headers={"Host": "x$(touch /tmp/owned);:1"}, timeout=5).json()
    assert hostile["server"]["http"] == f"http://localhost:{demo_server.http_port}"
    for model in hostile["models"]:
        assert "$(" not in json.dumps(model["snippets"])


@pytest.mark.frontends(FRONTENDS[0], WORKERS_FRONTEND)
def test_catalog_answers_only_get(demo_server):
    answer = requests.post(f"{demo_server.base_url}/catalog", timeout=5)
    assert answer.status_code == 400
    assert answer.json()["error"] == "/catalog accepts GET, got POST"


@pytest.fixture(scope="module")
def odd_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    repository = root / "models"
    shutil.copytree(demo_repository() / "add_sub", repository / HOSTILE_FOLDER)
    shutil.copytree(demo_repository() / "add_sub", repository / "odd.name-1_x")
    config = repository / "odd.name-1_x" / "config.pbtxt"
    config.write_text(
        config.read_text().replace('name: "add_sub"', 'name: "odd.name-1_x"')
        + f'parameters {{ key: "note" value {{ string_value: {json.dumps(HOSTILE_PARAMETER)} }} }}\n'
    )
    copy_model(repository, "broken_import")
    process = ConvoyProcess(repository, root / "server.log")
    yield from serve_until_stopped(process, "live")


def test_hostile_names_and_config_strings_are_shown_as_text(odd_server, tmp_path):
    page = rendered(f"{odd_server.base_url}/catalog", tmp_path)
    assert page.title == "Convoy model catalog"
    assert "pwned" not in page.ids and "bold" not in page.ids
    assert HOSTILE_FOLDER in page.sections
    assert "UNAVAILABLE" in page.sections[HOSTILE_FOLDER]
    assert json.dumps(HOSTILE_PARAMETER) in page.sections["odd.name-1_x"]
    assert "READY" in page.sections["odd.name-1_x"]


def test_a_model_that_failed_to_load_shows_unavailable_with_its_reason(odd_server, tmp_path):
    index = requests.post(f"{odd_server.base_url}/v2/repository/index", timeout=5).json()
    (row,) = [r for r in index if r["name"] == "broken_import"]
    assert row["state"] == "UNAVAILABLE" and row["reason"]
    page = rendered(f"{odd_server.base_url}/catalog", tmp_path)
    text = " ".join(page.sections["broken_import"].split())
    assert "UNAVAILABLE" in text
    assert " ".join(row["reason"].split()) in text
    assert not [key for key in page.snippets if key[0] == "broken_import"]
