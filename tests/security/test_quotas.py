"""Per-key quotas: a key past its rate gets RESOURCE_EXHAUSTED / 429 with when to retry, other
keys are unaffected, and the refusals are counted per key."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import WITH_WORKERS, ConvoyProcess, metric_value, serve_until_stopped
from security_helpers import bearer, build_repository, convoy_cli, create_key
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.frontends(*WITH_WORKERS)

#: Two requests at once, then one every five seconds: the third in a row is always refused.
RATE, BURST = 0.2, 2


@pytest.fixture(scope="module")
def limited(tmp_path_factory, frontend):
    yield from serve_limited(tmp_path_factory.mktemp("quotas"), frontend=frontend)


def serve_limited(root, extra_args: tuple[str, ...] = (), frontend: str = ""):
    """Fixture body: (server, the metered key, the unlimited key)."""
    keys_file = root / "keys.json"
    args = ["keys", "create", "--file", str(keys_file), "--name", "metered", "--models", "*"]
    done = convoy_cli(*args, "--rate-limit", str(RATE), "--burst", str(BURST))
    metered = done.stdout.split()[0]
    unlimited = create_key(keys_file, "unlimited", "*")
    listing = convoy_cli("keys", "list", "--file", str(keys_file)).stdout
    assert "rate_limit=0.2/s burst=2" in listing
    process = ConvoyProcess(
        build_repository(root),
        root / "server.log",
        extra_args=("--api-keys", str(keys_file), *extra_args),
        frontend=frontend,
    )
    for server in serve_until_stopped(process):
        yield server, metered, unlimited


def http_add_sub(server, key: str) -> requests.Response:
    body = {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
            for name in ("INPUT0", "INPUT1")
        ]
    }
    url = f"{server.base_url}/v2/models/add_sub/infer"
    return requests.post(url, json=body, headers=bearer(key), timeout=10)


def test_key_over_its_quota_is_refused_with_a_retry_hint_and_others_are_not(limited):
    server, metered, unlimited = limited
    assert [http_add_sub(server, metered).status_code for _ in range(BURST)] == [200] * BURST
    refused = http_add_sub(server, metered)
    assert refused.status_code == 429
    assert "API key 'metered' is over its quota of 0.2 requests/s" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) >= 1
    # The same bucket on gRPC.
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as rejected:
        client.infer("add_sub", inputs, headers=bearer(metered))
    assert rejected.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "quota" in rejected.value.message()
    # Another key is not held back by it.
    for _ in range(5):
        assert http_add_sub(server, unlimited).status_code == 200
    result = client.infer("add_sub", inputs, headers=bearer(unlimited))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2.0))
    client.close()
    scrape = bearer(unlimited)  # with keys, /metrics needs one
    assert metric_value(server, "convoy_quota_rejections_total", scrape, key="metered") == 2
    assert metric_value(server, "convoy_quota_rejections_total", scrape, key="unlimited") == 0


def test_quota_refusals_count_as_rejections_in_showback_and_convoy_usage(tmp_path, frontend):
    ledger = tmp_path / "usage.jsonl"
    serving = serve_limited(tmp_path, ("--usage-ledger", str(ledger)), frontend=frontend)
    server, metered, unlimited = next(serving)
    codes = [http_add_sub(server, metered).status_code for _ in range(BURST + 1)]
    assert codes == [200] * BURST + [429]
    labels = {"key": "metered", "model": "add_sub", "version": "1"}
    scrape = bearer(unlimited)  # with keys, /metrics needs one
    assert metric_value(server, "convoy_usage_rejections_total", scrape, **labels) == 1
    assert metric_value(server, "convoy_usage_requests_total", scrape, **labels) == BURST + 1
    next(serving, None)  # SIGTERM: the ledger gets its last interval
    summary = convoy_cli("usage", str(ledger), "--by", "key", "--period", "all", "--json")
    rows = {row["key"]: row for row in json.loads(summary.stdout)}
    assert rows["metered"]["rejections"] == 1
    assert rows["metered"]["requests"] == BURST + 1
