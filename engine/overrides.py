"""Triton's load parameters: a JSON `config` that stands in for config.pbtxt for one load, and
`file:<version>/<name>` contents that stand in for the model's files.

Front ends turn their wire parameters into plain Python values (str, bytes, bool, int) and call
`parse_load_parameters`; the repository loads from what it returns. Override files are written
to a private per-load directory, never into the user's repository (see `materialise`).
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from google.protobuf import json_format

from convoy.errors import InvalidInput
from convoy.protos import model_config_pb2 as mc

FILE_PREFIX = "file:"


@dataclass(frozen=True, slots=True)
class LoadOverrides:
    """What a RepositoryModelLoad asked to use instead of the repository's own files."""

    #: Replaces config.pbtxt for this load (None: read config.pbtxt).
    config: mc.ModelConfig | None = None
    #: "<version>/<relative path>" -> contents. When given, the model is loaded from these files
    #: alone (Triton's rule), in a private directory.
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.config is None and not self.files


def parse_load_parameters(name: str, parameters: dict[str, object], base64_files: bool) -> LoadOverrides:
    """Validate a load request's parameters. `base64_files`: file contents arrive as base64
    strings (HTTP JSON) rather than bytes (gRPC bytes_param). Raises InvalidInput naming the
    parameter and what was expected."""
    config = None
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if key == "config":
            config = _parse_config(name, value)
        elif key.startswith(FILE_PREFIX):
            relative = _file_path(key)
            files[relative] = _file_contents(key, value, base64_files)
        elif key == "unload_dependents":
            continue  # an unload parameter some clients send on load too; nothing to depend on
        else:
            raise InvalidInput(
                f"load parameter '{key}' is not supported; expected 'config' (JSON model "
                "configuration) or 'file:<version>/<file name>' (model file contents)"
            )
    if files and config is None:
        raise InvalidInput(
            "load parameter 'config': required with 'file:' overrides (the model is loaded from "
            "the given files alone, so its configuration must come with them)"
        )
    return LoadOverrides(config, files)


def _parse_config(name: str, value: object) -> mc.ModelConfig:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("load parameter 'config': expected UTF-8 JSON text") from None
    if isinstance(value, dict):  # an HTTP client that sent the object itself, not its text
        document = value
    elif isinstance(value, str):
        try:
            document = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"load parameter 'config': not valid JSON: {exc}") from None
    else:
        raise InvalidInput(
            f"load parameter 'config': expected a JSON model configuration string, got "
            f"{type(value).__name__}"
        )
    if not isinstance(document, dict):
        raise InvalidInput("load parameter 'config': expected a JSON object (a ModelConfig)")
    proto = mc.ModelConfig()
    try:
        json_format.ParseDict(document, proto)
    except json_format.ParseError as exc:
        raise InvalidInput(f"load parameter 'config': {exc}") from None
    if proto.name and proto.name != name:
        raise InvalidInput(
            f"load parameter 'config': name: '{proto.name}' must be the loaded model's name '{name}'"
        )
    return proto


def _file_path(key: str) -> str:
    """Where a `file:` override goes, relative to the model's folder. As Triton does, the path
    is joined to the folder (leading slashes dropped: `file:/1/model.py` is `1/model.py`) and
    normalised; it must stay inside the folder. config.pbtxt comes from `config` only."""
    relative = key[len(FILE_PREFIX) :]
    if "\\" in relative or "\x00" in relative:
        raise InvalidInput(
            f"load parameter '{key}': expected 'file:<version>/<file name>' without '\\' or NUL"
        )
    parts: list[str] = []
    for part in relative.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidInput(
                    f"load parameter '{key}': the path must stay within the model's folder "
                    "(expected 'file:<version>/<file name>')"
                )
            parts.pop()
            continue
        parts.append(part)
    if not parts:
        raise InvalidInput(f"load parameter '{key}': expected 'file:<version>/<file name>'")
    if parts == ["config.pbtxt"]:
        raise InvalidInput(
            f"load parameter '{key}': the configuration comes from the load parameter 'config'"
        )
    return str(PurePosixPath(*parts))


def _file_contents(key: str, value: object, base64_files: bool) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and base64_files:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(
                f"load parameter '{key}': expected base64-encoded file contents"
            ) from None
    expected = "base64-encoded file contents" if base64_files else "bytes"
    raise InvalidInput(f"load parameter '{key}': expected {expected}, got {type(value).__name__}")


def materialise(name: str, overrides: LoadOverrides) -> Path:
    """Write the override files to a fresh private directory; returns its model folder
    (<tmp>/<name>). The caller removes it with `discard` when the load is replaced."""
    root = Path(tempfile.mkdtemp(prefix="convoy-load-"))
    model_dir = root / name
    try:
        for relative, contents in overrides.files.items():
            target = model_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(contents)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return model_dir


def discard(model_dir: Path | None) -> None:
    """Remove a private directory made by `materialise` (its parent is the temporary root)."""
    if model_dir is not None:
        shutil.rmtree(model_dir.parent, ignore_errors=True)
