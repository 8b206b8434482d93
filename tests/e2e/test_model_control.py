"""RepositoryModelLoad with Triton's load parameters (a JSON `config`, `file:` contents), its
error wording, and a new version that fails to load leaving the old one serving."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess, Protocol, copy_model, serve_until_stopped
from tritonclient.utils import InferenceServerException

VERSION_SOURCE = """
import numpy as np


class Model:
    def execute(self, inputs):
        return {{"OUTPUT0": inputs["INPUT0"] + {add}}}
"""

CONFIG = {
    "name": "versioned_latest",
    "backend": "python",
    "max_batch_size": 16,
    "input": [{"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [1]}],
    "output": [{"name": "OUTPUT0", "data_type": "TYPE_INT32", "dims": [1]}],
}


@pytest.fixture(scope="module", params=["1", "2"], ids=["one-process", "two-workers"])
def control_server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    repository = root / "models"
    repository.mkdir()
    copy_model(repository, "versioned_latest")
    process = ConvoyProcess(repository, root / "server.log", ("--workers", request.param))
    yield from serve_until_stopped(process)


@pytest.fixture(params=["grpc", "http"])
def control(request, control_server):
    if request.param == "grpc":
        client = grpcclient.InferenceServerClient(control_server.grpc_url)
        protocol = Protocol("grpc", client, grpcclient)
    else:
        client = httpclient.InferenceServerClient(control_server.http_url)
        protocol = Protocol("http", client, httpclient)
    try:
        yield protocol
    finally:
        # Back to the repository's own files for the next test.
        client.load_model("versioned_latest")
        client.close()


def _answer(protocol, value: int = 10) -> tuple[int, str]:
    tensor = protocol.input("INPUT0", np.array([[value]], dtype=np.int32), "INT32")
    result = protocol.client.infer("versioned_latest", [tensor])
    response = result.get_response()
    version = response.model_version if protocol.name == "grpc" else response["model_version"]
    return int(result.as_numpy("OUTPUT0")[0, 0]), version


def test_config_override_replaces_config_pbtxt_for_the_load(control):
    control.client.load_model("versioned_latest", config=json.dumps(CONFIG))
    assert control.model_config("versioned_latest")["max_batch_size"] == 16
    assert _answer(control) == (12, "2")
    control.client.load_model("versioned_latest")  # without parameters: config.pbtxt again
    assert control.model_config("versioned_latest")["max_batch_size"] == 8


def test_file_overrides_load_the_given_files_and_leave_the_repository_alone(control, control_server):
    repository = control_server.repository / "versioned_latest"
    before = sorted(p.relative_to(repository) for p in repository.rglob("*") if p.is_file())
    files = {"file:7/model.py": VERSION_SOURCE.format(add=70).encode()}
    control.client.load_model("versioned_latest", config=json.dumps(CONFIG), files=files)
    assert _answer(control) == (80, "7")
    after = sorted(p.relative_to(repository) for p in repository.rglob("*") if p.is_file())
    assert [p for p in after if "__pycache__" not in str(p)] == before
    assert not (repository / "7").exists()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ('{"max_batch_size": "sixteen"}', "max_batch_size"),
        ("{not json", "not valid JSON"),
        ('{"max_batch_size": -3, "backend": "python"}', "max_batch_size"),
        ('{"name": "someone_else"}', "name"),
    ],
)
def test_bad_config_override_is_invalid_argument_naming_the_field(control, config, field):
    with pytest.raises(InferenceServerException) as caught:
        control.client.load_model("versioned_latest", config=config)
    assert caught.value.status() == control.status("INVALID_ARGUMENT")
    assert "load parameter 'config'" in caught.value.message()
    assert field in caught.value.message()
    # The model was left as it was.
    assert control.model_config("versioned_latest")["max_batch_size"] == 8
    assert _answer(control) == (12, "2")


def test_file_override_without_config_or_with_a_bad_path_is_refused(control):
    with pytest.raises(InferenceServerException) as caught:
        control.client.load_model("versioned_latest", files={"file:1/model.py": b"x = 1\n"})
    assert caught.value.status() == control.status("INVALID_ARGUMENT")
    assert "'config'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        control.client.load_model(
            "versioned_latest", config=json.dumps(CONFIG), files={"file:../evil.py": b"x = 1\n"}
        )
    assert caught.value.status() == control.status("INVALID_ARGUMENT")
    assert "file:../evil.py" in caught.value.message()


def test_loading_a_name_the_repository_does_not_hold_fails_in_tritons_words(control):
    with pytest.raises(InferenceServerException) as caught:
        control.client.load_model("not_in_repository")
    assert "failed to load 'not_in_repository'" in caught.value.message()
    assert caught.value.status() == control.status("NOT_FOUND")


def test_a_new_version_that_fails_leaves_the_old_serving_with_the_reason(control, control_server):
    broken = control_server.repository / "versioned_latest" / "5"
    broken.mkdir()
    (broken / "model.py").write_text("raise RuntimeError('version 5 is broken on purpose')\n")
    try:
        with pytest.raises(InferenceServerException) as caught:
            control.client.load_model("versioned_latest")
        assert "failed to load 'versioned_latest'" in caught.value.message()
        assert "version 5 is broken on purpose" in caught.value.message()
        assert _answer(control) == (12, "2")
        rows = {r["version"]: r for r in control.repository_index() if r["name"] == "versioned_latest"}
        assert rows["2"]["state"] == "READY"
        assert rows["5"]["state"] == "UNAVAILABLE"
        assert "broken on purpose" in rows["5"]["reason"]
    finally:
        shutil.rmtree(broken)
