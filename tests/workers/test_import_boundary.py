"""A --workers front-end process holds no engine: what its entry module (`python -m
convoy.server.workers`) imports loads neither the engine core, the schedulers, the runtimes nor
a model framework. Only the engine process pays for them (memory, start-up time)."""

from __future__ import annotations

import subprocess
import sys

#: Modules (and their submodules) a front-end process must not load.
ENGINE_ONLY = ("convoy.engine.core", "convoy.batching", "convoy.runtimes", "torch", "onnxruntime")


def _modules_after_importing(module: str) -> list[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.split()


def test_a_front_end_process_imports_no_engine_scheduler_runtime_or_framework():
    loaded = _modules_after_importing("convoy.server.workers")
    assert "convoy.engine.remote.client" in loaded  # the check ran on the real entry module
    engine_only = [
        name for name in loaded if any(name == m or name.startswith(m + ".") for m in ENGINE_ONLY)
    ]
    assert engine_only == [], f"a front-end process imports {engine_only}"
