"""Models Convoy cannot serve correctly are refused at load, and every model failure is visible
(issue 16): the client sees UNAVAILABLE with a reason naming the field or the file and method
(paths relative to the repository); the operator's log has an ERROR line naming model and
version."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import EXPLICIT, MODEL_SOURCES, ConvoyProcess, Protocol, serve_until_stopped
from tritonclient.utils import InferenceServerException

IDENTITY_IO = (
    'input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ -1 ] } ]\n'
    'output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ -1 ] } ]\n'
)

#: model name -> (config.pbtxt lines beside the identity tensors, the field its refusal names)
REFUSED = {
    "operations": (
        'max_batch_size: 8\nmodel_operations { op_library_filename: "libcustom.so" }\n',
        "model_operations",
    ),
    "tagged": ('max_batch_size: 8\nmetric_tags { key: "team" value: "search" }\n', "metric_tags"),
    "shape_tensor": (
        "max_batch_size: 8\n"
        'input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ -1 ], is_shape_tensor: true } ]\n'
        'output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ -1 ] } ]\n',
        "input[0].is_shape_tensor",
    ),
}

INIT_FAILS = """
import numpy as np

class Model:
    def initialize(self, config):
        self.scale = float(config["parameters"]["scale"])

    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"]}
"""

SYNTAX_ERROR = "class Model:\n    def execute(self, inputs)\n        return inputs\n"

WRONG_ROWS = """
import numpy as np

class Model:
    def execute(self, inputs):
        rows = inputs["INPUT0"].shape[0]
        return {"OUTPUT0": np.zeros((rows + 1, 4), dtype=np.int32)}
"""


def _model(repository: Path, name: str, config: str, source: str | None) -> None:
    (repository / name / "1").mkdir(parents=True)
    if "input [" not in config:
        config += IDENTITY_IO
    (repository / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n{config}')
    if source is None:
        shutil.copy(MODEL_SOURCES / "identity" / "model.py", repository / name / "1" / "model.py")
    else:
        (repository / name / "1" / "model.py").write_text(textwrap.dedent(source))


@pytest.fixture(scope="module")
def refusing_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("refusals")
    repository = root / "models"
    repository.mkdir()
    for name, (config, _) in REFUSED.items():
        _model(repository, name, config, None)
    _model(repository, "init_fails", "max_batch_size: 8\n", INIT_FAILS)
    _model(repository, "syntax_error", "max_batch_size: 8\n", SYNTAX_ERROR)
    _model(repository, "wrong_rows", "max_batch_size: 8\n", WRONG_ROWS)
    _model(repository, "no_backend", "max_batch_size: 8\n", None)
    config = repository / "no_backend" / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "python"', 'backend: "tensorrt"'))
    process = ConvoyProcess(repository, root / "server.log", EXPLICIT, frontend=frontend)
    yield from serve_until_stopped(process, "live")


@pytest.fixture(scope="module")
def index(refusing_server):
    answer = requests.post(f"{refusing_server.base_url}/v2/repository/index", timeout=10)
    return {row["name"]: row for row in answer.json()}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_config_convoy_cannot_honour_is_unavailable_naming_the_field(refusing_server, index, name):
    _, field = REFUSED[name]
    assert index[name]["state"] == "UNAVAILABLE"
    assert (
        f"{name}/config.pbtxt: {field}: is set, but Convoy does not implement it"
        in (index[name]["reason"])
    )
    client = grpcclient.InferenceServerClient(refusing_server.grpc_url)
    try:
        assert not client.is_model_ready(name)
        tensor = grpcclient.InferInput("INPUT0", [1, 4], "INT32")
        tensor.set_data_from_numpy(np.zeros((1, 4), dtype=np.int32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer(name, [tensor])
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        assert field in caught.value.message()
    finally:
        client.close()


def test_reasons_show_paths_relative_to_the_repository(refusing_server, index):
    root = str(refusing_server.repository.resolve())
    for row in index.values():
        assert root not in row["reason"], row


def test_initialize_raising_names_file_method_and_line(refusing_server, index):
    reason = index["init_fails"]["reason"]
    assert reason.startswith(
        "init_fails/1/model.py: Model.initialize() failed at line 6 in initialize()"
    )
    assert "KeyError: 'scale'" in reason


def test_syntax_error_names_the_file(index):
    reason = index["syntax_error"]["reason"]
    assert reason.startswith("syntax_error/1/model.py: import failed: SyntaxError")


def test_unknown_backend_names_the_config_file(index):
    reason = index["no_backend"]["reason"]
    assert reason.startswith("no_backend/config.pbtxt: backend: backend 'tensorrt' is not available")


def test_every_load_failure_is_logged_at_error_with_model_and_version(refusing_server, index):
    log = refusing_server.log()
    for name in (*REFUSED, "no_backend"):
        assert f"ERROR convoy.repository: model '{name}' failed to load" in log, name
    for name in ("init_fails", "syntax_error"):
        assert f"ERROR convoy.repository: model '{name}' version 1 failed to load" in log, name
    assert "model.py: Model.initialize() failed at line 6" in log


@pytest.mark.parametrize("protocol_name", ["grpc", "http"])
def test_wrong_row_count_fails_the_request_and_logs_an_error(refusing_server, protocol_name):
    if protocol_name == "grpc":
        import tritonclient.grpc as module

        client = module.InferenceServerClient(refusing_server.grpc_url)
    else:
        import tritonclient.http as module

        client = module.InferenceServerClient(refusing_server.http_url)
    protocol = Protocol(protocol_name, client, module)
    try:
        tensor = protocol.input("INPUT0", np.zeros((2, 4), dtype=np.int32), "INT32")
        with pytest.raises(InferenceServerException) as caught:
            client.infer("wrong_rows", [tensor])
        assert caught.value.status() == protocol.status("INTERNAL")
        assert "expected first dimension 2" in caught.value.message()
    finally:
        client.close()
    log = refusing_server.log()
    assert "ERROR convoy.batching" in log or "ERROR convoy.scheduler" in log
    assert "model 'wrong_rows' version 1 failed a batch of 2 rows" in log


def test_load_api_error_shows_paths_relative_to_the_repository(refusing_server):
    answer = requests.post(
        f"{refusing_server.base_url}/v2/repository/models/init_fails/load", timeout=30
    )
    assert answer.status_code >= 400
    message = answer.json()["error"]
    assert "init_fails/1/model.py: Model.initialize() failed" in message
    assert str(refusing_server.repository.resolve()) not in message
