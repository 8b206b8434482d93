"""The peer comparison's report logic: pairing runs, Convoy/peer ratios, targets, Markdown,
the "not installed" path and --peers parsing. Pure functions: nothing is started here."""

from __future__ import annotations

import pytest
import run as bench_run
from peers import PEERS, installed, missing_reason
from peers.__main__ import main as peers_main
from peers.compare import check_targets, markdown, pair


def record(protocol, concurrency, rps, p50, p99=900):
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "requests_per_s": rps,
        "p50_us": p50,
        "p99_us": p99,
    }


def test_pair_computes_convoy_over_peer_for_the_same_protocol_and_concurrency():
    convoy = [record("grpc", 1, 2000.0, 400), record("grpc", 32, 6000.0, 5000)]
    peer = [record("grpc", 32, 2400.0, 12000), record("grpc", 1, 250.0, 4000)]
    rows = pair(convoy, peer)
    by_concurrency = {row["concurrency"]: row for row in rows}
    assert by_concurrency[32]["convoy_over_peer"] == pytest.approx(2.5)
    assert by_concurrency[32]["peer_p50_over_convoy"] == pytest.approx(2.4)
    assert by_concurrency[1]["convoy_over_peer"] == pytest.approx(8.0)
    assert by_concurrency[1]["convoy"]["requests_per_s"] == 2000.0
    assert by_concurrency[1]["peer"]["requests_per_s"] == 250.0


def test_pair_leaves_the_ratio_empty_when_either_side_failed_or_is_missing():
    convoy = [record("grpc", 8, 3000.0, 900), {"protocol": "grpc", "concurrency": 1, "error": "boom"}]
    peer = [
        record("grpc", 1, 250.0, 4000),
        {"protocol": "grpc", "concurrency": 8, "error": "peer died"},
        record("http_json", 8, 1000.0, 7000),
    ]
    rows = pair(convoy, peer)
    assert [row["convoy_over_peer"] for row in rows] == [None, None, None]
    assert rows[2]["convoy"]["error"] == "not measured"


def peers_entry(name, pairs):
    return {"name": name, "description": PEERS[name].description, "status": "measured", "pairs": pairs}


def test_targets_report_met_not_met_and_not_measured():
    served = [record("grpc", 1, 2000.0, 450), record("grpc", 32, 6000.0, 5000)]
    pytriton = pair(
        [*served, record("http_json", 8, 9000.0, 800)],
        [record("grpc", 32, 2500.0, 12000), record("http_json", 8, 2000.0, 4000)],
    )
    results = {t["target"]: t for t in check_targets(served, [peers_entry("pytriton", pytriton)])}
    assert results["gRPC c=32 throughput >= 1.5x PyTriton (aim 2x)"]["value"] == pytest.approx(2.4)
    assert results["gRPC c=32 throughput >= 1.5x PyTriton (aim 2x)"]["met"] is True
    assert results["HTTP JSON c=8 throughput >= 5x PyTriton"]["value"] == pytest.approx(4.5)
    assert results["HTTP JSON c=8 throughput >= 5x PyTriton"]["met"] is False
    assert results["gRPC c=1 p50 <= 0.5 ms"] == {
        "target": "gRPC c=1 p50 <= 0.5 ms",
        "value": 450,
        "goal": 500,
        "met": True,
    }
    assert results["gRPC c=32 throughput >= 3x MLServer"]["met"] is None


def test_markdown_shows_ratio_columns_and_names_a_missing_peer_with_its_install_command():
    unstable = {**record("grpc", 1, 300.0, 4000), "unstable": True}
    pairs = pair(
        [record("grpc", 32, 6000.0, 5000), record("grpc", 1, 2000.0, 450)],
        [record("grpc", 32, 2000.0, 15000), unstable],
    )
    measured = {**peers_entry("pytriton", pairs), "driver": "perf_analyzer", "versions": {"x": "1"}}
    missing = {
        "name": "mlserver",
        "description": PEERS["mlserver"].description,
        "status": missing_reason(PEERS["mlserver"]),
    }
    text = "\n".join(markdown([measured, missing], check_targets([], [measured])))
    assert "| gRPC | 32 | 6,000 | 2,000 | 3.00 | 5,000 / 900 | 15,000 / 900 | 3.0 |" in text
    assert "| gRPC | 1 | 2,000 | 300 (unstable) | 6.67 |" in text
    assert "not installed (run `python -m bench.peers install mlserver`)" in text
    assert "gRPC c=32 throughput >= 1.5x PyTriton (aim 2x): 3.0 → met" in text
    assert "gRPC c=1 p50 <= 0.5 ms → not measured" in text


def test_an_empty_peers_dir_means_every_peer_reports_not_installed(tmp_path, capsys):
    assert not any(installed(peer, tmp_path) for peer in PEERS.values())
    assert peers_main(["list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in PEERS:
        assert f"{name}: not installed (run `python -m bench.peers install {name}`)" in out


def test_peers_option_parses_names_none_and_the_default():
    assert bench_run.select_peers(None) == list(PEERS)
    assert bench_run.select_peers("none") == []
    assert bench_run.select_peers("mlserver, pytriton") == ["mlserver", "pytriton"]
    with pytest.raises(SystemExit, match="unknown peer torchserve"):
        bench_run.select_peers("pytriton,torchserve")
