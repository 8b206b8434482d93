"""The Triton-style test models (tests/python_backend/models) and a repository builder."""

from __future__ import annotations

import shutil
from pathlib import Path

MODELS = Path(__file__).resolve().parent / "models"


def triton_repository(target: Path, names: list[str] | None = None) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for source in sorted(MODELS.iterdir()):
        if names is None or source.name in names:
            shutil.copytree(source, target / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    return target
