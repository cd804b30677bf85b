"""The tiny DP-GenG method options that job-level tests run on `digits`: every stage (generator, extractors,
DP-Init, matching, expert) runs, each for a step or two, so a whole `dpdistill run` takes seconds.

Tests that need a variation say only what differs: ``tiny_dpgeng(factor=2)``. Tests whose point is a stage's
absence or a particular generator keep their own dicts (test_selection, test_spec_errors, test_dp_mepf, ...).
"""

from __future__ import annotations

import copy
from typing import Any

TINY_DPGENG: dict[str, Any] = {
    "name": "dpgeng", "ipc": 1, "factor": 1, "generated_per_class": 20, "extractors": 1, "extractor_epochs": 1,
    "net_width": 8, "net_depth": 2, "expert_pretrain_epochs": 1, "expert_dp_epochs": 0.5, "expert_batch": 128,
    "iterations": 2, "batch_real": 16,
    "generator_options": {"iterations": 10, "num_features": 200, "batch_size": 100},
}


def tiny_dpgeng(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of TINY_DPGENG (a spec's `method` block) with ``overrides`` applied at its top level."""
    return {**copy.deepcopy(TINY_DPGENG), **overrides}
