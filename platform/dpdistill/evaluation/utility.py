"""Utility protocol: train fresh models on a (distilled / synthetic / real) labelled set, report real-test accuracy.

The numbers are mean ± std over seeds (std with ddof=0, as the DC / DM papers report with ``np.std``). The test
set is only ever used to score the finished models, never to pick epochs or hyper-parameters.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpdistill import models
from dpdistill.errors import DataError, SpecError
from dpdistill.evaluation.training import (
    MICRO_BATCH,
    Augment,
    Stat,
    accuracy,
    resolve_augment,
    thread_limit,
    train_classifier,
)
from dpdistill.evaluation.workers import SeedJob, fit_and_score, plan_workers, train_in_workers

__all__ = ["UtilityResult", "accuracy", "evaluate_utility", "train_classifier"]


@dataclass
class UtilityResult:
    """Accuracy of models trained on one set, over several seeds (fractions in [0,1])."""

    mean: float
    std: float
    accuracies: list[float] = field(default_factory=list)
    model: str = "convnet"
    epochs: int = 0
    n_train: int = 0
    extra: dict[str, list[float]] = field(default_factory=dict)  # accuracies on the extra_sets, per seed

    def as_metrics(self, prefix: str = "acc") -> dict[str, float]:
        """The mean and std as flat metrics, e.g. ``{"acc_mean": 0.97, "acc_std": 0.004}``."""
        return {f"{prefix}_mean": self.mean, f"{prefix}_std": self.std}


def _check_images(name: str, images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise DataError(f"{name}: expected a float tensor [N, C, H, W] in [0, 1], got {shape}")
    if images.shape[0] == 0:
        raise DataError(f"{name}: is empty")
    if images.shape[2] != images.shape[3]:
        raise DataError(f"{name}: expected square images, got {images.shape[2]}x{images.shape[3]}")
    return images


def _check_labels(name: str, labels: Any, n: int, num_classes: int, *, soft_ok: bool) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise DataError(f"{name}: expected a tensor, got {type(labels).__name__}")
    if len(labels) != n:
        raise DataError(f"{name}: has {len(labels)} labels for {n} images")
    if soft_ok and labels.ndim == 2 and labels.is_floating_point():
        if labels.shape[1] != num_classes:
            raise DataError(
                f"{name}: soft labels have {labels.shape[1]} columns; expected num_classes={num_classes}"
            )
        return labels
    if labels.ndim != 1 or labels.is_floating_point():
        raise DataError(
            f"{name}: expected integer class indices [N], got {labels.dtype} {tuple(labels.shape)}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DataError(
            f"{name}: labels must lie in [0, {num_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()


def _show_progress(progress: bool) -> bool:
    if not progress:
        return False
    from rich.console import Console

    # Console.is_terminal honours rich's own forcing (FORCE_COLOR / TTY_COMPATIBLE), so CI logs stay clean.
    return Console(file=sys.stdout).is_terminal


def evaluate_utility(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    model: str = "convnet",
    model_kwargs: dict[str, Any] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 300,
    batch_size: int = 256,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: str | Augment | None = None,
    mean: Stat = None,
    std: Stat = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    eval_batch_size: int = 1024,
    num_threads: int | None = None,
    extra_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    workers: int | None = None,
    micro_batch: int | None = MICRO_BATCH,
    compile: bool | None = None,
) -> UtilityResult:
    """Train one fresh ``model`` per seed on the train set and return its test accuracy, mean ± std over seeds.

    Per seed: ``torch.manual_seed(seed)`` before building the model (weights), a ``torch.Generator`` seeded with
    ``seed`` for shuffling and augmentation; the caller's global RNG state is left untouched. Images are float
    [N,C,H,W] in [0,1]; ``mean``/``std`` (scalar or per channel) normalise them after augmentation. ``augment`` is
    None, ``"dsa-lite"`` (random shifted crop + ±15° rotation), ``"dsa"`` (the DC/DM reference protocol) or
    ``f(images[, generator=g]) -> images``.
    ``train_labels`` may be soft labels [N, num_classes]. Intra-op threads are capped at the usable cores
    (or ``num_threads``) for the duration of the call and restored afterwards. ``extra_sets`` (e.g. the
    validation split) are scored by the same trained models, so one training gives test and validation accuracy.

    ``workers``: how many seeds train side by side, each in its own spawned process (see
    :mod:`dpdistill.evaluation.workers`); 1 is the in-process loop, one seed after the other; None chooses (more
    than one only on CPU, for several seeds with enough work, as many as the cores allow at the pinned thread
    count, or one thread each; ``$DPDISTILL_EVAL_WORKERS`` overrides). A seed's model is the same whichever path
    trains it when the thread count is the same (pinned ``threads``). ``micro_batch``: see
    :func:`~dpdistill.evaluation.training.train_classifier` (None: whole batches, as before). ``compile``: the
    training step through ``torch.compile`` (:mod:`dpdistill.models.compiled`; None: the job's ``compile``).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise SpecError(f"evaluate_utility: num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise SpecError(f"evaluate_utility: epochs must be a positive integer, got {epochs!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SpecError(f"evaluate_utility: workers must be a positive integer or None, got {workers!r}")
    if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int)
                                    or micro_batch < 1):
        raise SpecError(f"evaluate_utility: micro_batch must be a positive integer or None, got {micro_batch!r}")
    if batch_size < 1 or eval_batch_size < 1:
        raise SpecError(
            f"evaluate_utility: batch sizes must be positive, got {batch_size}, {eval_batch_size}"
        )
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise SpecError("evaluate_utility: seeds must name at least one seed")
    try:
        resolve_augment(augment)
    except ValueError:
        raise SpecError(
            f"evaluate_utility: augment must be None, 'dsa-lite', 'dsa' or a callable, got {augment!r}"
        ) from None
    train_images = _check_images("train_images", train_images)
    test_images = _check_images("test_images", test_images)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"test_images: shape {tuple(test_images.shape[1:])} differs from train_images {tuple(train_images.shape[1:])}"
        )
    train_labels = _check_labels("train_labels", train_labels, len(train_images), num_classes, soft_ok=True)
    test_labels = _check_labels("test_labels", test_labels, len(test_images), num_classes, soft_ok=False)
    extra_sets = dict(extra_sets or {})
    for set_name, (x_extra, y_extra) in extra_sets.items():
        _check_images(f"extra_sets[{set_name}]", x_extra)
        _check_labels(f"extra_sets[{set_name}]", y_extra, len(x_extra), num_classes, soft_ok=False)
    channels, image_size = train_images.shape[1], train_images.shape[2]
    for stat_name, stat in (("mean", mean), ("std", std)):
        if stat is not None and torch.as_tensor(stat).numel() not in (1, channels):
            raise SpecError(
                f"evaluate_utility: {stat_name} needs 1 or {channels} values, got {torch.as_tensor(stat).numel()}"
            )
    kwargs = dict(model_kwargs or {})
    device = torch.device(device)
    rng_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    # Fail on a bad model spec before any training starts (building one draws weights: keep the caller's RNG).
    with torch.random.fork_rng(devices=rng_devices):
        models.get(model, channels=channels, num_classes=num_classes, image_size=image_size, **kwargs)
    job = SeedJob(
        train_images=train_images, train_labels=train_labels, test_images=test_images, test_labels=test_labels,
        extra_sets={k: (x, y.long()) for k, (x, y) in extra_sets.items()}, num_classes=num_classes, model=model,
        model_kwargs=kwargs, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, augment=augment, mean=mean, std=std, device=device,
        eval_batch_size=eval_batch_size, micro_batch=micro_batch, compile=compile,
    )
    n_workers, worker_threads = plan_workers(job, seeds, workers, num_threads)
    bar = None
    if _show_progress(progress):
        from rich.progress import Progress

        bar = Progress(transient=True)
    with bar if bar is not None else contextlib.nullcontext():
        task = bar.add_task(f"utility {model}", total=len(seeds) * epochs) if bar is not None else None
        if n_workers > 1:
            per_seed = train_in_workers(
                job, seeds, n_workers, worker_threads,
                on_done=(lambda: bar.advance(task, epochs)) if bar is not None else None,
            )
        else:
            with thread_limit(num_threads) as threads:
                per_seed = [
                    fit_and_score(job, seed, threads,
                                  on_epoch=(lambda _e: bar.advance(task)) if bar is not None else None)
                    for seed in seeds
                ]
    accuracies = [test_acc for test_acc, _ in per_seed]
    extra: dict[str, list[float]] = {k: [scores[k] for _, scores in per_seed] for k in extra_sets}
    acc = torch.tensor(accuracies, dtype=torch.float64)
    return UtilityResult(
        mean=float(acc.mean()),
        std=float(acc.std(unbiased=False)),
        accuracies=accuracies,
        model=model,
        epochs=epochs,
        n_train=len(train_images),
        extra=extra,
    )
