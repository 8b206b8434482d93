"""A model's sibling files import as on Triton (`import helper`, `from model_common import ...`,
a sub-package, `import model`, lazy imports inside execute), and two models whose sibling files
have the same names each see their own: in the server's process and under process isolation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import ConvoyProcess, serve_until_stopped
from python_backend_models import triton_repository


def report(url: str, model: str) -> dict:
    client = grpcclient.InferenceServerClient(url)
    try:
        item = grpcclient.InferInput("X", [1, 1], "INT32")
        item.set_data_from_numpy(np.zeros((1, 1), dtype=np.int32))
        return json.loads(client.infer(model, [item]).as_numpy("MSG")[0, 0])
    finally:
        client.close()


def expected(which: str) -> dict:
    return {
        "helper": f"helper-{which}",
        "common": f"common-{which}",
        "tool": f"tool-helper-{which}",
        "lazy": f"lazy-{which}",
        "model_is_this_module": True,
        # Triton's stub has the version folder on sys.path while model.py loads ...
        "path_while_loading": True,
        "by_name": f"helper-{which}",
        # ... here it leaves again, so no other model's `import helper` can find this one.
        "path_now": False,
    }


@pytest.mark.parametrize("which", ["a", "b"])
def test_sibling_modules_import_and_stay_the_models_own(triton_server, which):
    assert report(triton_server.grpc_url, f"tp_sibling_{which}") == expected(which)


@pytest.fixture(scope="module")
def isolated_siblings(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("siblings_isolated")
    repository = triton_repository(root / "models", ["tp_sibling_a", "tp_sibling_b"])
    process = ConvoyProcess(
        repository, root / "server.log", extra_args=("--isolation", "process"), frontend=frontend
    )
    yield from serve_until_stopped(process, "ready")


@pytest.mark.parametrize("which", ["a", "b"])
def test_sibling_modules_under_process_isolation(isolated_siblings, which):
    got = report(isolated_siblings.grpc_url, f"tp_sibling_{which}")
    assert got == expected(which)


def test_reloading_a_model_imports_its_siblings_afresh(tmp_path):
    repository = triton_repository(tmp_path / "models", ["tp_sibling_a"])
    process = ConvoyProcess(
        repository,
        tmp_path / "server.log",
        extra_args=("--model-control-mode", "explicit", "--load-model", "tp_sibling_a"),
    )
    process.start("ready")
    try:
        assert report(process.grpc_url, "tp_sibling_a")["helper"] == "helper-a"
        helper = repository / "tp_sibling_a" / "1" / "helper.py"
        helper.write_text('NAME = "helper-edited"\n')
        client = grpcclient.InferenceServerClient(process.grpc_url)
        client.load_model("tp_sibling_a")
        client.close()
        assert report(process.grpc_url, "tp_sibling_a")["helper"] == "helper-edited"
    finally:
        process.stop()
