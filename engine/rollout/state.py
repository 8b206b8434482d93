"""The --rollout-state file: every model's roll-out as one JSON document, rewritten whole
(atomically: a temporary file renamed over it) after each transition, and read once at start.

{"format": 1, "rollouts": {model: {"spec": the spec document with its versions, "stable",
"candidate", "state", "reason", "step_index", "started_at", "finished_at", "previous",
"previous_until" (wall-clock seconds the old stable is kept until), "candidate_released",
"history": [...], "step_results": [...]}}}
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from convoy.errors import InvalidConfig

if TYPE_CHECKING:
    from .controller import Rollout

log = logging.getLogger("convoy.rollout")

STATE_FORMAT = 1


def read_state(path: Path) -> dict[str, dict[str, Any]]:
    """The records of the file (empty when it does not exist yet); InvalidConfig naming the
    flag when it is not a state file."""
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text())
        records = document["rollouts"]
        if not isinstance(records, dict):
            raise ValueError("'rollouts' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidConfig(f"--rollout-state {path}: not a roll-out state file ({exc})") from None
    return records


def record_of(rollout: Rollout) -> dict[str, Any]:
    until = None
    if rollout.previous_until_s is not None:
        until = time.time() + max(rollout.previous_until_s - time.monotonic(), 0.0)
    return {
        "spec": rollout.spec.document | {"stable": rollout.stable, "candidate": rollout.candidate},
        "stable": rollout.stable,
        "candidate": rollout.candidate,
        "state": rollout.state,
        "reason": rollout.reason,
        "step_index": rollout.step_index,
        "started_at": rollout.started_at,
        "finished_at": rollout.finished_at,
        "previous": rollout.previous,
        "previous_until": until,
        "candidate_released": rollout.candidate_released,
        "history": rollout.history,
        "step_results": rollout.step_results,
    }


def write_state(path: Path, rollouts: dict[str, Rollout]) -> None:
    """Replace the file with every roll-out's record; a failure is logged, never raised (the
    roll-outs go on; the next transition tries again)."""
    document = {"format": STATE_FORMAT, "rollouts": {n: record_of(r) for n, r in rollouts.items()}}
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(
            orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
        )
        os.replace(temporary, path)
    except OSError:
        log.exception("cannot write the roll-out state file %s", path)
