"""Training the utility protocol's seeds side by side: one spawned worker process per core, one thread each.

Why processes: a small ConvNet's training step is memory-bound elementwise work (pool, relu, group norm), so a
second intra-op thread gains little (0.21 -> 0.19 s per width-32 step on 256 images on a 2-core machine) while a
second single-threaded model trained beside the first nearly doubles throughput. The alternative measured, one
``torch.func`` ensemble (``stack_module_state`` + ``vmap`` over the seeds' models, grouped convolutions), took
1.35 s per model-epoch of 400 images against 0.32-0.45 s for the plain loop on one thread (3 models, measured on
the shared machine under load, so rough), so it was dropped.

A job's distill run on Ray already trains its seeds as Ray tasks (:mod:`dpdistill.runtime.parallel`), each
calling :func:`~dpdistill.evaluation.utility.evaluate_utility` with one seed; this pool serves the in-process
callers (``evaluation.parallel: false``, Tune trials, scripts, other pipelines). Each worker gets the data once
(at start-up), pins torch to the caller's thread count and ignores Ctrl-C: the parent decides, and on any error
or interrupt it terminates the workers before re-raising, so none outlive the call.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import torch

from dpdistill import models
from dpdistill.errors import SpecError
from dpdistill.evaluation.training import (
    THREADS_ENV,
    Augment,
    Stat,
    accuracy,
    resolve_threads,
    thread_limit,
    train_classifier,
    usable_cores,
)

EVAL_WORKERS_ENV = "DPDISTILL_EVAL_WORKERS"  # a fixed worker count for every evaluate_utility (1: in-process loop)
# Below this much work per seed (training images x epochs) the workers' start-up (importing torch in a spawned
# process, 3-5 s on a loaded 2-core machine) costs more than the second core saves: a width-32 ConvNet trains
# ~2,000-4,000 images per second on one thread, so 50,000 image-epochs are 12-25 s of training per seed.
MIN_POOL_IMAGE_EPOCHS = 50_000
# How long a terminated worker gets to exit before it is killed.
TERMINATE_GRACE_S = 5.0


@dataclass
class SeedJob:
    """Everything one seed's model needs: the sets, the architecture and the training / scoring settings."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    model: str
    model_kwargs: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    augment: str | Augment | None
    mean: Stat
    std: Stat
    device: torch.device
    eval_batch_size: int
    micro_batch: int | None
    extra_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    compile: bool | None = None  # torch.compile the training step (None: $DPDISTILL_COMPILE)


def fit_and_score(
    job: SeedJob, seed: int, threads: int | None, on_epoch: Callable[[int], None] | None = None
) -> tuple[float, dict[str, float]]:
    """Train one fresh model for ``seed`` (weights from ``torch.manual_seed(seed)``, shuffling and augmentation
    from a generator seeded with ``seed``) and return its test accuracy and its accuracy on each extra set.

    The caller's global RNG state is left untouched; ``threads`` intra-op threads throughout.
    """
    device = job.device
    rng_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    channels, image_size = job.train_images.shape[1], job.train_images.shape[2]
    with thread_limit(threads) as threads:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            net = models.get(
                job.model, channels=channels, num_classes=job.num_classes, image_size=image_size,
                **job.model_kwargs,
            )
            train_classifier(
                net, job.train_images, job.train_labels, epochs=job.epochs, batch_size=job.batch_size,
                lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay, augment=job.augment,
                mean=job.mean, std=job.std, device=device, generator=torch.Generator().manual_seed(seed),
                on_epoch=on_epoch, num_threads=threads, micro_batch=job.micro_batch, compile=job.compile,
            )

        def score(x: torch.Tensor, y: torch.Tensor) -> float:
            return accuracy(net, x, y, job.eval_batch_size, mean=job.mean, std=job.std, device=device)

        return score(job.test_images, job.test_labels), {k: score(x, y) for k, (x, y) in job.extra_sets.items()}


def _picklable(job: SeedJob) -> bool:
    # The tensors always pickle; a custom augmentation (a lambda, a closure) or model option may not.
    try:
        pickle.dumps((job.augment, job.model_kwargs, job.mean, job.std))
    except Exception:
        return False
    return True


def plan_workers(
    job: SeedJob, seeds: Sequence[int], workers: int | None, num_threads: int | None
) -> tuple[int, int]:
    """How many worker processes train the seeds (1: the in-process loop) and the threads each one uses.

    Each worker uses the pinned count (``num_threads``, else ``$DPDISTILL_THREADS``), else one thread.
    ``workers`` None: ``$DPDISTILL_EVAL_WORKERS`` if set, else as many as :func:`usable_cores` holds at that
    thread count, but only on CPU, for two seeds or more, a picklable job and at least
    :data:`MIN_POOL_IMAGE_EPOCHS` of work per seed. Never more workers than seeds.
    """
    if workers is None and os.environ.get(EVAL_WORKERS_ENV, "").strip():
        raw = os.environ[EVAL_WORKERS_ENV].strip()
        if not raw.isdigit() or int(raw) < 1:
            raise SpecError(f"${EVAL_WORKERS_ENV} must be a positive integer, got {raw!r}")
        workers = int(raw)
    pinned = num_threads is not None or bool(os.environ.get(THREADS_ENV))
    threads = resolve_threads(num_threads) if pinned else 1
    if workers is None:
        if (
            job.device.type != "cpu"
            or len(seeds) < 2
            or job.epochs * len(job.train_images) < MIN_POOL_IMAGE_EPOCHS
            or not _picklable(job)
        ):
            return 1, threads
        workers = usable_cores() // threads
    workers = max(1, min(workers, len(seeds)))
    if workers > 1 and job.device.type != "cpu":
        raise SpecError(f"evaluate_utility: workers={workers} trains on CPU only, not on {job.device}")
    if workers > 1 and not _picklable(job):
        raise SpecError(
            f"evaluate_utility: workers={workers} sends the augmentation and model options to worker processes, "
            "but they do not pickle (a lambda or closure?); use a module-level function or workers=1"
        )
    return workers, threads


# One worker process's job and thread count, set once by _init_worker.
_JOB: SeedJob | None = None
_THREADS = 1


def _init_worker(job: SeedJob, threads: int) -> None:
    global _JOB, _THREADS
    # Ctrl-C reaches the whole process group; the parent handles it and terminates us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _JOB, _THREADS = job, threads


def _worker_seed(seed: int) -> tuple[float, dict[str, float]]:
    assert _JOB is not None, "worker used before _init_worker"
    return fit_and_score(_JOB, seed, _THREADS)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop every worker of ``pool`` now (the running seeds' work is abandoned) and reap them."""
    # ProcessPoolExecutor (3.11) has no public way to stop running work; its _processes are the live workers.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(TERMINATE_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()
    # The pool's manager thread joins the same processes: when its waitpid reaps a worker, ours sees no child
    # and that Process object keeps looking alive until the manager thread records the exit code. Wait for it
    # (the workers are dead, so it finishes at once), or a worker still shows in active_children() after we return.
    if manager is not None:
        manager.join(TERMINATE_GRACE_S)


def train_in_workers(
    job: SeedJob, seeds: Sequence[int], workers: int, threads: int, on_done: Callable[[], None] | None = None
) -> list[tuple[float, dict[str, float]]]:
    """:func:`fit_and_score` for every seed in ``workers`` spawned processes of ``threads`` threads; results in
    seed order. The first failure (an exception in a worker, or a worker that died) is raised at once, naming its
    seed, after the other workers are terminated; so is a KeyboardInterrupt in the caller."""
    context = torch.multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                               initargs=(job, threads))
    try:
        futures: dict[Future, int] = {pool.submit(_worker_seed, seed): i for i, seed in enumerate(seeds)}
        results: list[tuple[float, dict[str, float]] | None] = [None] * len(seeds)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                i = futures[future]
                try:
                    results[i] = future.result()
                except BrokenProcessPool as err:
                    raise RuntimeError(
                        f"evaluate_utility: a worker process died while training seed {seeds[i]} (killed, or out "
                        "of memory?); a script that calls evaluate_utility at import time needs an "
                        "`if __name__ == '__main__':` guard for spawned workers, or pass workers=1"
                    ) from err
                except Exception as err:
                    err.add_note(f"while training seed {seeds[i]} in an evaluation worker process")
                    raise
                if on_done is not None:
                    on_done()
    except BaseException:
        _terminate(pool)
        raise
    pool.shutdown(wait=True)
    return [r for r in results if r is not None]
