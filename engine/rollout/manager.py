"""The engine's roll-outs: one per model at most, started from `<model>/rollout.json`, from a new
version folder (poll mode, `new_versions: "candidate"`) or through the admin API; checked by
their gates every CHECK_INTERVAL_S; kept across restarts in the --rollout-state file.

Restart: with --rollout-state, a roll-out that was running resumes at the step it had reached
(its bake clock and samples start afresh; they lived in memory) when its `on_restart` is
"resume" (the default), or is aborted (no traffic or mirrors to the candidate, recorded why)
with "abort"; a finished roll-out keeps its outcome (a rolled-back candidate gets no traffic, a
promoted version keeps serving). The versions a state-file roll-out holds are loaded before any
request can reach the model, so traffic is never split, or sent to the candidate, by accident.
Without the file, a roll-out rollout.json declares starts again from its first step; one the
API started cannot be forgotten that way, so the API refuses to start one without the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convoy.config import ServerConfig
from convoy.errors import Conflict, ConvoyError, InvalidConfig, InvalidInput, ModelNotFound

from .checks import check_model, check_signatures
from .controller import RUNNING, Rollout
from .report import report_document
from .spec import RolloutSpec, output_rules, parse_spec
from .state import read_state, write_state

if TYPE_CHECKING:
    from convoy.types import Response

    from ..payload_log import PayloadLog
    from ..repository import Model, ModelRepository, ModelVersion
    from .compare import PairVerdict
    from .routing import Pair

log = logging.getLogger("convoy.rollout")

#: Seconds between gate checks (a broken guard rolls back within this).
CHECK_INTERVAL_S = 0.2
#: The declaration beside config.pbtxt.
ROLLOUT_FILE = "rollout.json"


class RolloutManager:
    """Owns every Rollout; the repository asks it which versions to hold and serve."""

    def __init__(self, settings: ServerConfig, repository: ModelRepository) -> None:
        self.repository = repository
        self.state_path: Path | None = settings.rollout_state
        #: The current (running or finished) roll-out of each model that has one.
        self.rollouts: dict[str, Rollout] = {}
        #: Models whose requests naming no version a running roll-out splits: name -> route.
        self.routes: dict[str, Any] = {}
        #: Set by the engine: where disagreeing pairs are logged (None: not logged).
        self.payload_log: PayloadLog | None = None
        #: From the state file, until restored (after the start-up loads).
        self._records: dict[str, dict[str, Any]] = {}
        #: Starts a load asked for (rollout.json, a poll's new version), run once it serves.
        self._pending: dict[str, RolloutSpec] = {}
        #: Versions held and served before a roll-out object exists (records, pending starts).
        self._holds: dict[str, set[int]] = {}
        #: None for a spec that names no versions (start() refuses it once it tries to load them).
        self._defaults: dict[str, int | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._tick: asyncio.Task[None] | None = None
        self.started = False

    # --- lifetime --------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Read the state file (before any model loads, so held versions load with them)."""
        if self.state_path is None:
            return
        records = read_state(self.state_path)
        for name, record in records.items():
            try:
                spec = parse_spec(record["spec"])
                versions = {int(record["stable"]), int(record["candidate"])}
                if record.get("previous") is not None:
                    versions.add(int(record["previous"]))
            except (ConvoyError, KeyError, TypeError, ValueError) as exc:
                log.error("--rollout-state: the roll-out of '%s' cannot be restored: %s", name, exc)
                continue
            self._records[name] = record
            self._holds[name] = versions
            state = record.get("state")
            promoted = state == "promoted"
            self._defaults[name] = int(record["candidate"]) if promoted else spec.stable

    async def begin(self) -> None:
        """After the start-up loads: restore the state file's roll-outs, start the declared
        ones, and start checking the gates."""
        self.started = True
        for name, record in list(self._records.items()):
            await self._restore(name, record)
        self._records.clear()
        for name in list(self._pending):
            await self._start_pending(name)
        self._tick = asyncio.get_running_loop().create_task(self._check_gates(), name="convoy-rollouts")

    async def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _check_gates(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            for rollout in list(self.rollouts.values()):
                try:
                    rollout.tick()
                except Exception:
                    log.exception("roll-out of '%s': gate check failed", rollout.model)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- repository hooks (engine/repository.py: RolloutHooks) ----------------------------------------
    def held_versions(self, name: str) -> set[int]:
        rollout = self.rollouts.get(name)
        held = set(self._holds.get(name, ()))
        if rollout is not None:
            held |= rollout.held_versions()
        return held

    def default_version(self, name: str) -> int | None:
        rollout = self.rollouts.get(name)
        if rollout is None:
            return self._defaults.get(name)
        if rollout.state == "promoted" and rollout.previous is None:
            return None  # done: the version policy decides again
        return rollout.serving_version

    def plan_versions(
        self, name: str, model_dir: Path, previous: Model | None, chosen: list[int]
    ) -> list[int]:
        spec = self._declared(name, model_dir)
        current = self.rollouts.get(name)
        if spec is not None and spec.stable is not None:
            same = current is not None and (current.stable, current.candidate) == (
                spec.stable,
                spec.candidate,
            )
            record = self._records.get(name)
            restored = record is not None and (int(record["stable"]), int(record["candidate"])) == (
                spec.stable,
                spec.candidate,
            )
            if not same and not restored and (current is None or current.state not in RUNNING):
                self._hold(name, spec)
        elif spec is not None and spec.new_versions == "candidate" and previous is not None:
            serving = previous.serving()
            busy = current is not None and current.state in RUNNING
            if serving is not None and not busy and name not in self._pending:
                new = [v for v in chosen if v > serving.version and v not in previous.versions]
                if new:
                    candidate = max(new)
                    log.info(
                        "roll-out of '%s': new version %d becomes the candidate of version %d",
                        name,
                        candidate,
                        serving.version,
                    )
                    self._hold(
                        name, dataclasses.replace(spec, stable=serving.version, candidate=candidate)
                    )
        available = {int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}
        held = self.held_versions(name) & available
        return sorted(set(chosen) | held, reverse=True)

    def _hold(self, name: str, spec: RolloutSpec) -> None:
        assert spec.stable is not None and spec.candidate is not None  # plan_versions' specs name both
        self._pending[name] = spec
        self._holds[name] = {spec.stable, spec.candidate}
        self._defaults[name] = spec.stable

    def loaded(self, name: str, model: Model) -> None:
        if self.started and name in self._pending:
            self._spawn(self._start_pending(name))

    @staticmethod
    def _declared(name: str, model_dir: Path) -> RolloutSpec | None:
        path = model_dir / ROLLOUT_FILE
        if not path.is_file():
            return None
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidConfig(f"{path}: not valid JSON: {exc}") from None
        try:
            return parse_spec(document, template=True)
        except InvalidInput as exc:
            raise InvalidConfig(f"{path}: {exc}") from None

    # --- starting -------------------------------------------------------------------------------------
    async def _start_pending(self, name: str) -> None:
        spec = self._pending.pop(name, None)
        if spec is None:
            return
        try:
            await self._start(name, spec, "rollout.json")
        except ConvoyError as exc:
            log.error("roll-out of '%s' (%s) not started: %s", name, ROLLOUT_FILE, exc)
            self._holds.pop(name, None)
            self._defaults.pop(name, None)
            self._publish(name)

    async def start(self, name: str, document: Any) -> dict[str, Any]:
        """The admin API's start: refused (naming the field) unless everything checks out."""
        spec = parse_spec(document)
        if self.state_path is None:
            raise InvalidInput(
                "rollout start: the server runs without --rollout-state FILE; a roll-out started "
                "through the API needs it, so that a restart resumes or aborts it (see "
                "on_restart) instead of forgetting it (or declare it in <model>/rollout.json)"
            )
        rollout = await self._start(name, spec, "api")
        return rollout.status()

    async def _start(self, name: str, spec: RolloutSpec, origin: str) -> Rollout:
        model = self.repository.models.get(name)
        if model is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        config = model.config
        if config is None:
            raise InvalidInput(f"model: '{name}' has no valid configuration: {model.reason}")
        check_model(config)
        current = self.rollouts.get(name)
        if current is not None and current.state in RUNNING:
            raise Conflict(
                f"model '{name}' already has a roll-out running (version {current.stable} -> "
                f"{current.candidate}, {current.step.label}); promote or abort it first"
            )
        rules = output_rules(spec, config)
        previous_holds = self._holds.get(name)
        # A spec naming no versions (new_versions: candidate, from the API) holds {None} until
        # add_versions below refuses it.
        self._holds[name] = {spec.stable, spec.candidate}  # type: ignore[arg-type]
        self._defaults[name] = spec.stable
        try:
            for field in ("stable", "candidate"):
                version = getattr(spec, field)
                try:
                    await self.repository.add_versions(name, {version})
                except InvalidInput as exc:
                    raise InvalidInput(f"{field}: {exc}") from None
                entry = self.repository.models[name].versions.get(version)
                if entry is None or not entry.ready:
                    reason = entry.reason if entry is not None else "not loaded"
                    raise InvalidInput(
                        f"{field}: model '{name}' version {version} is not ready: {reason}"
                    )
            await check_signatures(self.repository.models[name], spec, self.repository.root)
        except BaseException:
            if previous_holds is None:
                self._holds.pop(name, None)
            else:
                self._holds[name] = previous_holds
            self._defaults.pop(name, None)
            self._publish(name)
            raise
        rollout = Rollout(
            name,
            spec,
            rules,
            {s.name: s.datatype for s in config.outputs},
            config.max_batch_size > 0,
            lambda version: self._lookup(name, version),
            self._changed,
            self._log_disagreement,
        )
        rollout._record(
            "start",
            f"{origin}: version {spec.stable} -> {spec.candidate}, mode {spec.mode}, steps "
            + " -> ".join(s.label for s in spec.steps),
        )
        self.rollouts[name] = rollout
        self._holds.pop(name, None)
        self._defaults.pop(name, None)
        log.info(
            "roll-out of '%s' started (%s): version %d -> %d, %s, steps %s",
            name,
            origin,
            spec.stable,
            spec.candidate,
            spec.mode,
            [s.label for s in spec.steps],
        )
        self._changed(rollout)
        return rollout

    def _lookup(self, name: str, version: int) -> ModelVersion | None:
        model = self.repository.models.get(name)
        return None if model is None else model.versions.get(version)

    # --- restoring ------------------------------------------------------------------------------------
    async def _restore(self, name: str, record: dict[str, Any]) -> None:
        model = self.repository.models.get(name)
        if model is None or model.config is None:
            log.error("--rollout-state: model '%s' is not loaded; its roll-out is dropped", name)
            self._holds.pop(name, None)
            self._defaults.pop(name, None)
            return
        spec = parse_spec(record["spec"])
        config = model.config
        try:
            rules = output_rules(spec, config)
        except InvalidInput as exc:
            log.error("--rollout-state: the roll-out of '%s' cannot be restored: %s", name, exc)
            self._holds.pop(name, None)
            self._defaults.pop(name, None)
            self._publish(name)
            return
        rollout = Rollout(
            name,
            spec,
            rules,
            {s.name: s.datatype for s in config.outputs},
            config.max_batch_size > 0,
            lambda version: self._lookup(name, version),
            self._changed,
            self._log_disagreement,
        )
        rollout.history = list(record.get("history", []))
        rollout.step_results = list(record.get("step_results", []))
        rollout.started_at = record.get("started_at", rollout.started_at)
        rollout.step_index = min(int(record.get("step_index", 0)), len(spec.steps) - 1)
        state = record.get("state", "running")
        self.rollouts[name] = rollout
        self._holds.pop(name, None)
        self._defaults.pop(name, None)
        missing = [v for v in (rollout.stable, rollout.candidate) if self._lookup(name, v) is None]
        if state in RUNNING:
            if missing:
                rollout.finish(
                    "aborted", f"server restarted mid-roll-out; version(s) {missing} not loaded"
                )
            elif spec.on_restart == "abort":
                rollout.finish("aborted", "server restarted mid-roll-out (on_restart: abort)")
            else:
                rollout._begin_step(time.monotonic())
                rollout._record(
                    "resume",
                    f"server restarted mid-roll-out; resumed at step {rollout.step_index + 1} "
                    f"({rollout.step.label}) with its bake time and samples started afresh",
                )
                log.warning("roll-out of '%s': resumed at %s after a restart", name, rollout.step.label)
                self._changed(rollout)
            return
        rollout.state = state
        rollout.reason = record.get("reason", "")
        rollout.finished_at = record.get("finished_at", "")
        rollout.candidate_released = bool(record.get("candidate_released", False))
        rollout._set_weight()
        previous = record.get("previous")
        until = record.get("previous_until")
        if state == "promoted" and previous is not None and until is not None:
            left = float(until) - time.time()
            if left > 0 and self._lookup(name, int(previous)) is not None:
                rollout.previous = int(previous)
                rollout.previous_until_s = time.monotonic() + left
        self._changed(rollout)

    # --- the admin API's other verbs ------------------------------------------------------------------
    def _get(self, name: str) -> Rollout:
        rollout = self.rollouts.get(name)
        if rollout is None:
            if name not in self.repository.models:
                raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
            raise ModelNotFound(f"model '{name}' has no roll-out")
        return rollout

    def status(self, name: str = "") -> dict[str, Any]:
        if name:
            return self._get(name).status()
        return {"rollouts": [self.rollouts[n].status() for n in sorted(self.rollouts)]}

    def promote(self, name: str) -> dict[str, Any]:
        rollout = self._get(name)
        if rollout.state in RUNNING or (
            rollout.state in ("rolled_back", "aborted") and not rollout.candidate_released
        ):
            if self._lookup(name, rollout.candidate) is None:
                raise Conflict(f"model '{name}' version {rollout.candidate} is no longer loaded")
            rollout.promote(f"promoted by the operator at {rollout.step.label}")
            return rollout.status()
        raise Conflict(f"model '{name}': the roll-out is {rollout.state}; nothing to promote")

    def abort(self, name: str) -> dict[str, Any]:
        rollout = self._get(name)
        if rollout.state in RUNNING:
            rollout.finish("aborted", f"aborted by the operator at {rollout.step.label}")
        elif rollout.state == "promoted":
            if rollout.previous is None or self._lookup(name, rollout.previous) is None:
                raise Conflict(
                    f"model '{name}': version {rollout.stable} (stable before promotion) is no "
                    "longer kept (keep_previous_seconds passed); start a new roll-out to go back"
                )
            rollout.revert("reverted by the operator")
        elif rollout.state in ("rolled_back", "aborted") and not rollout.candidate_released:
            rollout.release_candidate(f"candidate version {rollout.candidate} released by the operator")
        else:
            raise Conflict(f"model '{name}': the roll-out is {rollout.state}; nothing to abort")
        return rollout.status()

    def report(self, name: str) -> dict[str, Any]:
        return report_document(self._get(name))

    def catalog_summary(self) -> dict[str, Any]:
        """Each roll-out's status without its history (the catalog re-reads it every few s)."""
        return {name: rollout.status() | {"history": []} for name, rollout in self.rollouts.items()}

    # --- after every transition -----------------------------------------------------------------------
    def _changed(self, rollout: Rollout) -> None:
        self._publish(rollout.model)
        self._save()

    def _publish(self, name: str) -> None:
        """Tell the repository (and through it the --workers front ends) where requests for
        `name` now go, and let go of versions no longer held."""
        rollout = self.rollouts.get(name)
        if rollout is not None and rollout.state in RUNNING:
            self.routes[name] = rollout.route
        else:
            self.routes.pop(name, None)
        model = self.repository.models.get(name)
        if model is not None:
            model.default_version = self.default_version(name)
            held = self.held_versions(name)
            if self.started and any(v not in held for v in model.versions):
                self._spawn(self.repository.release_versions(name, held))
        self.repository.changed()

    def _save(self) -> None:
        if self.state_path is not None:
            write_state(self.state_path, self.rollouts)

    # --- disagreements into the payload log -----------------------------------------------------------
    def _log_disagreement(
        self,
        rollout: Rollout,
        pair: Pair,
        verdict: PairVerdict,
        stable: Response,
        candidate: Response,
    ) -> None:
        if self.payload_log is None:
            return
        model = self.repository.models.get(rollout.model)
        if model is None or model.config is None:
            return
        self.payload_log.offer_pair(
            model.config,
            rollout.stable,
            rollout.candidate,
            pair.request_id,
            pair.inputs,
            stable.outputs,
            candidate.outputs,
            verdict.describe(),
        )
