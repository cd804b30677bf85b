"""Job kinds: each kind is a pipeline with a ``prepare`` step (all input checks, no side effects) and an
``execute`` step (the stages, run inside a run folder). Kinds are imported lazily so the CLI stays fast."""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from dpdistill.errors import SpecError

_KINDS: dict[str, str] = {
    "distill": "dpdistill.pipelines.distill_job:DistillPipeline",
    "synthesize": "dpdistill.pipelines.synthesize_job:SynthesizePipeline",
    "sfdd": "dpdistill.pipelines.sfdd_job:SFDDPipeline",
}


class Pipeline(Protocol):
    """What the runner needs of a job kind."""

    kind: str

    def method_config(self, method: str, source: str) -> Any:
        """The config type of ``method`` (dataclass or pydantic model), or None; SpecError if unknown."""

    def prepare(self, spec: Any) -> Any:
        """Validate everything that can be wrong with the input (data present, privacy parameters) and load
        what the job needs. Must not create files: a failure here leaves no run folder."""

    def execute(self, ctx: Any, prepared: Any) -> dict[str, Any]:
        """Run the stages; return the summary (see runner.RunResult)."""


def get_pipeline(kind: str, source: str = "<spec>") -> Pipeline:
    """The pipeline for a job kind."""
    if kind not in _KINDS:
        raise SpecError(
            f"{source}: field 'kind': job kind '{kind}' is not available yet; available: {', '.join(_KINDS)}"
        )
    module, _, attr = _KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)()


def available_kinds() -> list[str]:
    return sorted(_KINDS)
