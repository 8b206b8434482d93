"""The serve settings table (convoy/settings.py) is the one definition of `convoy serve`'s flags:
every flag parses as before, the ServerConfig built from the defaults is ServerConfig's own,
refusals name the flag, and README.md's table is the rendered one."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, write_identity_model

from convoy.config import FlagError, ServerConfig
from convoy.settings import (
    README,
    SETTINGS,
    add_serve_arguments,
    build_config,
    readme_with_table,
)

#: `convoy serve` before the settings table (issue 29): what the command line parses to with no
#: flags, and what each flag with a sample value parses to (paths as text).
OLD_DEFAULTS = {
    "model_repository": None,
    "host": "0.0.0.0",
    "protocol_addresses": [],
    "http_port": 8000,
    "grpc_port": 8001,
    "metrics_port": 8002,
    "allow_metrics": True,
    "metrics_config": [],
    "allow_gpu_metrics": True,
    "allow_cpu_metrics": True,
    "metrics_interval_ms": 2000,
    "cache_config": [],
    "response_cache_byte_size": 0,
    "max_queue_size": 8192,
    "grpc_max_message_bytes": 268435456,
    "http_max_body_bytes": 268435456,
    "http_max_json_bytes": 16777216,
    "http_max_head_bytes": 65536,
    "http_max_headers": 100,
    "header_timeout": 5.0,
    "max_connections": 0,
    "execution_timeout": 0.0,
    "isolation": "thread",
    "workers": "1",
    "frontend": None,
    "native_threads": 0,
    "ipc_arena_mb": 64,
    "shutdown_grace": 30.0,
    "strict_readiness": True,
    "model_control_mode": "none",
    "allow_client_shm": False,
    "server_name": "convoy",
    "repository_poll_secs": 15.0,
    "rollout_state": None,
    "load_model": [],
    "log_level": "INFO",
    "log_verbose": 0,
    "log_format": "text",
    "access_log": "",
    "trace_otlp_endpoint": "",
    "trace_console": False,
    "trace_config": [],
    "api_keys": None,
    "auth_health": "open",
    "auth_metrics": None,
    "tls_cert": None,
    "tls_key": None,
    "tls_client_ca": None,
    "usage_ledger": None,
    "usage_interval": 60.0,
    "payload_log_dir": None,
    "payload_log_max_bytes": 104857600,
    "payload_log_backups": 5,
    "payload_log_max_elements": 65536,
    "payload_log_queue_size": 1024,
    "capacity_report": [],
}
OLD_SAMPLES = [
    (("--model-repository", "x1"), "model_repository", "x1"),
    (("--model-store", "x1"), "model_repository", "x1"),
    (("--host", "x1"), "host", "x1"),
    (("--http-address", "x1"), "protocol_addresses", ["x1"]),
    (("--grpc-address", "x1"), "protocol_addresses", ["x1"]),
    (("--http-port", "7"), "http_port", 7),
    (("--grpc-port", "7"), "grpc_port", 7),
    (("--metrics-port", "7"), "metrics_port", 7),
    (("--allow-metrics", "false"), "allow_metrics", False),
    (("--metrics-config", "x1"), "metrics_config", ["x1"]),
    (("--allow-gpu-metrics", "false"), "allow_gpu_metrics", False),
    (("--allow-cpu-metrics", "false"), "allow_cpu_metrics", False),
    (("--metrics-interval-ms", "7"), "metrics_interval_ms", 7),
    (("--cache-config", "x1"), "cache_config", ["x1"]),
    (("--response-cache-byte-size", "7"), "response_cache_byte_size", 7),
    (("--max-queue-size", "7"), "max_queue_size", 7),
    (("--grpc-max-message-bytes", "7"), "grpc_max_message_bytes", 7),
    (("--http-max-body-bytes", "7"), "http_max_body_bytes", 7),
    (("--http-max-json-bytes", "7"), "http_max_json_bytes", 7),
    (("--http-max-head-bytes", "7"), "http_max_head_bytes", 7),
    (("--http-max-headers", "7"), "http_max_headers", 7),
    (("--header-timeout", "2.5"), "header_timeout", 2.5),
    (("--max-connections", "7"), "max_connections", 7),
    (("--execution-timeout", "2.5"), "execution_timeout", 2.5),
    (("--isolation", "process"), "isolation", "process"),
    (("--workers", "x1"), "workers", "x1"),
    (("--frontend", "python"), "frontend", "python"),
    (("--native-threads", "7"), "native_threads", 7),
    (("--ipc-arena-mb", "7"), "ipc_arena_mb", 7),
    (("--shutdown-grace", "2.5"), "shutdown_grace", 2.5),
    (("--exit-timeout-secs", "2.5"), "shutdown_grace", 2.5),
    (("--strict-readiness", "false"), "strict_readiness", False),
    (("--model-control-mode", "poll"), "model_control_mode", "poll"),
    (("--allow-client-shm", "true"), "allow_client_shm", True),
    (("--allow-client-shm",), "allow_client_shm", True),
    (("--server-name", "x1"), "server_name", "x1"),
    (("--id", "x1"), "server_name", "x1"),
    (("--repository-poll-secs", "2.5"), "repository_poll_secs", 2.5),
    (("--rollout-state", "x1"), "rollout_state", "x1"),
    (("--load-model", "x1"), "load_model", ["x1"]),
    (("--log-level", "ERROR"), "log_level", "ERROR"),
    (("--log-verbose", "7"), "log_verbose", 7),
    (("--log-format", "json"), "log_format", "json"),
    (("--access-log", "x1"), "access_log", "x1"),
    (("--access-log",), "access_log", "-"),
    (("--trace-otlp-endpoint", "x1"), "trace_otlp_endpoint", "x1"),
    (("--trace-console",), "trace_console", True),
    (("--trace-config", "x1"), "trace_config", ["x1"]),
    (("--api-keys", "x1"), "api_keys", "x1"),
    (("--auth-health", "protected"), "auth_health", "protected"),
    (("--auth-metrics", "protected"), "auth_metrics", "protected"),
    (("--tls-cert", "x1"), "tls_cert", "x1"),
    (("--tls-key", "x1"), "tls_key", "x1"),
    (("--tls-client-ca", "x1"), "tls_client_ca", "x1"),
    (("--usage-ledger", "x1"), "usage_ledger", "x1"),
    (("--usage-interval", "2.5"), "usage_interval", 2.5),
    (("--payload-log-dir", "x1"), "payload_log_dir", "x1"),
    (("--payload-log-max-bytes", "7"), "payload_log_max_bytes", 7),
    (("--payload-log-backups", "7"), "payload_log_backups", 7),
    (("--payload-log-max-elements", "7"), "payload_log_max_elements", 7),
    (("--payload-log-queue-size", "7"), "payload_log_queue_size", 7),
    (("--capacity-report", "x1"), "capacity_report", ["x1"]),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


def _plain(value: object) -> object:
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def test_every_old_flag_parses_to_the_same_value(monkeypatch):
    monkeypatch.delenv("CONVOY_API_KEYS_FILE", raising=False)
    parser = _parser()
    assert {k: _plain(v) for k, v in vars(parser.parse_args([])).items()} == OLD_DEFAULTS
    for argv, dest, value in OLD_SAMPLES:
        assert _plain(getattr(parser.parse_args(list(argv)), dest)) == value, argv


def test_flags_are_declared_once():
    flags = [flag for setting in SETTINGS for flag in setting.flags]
    assert len(flags) == len(set(flags))
    names = [setting.name for setting in SETTINGS]
    assert len(names) == len(set(names))


def test_default_command_line_builds_the_default_server_config(tmp_path, monkeypatch):
    monkeypatch.delenv("CONVOY_API_KEYS_FILE", raising=False)
    write_identity_model(tmp_path, "alpha", "INT32")
    args = _parser().parse_args(["--model-repository", str(tmp_path)])
    assert build_config(args, tmp_path / "unused") == ServerConfig(model_repository=tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-queue-size", "-1"], "--max-queue-size must be positive, got -1"),
        (["--http-port", "70000"], "--http-port must be from 0 to 65535, got 70000"),
        (["--metrics-port", "-2"], "--metrics-port must be from -1 to 65535, got -2"),
        (["--ipc-arena-mb", "-1"], "--ipc-arena-mb must be 0 or more, got -1"),
        (["--native-threads", "-3"], "--native-threads must be 0 or more, got -3"),
        (["--metrics-interval-ms", "0"], "--metrics-interval-ms must be positive, got 0"),
        (["--exit-timeout-secs", "-1"], "--shutdown-grace must be 0 or more, got -1.0"),
        (["--workers", "0"], "--workers must be a whole number of at least 1 or 'auto', got 0"),
        (["--server-name", " "], "--server-name must not be empty"),
        (
            ["--model-control-mode", "poll", "--repository-poll-secs", "0"],
            "--repository-poll-secs must be positive, got 0.0",
        ),
    ],
)
def test_a_setting_out_of_bounds_is_refused_naming_the_flag(tmp_path, argv, message):
    args = _parser().parse_args(["--model-repository", str(tmp_path), *argv])
    with pytest.raises(FlagError) as refused:
        build_config(args, tmp_path)
    assert str(refused.value) == message


BAD = ("--max-queue-size", "-1")


def test_serve_exits_with_the_refusal_before_loading(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "convoy", "serve", "--model-repository", str(tmp_path), *BAD],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "convoy: --max-queue-size must be positive, got -1"


def test_readme_table_is_the_rendered_settings_table():
    written = README.read_text()
    assert written == readme_with_table(written), (
        "README.md's table of serve settings differs from convoy/settings.py's SETTINGS; "
        "regenerate it with: python -m convoy.settings --readme"
    )
