"""bench/ is a folder of scripts, not a package: its modules import each other by bare name
(`from workloads import ...`), so tests import them the same way, from bench/ on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
