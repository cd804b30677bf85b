"""Utility evaluation over several seeds: one Ray task per seed, or in-process.

Training k fresh classifiers is embarrassingly parallel; on a 2-core laptop two single-threaded tasks beat one
two-threaded loop, and on a cluster the seeds spread over nodes. The released set and the evaluation splits
travel through Ray's object store (``ray.put`` once, shared by every task). Inside a Tune trial (which already
holds its CPUs) evaluation runs in-process instead, so trials never wait on nested tasks.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch


def _evaluate_one_seed(train_x, train_y, test_x, test_y, extra_sets, seed: int, kwargs: dict[str, Any]):
    from dpdistill.evaluation.utility import evaluate_utility

    result = evaluate_utility(train_x, train_y, test_x, test_y, seeds=(seed,), progress=False,
                              extra_sets=extra_sets, **kwargs)
    return result.accuracies[0], {k: v[0] for k, v in result.extra.items()}


def _summarise(accs: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "accuracies": accs}


def evaluate_seeds(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, seeds: list[int],
    *, extra_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, use_ray: bool = True,
    progress: bool = True, **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Accuracy (mean, std over seeds, population std as the DC papers) on test and on each extra set.

    Threads: ``num_threads`` (or the job's pinned ``threads``, $DPDISTILL_THREADS) is used by both paths, each Ray
    task reserving that many CPUs, so the two give the same figures to the last digit. Unpinned, each Ray task
    uses one thread (parallel seeds) and the in-process loop the cores it finds free.
    """
    import os

    from dpdistill.evaluation.training import THREADS_ENV

    extra_sets = extra_sets or {}
    pinned = kwargs.pop("num_threads", None) or (int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV)
                                                 else None)
    if use_ray:
        import ray

        from dpdistill.runtime.device import ray_gpus, worker_device

        # A CUDA evaluation's tasks ask for a share of a GPU (Ray hides GPUs from tasks that do not) and name
        # the device as the worker sees it.
        device = torch.device(kwargs.get("device", "cpu"))
        kwargs = {**kwargs, "device": worker_device(device), "num_threads": pinned or 1}
        task = ray.remote(num_cpus=pinned or 1, num_gpus=ray_gpus(device, len(seeds)))(_evaluate_one_seed)
        refs = [ray.put(t) for t in (train_x, train_y, test_x, test_y)]
        extra_ref = ray.put(extra_sets)
        per_seed = ray.get([task.remote(*refs, extra_ref, s, kwargs) for s in seeds])
        test_accs = [a for a, _ in per_seed]
        extra = {k: [e[k] for _, e in per_seed] for k in extra_sets}
    else:
        from dpdistill.evaluation.utility import evaluate_utility

        r = evaluate_utility(train_x, train_y, test_x, test_y, seeds=seeds, progress=progress,
                             extra_sets=extra_sets, num_threads=pinned, **kwargs)
        test_accs, extra = r.accuracies, r.extra
    return {"test": _summarise(test_accs), **{k: _summarise(v) for k, v in extra.items()}}
