"""`--model-control-mode poll`: watch the model repository and load what changed.

Every `interval` seconds the repository folder is scanned (on a thread: it is file-system work).
A model folder that appeared or whose files changed is (re)loaded, which rolls its versions out
(engine/repository.py: new versions warm up before they take traffic, the old ones drain); a
model folder that disappeared is unloaded. A change is acted on once it has held still for one
poll, so a version folder still being copied is not loaded half-written.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from convoy.engine.repository import ModelRepository

log = logging.getLogger("convoy.poller")


def fingerprint(path: Path) -> str:
    """A digest of every file under `path` (relative name, size, modification time); "" when
    the path does not exist."""
    if not path.exists():
        return ""
    digest = hashlib.blake2b(digest_size=16)
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            file = Path(folder) / name
            try:
                stat = file.stat()
            except OSError:
                continue
            relative = file.relative_to(path)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class RepositoryPoller:
    """Scans the repository every `interval` seconds; `run` until cancelled."""

    def __init__(self, repository: ModelRepository, interval: float) -> None:
        self.repository = repository
        self.interval = interval
        #: model name -> fingerprint of the files last loaded (or last seen at start).
        self._loaded: dict[str, str] = {}
        #: model name -> fingerprint seen by the previous scan (a change must hold for a poll).
        self._seen: dict[str, str] = {}

    def _scan(self) -> dict[str, str]:
        root = self.repository.root
        return {name: fingerprint(root / name) for name in self.repository.model_names()}

    async def baseline(self) -> None:
        """Remember the repository as it is before the start-up loads."""
        self._loaded = await asyncio.to_thread(self._scan)
        self._seen = dict(self._loaded)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        current = await asyncio.to_thread(self._scan)
        seen, self._seen = self._seen, current
        models = self.repository.models
        for name, print_ in current.items():
            if print_ == self._loaded.get(name) or print_ != seen.get(name):
                continue  # unchanged, or still changing
            model = models.get(name)
            if model is not None and model.private_dir is not None:
                continue  # loaded through the API with file overrides: not the folder's
            self._loaded[name] = print_
            log.info("repository poll: model '%s' %s", name, "changed" if model else "added")
            loaded = await self.repository.load(name)
            if loaded.load_error:
                log.error("repository poll: model '%s' failed to load: %s", name, loaded.load_error)
        for name in list(self._loaded):
            if name in current:
                continue
            del self._loaded[name]
            model = models.get(name)
            if model is not None and model.private_dir is None:
                log.info("repository poll: model '%s' removed", name)
                try:
                    await self.repository.unload(name)
                except Exception:
                    log.exception("repository poll: unloading '%s' failed", name)
