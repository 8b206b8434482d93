"""RepositoryModelLoad with Triton's load parameters (a JSON `config`, `file:` contents), its
error wording and statuses, a new version that fails to load leaving the old one serving, and
load/unload refused unless the server runs --model-control-mode explicit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import EXPLICIT, ConvoyProcess, Protocol, copy_model, serve_until_stopped
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
    process = ConvoyProcess(repository, root / "server.log", ("--workers", request.param, *EXPLICIT))
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


def _poll_failure(control, caught, name: str = "versioned_latest") -> str:
    """Triton's answer to a load that cannot read what it names: INTERNAL, in its words."""
    assert caught.value.status() == control.status("INTERNAL")
    message = caught.value.message()
    assert message.startswith(f"failed to load '{name}', failed to poll from model repository: ")
    return message


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ('{"max_batch_size": "sixteen"}', "max_batch_size"),
        ("{not json", "not valid JSON"),
        ('{"max_batch_size": -3, "backend": "python"}', "max_batch_size"),
        ('{"name": "someone_else"}', "name"),
    ],
)
def test_bad_config_override_fails_polling_naming_the_field(control, config, field):
    with pytest.raises(InferenceServerException) as caught:
        control.client.load_model("versioned_latest", config=config)
    message = _poll_failure(control, caught)
    assert "load parameter 'config'" in message
    assert field in message
    # The model was left as it was.
    assert control.model_config("versioned_latest")["max_batch_size"] == 8
    assert _answer(control) == (12, "2")


def test_file_override_without_config_or_with_a_path_leaving_the_folder_is_refused(control):
    with pytest.raises(InferenceServerException) as caught:
        control.client.load_model("versioned_latest", files={"file:1/model.py": b"x = 1\n"})
    assert "'config'" in _poll_failure(control, caught)
    for key in ("file:../evil.py", "file:/1/../../evil.py", "file:7/../../../evil.py"):
        with pytest.raises(InferenceServerException) as caught:
            control.client.load_model(
                "versioned_latest", config=json.dumps(CONFIG), files={key: b"x = 1\n"}
            )
        message = _poll_failure(control, caught)
        assert key in message and "within the model's folder" in message
    assert _answer(control) == (12, "2")


def test_file_override_key_with_a_leading_slash_is_the_same_path(control):
    files = {"file:/7/model.py": VERSION_SOURCE.format(add=70).encode()}
    control.client.load_model("versioned_latest", config=json.dumps(CONFIG), files=files)
    assert _answer(control) == (80, "7")
    files = {"file:/9/./sub/../model.py": VERSION_SOURCE.format(add=90).encode()}
    control.client.load_model("versioned_latest", config=json.dumps(CONFIG), files=files)
    assert _answer(control) == (100, "9")


def test_file_override_name_past_the_filesystem_limit_fails_polling_and_the_server_lives(control):
    # Triton's own check: one path component longer than NAME_MAX (255).
    with pytest.raises(InferenceServerException) as caught:
        control.client.load_model("versioned_latest", config="{}", files={"file:" + "A" * 256: b"a"})
    _poll_failure(control, caught)
    assert control.client.is_server_live()
    assert _answer(control) == (12, "2")


def test_loading_a_name_the_repository_does_not_hold_fails_in_tritons_words(control):
    with pytest.raises(InferenceServerException) as caught:
        control.client.load_model("not_in_repository")
    assert "no folder 'not_in_repository'" in _poll_failure(control, caught, "not_in_repository")


def test_a_new_version_that_fails_leaves_the_old_serving_with_the_reason(control, control_server):
    broken = control_server.repository / "versioned_latest" / "5"
    broken.mkdir()
    (broken / "model.py").write_text("raise RuntimeError('version 5 is broken on purpose')\n")
    try:
        with pytest.raises(InferenceServerException) as caught:
            control.client.load_model("versioned_latest")
        # Triton's answer for a model that fails to load: INVALID_ARGUMENT, in its words.
        assert caught.value.status() == control.status("INVALID_ARGUMENT")
        assert caught.value.message().startswith("load failed for model 'versioned_latest': ")
        assert "version 5 is broken on purpose" in caught.value.message()
        assert _answer(control) == (12, "2")
        rows = {r["version"]: r for r in control.repository_index() if r["name"] == "versioned_latest"}
        assert rows["2"]["state"] == "READY"
        assert rows["5"]["state"] == "UNAVAILABLE"
        assert "broken on purpose" in rows["5"]["reason"]
    finally:
        shutil.rmtree(broken)


# --- load and unload need explicit model control ---------------------------------------------------


@pytest.fixture(scope="module", params=["none", "poll"])
def uncontrolled_server(request, tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp(f"mode-{request.param}")
    repository = root / "models"
    repository.mkdir()
    copy_model(repository, "versioned_latest")
    process = ConvoyProcess(
        repository, root / "server.log", ("--model-control-mode", request.param), frontend=frontend
    )
    yield from serve_until_stopped(process)


@pytest.mark.parametrize("protocol_name", ["grpc", "http"])
def test_load_and_unload_are_refused_without_explicit_model_control(uncontrolled_server, protocol_name):
    module = grpcclient if protocol_name == "grpc" else httpclient
    url = uncontrolled_server.grpc_url if protocol_name == "grpc" else uncontrolled_server.http_url
    client = module.InferenceServerClient(url)
    protocol = Protocol(protocol_name, client, module)
    try:
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as caught:
                call("versioned_latest")
            assert caught.value.status() == protocol.status("UNAVAILABLE")
            assert caught.value.message() == (
                "explicit model load / unload is not allowed if polling is enabled"
            )
        assert client.is_model_ready("versioned_latest")  # nothing was unloaded
    finally:
        client.close()
