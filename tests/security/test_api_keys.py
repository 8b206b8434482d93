"""API keys over gRPC (tritonclient.grpc, headers=) and HTTP (tritonclient.http, headers=, and plain
requests): missing or unknown keys are UNAUTHENTICATED / 401, keys outside their scope
PERMISSION_DENIED / 403, listings show only the models in scope, management needs its own scope,
streams check every request's model, and logs name the caller but never hold a key."""

from __future__ import annotations

import contextlib
import json
import queue

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import metric_value, poll
from security_helpers import bearer
from tritonclient.utils import InferenceServerException

#: A well-formed key that is in no key file.
UNKNOWN_KEY = "cvy_" + "x" * 43

#: What InferenceServerException.status() says, by protocol.
STATUS = {
    "grpc": {
        "UNAUTHENTICATED": "StatusCode.UNAUTHENTICATED",
        "PERMISSION_DENIED": "StatusCode.PERMISSION_DENIED",
    },
    "http": {"UNAUTHENTICATED": "401", "PERMISSION_DENIED": "403"},
}


@pytest.fixture(params=["grpc", "http"])
def client(request, keyed):
    """(protocol name, tritonclient of that flavour, its module) on the keyed server."""
    if request.param == "grpc":
        made = grpcclient.InferenceServerClient(keyed.process.grpc_url)
        yield "grpc", made, grpcclient
    else:
        made = httpclient.InferenceServerClient(keyed.process.http_url)
        yield "http", made, httpclient
    made.close()


def add_sub_inputs(module, value: float = 1.0):
    tensors = []
    for name in ("INPUT0", "INPUT1"):
        tensor = module.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(np.full((1, 16), value, dtype=np.float32))
        tensors.append(tensor)
    return tensors


def int32_input(module):
    tensor = module.InferInput("INPUT0", [1, 3], "INT32")
    tensor.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int32))
    return tensor


def expect_error(protocol: str, code: str, call, *args, **kwargs) -> str:
    """Run a client call that must fail with `code`; returns the error message."""
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    assert caught.value.status() == STATUS[protocol][code], caught.value
    return caught.value.message()


def index_names(protocol: str, client, headers) -> set[str]:
    if protocol == "grpc":
        rows = client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
    else:
        rows = client.get_model_repository_index(headers=headers)
    return {row["name"] for row in rows}


def statistics_names(protocol: str, client, headers) -> set[str]:
    if protocol == "grpc":
        answer = client.get_inference_statistics(headers=headers, as_json=True)
    else:
        answer = client.get_inference_statistics(headers=headers)
    return {row["name"] for row in answer.get("model_stats", [])}


# --- inference and metadata --------------------------------------------------------------------
def test_key_in_scope_is_served(client, keyed):
    protocol, made, module = client
    result = made.infer("add_sub", add_sub_inputs(module, 2.0), headers=keyed.headers("team_a"))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 4.0, np.float32))
    metadata = made.get_model_metadata("add_sub", headers=keyed.headers("team_a"))
    name = metadata.name if protocol == "grpc" else metadata["name"]
    assert name == "add_sub"
    assert made.get_model_config("add_sub", headers=keyed.headers("team_a"))
    assert made.get_server_metadata(headers=keyed.headers("scraper"))


@pytest.mark.parametrize("presented", ["missing", "unknown", "not-bearer"])
def test_missing_or_unknown_key_is_unauthenticated(client, keyed, presented):
    protocol, made, module = client
    headers = {
        "missing": {},
        "unknown": bearer(UNKNOWN_KEY),
        # A real key, but not in the Bearer scheme.
        "not-bearer": {"authorization": f"Basic {keyed.keys['admin']}"},
    }[presented]
    calls = [
        (made.infer, "add_sub", add_sub_inputs(module)),
        (made.get_model_metadata, "add_sub"),
        (made.get_model_config, "add_sub"),
        (made.get_server_metadata,),
        (made.get_model_repository_index,),
        (made.get_inference_statistics, "add_sub"),
    ]
    for call, *args in calls:
        message = expect_error(protocol, "UNAUTHENTICATED", call, *args, headers=headers)
        assert "API key" in message
        assert UNKNOWN_KEY not in message and keyed.keys["admin"] not in message


def test_key_out_of_scope_is_permission_denied(client, keyed):
    protocol, made, module = client
    team_a = keyed.headers("team_a")
    for call, *args in [
        (made.infer, "private_model", [int32_input(module)]),
        (made.get_model_metadata, "private_model"),
        (made.get_model_config, "private_model"),
        (made.get_inference_statistics, "private_model"),
        # A model that does not exist is out of scope too: no hint that it is missing.
        (made.infer, "no_such_model", [int32_input(module)]),
    ]:
        message = expect_error(protocol, "PERMISSION_DENIED", call, *args, headers=team_a)
        assert f"API key 'team_a' may not use model '{args[0]}'" in message
    # The same calls with a key covering every model are served (or 404 for the missing one).
    admin = keyed.headers("admin")
    result = made.infer("private_model", [int32_input(module)], headers=admin)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), [[1, 2, 3]])


def test_listings_show_only_models_in_the_keys_scope(client, keyed):
    protocol, made, _ = client
    everything = {"add_sub", "private_model", "reloadable"}
    assert index_names(protocol, made, keyed.headers("admin")) == everything
    assert index_names(protocol, made, keyed.headers("team_a")) == {"add_sub"}
    assert index_names(protocol, made, keyed.headers("scraper")) == set()
    assert statistics_names(protocol, made, keyed.headers("admin")) == everything
    assert statistics_names(protocol, made, keyed.headers("team_a")) == {"add_sub"}


def test_management_apis_need_the_manage_scope(client, keyed):
    protocol, made, _ = client
    team_a = keyed.headers("team_a")
    admin = keyed.headers("admin")
    message = expect_error(protocol, "PERMISSION_DENIED", made.unload_model, "add_sub", headers=team_a)
    assert "may not use the management APIs" in message
    expect_error(protocol, "PERMISSION_DENIED", made.load_model, "add_sub", headers=team_a)
    expect_error(protocol, "PERMISSION_DENIED", made.get_log_settings, headers=team_a)
    expect_error(
        protocol, "PERMISSION_DENIED", made.update_log_settings, {"log_info": True}, headers=team_a
    )
    expect_error(protocol, "UNAUTHENTICATED", made.unload_model, "reloadable")
    # Still loaded after the refusals; the admin key unloads and loads it again.
    assert made.is_model_ready("reloadable", headers=admin)
    made.unload_model("reloadable", headers=admin)
    poll(lambda: not made.is_model_ready("reloadable", headers=admin), "reloadable to unload")
    made.load_model("reloadable", headers=admin)
    assert made.is_model_ready("reloadable", headers=admin)
    assert made.get_log_settings(headers=admin)


def test_raw_http_answers_401_with_www_authenticate_and_403_as_json(keyed):
    base = keyed.process.base_url
    body = {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
            for name in ("INPUT0", "INPUT1")
        ]
    }
    url = f"{base}/v2/models/add_sub/infer"
    missing = requests.post(url, json=body, timeout=10)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["error"]
    unknown = requests.post(url, json=body, headers=bearer(UNKNOWN_KEY), timeout=10)
    assert unknown.status_code == 401
    assert "invalid API key" in unknown.json()["error"]
    denied = requests.post(
        f"{base}/v2/models/private_model/infer", json=body, headers=keyed.headers("team_a"), timeout=10
    )
    assert denied.status_code == 403
    assert denied.json() == {"error": "API key 'team_a' may not use model 'private_model'"}
    # The scheme name is case-insensitive (RFC 7235).
    served = requests.post(
        url, json=body, headers={"Authorization": f"bearer {keyed.keys['team_a']}"}, timeout=10
    )
    assert served.status_code == 200, served.text


def test_server_health_is_open_but_model_readiness_and_metrics_need_a_key_by_default(keyed):
    """Probes need no key; a model's readiness is no probe (it would tell real model names from
    fake ones) and /metrics names every model and key: both need a key (issue 21)."""
    process = keyed.process
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert requests.get(process.base_url + path, timeout=10).status_code == 200
    for model in ("add_sub", "no_such_model"):
        answer = requests.get(f"{process.base_url}/v2/models/{model}/ready", timeout=10)
        assert answer.status_code == 401
    metrics = f"http://127.0.0.1:{process.metrics_port}/metrics"
    assert requests.get(metrics, timeout=10).status_code == 401
    # A key in scope for no model serves as Prometheus's scrape key.
    assert requests.get(metrics, headers=keyed.headers("scraper"), timeout=10).status_code == 200
    made = grpcclient.InferenceServerClient(process.grpc_url)
    try:
        assert made.is_server_live() and made.is_server_ready()
        assert made.is_model_ready("add_sub", headers=keyed.headers("team_a"))
        for model in ("add_sub", "no_such_model"):
            with pytest.raises(InferenceServerException) as refused:
                made.is_model_ready(model)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    finally:
        made.close()


def test_models_outside_a_keys_scope_answer_alike_whether_they_exist_or_not(keyed):
    base = keyed.process.base_url
    answers = set()
    for model in ("private_model", "no_such_model"):
        for tail in ("", "/ready", "/config", "/stats"):
            got = requests.get(f"{base}/v2/models/{model}{tail}", headers=keyed.headers("team_a"))
            answers.add((tail, got.status_code, got.json()["error"].replace(model, "M")))
    assert {status for _, status, _ in answers} == {403}
    assert len(answers) == 4  # per endpoint, one answer for a real and a fake model
    made = grpcclient.InferenceServerClient(keyed.process.grpc_url)
    try:
        details = set()
        for model in ("private_model", "no_such_model"):
            with pytest.raises(InferenceServerException) as refused:
                made.is_model_ready(model, headers=keyed.headers("team_a"))
            assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
            details.add(refused.value.message().replace(model, "M"))
        assert len(details) == 1
    finally:
        made.close()


# --- streaming ---------------------------------------------------------------------------------
def test_stream_checks_each_requests_model_against_the_key(keyed):
    made = grpcclient.InferenceServerClient(keyed.process.grpc_url)
    answers: queue.SimpleQueue = queue.SimpleQueue()
    made.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers=keyed.headers("team_a")
    )
    try:
        made.async_stream_infer("add_sub", add_sub_inputs(grpcclient), request_id="first")
        made.async_stream_infer("private_model", [int32_input(grpcclient)], request_id="denied")
        made.async_stream_infer("add_sub", add_sub_inputs(grpcclient, 3.0), request_id="after")
        received = [answers.get(timeout=30) for _ in range(3)]
    finally:
        made.stop_stream()
        made.close()
    served = {result.get_response().id: result for result, error in received if error is None}
    errors = [error for _, error in received if error is not None]
    assert set(served) == {"first", "after"}
    np.testing.assert_array_equal(served["after"].as_numpy("OUTPUT0"), np.full((1, 16), 6.0, np.float32))
    (error,) = errors
    assert "API key 'team_a' may not use model 'private_model'" in error.message()


def test_stream_without_a_valid_key_is_refused(keyed):
    made = grpcclient.InferenceServerClient(keyed.process.grpc_url)
    answers: queue.SimpleQueue = queue.SimpleQueue()
    made.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers=bearer(UNKNOWN_KEY)
    )
    try:
        # The server ends the stream as it opens: the send may already find it closed.
        with contextlib.suppress(InferenceServerException):
            made.async_stream_infer("add_sub", add_sub_inputs(grpcclient), request_id="refused")
        result, error = answers.get(timeout=30)
    finally:
        made.stop_stream()
        made.close()
    assert result is None
    assert error.status() == "StatusCode.UNAUTHENTICATED"


# --- identity in the logs ------------------------------------------------------------------------
def access_lines(keyed) -> list[dict]:
    if not keyed.access_log.exists():
        return []
    return [json.loads(line) for line in keyed.access_log.read_text().splitlines() if line]


def test_access_log_names_the_caller_and_no_log_holds_a_key(keyed):
    grpc_made = grpcclient.InferenceServerClient(keyed.process.grpc_url)
    http_made = httpclient.InferenceServerClient(keyed.process.http_url)
    try:
        for made, module, protocol in ((grpc_made, grpcclient, "grpc"), (http_made, httpclient, "http")):
            made.infer(
                "add_sub",
                add_sub_inputs(module),
                request_id=f"who-{protocol}",
                headers=keyed.headers("team_a"),
            )
            with pytest.raises(InferenceServerException):
                made.infer(
                    "add_sub",
                    add_sub_inputs(module),
                    request_id=f"nobody-{protocol}",
                    headers=bearer(UNKNOWN_KEY),
                )
    finally:
        grpc_made.close()
        http_made.close()

    def by_id():
        return {line.get("request_id"): line for line in access_lines(keyed)}

    # The refused HTTP request is logged without an id (its body was never read).
    poll(lambda: {"who-grpc", "who-http", "nobody-grpc"} <= by_id().keys(), "the access log lines")
    lines = by_id()
    assert lines["who-grpc"]["principal"] == "team_a"
    assert lines["who-http"]["principal"] == "team_a"
    assert lines["who-grpc"]["status"] == "OK" and lines["who-http"]["status"] == "200"
    assert lines["nobody-grpc"]["principal"] is None
    assert lines["nobody-grpc"]["status"] == "UNAUTHENTICATED"
    assert any(line["status"] == "401" and line["principal"] is None for line in access_lines(keyed))

    logs = keyed.process.log() + keyed.access_log.read_text() + "\n".join(keyed.process.stdout_lines)
    assert "team_a" in logs
    for secret in (*keyed.keys.values(), UNKNOWN_KEY):
        assert secret not in logs
    # The key file holds digests only.
    stored = keyed.keys_file.read_text()
    for secret in keyed.keys.values():
        assert secret not in stored


def test_usage_is_metered_per_key_on_the_metrics_endpoint(keyed):
    """The front ends put the key's name on each request; showback counts it under that name."""

    def requests_of(name: str) -> float:
        return metric_value(
            keyed.process,
            "convoy_usage_requests_total",
            keyed.headers("scraper"),
            key=name,
            model="add_sub",
        )

    before = requests_of("admin")
    made = grpcclient.InferenceServerClient(keyed.process.grpc_url)
    try:
        for _ in range(3):
            made.infer("add_sub", add_sub_inputs(grpcclient), headers=keyed.headers("admin"))
    finally:
        made.close()
    body = {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": [2, 16], "data": [1.0] * 32}
            for name in ("INPUT0", "INPUT1")
        ]
    }
    answer = requests.post(
        f"{keyed.process.base_url}/v2/models/add_sub/infer",
        json=body,
        headers=keyed.headers("admin"),
        timeout=10,
    )
    assert answer.status_code == 200
    poll(lambda: requests_of("admin") - before == 4, "admin's four requests in the usage counters")
    rows = metric_value(
        keyed.process, "convoy_usage_rows_total", keyed.headers("scraper"), key="admin", model="add_sub"
    )
    assert rows >= 5
