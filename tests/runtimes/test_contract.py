"""Every bundled runtime satisfies the runtime contract (runtimes/base.py), and what its
`capabilities` declare matches what it implements: an undeclared override would never be
called, a declared capability without its method would fall back to the default silently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convoy.config import ModelConfig, ModelVersionSource
from convoy.runtimes.base import (
    BACKENDS,
    Capabilities,
    Runtime,
    RuntimeBase,
    RuntimeInstance,
    runtime_factory,
)
from convoy.runtimes.isolated import IsolatedRuntime
from convoy.types import TensorSpec

#: Capability -> the RuntimeBase member a runtime declaring it overrides.
DECLARED_BY = {
    "batch_buffers": "batch_buffers",
    "edits_config": "complete_config_dict",
    "isolated": "kill",
}


def _classes() -> list[type[RuntimeBase]]:
    classes = [runtime_factory(backend) for backend in sorted(BACKENDS)]
    return [*classes, IsolatedRuntime]  # type: ignore[list-item]


def _source(tmp_path: Path) -> ModelVersionSource:
    spec = TensorSpec("INPUT0", "FP32", (4,))
    config = ModelConfig(
        name="contract", backend="python", max_batch_size=8, inputs=(spec,), outputs=(spec,)
    )
    return ModelVersionSource(config, 1, tmp_path)


def _instance(cls: type[RuntimeBase], source: ModelVersionSource) -> object:
    if cls is IsolatedRuntime:
        return IsolatedRuntime("python", source, 0)  # nothing starts before load
    return cls(source, 0)  # type: ignore[call-arg]


@pytest.mark.parametrize("cls", _classes(), ids=lambda cls: cls.__name__)
def test_every_bundled_runtime_satisfies_the_runtime_protocol(cls, tmp_path):
    assert issubclass(cls, RuntimeBase)
    assert isinstance(cls.capabilities, Capabilities)
    runtime = _instance(cls, _source(tmp_path))
    assert isinstance(runtime, Runtime)
    assert runtime.executes_requests is False  # known after load; merged batches until then


@pytest.mark.parametrize("cls", _classes(), ids=lambda cls: cls.__name__)
def test_a_runtime_overrides_exactly_what_its_capabilities_declare(cls):
    for capability, member in DECLARED_BY.items():
        declared = getattr(cls.capabilities, capability)
        overridden = getattr(cls, member) is not getattr(RuntimeBase, member)
        assert declared == overridden, (
            f"{cls.__name__}: {capability}={declared}, {member} overridden={overridden}"
        )


@pytest.mark.parametrize("cls", _classes(), ids=lambda cls: cls.__name__)
def test_the_runtime_class_is_its_factory(cls, tmp_path):
    """The repository reads the factory's capabilities and completes configs through it."""
    source = _source(tmp_path)
    assert callable(cls.complete_config) and callable(cls.complete_config_dict)
    if not cls.capabilities.edits_config:
        document = {"name": "contract"}
        assert cls.complete_config_dict(source, document) is document


def test_only_a_declaring_runtime_gets_its_batch_buffers_called():
    class Plain(RuntimeBase):
        def load(self) -> None: ...

        def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return inputs

        def close(self) -> None: ...

    class Pinned(Plain):
        capabilities = Capabilities(batch_buffers=True)

        def batch_buffers(self, rows: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
            return {name: np.empty((rows, *a.shape[1:]), a.dtype) for name, a in like.items()}

    plain, pinned = RuntimeInstance(Plain(), "plain"), RuntimeInstance(Pinned(), "pinned")
    try:
        assert plain.batch_buffers is None
        assert pinned.batch_buffers is not None
        assert pinned.batch_buffers(2, {"x": np.zeros((1, 3))})["x"].shape == (2, 3)
    finally:
        plain.abandon()
        pinned.abandon()
