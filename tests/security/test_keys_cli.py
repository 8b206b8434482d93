"""`convoy keys create | list | revoke`: the plaintext is printed once and never stored, the file
is private to its owner, and mistakes get a clear message and a non-zero exit."""

from __future__ import annotations

import json
import stat

from security_helpers import convoy_cli, create_key

from convoy.auth import KEY_PREFIX, digest


def test_create_prints_the_key_once_and_stores_only_its_digest(tmp_path):
    path = tmp_path / "keys.json"
    key = create_key(path, "team-a", "add_sub, text_*", manage=False)
    admin = create_key(path, "ops", "*", manage=True)
    assert key.startswith(KEY_PREFIX) and len(key) > 40 and key != admin
    text = path.read_text()
    assert key not in text and admin not in text
    assert json.loads(text) == {
        "keys": [
            {"name": "team-a", "sha256": digest(key), "models": ["add_sub", "text_*"], "manage": False},
            {"name": "ops", "sha256": digest(admin), "models": ["*"], "manage": True},
        ]
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_list_shows_names_and_scopes_never_keys(tmp_path):
    path = tmp_path / "keys.json"
    key = create_key(path, "team-a", "add_*")
    listed = convoy_cli("keys", "list", "--file", str(path)).stdout
    assert listed.splitlines() == ["team-a\tmodels=add_*\tmanage=no"]
    assert key not in listed


def test_the_file_can_come_from_the_environment(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, "team-a", "*")
    listed = convoy_cli("keys", "list", env={"CONVOY_API_KEYS_FILE": str(path)}).stdout
    assert listed.startswith("team-a\t")
    missing = convoy_cli("keys", "list", check=False)
    assert missing.returncode == 2
    assert "give --file or set $CONVOY_API_KEYS_FILE" in missing.stderr


def test_revoke_removes_only_the_named_key(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, "team-a", "*")
    kept = create_key(path, "team-b", "*")
    convoy_cli("keys", "revoke", "--file", str(path), "--name", "team-a")
    assert [entry["sha256"] for entry in json.loads(path.read_text())["keys"]] == [digest(kept)]
    again = convoy_cli("keys", "revoke", "--file", str(path), "--name", "team-a", check=False)
    assert again.returncode == 1
    assert f"no key named 'team-a' in {path}" in again.stderr


def test_mistakes_are_refused_with_a_message(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, "team-a", "*")
    duplicate = convoy_cli("keys", "create", "--file", str(path), "--name", "team-a", check=False)
    assert duplicate.returncode == 1
    assert "already has a key named 'team-a'" in duplicate.stderr
    bad_name = convoy_cli("keys", "create", "--file", str(path), "--name", "a b", check=False)
    assert bad_name.returncode == 1
    assert "keys[1].name: expected 1-64 letters, digits" in bad_name.stderr
    assert bad_name.stdout == ""  # no key is printed when none was stored
    path.write_text("not json")
    broken = convoy_cli("keys", "list", "--file", str(path), check=False)
    assert broken.returncode == 1
    assert f"{path}: not valid JSON" in broken.stderr


def test_serve_refuses_a_broken_key_file_and_protection_without_keys(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text('{"keys": {}}')
    broken = convoy_cli(
        "serve",
        "--api-keys",
        str(path),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "-1",
        check=False,
    )
    assert broken.returncode == 1
    assert f"{path}: expected an object with a 'keys' list" in broken.stderr
    unkeyed = convoy_cli("serve", "--auth-health", "protected", check=False)
    assert unkeyed.returncode != 0
    assert "--auth-health protected needs --api-keys" in unkeyed.stderr
    half_tls = convoy_cli("serve", "--tls-cert", str(path), check=False)
    assert half_tls.returncode != 0
    assert "--tls-cert and --tls-key go together" in half_tls.stderr
