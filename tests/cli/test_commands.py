"""What a new user types first (issue 16): `convoy --help`/`--version`, defaults in subcommand
help, Triton's flag spellings, --load-model '*' and unknown names, --metrics-port -1, and a port
in use found before any model loads (one process and --workers)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
from helpers import REPO_ROOT, ConvoyProcess, serve_until_stopped, write_identity_model

from convoy import __version__


def convoy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convoy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def test_top_level_help_describes_convoy_not_its_internals():
    result = convoy("--help")
    assert result.returncode == 0
    assert "Open Inference Protocol" in result.stdout
    assert "only place allowed to exit" not in result.stdout
    assert "convoy serve --model-repository" in result.stdout


def test_version_prints_the_package_version():
    result = convoy("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"convoy {__version__}"


@pytest.mark.parametrize(
    ("command", "flag", "default"),
    [
        ("serve", "--http-port", "8000"),
        ("serve", "--grpc-port", "8001"),
        ("serve", "--metrics-port", "8002"),
        ("serve", "--shutdown-grace", "30.0"),
        ("serve", "--execution-timeout", "0.0"),
        ("usage", "--period", "day"),
    ],
)
def test_subcommand_help_shows_defaults(command, flag, default):
    help_text = convoy(command, "--help").stdout
    options = help_text[help_text.index("options:") :]
    # Each option's entry runs from its line to the next option's.
    entries = {}
    for block in options.split("\n  -")[1:]:
        entries[block.split()[0].rstrip(",")] = " ".join(block.split())
    assert f"(default: {default})" in entries[flag.removeprefix("-")], entries[flag.removeprefix("-")]


def _repository(tmp_path: Path, marker: Path | None = None) -> Path:
    repository = tmp_path / "models"
    repository.mkdir()
    for name in ("alpha", "beta"):
        write_identity_model(repository, name, "INT32")
    if marker is not None:
        # Loading this model leaves a mark: proof of whether any model was loaded.
        (repository / "alpha" / "1" / "model.py").write_text(
            textwrap.dedent(
                f"""
                from pathlib import Path

                class Model:
                    def initialize(self, config):
                        Path({str(marker)!r}).write_text("loaded")

                    def execute(self, inputs):
                        return {{"OUTPUT0": inputs["INPUT0"]}}
                """
            )
        )
    return repository


def _index(process: ConvoyProcess) -> dict[str, str]:
    rows = requests.post(f"{process.base_url}/v2/repository/index", timeout=10).json()
    return {row["name"]: row["state"] for row in rows}


def test_load_model_star_loads_every_model(tmp_path):
    process = ConvoyProcess(
        _repository(tmp_path),
        tmp_path / "server.log",
        ("--model-control-mode", "explicit", "--load-model", "*"),
    )
    for running in serve_until_stopped(process, "ready"):
        assert _index(running) == {"alpha": "READY", "beta": "READY"}


def test_load_model_named_loads_only_that_one(tmp_path):
    process = ConvoyProcess(
        _repository(tmp_path),
        tmp_path / "server.log",
        ("--model-control-mode", "explicit", "--load-model", "beta"),
    )
    for running in serve_until_stopped(process, "ready"):
        assert _index(running) == {"alpha": "UNAVAILABLE", "beta": "READY"}


def test_unknown_load_model_refuses_to_start(tmp_path):
    result = convoy(
        "serve",
        "--model-repository",
        str(_repository(tmp_path)),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "nosuch",
    )
    assert result.returncode != 0
    assert "--load-model nosuch: not in the model repository" in result.stderr
    assert "alpha, beta" in result.stderr


def test_load_model_without_explicit_mode_is_refused(tmp_path):
    result = convoy("serve", "--model-repository", str(_repository(tmp_path)), "--load-model", "alpha")
    assert result.returncode != 0
    assert "--load-model needs --model-control-mode explicit" in result.stderr


@pytest.mark.parametrize("flags", [("--metrics-port", "-1"), ("--allow-metrics", "false")])
def test_metrics_off_prints_minus_one_and_serves_no_metrics(tmp_path, flags):
    process = ConvoyProcess(_repository(tmp_path), tmp_path / "server.log", flags)
    for running in serve_until_stopped(process, "ready"):
        assert running.metrics_port == -1
        assert any(line.endswith("metrics=-1") for line in running.stdout_lines)


def test_triton_spellings_are_accepted(tmp_path):
    process = ConvoyProcess(
        _repository(tmp_path),
        tmp_path / "server.log",
        (
            "--exit-timeout-secs",
            "5",
            "--log-verbose",
            "1",
            "--http-address",
            "127.0.0.1",
            "--grpc-address",
            "127.0.0.1",
            "--allow-metrics",
            "true",
            "--strict-readiness",
            "true",
        ),
    )
    for running in serve_until_stopped(process, "ready"):
        assert requests.get(f"{running.base_url}/v2/health/ready", timeout=10).json() == {"ready": True}
        settings = requests.get(f"{running.base_url}/v2/logging", timeout=10).json()
        assert settings["log_verbose_level"] > 0  # --log-verbose 1: DEBUG


def test_different_http_and_grpc_addresses_are_refused(tmp_path):
    result = convoy(
        "serve",
        "--model-repository",
        str(_repository(tmp_path)),
        "--http-address",
        "127.0.0.1",
        "--grpc-address",
        "0.0.0.0",
    )
    assert result.returncode != 0
    assert "must name the same address" in result.stderr


def test_strict_readiness_false_is_ready_beside_a_failed_model(tmp_path):
    repository = _repository(tmp_path)
    (repository / "alpha" / "1" / "model.py").write_text("raise ImportError('broken on purpose')\n")
    process = ConvoyProcess(repository, tmp_path / "server.log", ("--strict-readiness", "false"))
    for running in serve_until_stopped(process, "ready"):
        assert _index(running)["alpha"] == "UNAVAILABLE"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_stops_start_up_before_any_model_loads(tmp_path, workers):
    marker = tmp_path / "alpha-loaded"
    repository = _repository(tmp_path, marker)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = convoy(
            "serve",
            "--model-repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
            "--workers",
            workers,
        )
    assert result.returncode == 1
    assert str(port) in result.stderr
    assert not marker.exists(), "a model was loaded before the port was found in use"


def test_demo_serves_what_the_installed_extras_allow_and_names_the_missing_extra():
    from convoy.cli import demo_models_served

    assert demo_models_served(lambda module: True) == (("add_sub", "text_embedding"), [])
    served, notes = demo_models_served(lambda module: module != "transformers")
    assert served == ("add_sub",)
    (note,) = notes
    assert "text_embedding" in note and "transformers" in note
    assert "pip install 'convoy-inference[text]'" in note


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_installs_runtime_extras_only_and_passes_flags_through(tmp_path):
    venv = tmp_path / "venv"  # not created: -n only prints what make would run
    dry = subprocess.run(
        ["make", "-n", "serve", f"VENV={venv}", "ARGS=--http-port 9000"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert "[dev]" not in dry.stdout
    assert "-e '.[text]'" in dry.stdout
    assert f"{venv}/bin/convoy serve --http-port 9000" in dry.stdout
    core = subprocess.run(
        ["make", "-n", "serve", f"VENV={venv}", "SERVE_EXTRAS="],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert "-e '.'" in core.stdout and "torch" not in core.stdout
