"""--auth-health protected and --auth-metrics protected: health (live, ready, model ready) and the
Prometheus endpoint answer only to a valid key, over HTTP and gRPC."""

from __future__ import annotations

import pytest
import requests
import tritonclient.grpc as grpcclient
from security_helpers import bearer, start_keyed
from tritonclient.utils import InferenceServerException

HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready", "/v2/models/add_sub/ready")


@pytest.fixture(scope="module")
def protected(tmp_path_factory, frontend):
    yield from start_keyed(
        tmp_path_factory.mktemp("protected"),
        "--auth-health",
        "protected",
        "--auth-metrics",
        "protected",
        health_key="scraper",
        frontend=frontend,
    )


def test_http_health_needs_a_valid_key(protected):
    base = protected.process.base_url
    for path in HEALTH_PATHS:
        refused = requests.get(base + path, timeout=10)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"] == "Bearer"
        assert requests.get(base + path, headers=bearer("cvy_wrong"), timeout=10).status_code == 401
    for path in HEALTH_PATHS[:2]:
        # Any valid key will do for the server's health, even one in scope for no model...
        assert (
            requests.get(base + path, headers=protected.headers("scraper"), timeout=10).status_code
            == 200
        )
    # ...but a model's readiness needs the model in scope.
    model_ready = base + HEALTH_PATHS[2]
    assert requests.get(model_ready, headers=protected.headers("scraper"), timeout=10).status_code == 403
    assert requests.get(model_ready, headers=protected.headers("team_a"), timeout=10).status_code == 200


def test_grpc_health_needs_a_valid_key(protected):
    client = grpcclient.InferenceServerClient(protected.process.grpc_url)
    try:
        for call, args in (
            (client.is_server_live, ()),
            (client.is_server_ready, ()),
            (client.is_model_ready, ("add_sub",)),
        ):
            with pytest.raises(InferenceServerException) as caught:
                call(*args)
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.is_server_live(headers=protected.headers("scraper"))
        assert client.is_server_ready(headers=protected.headers("scraper"))
        assert client.is_model_ready("add_sub", headers=protected.headers("team_a"))
        with pytest.raises(InferenceServerException) as caught:
            client.is_model_ready("private_model", headers=protected.headers("team_a"))
        assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
    finally:
        client.close()


def test_metrics_need_a_valid_key(protected):
    url = f"http://127.0.0.1:{protected.process.metrics_port}/metrics"
    refused = requests.get(url, timeout=10)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert "nv_inference" not in refused.text
    assert requests.get(url, headers=bearer("cvy_wrong"), timeout=10).status_code == 401
    scraped = requests.get(url, headers=protected.headers("scraper"), timeout=10)
    assert scraped.status_code == 200
    assert 'nv_inference_request_success{model="add_sub",version="1"}' in scraped.text
