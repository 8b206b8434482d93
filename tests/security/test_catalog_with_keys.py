"""With API keys, the catalog needs a key, lists only the models the key may use, and its
snippets send the caller's key from CONVOY_API_KEY (never a key of their own)."""

from __future__ import annotations

import os
import subprocess
import sys

import requests

SNIPPETS = ("curl", "python_grpc", "python_http", "python_requests")


def run_snippet(kind: str, code: str, key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CONVOY_API_KEY"}
    if key is not None:
        env["CONVOY_API_KEY"] = key
    command = ["bash", "-c", code] if kind == "curl" else [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def test_catalog_needs_a_key_and_shows_only_its_models(keyed):
    url = f"{keyed.process.base_url}/catalog.json"
    assert requests.get(url, timeout=5).status_code == 401
    bad_key = {"Authorization": "Bearer not-a-key"}
    assert (
        requests.get(f"{keyed.process.base_url}/catalog", headers=bad_key, timeout=5).status_code == 401
    )
    team = requests.get(url, headers=keyed.headers("team_a"), timeout=5).json()
    assert [m["name"] for m in team["models"]] == ["add_sub"]
    admin = requests.get(url, headers=keyed.headers("admin"), timeout=5).json()
    assert {m["name"] for m in admin["models"]} >= {"add_sub", "private_model"}
    page = requests.get(f"{keyed.process.base_url}/catalog", headers=keyed.headers("team_a"), timeout=5)
    assert page.status_code == 200 and "private_model" not in page.text


def test_snippets_send_the_callers_key_from_the_environment(keyed):
    document = requests.get(
        f"{keyed.process.base_url}/catalog.json", headers=keyed.headers("team_a"), timeout=5
    ).json()
    (add_sub,) = document["models"]
    for kind in SNIPPETS:
        code = add_sub["snippets"][kind]
        assert "CONVOY_API_KEY" in code
        assert all(key not in code for key in keyed.keys.values())
        served = run_snippet(kind, code, keyed.keys["team_a"])
        assert served.returncode == 0, f"{kind}: {served.stderr}"
        assert "OUTPUT0" in served.stdout and "OUTPUT1" in served.stdout, served.stdout
        refused = run_snippet(kind, code, "not-a-key")
        assert "OUTPUT0" not in refused.stdout, f"{kind} was served with a bad key"


def test_a_browser_without_a_key_gets_a_prompt_that_opens_the_catalog_with_one(keyed):
    """No Authorization header (a browser): a page asking for the key, with no model in it; its
    script fetches the catalog with the key it keeps for the tab and the live refresh sends it."""
    prompt = requests.get(f"{keyed.process.base_url}/catalog", timeout=5)
    assert prompt.status_code == 200
    assert prompt.headers["content-type"].startswith("text/html")
    assert 'type="password"' in prompt.text
    assert "add_sub" not in prompt.text and "private_model" not in prompt.text
    assert 'sessionStorage.setItem("convoy.key"' in prompt.text
    assert 'Authorization: "Bearer " + key' in prompt.text
    # What the prompt's script fetches with the key: the catalog, whose refresh sends it too.
    page = requests.get(f"{keyed.process.base_url}/catalog", headers=keyed.headers("team_a"), timeout=5)
    assert page.status_code == 200 and "add_sub" in page.text
    assert 'sessionStorage.getItem("convoy.key")' in page.text
    assert requests.get(f"{keyed.process.base_url}/catalog.json", timeout=5).status_code == 401
