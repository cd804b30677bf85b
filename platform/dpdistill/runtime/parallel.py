"""Utility evaluation over several seeds: one Ray task per seed, or in-process.

Training k fresh classifiers is embarrassingly parallel; on a 2-core laptop two single-threaded tasks beat one
two-threaded loop, and on a cluster the seeds spread over nodes. The released set and the evaluation splits
travel through Ray's object store (``ray.put`` once, shared by every task). Inside a Tune trial (which already
holds its CPUs) evaluation runs in-process instead, so trials never wait on nested tasks.

Several evaluations of one job can share the cluster: :func:`submit_seeds` queues one evaluation's tasks and
returns at once (:class:`PendingSeeds`), and :func:`evaluate_seeds`' ``after_submit`` hook lets a caller queue
another evaluation right behind its own tasks (DP-GenG's DP-generated baseline behind the release: 3 + 3 seeds
on 2 cores finish in about the time of the release's 3 alone, instead of one evaluation after the other).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
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


class PendingSeeds:
    """One evaluation's seeds, submitted: :meth:`result` waits for their figures, :meth:`cancel` abandons them."""

    def __init__(self, collect: Callable[[], dict[str, dict[str, Any]]],
                 cancel: Callable[[], None] | None = None) -> None:
        self._collect = collect
        self._cancel = cancel

    def result(self) -> dict[str, dict[str, Any]]:
        """The accuracies (as :func:`evaluate_seeds` returns them), once every seed is done."""
        return self._collect()

    def cancel(self) -> None:
        """Stop the seeds still queued or running (best effort; nothing is returned)."""
        if self._cancel is not None:
            self._cancel()

    def abandon(self, err: BaseException) -> None:
        """After ``err`` left the wait for these seeds: cancel them, unless ``err`` is an interrupt (Ctrl-C,
        SIGTERM). An interrupt ends the driver, and Ray then kills its job's workers, running or queued; a cancel
        racing the tasks' replies makes Ray 2.60's core worker abort the driver ("Tried to complete task that
        was not pending"), which would turn a clean interrupted exit into a crash (seen in LiRA studies, see
        runtime.lira_tasks.ray_map). A failure, by contrast, may leave the driver running: its seeds are stopped."""
        if not isinstance(err, KeyboardInterrupt):  # runner.Terminated (SIGTERM) is a KeyboardInterrupt
            self.cancel()


def task_kwargs(kwargs: dict[str, Any], pinned: int | None) -> dict[str, Any]:
    """evaluate_utility's options for one seed's Ray task. A Ray worker does not see the driver's environment,
    so the job's choices that live there go along explicitly: the thread count (``pinned``, else one thread) and
    whether to compile ($DPDISTILL_COMPILE, unless ``compile`` is given); the device is named as the worker sees
    it."""
    from dpdistill.models.compiled import requested as compile_requested
    from dpdistill.runtime.device import worker_device

    device = torch.device(kwargs.get("device", "cpu"))
    return {**kwargs, "device": worker_device(device), "num_threads": pinned or 1,
            "compile": compile_requested(kwargs.get("compile"))}


def submit_seeds(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, seeds: list[int],
    *, extra_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, use_ray: bool = True,
    progress: bool = True, **kwargs: Any,
) -> PendingSeeds:
    """Queue the seeds' models and return at once; :meth:`PendingSeeds.result` gives :func:`evaluate_seeds`'
    figures. On Ray the tasks are submitted now (they run as CPUs free up, in submission order); in-process, the
    models are trained when the result is asked for."""
    import os

    from dpdistill.evaluation.training import THREADS_ENV

    extra_sets = extra_sets or {}
    pinned = kwargs.pop("num_threads", None) or (int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV)
                                                 else None)
    if not use_ray:
        from dpdistill.evaluation.utility import evaluate_utility

        def train_here() -> dict[str, dict[str, Any]]:
            r = evaluate_utility(train_x, train_y, test_x, test_y, seeds=seeds, progress=progress,
                                 extra_sets=extra_sets, num_threads=pinned, **kwargs)
            return {"test": _summarise(r.accuracies), **{k: _summarise(v) for k, v in r.extra.items()}}

        return PendingSeeds(train_here)

    import ray

    from dpdistill.runtime.device import ray_gpus

    # A CUDA evaluation's tasks ask for a share of a GPU (Ray hides GPUs from tasks that do not).
    device = torch.device(kwargs.get("device", "cpu"))
    kwargs = task_kwargs(kwargs, pinned)
    task = ray.remote(num_cpus=pinned or 1, num_gpus=ray_gpus(device, len(seeds)))(_evaluate_one_seed)
    refs = [ray.put(t) for t in (train_x, train_y, test_x, test_y)]
    extra_ref = ray.put(extra_sets)
    tasks = [task.remote(*refs, extra_ref, s, kwargs) for s in seeds]

    def collect() -> dict[str, dict[str, Any]]:
        per_seed = ray.get(tasks)
        extra = {k: [e[k] for _, e in per_seed] for k in extra_sets}
        return {"test": _summarise([a for a, _ in per_seed]), **{k: _summarise(v) for k, v in extra.items()}}

    def cancel() -> None:
        for ref in tasks:
            try:
                ray.cancel(ref)
            except Exception:  # already finished, or Ray is going down: nothing left to stop
                pass

    return PendingSeeds(collect, cancel)


def evaluate_seeds(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, seeds: list[int],
    *, extra_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, use_ray: bool = True,
    progress: bool = True, after_submit: Callable[[], None] | None = None, **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Accuracy (mean, std over seeds, population std as the DC papers) on test and on each extra set.

    Threads: ``num_threads`` (or the job's pinned ``threads``, $DPDISTILL_THREADS) is used by both paths, each Ray
    task reserving that many CPUs, so the two give the same figures to the last digit. Unpinned, each Ray task
    uses one thread (parallel seeds) and the in-process loop the cores it finds free.

    ``after_submit`` is called once this evaluation's seeds are queued and before waiting for them: a caller
    queues another evaluation there so that it runs behind (and beside) this one.
    """
    pending = submit_seeds(train_x, train_y, test_x, test_y, seeds, extra_sets=extra_sets, use_ray=use_ray,
                           progress=progress, **kwargs)
    try:
        if after_submit is not None:
            after_submit()
        return pending.result()
    except BaseException as err:
        pending.abandon(err)
        raise
