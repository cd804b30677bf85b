"""DP-GenG: differentially private dataset distillation guided by DP-generated data, one module per stage.

>>> from dpdistill.distill.dpgeng import DPGenGConfig, run_dpgeng
>>> syn = run_dpgeng(sensitive, DPGenGConfig(ipc=10), seed=0, ledger=ledger, mean=[0.1307], std=[0.3081])
>>> syn.report["epsilon_by_component"]        # ε per stage (generator, expert, feature matching)

A distill job logs the report's σs and stage times, and evaluates its DP-generated-at-IPC baseline
(``baseline_generated_acc_mean``) like the release. The method is found as ``distill.get("dpgeng")``
(:mod:`dpdistill.distill.registry`).
"""

from dpdistill.distill.dpgeng.allocation import (
    UtilityAllocation,
    sigma_for_share,
    solve_free_sigma,
    utility_allocation,
)
from dpdistill.distill.dpgeng.feature_matching import (
    PoissonClassSampler,
    clip_rows,
    clipped_sum,
    dp_feature_matching_loss,
    feature_matching_mechanism,
)
from dpdistill.distill.dpgeng.pipeline import ComponentLedger, DPGenGConfig, run_dpgeng

__all__ = [
    "ComponentLedger",
    "DPGenGConfig",
    "PoissonClassSampler",
    "UtilityAllocation",
    "clip_rows",
    "clipped_sum",
    "dp_feature_matching_loss",
    "feature_matching_mechanism",
    "run_dpgeng",
    "sigma_for_share",
    "solve_free_sigma",
    "utility_allocation",
]
