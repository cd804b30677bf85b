"""Utility evaluation over several seeds, one Ray task per seed.

Training k fresh classifiers is embarrassingly parallel; on a 2-core laptop two single-threaded tasks beat one
two-threaded loop, and on a cluster the seeds spread over nodes. The released set and the test split travel
through Ray's object store (``ray.put`` once, shared by every task).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch


def _evaluate_one_seed(train_x, train_y, test_x, test_y, seed: int, kwargs: dict[str, Any]) -> float:
    from dpdistill.evaluation.utility import evaluate_utility

    torch.set_num_threads(1)
    result = evaluate_utility(train_x, train_y, test_x, test_y, seeds=(seed,), progress=False, **kwargs)
    return float(result.accuracies[0])


def evaluate_seeds_on_ray(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    seeds: list[int], **kwargs: Any,
) -> dict[str, Any]:
    """Run ``evaluate_utility`` for each seed as a Ray task; returns mean, std and per-seed accuracies."""
    import ray

    task = ray.remote(num_cpus=1)(_evaluate_one_seed)
    refs_data = [ray.put(t) for t in (train_x, train_y, test_x, test_y)]
    accs = ray.get([task.remote(*refs_data, s, kwargs) for s in seeds])
    return {
        "mean": statistics.fmean(accs),
        "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
        "accuracies": accs,
    }
