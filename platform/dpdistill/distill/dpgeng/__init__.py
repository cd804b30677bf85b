"""DP-GenG: differentially private dataset distillation guided by DP-generated data, one module per stage.

>>> from dpdistill.distill.dpgeng import DPGenGConfig, run_dpgeng
>>> syn = run_dpgeng(sensitive, DPGenGConfig(ipc=10), seed=0, ledger=ledger, mean=[0.1307], std=[0.3081])
>>> syn.report["epsilon_by_component"]        # ε per stage (generator, expert, feature matching)

A distill job logs the report's σs and stage times, and evaluates its DP-generated-at-IPC baseline
(``baseline_generated_acc_mean``) like the release. The method is found as ``distill.get("dpgeng")``
(:mod:`dpdistill.distill.registry`).
"""

from dpdistill.distill.dpgeng.allocation import UtilityAllocation, utility_allocation
from dpdistill.distill.dpgeng.pipeline import ComponentLedger, DPGenGConfig, run_dpgeng

# The DP building blocks it shares with NDPDC and PSG (Poisson sampling, clipping, noisy means, the σ solver,
# DP feature matching) live outside this package: dpdistill.privacy.dp_ops and dpdistill.distill.private_matching.
__all__ = [
    "ComponentLedger",
    "DPGenGConfig",
    "UtilityAllocation",
    "run_dpgeng",
    "utility_allocation",
]
