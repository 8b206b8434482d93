"""Type-checks the convoy package with mypy, strict by default (`make typecheck`, part of
`make test`).

mypy cannot see the package as it installs: setuptools maps top-level folders to convoy.*
names (pyproject's [tool.setuptools] package-dir: convoy.server = server, ...) and an editable
install resolves them with an import hook mypy does not run. So this script lays out the package
as installed, a tree of symlinks under build/typecheck/src/convoy/, runs mypy on it (its cache in
build/typecheck/), and rewrites the paths mypy reports back to the repository's files
(build/typecheck/src/convoy/server/app.py is reported as server/app.py). The exit status is
mypy's.

The settings are pyproject's [tool.mypy], with its burn-down list: modules that do not pass
strict yet, whose errors are ignored. `--burn-down` checks every module strictly, the list
disregarded, and says which modules fail: what the list should be, so a module that passes now
can leave it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "convoy"
BUILD = ROOT / "build" / "typecheck"
TREE = BUILD / "src"
#: mypy reports files relative to TREE (its working directory): convoy/server/app.py.
REPORTED_PATH = re.compile(r"(?<![\w/.])" + PACKAGE + r"(?:/[\w.-]+)+\.pyi?\b")


def package_dirs(pyproject: dict) -> dict[str, Path]:
    """convoy.* package name -> its folder in the repository, from setuptools' package-dir."""
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    dirs = {name: ROOT / folder for name, folder in mapping.items() if name.split(".")[0] == PACKAGE}
    if PACKAGE not in dirs:
        raise SystemExit(f"typecheck: pyproject.toml's package-dir does not map '{PACKAGE}'")
    return dirs


def build_tree(dirs: dict[str, Path]) -> dict[Path, Path]:
    """Lay out the package as installed under TREE; returns tree folder -> repository folder.

    A package with mapped subpackages below it (convoy itself) is a real folder holding a link
    to each of its own entries and one to each subpackage's folder; any other package is one
    link to its folder. A name that a package's folder and a mapped subpackage both claim is an
    error, so every module resolves to exactly one file.
    """
    if TREE.exists():
        shutil.rmtree(TREE)
    TREE.mkdir(parents=True)
    places: dict[Path, Path] = {}
    for name in sorted(dirs, key=lambda n: n.count(".")):
        source = dirs[name]
        if not source.is_dir():
            raise SystemExit(f"typecheck: package '{name}' maps to {source}, which is not a folder")
        place = TREE.joinpath(*name.split("."))
        if not place.parent.is_dir():
            raise SystemExit(f"typecheck: package '{name}' has no mapped parent package")
        children = {n.rpartition(".")[2] for n in dirs if n.rpartition(".")[0] == name}
        places[place] = source
        if not children:
            place.symlink_to(os.path.relpath(source, place.parent), target_is_directory=True)
            continue
        place.mkdir()
        for entry in sorted(source.iterdir()):
            stem = entry.name.split(".")[0]
            if stem in children:
                raise SystemExit(
                    f"typecheck: {entry.relative_to(ROOT)} and package '{name}.{stem}' "
                    "(package-dir) claim the same module"
                )
            if entry.name != "__pycache__":
                (place / entry.name).symlink_to(os.path.relpath(entry, place))
    return places


def repository_path(reported: str, places: dict[Path, Path]) -> str:
    """The repository file behind a path mypy reported relative to TREE."""
    path = TREE / reported
    # The deepest package folder holding the path (convoy/server before convoy).
    for place in sorted(places, key=lambda p: len(p.parts), reverse=True):
        if path.is_relative_to(place):
            return str((places[place] / path.relative_to(place)).relative_to(ROOT))
    return reported


def strict_config(pyproject: dict) -> Path:
    """A mypy config with pyproject's settings less the burn-down list (its ignore_errors)."""
    settings = pyproject["tool"]["mypy"]
    lines = ["[mypy]"]
    lines += [f"{key} = {ini_value(value)}" for key, value in settings.items() if key != "overrides"]
    for override in settings.get("overrides", []):
        options = {k: v for k, v in override.items() if k not in ("module", "ignore_errors")}
        modules = override["module"]
        if not options:
            continue
        lines.append(f"[mypy-{ini_value(modules)}]")
        lines += [f"{key} = {ini_value(value)}" for key, value in options.items()]
    config = BUILD / "strict.ini"
    config.write_text("\n".join(lines) + "\n")
    return config


def ini_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def run_mypy(config: Path, cache: Path, places: dict[Path, Path]) -> tuple[int, set[str]]:
    """Run mypy on the tree, echoing its report with repository paths; returns its exit status
    and the repository files it reported errors in."""
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(config),
        "--cache-dir",
        str(cache),
        "-p",
        PACKAGE,
    ]
    # From TREE: mypy looks for modules in its working directory first, where the repository's
    # own convoy/ folder (without the mapped subpackages) would otherwise be found.
    process = subprocess.Popen(command, cwd=TREE, stdout=subprocess.PIPE, text=True)
    failing: set[str] = set()
    assert process.stdout is not None
    for line in process.stdout:
        line = REPORTED_PATH.sub(lambda m: repository_path(m.group(0), places), line)
        path, _, rest = line.partition(":")
        if " error: " in rest:
            failing.add(path)
        sys.stdout.write(line)
    return process.wait(), failing


def module_name(path: str, places: dict[Path, Path]) -> str:
    """The convoy.* module a repository file is (server/app.py: convoy.server.app)."""
    file = ROOT / path
    for place, source in sorted(places.items(), key=lambda p: len(p[1].parts), reverse=True):
        if file.is_relative_to(source):
            inside = file.relative_to(source).with_suffix("")
            parts = [*place.relative_to(TREE).parts, *inside.parts]
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--burn-down",
        action="store_true",
        help="check every module strictly, the burn-down list disregarded, and print what it should be",
    )
    args = parser.parse_args()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    places = build_tree(package_dirs(pyproject))
    if not args.burn_down:
        status, _ = run_mypy(ROOT / "pyproject.toml", BUILD / ".mypy_cache", places)
        return status
    status, failing = run_mypy(strict_config(pyproject), BUILD / ".mypy_cache_strict", places)
    modules = sorted(module_name(path, places) for path in failing)
    listed = set()
    for override in pyproject["tool"]["mypy"].get("overrides", []):
        if override.get("ignore_errors"):
            modules_listed = override["module"]
            listed.update([modules_listed] if isinstance(modules_listed, str) else modules_listed)
    print(f"\nburn-down: {len(modules)} modules fail strict; the list should be:")
    print("module = [\n" + "".join(f'    "{m}",\n' for m in modules) + "]")
    for name in sorted(listed - set(modules)):
        print(f"burn-down: {name} passes strict (or is not a module): take it off the list")
    for name in sorted(set(modules) - listed):
        print(f"burn-down: {name} fails strict and is not on the list")
    return status


if __name__ == "__main__":
    sys.exit(main())
