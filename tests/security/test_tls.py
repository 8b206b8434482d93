"""TLS (--tls-cert/--tls-key) and mutual TLS (--tls-client-ca) on gRPC, HTTP and metrics, with
tritonclient's own TLS options and certificates made by trustme for each test session."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess, serve_until_stopped
from security_helpers import build_repository
from tritonclient.utils import InferenceServerException


def tls_process(root, certificates, *extra: str, frontend: str = "", **health) -> ConvoyProcess:
    return ConvoyProcess(
        build_repository(root),
        root / "server.log",
        extra_args=(
            "--tls-cert",
            str(certificates.server_cert),
            "--tls-key",
            str(certificates.server_key),
            *extra,
        ),
        scheme="https",
        health_request={"verify": str(certificates.ca), **health},
        frontend=frontend,
    )


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certificates, frontend):
    yield from serve_until_stopped(
        tls_process(tmp_path_factory.mktemp("tls"), certificates, frontend=frontend)
    )


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, certificates, frontend):
    process = tls_process(
        tmp_path_factory.mktemp("mtls"),
        certificates,
        "--tls-client-ca",
        str(certificates.client_ca),
        cert=(str(certificates.client_cert), str(certificates.client_key)),
        frontend=frontend,
    )
    yield from serve_until_stopped(process)


def add_sub_inputs(module):
    tensors = []
    for name in ("INPUT0", "INPUT1"):
        tensor = module.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(np.full((1, 16), 1.5, dtype=np.float32))
        tensors.append(tensor)
    return tensors


def assert_add_sub_served(client, module) -> None:
    result = client.infer("add_sub", add_sub_inputs(module))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 3.0, np.float32))


def grpc_refused(client) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.is_server_live()
    assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value


# --- TLS ------------------------------------------------------------------------------------------
def test_grpc_client_verifying_the_server_is_served_over_tls(tls_server, certificates):
    client = grpcclient.InferenceServerClient(
        tls_server.grpc_url, ssl=True, root_certificates=str(certificates.ca)
    )
    try:
        assert client.is_server_ready()
        assert_add_sub_served(client, grpcclient)
    finally:
        client.close()


def test_http_client_verifying_the_server_is_served_over_tls(tls_server, certificates):
    client = httpclient.InferenceServerClient(
        tls_server.http_url, ssl=True, ssl_options={"ca_certs": str(certificates.ca)}
    )
    try:
        assert client.is_server_ready()
        assert_add_sub_served(client, httpclient)
    finally:
        client.close()
    answer = requests.get(f"{tls_server.base_url}/v2", verify=str(certificates.ca), timeout=10)
    assert answer.json()["name"] == "convoy"


def test_metrics_are_served_over_tls(tls_server, certificates):
    url = f"https://127.0.0.1:{tls_server.metrics_port}/metrics"
    scraped = requests.get(url, verify=str(certificates.ca), timeout=10)
    assert scraped.status_code == 200
    assert "nv_inference_request_success" in scraped.text
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{tls_server.metrics_port}/metrics", timeout=10)


def test_plaintext_and_untrusting_clients_get_no_answer(tls_server, certificates):
    plaintext = grpcclient.InferenceServerClient(tls_server.grpc_url)
    untrusting = grpcclient.InferenceServerClient(
        tls_server.grpc_url, ssl=True, root_certificates=str(certificates.client_ca)
    )
    try:
        grpc_refused(plaintext)
        grpc_refused(untrusting)
    finally:
        plaintext.close()
        untrusting.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{tls_server.http_url}/v2", timeout=10)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{tls_server.base_url}/v2", verify=str(certificates.client_ca), timeout=10)


# --- mutual TLS -----------------------------------------------------------------------------------
def test_mtls_serves_clients_with_a_certificate_from_the_client_ca(mtls_server, certificates):
    grpc_client = grpcclient.InferenceServerClient(
        mtls_server.grpc_url,
        ssl=True,
        root_certificates=str(certificates.ca),
        private_key=str(certificates.client_key),
        certificate_chain=str(certificates.client_cert),
    )
    http_client = httpclient.InferenceServerClient(
        mtls_server.http_url,
        ssl=True,
        ssl_options={
            "ca_certs": str(certificates.ca),
            "certfile": str(certificates.client_cert),
            "keyfile": str(certificates.client_key),
        },
    )
    try:
        assert_add_sub_served(grpc_client, grpcclient)
        assert_add_sub_served(http_client, httpclient)
    finally:
        grpc_client.close()
        http_client.close()
    scraped = requests.get(
        f"https://127.0.0.1:{mtls_server.metrics_port}/metrics",
        verify=str(certificates.ca),
        cert=(str(certificates.client_cert), str(certificates.client_key)),
        timeout=10,
    )
    assert scraped.status_code == 200


@pytest.mark.parametrize("presented", ["none", "untrusted"])
def test_mtls_refuses_the_handshake_without_a_trusted_client_certificate(
    mtls_server, certificates, presented
):
    cert = None
    grpc_options = {}
    if presented == "untrusted":
        cert = (str(certificates.rogue_cert), str(certificates.rogue_key))
        grpc_options = {"private_key": cert[1], "certificate_chain": cert[0]}
    client = grpcclient.InferenceServerClient(
        mtls_server.grpc_url, ssl=True, root_certificates=str(certificates.ca), **grpc_options
    )
    try:
        grpc_refused(client)
    finally:
        client.close()
    for url in (f"{mtls_server.base_url}/v2", f"https://127.0.0.1:{mtls_server.metrics_port}/metrics"):
        with pytest.raises(requests.ConnectionError):
            requests.get(url, verify=str(certificates.ca), cert=cert, timeout=10)
