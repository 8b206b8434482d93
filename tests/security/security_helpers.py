"""Helpers for the security tests: key files made by `convoy keys create` and real `convoy serve`
processes started with them (fixtures are in conftest.py).

Keys: `team_a` may call add_sub only (pattern "add_*"); `admin` may call every model and use the
management APIs; `scraper` is valid but in scope for no model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from helpers import EXPLICIT, REPO_ROOT, ConvoyProcess, serve_until_stopped, write_identity_model

from convoy.cli import demo_repository

KEY_SCOPES = {
    "team_a": ("add_*", False),
    "admin": ("*", True),
    "scraper": ("", False),
}


def convoy_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m convoy ARGS`, with CONVOY_API_KEYS_FILE only when `env` sets it."""
    clean = {k: v for k, v in os.environ.items() if k != "CONVOY_API_KEYS_FILE"}
    done = subprocess.run(
        [sys.executable, "-m", "convoy", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        env={**clean, **(env or {})},
    )
    if check:
        assert done.returncode == 0, f"convoy {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done


def create_key(path: Path, name: str, models: str, manage: bool = False) -> str:
    """`convoy keys create`; returns the plaintext key it printed."""
    args = ["keys", "create", "--file", str(path), "--name", name, "--models", models]
    done = convoy_cli(*args, *(["--manage"] if manage else []))
    (key,) = done.stdout.split()
    return key


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@dataclass
class KeyedServer:
    process: ConvoyProcess
    keys_file: Path
    #: name -> plaintext key
    keys: dict[str, str]
    access_log: Path

    def headers(self, name: str) -> dict[str, str]:
        return bearer(self.keys[name])


def build_repository(root: Path) -> Path:
    """add_sub, a model outside team_a's scope, and one the management tests unload/load."""
    repository = root / "models"
    repository.mkdir(parents=True)
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    write_identity_model(repository, "private_model", "INT32")
    write_identity_model(repository, "reloadable", "INT32")
    return repository


def make_keys(path: Path) -> dict[str, str]:
    return {
        name: create_key(path, name, models, manage) for name, (models, manage) in KEY_SCOPES.items()
    }


def start_keyed(root: Path, *extra: str, health_key: str | None = None, frontend: str = ""):
    """Fixture body: a server with the three keys and an access log (JSON lines)."""
    keys_file = root / "keys.json"
    keys = make_keys(keys_file)
    access_log = root / "access.log"
    process = ConvoyProcess(
        build_repository(root),
        root / "server.log",
        extra_args=(
            "--api-keys",
            str(keys_file),
            "--access-log",
            str(access_log),
            "--log-format",
            "json",
            *EXPLICIT,
            *extra,
        ),
        health_request={"headers": bearer(keys[health_key])} if health_key else {},
        frontend=frontend,
    )
    for server in serve_until_stopped(process):
        yield KeyedServer(server, keys_file, keys, access_log)


@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    #: Signed by `client_ca` (the CA the mTLS server trusts).
    client_ca: Path
    client_cert: Path
    client_key: Path
    #: A client certificate from a CA the server does not trust.
    rogue_cert: Path
    rogue_key: Path
