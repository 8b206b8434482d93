"""Keys change without a restart: `convoy keys create` / `revoke` on the served file take effect
(the server watches the file), SIGHUP rereads it even when nothing about the file looks changed,
and a broken file keeps the keys in force and says so in the log."""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests
from helpers import poll
from security_helpers import bearer, convoy_cli, create_key, start_keyed

from convoy.auth import digest


@pytest.fixture(scope="module")
def reloading(tmp_path_factory, frontend):
    yield from start_keyed(tmp_path_factory.mktemp("reload"), frontend=frontend)


def metadata_status(server, key: str) -> int:
    return requests.get(f"{server.process.base_url}/v2", headers=bearer(key), timeout=10).status_code


def test_created_and_revoked_keys_take_effect_without_restart(reloading):
    new_key = create_key(reloading.keys_file, "late_team", "add_sub")
    poll(lambda: metadata_status(reloading, new_key) == 200, "the new key to be accepted")
    convoy_cli("keys", "revoke", "--file", str(reloading.keys_file), "--name", "team_a")
    poll(
        lambda: metadata_status(reloading, reloading.keys["team_a"]) == 401,
        "the revoked key to be refused",
    )
    assert metadata_status(reloading, reloading.keys["admin"]) == 200
    assert "reloaded 3 API keys" in reloading.process.log()


def test_broken_key_file_keeps_the_keys_in_force(reloading):
    admin = reloading.keys["admin"]
    good = reloading.keys_file.read_text()
    reloading.keys_file.write_text('{"keys": [{"name": "half-written"')
    poll(lambda: "API keys not reloaded" in reloading.process.log(), "the reload error in the log")
    assert metadata_status(reloading, admin) == 200
    assert "not valid JSON" in reloading.process.log()
    # A file that parses but names a bad entry is refused the same way.
    reloading.keys_file.write_text(json.dumps({"keys": [{"name": "x", "sha256": "not-a-digest"}]}))
    poll(lambda: "sha256 must be 64 lowercase hex digits" in reloading.process.log(), "the second error")
    assert metadata_status(reloading, admin) == 200
    reloading.keys_file.write_text(good)


def test_sighup_rereads_the_key_file(reloading):
    """The file is rewritten in place with the same size and its old mtime, so only the signal
    can make the server notice."""
    path = reloading.keys_file
    document = json.loads(path.read_text())
    admin_entry = next(entry for entry in document["keys"] if entry["name"] == "admin")
    replacement = "cvy_" + "s" * 43  # same length as a generated key: the digest is what changes
    admin_entry["sha256"] = digest(replacement)
    before = path.stat()
    text = json.dumps(document, indent=2) + "\n"
    assert len(text) == before.st_size
    with path.open("r+") as handle:  # same inode
        handle.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
        before.st_mtime_ns,
        before.st_size,
        before.st_ino,
    )
    reloading.process.send_signal(signal.SIGHUP)
    poll(lambda: metadata_status(reloading, replacement) == 200, "the SIGHUP reload")
    assert metadata_status(reloading, reloading.keys["admin"]) == 401
