"""pb_utils details Triton model code relies on, through a real server and tritonclient:
TritonError codes reaching clients with Triton's statuses, response parameters limited to
bool/int/str, DLPack over input tensors, Logger levels in the server log, custom metric types on
/metrics, and the full config dict auto_complete_config and initialize see."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import poll
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException


def features(client, mode: str, x: np.ndarray | None = None):
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    x = np.arange(4, dtype=np.float32).reshape(1, 4) if x is None else x
    item = module.InferInput("X", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return client.infer("tp_features", [item], parameters={"mode": mode})


@pytest.mark.parametrize(
    ("mode", "grpc_status", "http_status"),
    [("unknown", "UNKNOWN", "400"), ("already_exists", "ALREADY_EXISTS", "400")],
)
def test_triton_error_codes_reach_clients_with_tritons_statuses(
    grpc_client, http_client, mode, grpc_status, http_status
):
    with pytest.raises(InferenceServerException) as over_grpc:
        features(grpc_client, mode)
    assert over_grpc.value.status() == f"StatusCode.{grpc_status}"
    assert f"{mode} happened" in over_grpc.value.message()
    with pytest.raises(InferenceServerException) as over_http:
        features(http_client, mode)
    assert over_http.value.status() == http_status
    assert f"{mode} happened" in over_http.value.message()


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (
            "param_float",
            "InferenceResponse parameters: 'score' must be a bool, int or str, got float (0.5)",
        ),
        (
            "param_nested",
            "InferenceResponse parameters: 'score' must be a bool, int or str, got dict ({'a': 1})",
        ),
        ("param_null", "InferenceResponse parameters: 'score' must be a bool, int or str, got NoneType"),
    ],
)
def test_response_parameters_other_than_bool_int_str_are_refused_naming_the_key(
    grpc_client, mode, message
):
    answer = features(grpc_client, mode).as_numpy("MSG")[0, 0].decode()
    assert answer.startswith(message)


def test_bool_int_str_response_parameters_reach_the_client(grpc_client, http_client):
    over_grpc = features(grpc_client, "param_ok").get_response().parameters
    assert over_grpc["flag"].bool_param is True
    assert over_grpc["count"].int64_param == 3
    assert over_grpc["score"].string_param == "fine"
    over_http = features(http_client, "param_ok").get_response()["parameters"]
    assert over_http == {"flag": True, "count": 3, "score": "fine"}


def test_to_dlpack_works_on_input_tensors(grpc_client, http_client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for client in (grpc_client, http_client):
        np.testing.assert_array_equal(features(client, "dlpack", x).as_numpy("Y"), 2 * x)


def _log_lines(server) -> list[str]:
    return server.log_path.read_text().splitlines()


def _level_of(lines: list[str], text: str) -> str | None:
    """The level name of the server-log line carrying `text` (text format: time LEVEL name: msg)."""
    for line in lines:
        if line.endswith(text):
            return line.split(" ")[2]
    return None


def test_logger_levels_reach_the_server_log_at_their_level(triton_server, grpc_client, http_client):
    features(grpc_client, "log")
    expected = {
        "tp_features log() INFO line": "INFO",
        "tp_features log() WARNING line": "WARNING",
        "tp_features log() ERROR line": "ERROR",
        "tp_features log_info line": "INFO",
        "tp_features log_warn line": "WARNING",
        "tp_features log_error line": "ERROR",
    }
    lines = poll(
        lambda: (
            (found := _log_lines(triton_server)) and all(_level_of(found, t) for t in expected) and found
        ),
        "the model's log lines in the server log",
    )
    for text, level in expected.items():
        assert _level_of(lines, text) == level, text
    # The model's lines are under its own logger name.
    assert any(" convoy.model.tp_features: tp_features log_info line" in line for line in lines)
    # VERBOSE is Triton's verbose log: off until log_verbose_level > 0.
    assert _level_of(lines, "tp_features log() VERBOSE line") is None
    http_client.update_log_settings({"log_verbose_level": 1})
    try:
        features(grpc_client, "log")
        lines = poll(
            lambda: (
                (found := _log_lines(triton_server))
                and _level_of(found, "tp_features log_verbose line")
                and found
            ),
            "the model's verbose lines",
        )
    finally:
        http_client.update_log_settings({"log_verbose_level": 0})
    assert _level_of(lines, "tp_features log() VERBOSE line") == "DEBUG"
    assert _level_of(lines, "tp_features log_verbose line") == "DEBUG"


def test_custom_metrics_are_typed_counter_gauge_histogram_under_their_names(triton_server, grpc_client):
    features(grpc_client, "", np.ones((2, 4), dtype=np.float32))
    text = requests.get(f"http://127.0.0.1:{triton_server.metrics_port}/metrics", timeout=10).text
    assert "# TYPE tp_features_requests counter\n" in text
    assert "# TYPE tp_features_last_rows gauge\n" in text
    assert "# TYPE tp_features_rows histogram\n" in text
    lines = text.splitlines()
    # Samples keep the family's exact name, as Triton exposes them.
    assert any(line.startswith('tp_features_requests{model="tp_features"} ') for line in lines)
    bucket = 'tp_features_rows_bucket{le="2.0",model="tp_features"} '
    assert any(line.startswith(bucket) for line in lines)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["tp_features_requests"].type == "counter"
    assert families["tp_features_last_rows"].type == "gauge"
    assert families["tp_features_rows"].type == "histogram"
    # OpenMetrics (what Prometheus asks for first) needs `_total` on counters: there the family
    # stays untyped under its exact name.
    open_metrics = requests.get(
        f"http://127.0.0.1:{triton_server.metrics_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=10,
    ).text
    assert "# TYPE tp_features_requests unknown\n" in open_metrics


def test_auto_complete_config_sees_every_model_config_key(http_client):
    config = http_client.get_model_config("tp_autocomplete_example")
    seen = set(config["parameters"]["seen_keys"]["string_value"].split(","))
    # Every ModelConfig field Triton prints (primitive and repeated fields with their defaults,
    # plus what its normalisation fills in) was in as_dict().
    assert {
        "name",
        "platform",
        "backend",
        "runtime",
        "version_policy",
        "max_batch_size",
        "input",
        "output",
        "batch_input",
        "batch_output",
        "optimization",
        "instance_group",
        "default_model_filename",
        "cc_model_filenames",
        "metric_tags",
        "parameters",
        "model_warmup",
    } <= seen
    assert [i["name"] for i in config["input"]] == ["INPUT0"]
    assert config["max_batch_size"] == 4
    # The defaults model code saw are not written back as if config.pbtxt had said them.
    assert "optimization" not in config


def test_initialize_model_config_holds_every_key(grpc_client):
    x = np.zeros((1, 4), dtype=np.float32)
    item = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    item.set_data_from_numpy(x)
    result = grpc_client.infer("tp_autocomplete_example", [item])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)
    keys = result.get_response().parameters["initialize_keys"].string_param.split(",")
    wanted = {"input", "output", "parameters", "instance_group", "version_policy", "model_warmup"}
    assert wanted <= set(keys)
