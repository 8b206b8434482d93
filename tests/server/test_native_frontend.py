"""The native front end as a part of the server: it is chosen when built (and says so), refused
where it cannot serve, and words its own refusals by convoy/errors.py's table. What it serves is
checked by the protocol suites, which run against both front ends."""

from __future__ import annotations

import subprocess
import sys

import pytest

from convoy import errors
from convoy.config import ServerConfig
from convoy.server.app import choose_frontend

native = pytest.importorskip("convoy.server._native", reason="the native front end is not built")


def test_its_own_refusals_use_the_one_error_table():
    for class_name, grpc_status, http_status in native.error_table():
        cls = getattr(errors, class_name, Exception)
        assert errors.status_of(cls("refused"))[:2] == (grpc_status, http_status), class_name


def test_auto_picks_the_native_front_end_when_it_is_built(tmp_path):
    assert choose_frontend(ServerConfig(model_repository=tmp_path)) == ("native", "")
    assert choose_frontend(ServerConfig(model_repository=tmp_path, frontend="python")) == ("python", "")


def test_without_the_extension_auto_falls_back_saying_why_and_native_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "convoy.server._native", None)  # import fails as if unbuilt
    frontend, why = choose_frontend(ServerConfig(model_repository=tmp_path))
    assert frontend == "python" and "not built" in why and "cargo" in why
    with pytest.raises(OSError, match="--frontend native"):
        choose_frontend(ServerConfig(model_repository=tmp_path, frontend="native"))


def test_native_with_workers_is_refused_naming_both_flags(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "convoy", "serve", "--frontend", "native", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "--frontend native" in done.stderr and "--workers" in done.stderr
