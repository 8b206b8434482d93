"""Model code namespaces: a python-backend model's model.py and the modules beside it, imported
the way Triton's stub imports them, yet private to one model instance.

Triton runs each instance in a stub process of its own with the version folder and the model
folder on `sys.path`, so `import helper` finds the model's helper.py and two models' helper.py
never meet. Convoy's instances share the server's process (unless `isolation: process`), and
`sys.modules` is one table, so each instance gets a package of its own, `convoy_model_<name>_<n>`,
whose `__path__` is [version folder, model folder]: model.py is `<package>.model`, helper.py
`<package>.helper`. An absolute import written in that package's code (`import helper`,
`from model_common import f`, `import model`) of a name the package provides and the environment
does not (Triton puts the model's folders *after* the environment's on sys.path) is resolved in
the package: the import hook below (builtins.__import__, as plugin loaders do it) looks at the
importing module's name and nothing else, so every other import costs one dictionary look-up.

While model.py itself loads, its folders are also on `sys.path` (model code that imports with
`importlib.import_module("helper")` or scans sys.path finds them there); modules imported that
way are taken out of `sys.modules` after the load, so the next model does not see them.

The hook and the table of namespaces are process-wide by nature (there is one __import__).
"""

from __future__ import annotations

import builtins
import importlib.machinery
import importlib.util
import itertools
import re
import sys
import threading
import types
from pathlib import Path

PREFIX = "convoy_model_"

_lock = threading.RLock()
_ids = itertools.count()
#: package name -> its namespace (read by the import hook without the lock: dict reads are atomic).
_namespaces: dict[str, ModelNamespace] = {}
_original_import = builtins.__import__


class ModelNamespace:
    """The package holding one model instance's code; `load` imports its model file."""

    def __init__(self, label: str, folders: list[Path]) -> None:
        self.package = f"{PREFIX}{_identifier(label)}_{next(_ids)}"
        self.folders = [str(folder) for folder in folders]
        self._provides: dict[str, bool] = {}
        package = types.ModuleType(self.package)
        package.__path__ = list(self.folders)
        package.__package__ = self.package
        package.__spec__ = importlib.machinery.ModuleSpec(self.package, None, is_package=True)
        package.__spec__.submodule_search_locations = package.__path__
        with _lock:
            _install_hook()
            sys.modules[self.package] = package
            _namespaces[self.package] = self

    def load(self, path: Path) -> types.ModuleType:
        """Import the model file `path` as `<package>.<stem>` (`<package>.model` for model.py),
        with the model's folders on sys.path meanwhile. Raises what the import raised."""
        name = f"{self.package}.{_identifier(path.stem)}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{path} cannot be imported")
        module = importlib.util.module_from_spec(spec)
        with _lock:
            before = set(sys.modules)
            added = [folder for folder in self.folders if folder not in sys.path]
            sys.path.extend(added)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            finally:
                for folder in added:
                    sys.path.remove(folder)
                self._evict(set(sys.modules) - before)
        return module

    def _evict(self, names: set[str]) -> None:
        """Take out of sys.modules what the load imported from the model's folders under a
        top-level name (importlib.import_module and the like), so other models cannot see it."""
        for name in names:
            if name.startswith(PREFIX):
                continue
            module = sys.modules.get(name)
            origin = getattr(module, "__file__", None) or ""
            if any(origin.startswith(folder + "/") for folder in self.folders):
                del sys.modules[name]

    def provides(self, top: str) -> bool:
        """Whether `import top` in this package's code means the model's own file: the model's
        folders have it and the environment (sys.path) does not, as with Triton's path order."""
        found = self._provides.get(top)
        if found is None:
            # The environment's path without the model's own folders (on it while model.py loads).
            environment = [entry for entry in sys.path if entry not in self.folders]
            found = (
                top not in sys.builtin_module_names
                and importlib.machinery.PathFinder.find_spec(top, self.folders) is not None
                and top not in sys.modules
                and importlib.machinery.PathFinder.find_spec(top, environment) is None
            )
            self._provides[top] = found
        return found

    def close(self) -> None:
        """Forget the package and everything imported into it (the instance is gone)."""
        with _lock:
            _namespaces.pop(self.package, None)
            prefix = self.package + "."
            for name in [n for n in sys.modules if n == self.package or n.startswith(prefix)]:
                del sys.modules[name]


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _install_hook() -> None:
    if builtins.__import__ is not _model_import:
        builtins.__import__ = _model_import


def _model_import(name, globals=None, locals=None, fromlist=(), level=0):
    """builtins.__import__, resolving a model package's absolute imports of its own modules in
    the package (see the module docstring)."""
    if level == 0 and globals is not None:
        importer = globals.get("__name__")
        if importer is not None and importer.startswith(PREFIX):
            space = _namespaces.get(importer.partition(".")[0])
            top = name.partition(".")[0]
            if space is not None and space.provides(top):
                module = _original_import(f"{space.package}.{name}", globals, locals, fromlist, 0)
                if fromlist:
                    return module
                return sys.modules[f"{space.package}.{top}"]
    return _original_import(name, globals, locals, fromlist, level)
