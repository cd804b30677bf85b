"""Load a script of benchmarks/ as a module, for tests that check a benchmark's own logic (bench_runs' spec hash,
its reading of a run's console output). benchmarks/ is not a package, so the script is loaded from its file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a fresh module (executed once per call)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"benchmarks/{name}.py not found"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
