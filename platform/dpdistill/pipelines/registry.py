"""The job-kind registry: kind -> "module:Pipeline class", imported only when a job of that kind runs.

Naming a kind here is its registration; this module imports no pipeline module (they import torch and the
methods), so :mod:`dpdistill.spec` derives the allowed ``kind`` values from it while loading a spec cheaply.
"""

from __future__ import annotations

import importlib
from typing import Any

from dpdistill.errors import SpecError

# kind -> "module:attr" of a class implementing dpdistill.pipelines.Pipeline, or the class itself (a kind
# registered at run time).
_KINDS: dict[str, str | type] = {
    "distill": "dpdistill.pipelines.distill_job:DistillPipeline",
    "synthesize": "dpdistill.pipelines.synthesize_job:SynthesizePipeline",
    "sfdd": "dpdistill.pipelines.sfdd_job:SFDDPipeline",
    "evaluate": "dpdistill.pipelines.evaluate_job:EvaluatePipeline",
}


def register(kind: str, target: str | type) -> None:
    """Make ``target`` ("module:Class", or the class) the pipeline of job ``kind``; a taken kind is a ValueError.

    A kind registered after :mod:`dpdistill.spec` was imported is not accepted by its ``kind`` field, which is
    fixed when the spec model is built.
    """
    if not kind or kind != kind.strip():
        raise ValueError(f"job kind must be a non-empty identifier, got {kind!r}")
    if isinstance(target, str) and target.count(":") != 1:
        raise ValueError(f"pipelines.register({kind!r}): target must be 'module:Class', got {target!r}")
    if kind in _KINDS and _KINDS[kind] != target:
        raise ValueError(f"job kind {kind!r} is already registered")
    _KINDS[kind] = target


def names() -> list[str]:
    """The registered job kinds, sorted (no pipeline module is imported)."""
    return sorted(_KINDS)


def get(kind: str, source: str = "<spec>") -> Any:
    """The pipeline class of job ``kind`` (its module imported now); SpecError listing the kinds if unknown."""
    if kind not in _KINDS:
        raise SpecError(f"{source}: field 'kind': unknown job kind '{kind}'; expected one of: {', '.join(names())}")
    target = _KINDS[kind]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target
