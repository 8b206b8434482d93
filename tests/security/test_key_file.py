"""The key file format and scope matching (convoy/auth.py), without a server: every mistake is
named by file and entry, globs match whole model names, and a key is found only by its digest."""

from __future__ import annotations

import json

import pytest

from convoy.auth import ApiKey, Keyring, digest, new_key, parse_keys, write_key_file
from convoy.errors import InvalidConfig, PermissionDenied, Unauthenticated


def entry(name="team-a", key="k", models=("*",), manage=False) -> dict:
    return {"name": name, "sha256": digest(key), "models": list(models), "manage": manage}


def document(*entries) -> str:
    return json.dumps({"keys": list(entries)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "keys.json: expected an object with a 'keys' list"),
        ('{"keys": [1]}', "keys.json: keys[0]: expected an object"),
        (document({**entry(), "name": ""}), "keys.json: keys[0].name: expected 1-64 letters"),
        (document({**entry(), "sha256": "abc"}), "keys.json: key 'team-a': sha256 must be 64"),
        (document({**entry(), "models": "add_sub"}), "key 'team-a': models must be a list"),
        (document({**entry(), "manage": "yes"}), "key 'team-a': manage must be true or false"),
        (document(entry(key="a"), entry(key="b")), "key 'team-a': the name appears more than once"),
        (document(entry(), entry(name="team-b")), "key 'team-b': the same key is listed twice"),
    ],
)
def test_mistakes_name_the_file_and_the_entry(text, message):
    with pytest.raises(InvalidConfig) as caught:
        parse_keys(text, "keys.json")
    assert message in str(caught.value)


def test_globs_match_whole_model_names():
    key = ApiKey("team-a", digest("k"), ("add_*", "bert"))
    assert key.allows("add_sub") and key.allows("add_") and key.allows("bert")
    assert not key.allows("xadd_sub")
    assert not key.allows("bert-large")
    assert not key.allows("text_embedding")
    assert not ApiKey("none", digest("k"), ()).allows("add_sub")
    assert ApiKey("all", digest("k"), ("*",)).allows("anything/at all")


def test_a_key_is_known_only_by_its_digest_and_checked_for_scope(tmp_path):
    plaintext = new_key()
    path = tmp_path / "keys.json"
    write_key_file(path, [ApiKey("team-a", digest(plaintext), ("add_*",), manage=False)])
    assert plaintext not in path.read_text()
    keys = Keyring(path)
    assert keys.authorize(f"Bearer {plaintext}", "add_sub").name == "team-a"
    assert keys.authorize(f"  bearer   {plaintext} ").name == "team-a"
    for presented in (None, "", plaintext, f"Basic {plaintext}", f"Bearer {plaintext}x", "Bearer "):
        with pytest.raises(Unauthenticated):
            keys.authorize(presented)
    with pytest.raises(PermissionDenied, match="may not use model 'bert'"):
        keys.authorize(f"Bearer {plaintext}", "bert")
    with pytest.raises(PermissionDenied, match="may not use the management APIs"):
        keys.authorize(f"Bearer {plaintext}", manage=True)


def test_reload_keeps_the_keys_in_force_when_the_file_breaks(tmp_path):
    first, second = new_key(), new_key()
    path = tmp_path / "keys.json"
    write_key_file(path, [ApiKey("one", digest(first), ("*",))])
    keys = Keyring(path)
    path.write_text("{broken")
    assert keys.reload_if_changed() is False
    assert keys.authorize(f"Bearer {first}").name == "one"
    write_key_file(path, [ApiKey("two", digest(second), ("*",))])
    assert keys.reload_if_changed() is True
    assert keys.authorize(f"Bearer {second}").name == "two"
    with pytest.raises(Unauthenticated):
        keys.authorize(f"Bearer {first}")
    assert keys.reload_if_changed() is False  # unchanged file: no reread
