"""DP-GenG: differentially private dataset distillation guided by DP-generated data, one module per stage.

>>> from dpdistill.distill.dpgeng import DPGenGConfig, run_dpgeng
>>> syn = run_dpgeng(sensitive, DPGenGConfig(ipc=10), seed=0, ledger=ledger, mean=[0.1307], std=[0.3081])
>>> syn.report["epsilon_by_component"]        # ε per stage (generator, expert, feature matching)

A distill job logs the report with :func:`report_to_job` (ε by stage, σs, and the accuracy of the
DP-generated-at-IPC baseline as ``baseline_generated_acc_mean``).

Importing this package registers the method as ``distill.get("dpgeng")``.
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
from dpdistill.distill.dpgeng.job import report_to_job
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
    "report_to_job",
    "run_dpgeng",
    "sigma_for_share",
    "solve_free_sigma",
    "utility_allocation",
]
