"""Fixtures for the security tests: a keyed server (see security_helpers.py for its keys) and
certificates made by trustme for the TLS tests."""

from __future__ import annotations

import pytest
from security_helpers import Certificates, start_keyed


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, frontend):
    """Keys on; health and metrics open (the defaults)."""
    yield from start_keyed(tmp_path_factory.mktemp("keyed"), frontend=frontend)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> Certificates:
    import trustme

    root = tmp_path_factory.mktemp("certs")
    server_ca = trustme.CA()
    client_ca = trustme.CA()
    rogue_ca = trustme.CA()
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert("client.example")
    rogue = rogue_ca.issue_cert("rogue.example")
    paths = Certificates(*(root / name for name in (
        "ca.pem", "server.pem", "server.key", "client-ca.pem", "client.pem", "client.key",
        "rogue.pem", "rogue.key",
    )))  # fmt: skip
    server_ca.cert_pem.write_to_path(str(paths.ca))
    server.cert_chain_pems[0].write_to_path(str(paths.server_cert))
    server.private_key_pem.write_to_path(str(paths.server_key))
    client_ca.cert_pem.write_to_path(str(paths.client_ca))
    client.cert_chain_pems[0].write_to_path(str(paths.client_cert))
    client.private_key_pem.write_to_path(str(paths.client_key))
    rogue.cert_chain_pems[0].write_to_path(str(paths.rogue_cert))
    rogue.private_key_pem.write_to_path(str(paths.rogue_key))
    return paths
