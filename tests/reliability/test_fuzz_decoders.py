"""Runs the atheris decoder target (fuzz_decoders.py) for a bounded number of inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

TARGET = Path(__file__).with_name("fuzz_decoders.py")


def test_decoders_raise_only_convoy_errors(tmp_path):
    done = subprocess.run(
        [sys.executable, str(TARGET), "-runs=30000", "-max_total_time=20", "-max_len=1024"],
        cwd=tmp_path,  # crash-* reproducers land here, not in the checkout
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
