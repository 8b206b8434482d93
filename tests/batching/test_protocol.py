"""Every scheduler kind implements `ModelScheduler`, and the engine uses no other member of a
scheduler (except the dynamic batcher's own, read after an isinstance check)."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from types import SimpleNamespace

from scheduler_fakes import EchoRuntime, model_config

from convoy.batching.protocol import ModelScheduler
from convoy.batching.scheduler import Scheduler
from convoy.batching.sequence import SequenceScheduler
from convoy.batching.stats import ModelStats
from convoy.config import DynamicBatching, ModelConfig, SequenceBatching
from convoy.engine.ensemble import EnsembleScheduler
from convoy.runtimes.base import RuntimeInstance

ENGINE = Path(__file__).resolve().parents[2] / "engine"
#: The dynamic batcher's members the metrics read behind `isinstance(scheduler, Scheduler)`.
DYNAMIC_ONLY = {"batch_size_limit", "padding_tokens", "latency_plan"}


def declared() -> set[str]:
    return {name for name in vars(ModelScheduler) if not name.startswith("_")} | {"__aenter__"}


def test_every_scheduler_kind_is_a_model_scheduler():
    async def scenario():
        instance = RuntimeInstance(EchoRuntime("i0", None), "fake-0")
        try:
            dynamic = Scheduler(model_config(4, DynamicBatching()), "1", [instance], ModelStats(), 8)
            base = model_config(4)
            sequence_config = ModelConfig(
                name=base.name,
                backend=base.backend,
                max_batch_size=base.max_batch_size,
                inputs=base.inputs,
                outputs=base.outputs,
                sequence_batching=SequenceBatching(),
            )
            sequence = SequenceScheduler(sequence_config, "1", [instance], ModelStats(), 8)
            ensemble = EnsembleScheduler(
                base, "1", SimpleNamespace(steps=()), None, None, ModelStats(), 8
            )
            for scheduler in (dynamic, sequence, ensemble):
                assert isinstance(scheduler, ModelScheduler), type(scheduler).__name__
        finally:
            await instance.close()

    asyncio.run(scenario())


def scheduler_members_used(source: str) -> set[str]:
    """Attributes read off anything named `scheduler` (`scheduler.x`, `entry.scheduler.x`)."""
    used = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        named = (isinstance(owner, ast.Name) and owner.id == "scheduler") or (
            isinstance(owner, ast.Attribute) and owner.attr == "scheduler"
        )
        if named:
            used.add(node.attr)
    return used


def test_the_engine_uses_only_the_declared_scheduler_members():
    allowed = declared() | DYNAMIC_ONLY
    for path in sorted(ENGINE.rglob("*.py")):
        undeclared = scheduler_members_used(path.read_text()) - allowed
        assert not undeclared, f"{path.relative_to(ENGINE.parent)} uses {sorted(undeclared)}"
