"""Health, server and model metadata, model configuration, over gRPC and HTTP."""

from __future__ import annotations

import shutil

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import DATATYPES, WITH_WORKERS, ConvoyProcess, identity_model_name, serve_until_stopped

from convoy.cli import demo_repository

pytestmark = pytest.mark.frontends(*WITH_WORKERS)


def test_server_is_live_and_ready(protocol):
    assert protocol.client.is_server_live()
    assert protocol.client.is_server_ready()


def test_server_metadata_names_convoy_and_its_extensions(protocol):
    metadata = protocol.server_metadata()
    assert metadata["name"] == "convoy"
    assert metadata["version"]
    for extension in (
        "binary_tensor_data",
        "model_repository",
        "statistics",
        "model_configuration",
        "logging",
        "trace",
    ):
        assert extension in metadata["extensions"]


@pytest.fixture(scope="module")
def named_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("named")
    shutil.copytree(demo_repository() / "add_sub", root / "models" / "add_sub")
    process = ConvoyProcess(
        root / "models", root / "server.log", ("--server-name", "triton"), frontend=frontend
    )
    yield from serve_until_stopped(process)


def test_server_name_is_what_server_name_says_for_clients_that_check_it(named_server):
    grpc = grpcclient.InferenceServerClient(named_server.grpc_url)
    http = httpclient.InferenceServerClient(named_server.http_url)
    try:
        assert grpc.get_server_metadata(as_json=True)["name"] == "triton"
        assert http.get_server_metadata()["name"] == "triton"
    finally:
        grpc.close()
        http.close()


def test_every_served_model_is_ready(protocol):
    names = ["add_sub", "fixed_shape", "fails_on_value", "versioned_all", "versioned_latest"]
    names += [identity_model_name(d) for d in DATATYPES]
    for name in names:
        assert protocol.client.is_model_ready(name), name


def test_unknown_model_is_not_ready(protocol):
    assert not protocol.client.is_model_ready("no_such_model")


def test_model_metadata_lists_inputs_with_batch_dimension(protocol):
    metadata = protocol.model_metadata("add_sub")
    assert metadata["name"] == "add_sub"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "python"
    inputs = {t["name"]: t for t in metadata["inputs"]}
    outputs = {t["name"]: t for t in metadata["outputs"]}
    assert set(inputs) == {"INPUT0", "INPUT1"}
    assert set(outputs) == {"OUTPUT0", "OUTPUT1"}
    for tensor in [*inputs.values(), *outputs.values()]:
        assert tensor["datatype"] == "FP32"
        assert [int(d) for d in tensor["shape"]] == [-1, 16]


def test_non_batching_model_metadata_has_no_batch_dimension(protocol):
    metadata = protocol.model_metadata("fixed_shape")
    (tensor,) = metadata["inputs"]
    assert [int(d) for d in tensor["shape"]] == [2, 3]


def test_model_config_reports_max_batch_size_inputs_and_outputs(protocol):
    config = protocol.model_config("add_sub")
    assert config["name"] == "add_sub"
    assert config["backend"] == "python"
    assert int(config["max_batch_size"]) == 64
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        ("INPUT0", "TYPE_FP32", [16]),
        ("INPUT1", "TYPE_FP32", [16]),
    ]
    assert [t["name"] for t in config["output"]] == ["OUTPUT0", "OUTPUT1"]
    assert "dynamic_batching" in config


def test_model_config_of_non_batching_model_has_max_batch_size_zero(protocol):
    config = protocol.model_config("fixed_shape")
    assert int(config.get("max_batch_size", 0)) == 0
    assert [int(d) for d in config["input"][0]["dims"]] == [2, 3]


def test_model_config_reports_the_version_policy(protocol):
    assert "all" in protocol.model_config("versioned_all")["version_policy"]
    latest = protocol.model_config("versioned_latest")["version_policy"]["latest"]
    assert int(latest["num_versions"]) == 1


def test_metrics_endpoint_answers_on_its_own_port(server):
    import requests

    answer = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
    assert answer.status_code == 200
