"""LiRA membership-inference studies on Ray: shadow releases as parallel tasks, and ``dpdistill mia SPEC``.

Each shadow run (release a random half of the target pool, train a model on the release, score the whole pool)
is independent, so they run as one Ray task each (:func:`ray_map`); the pool and the release callable travel
through the object store once. The attack itself is :mod:`dpdistill.evaluation.lira` (Ray-free).

A job spec becomes a release callable with :func:`release_for_spec`: its distill or synthesize method with the
spec's options, run on the shadow's half exactly as a job runs it on the training split: a private method gets
its own in-memory ledger with the spec's ε (δ: the spec's, else 1/(n ln n) of the half) and privacy randomness
(secret; reproducible only under the spec's debugging flag), normalisation uses the dataset's public constants.

Privacy: a study reads the sensitive pool by design and writes numbers computed from it without noise. It is an
evaluation, NOT a private release: :func:`run_mia` stamps its folder NOT PRIVATE (like DM's release) and refuses
a spec with ``privacy.owner_budget``, whose owner's store would spend nothing while every record is read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpdistill.errors import SpecError
from dpdistill.evaluation.lira import DEFAULT_FPRS, LiraStudy, ShadowModel, run_study

log = logging.getLogger("dpdistill.mia")

NOT_PRIVATE_REASON = ("NOT PRIVATE: a membership-inference study reads the sensitive pool without noise by design; "
                      "its scores and ROC are an evaluation of the release method, not a private release")


# ------------------------------------------------------------------------------------------- fan-out


def _shadow_task(fn: Callable[..., np.ndarray], shared: tuple[Any, ...], member: np.ndarray, seed: int,
                 rest: tuple[Any, ...]) -> np.ndarray:
    release, images, labels = shared
    # One intra-op thread per task: the tasks themselves fill the cores (see evaluation.training.thread_limit).
    return fn(release, images, labels, member, seed, *rest, num_threads=1)


def ray_map(fn: Callable[..., np.ndarray], jobs: list[tuple[Any, ...]], *, num_cpus: float = 1,
            num_gpus: float = 0) -> list[np.ndarray]:
    """Run ``fn(*job)`` for every shadow job of :func:`~dpdistill.evaluation.lira.run_study` as Ray tasks (Ray
    must be initialised); the release, pool images and labels, shared by every job, are put in the store once."""
    import ray

    if not jobs:
        return []
    release, images, labels = jobs[0][:3]
    shared = ray.put((release, images, labels))
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_shadow_task)
    refs = [task.remote(fn, shared, job[3], job[4], tuple(job[5:])) for job in jobs]
    return ray.get(refs)


# --------------------------------------------------------------------------------------- releases


@dataclass(frozen=True)
class DistillRelease:
    """A registered distiller as a release callable ``(images, labels, seed) -> (images, labels)`` (picklable)."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    epsilon: float | None = None  # the budget of each shadow's own ledger (private methods)
    delta: float | None = None  # None: 1/(n ln n) of the shadow's half
    mean: list[float] | None = None  # public normalisation statistics
    std: list[float] | None = None
    device: str = "cpu"
    reproducible_noise: bool = False  # the spec's debugging flag: noise derived from the shadow's seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        from dpdistill import distill
        from dpdistill.data import ImageSet

        record = distill.get(self.method)
        config = record.make_config(**self.options)
        real = ImageSet(images.float().contiguous(), labels.long(), self.num_classes, "mia-shadow")
        kwargs: dict[str, Any] = {"seed": int(seed), "progress": False, "mean": self.mean, "std": self.std,
                                  "device": self.device}
        if record.private:
            kwargs.update(_private_kwargs(self.epsilon, self.delta, len(real), self.reproducible_noise, seed,
                                          self.method))
        return record.run(real, config, **kwargs).export()


@dataclass(frozen=True)
class SynthesisRelease:
    """A registered DP synthesiser as a release callable: fit on the half, generate ``n_per_class`` per class."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    epsilon: float | None = None
    delta: float | None = None
    device: str = "cpu"
    reproducible_noise: bool = False

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        from dpdistill import synthesis
        from dpdistill.data import ImageSet
        from dpdistill.pipelines.synthesize_job import split_options

        config, job = split_options(self.method, self.options)
        real = ImageSet(images.float().contiguous(), labels.long(), self.num_classes, "mia-shadow")
        private = _private_kwargs(self.epsilon, self.delta, len(real), self.reproducible_noise, seed, self.method)
        synth = synthesis.get(self.method)(config, channels=real.channels, image_size=real.image_size,
                                           num_classes=self.num_classes, seed=int(seed), device=self.device,
                                           noise=private["noise"])
        synth.fit(real, private["ledger"], progress=False)
        return synth.generate(n_per_class=job.n_per_class, seed=int(seed))


def _private_kwargs(epsilon: float | None, delta: float | None, n: int, reproducible: bool, seed: int,
                    method: str) -> dict[str, Any]:
    from dpdistill.privacy import PrivacyLedger
    from dpdistill.privacy.defaults import default_delta
    from dpdistill.privacy.noise import PrivacyRandomness

    if epsilon is None:
        raise SpecError(f"privacy.epsilon: method '{method}' is private and needs a budget")
    # A fresh in-memory ledger per shadow: each shadow release spends the spec's ε, as the real run would.
    ledger = PrivacyLedger(None, epsilon, delta if delta is not None else default_delta(n), n_records=n,
                           noise="reproducible" if reproducible else "secret")
    return {"ledger": ledger, "noise": PrivacyRandomness.for_spec(reproducible, int(seed))}


def release_for_spec(spec: Any, num_classes: int, mean: list[float], std: list[float]) -> Callable[..., Any]:
    """The spec's release pipeline as a picklable ``(images, labels, seed) -> (images, labels)``."""
    if spec.kind == "distill":
        from dpdistill import distill

        record = distill.get(spec.method.name)
        record.make_config(**spec.method.options())  # a bad option fails here, before any data is read
        if record.private and spec.privacy.epsilon is None:
            raise SpecError(f"privacy.epsilon: method '{spec.method.name}' is private and needs a budget")
        if not record.private and spec.privacy.epsilon is not None:
            raise SpecError(f"privacy.epsilon: method '{spec.method.name}' gives no privacy guarantee; remove "
                            "privacy.epsilon")
        return DistillRelease(spec.method.name, spec.method.options(), num_classes, spec.privacy.epsilon,
                              spec.privacy.delta, list(mean), list(std), "cpu", spec.privacy.reproducible_noise)
    if spec.kind == "synthesize":
        from dpdistill.pipelines.synthesize_job import split_options

        _, job = split_options(spec.method.name, spec.method.options())
        if job.pretrain is not None:
            raise SpecError("method.pretrain: a membership-inference study does not pretrain its shadow "
                            "generators; remove pretrain")
        if spec.privacy.epsilon is None:
            raise SpecError(f"privacy.epsilon: method '{spec.method.name}' is private and needs a budget")
        return SynthesisRelease(spec.method.name, spec.method.options(), num_classes, spec.privacy.epsilon,
                                spec.privacy.delta, "cpu", spec.privacy.reproducible_noise)
    raise SpecError(f"kind: a membership-inference study runs distill or synthesize jobs, not '{spec.kind}'")


def shadow_model_for_spec(spec: Any, mean: list[float], std: list[float]) -> ShadowModel:
    """The spec's evaluation protocol (model, options, epochs, lr, batch, augmentation) as the shadow model."""
    ev = spec.evaluation
    return ShadowModel(name=ev.model, options=dict(ev.model_options), epochs=ev.epochs, lr=ev.lr,
                       batch_size=ev.batch_size, augment=ev.augmentation(), mean=list(mean), std=list(std))


# ------------------------------------------------------------------------------------------ the study


def check_mia_spec(spec: Any) -> None:
    """Refuse what a study cannot honestly run: a spec charging an owner budget (nothing would be charged while
    the whole pool is read) or a non-CPU device (the shadow tasks ask for CPUs only)."""
    if spec.privacy.owner_budget is not None:
        raise SpecError("privacy.owner_budget: a membership-inference study reads every pool record without "
                        "spending the owner's budget (it is an evaluation, NOT a private release); remove "
                        "owner_budget to study the method")
    if spec.device not in ("cpu", "auto"):
        raise SpecError(f"device: a membership-inference study runs its shadows on CPU, got '{spec.device}'")


def select_pool(train: Any, pool: int, seed: int) -> Any:
    """The target pool: ``pool`` records of the training split at positions drawn from the public ``seed``."""
    if pool < 2 or pool > len(train):
        raise SpecError(f"--pool: expected 2 to {len(train)} records (the training split), got {pool}")
    g = torch.Generator().manual_seed(int(seed))
    return train.subset(torch.randperm(len(train), generator=g)[:pool])


def run_mia(spec: Any, *, shadows: int, pool: int, runs_dir: Path, use_ray: bool = True,
            address: str | None = None) -> tuple[LiraStudy, Path]:
    """Run a LiRA study of ``spec``'s release pipeline and write ``runs_dir/<name>-mia/<stamp>/``.

    The folder holds spec.yaml, status.json (``not_private``), metrics.json (TPRs, AUC), mia.json (the
    figures, the settings and a thinned ROC), artifacts/roc.png and artifacts/RELEASE_NOT_PRIVATE.txt.
    """
    from dpdistill.pipelines.distill_job import load_splits
    from dpdistill.pipelines.not_private import RELEASE_NOT_PRIVATE
    from dpdistill.runtime.cluster import ray_session
    from dpdistill.runtime.runfolder import RunFolder, atomic_write_json, atomic_write_text

    check_mia_spec(spec)
    if shadows < 4:
        raise SpecError(f"--shadows: LiRA needs at least 4 shadow runs, got {shadows}")
    session = (ray_session(address or spec.ray.address, spec.ray.num_cpus, spec.ray.auth_token_path) if use_ray
               else contextlib.nullcontext())
    with session:
        # The cluster is reached (and authenticated) before any sensitive record is read.
        train, _, _, info = load_splits(spec)
        release = release_for_spec(spec, info.num_classes, list(info.mean), list(info.std))
        model = shadow_model_for_spec(spec, list(info.mean), list(info.std))
        target = select_pool(train, pool, spec.seed)
        run = RunFolder.create(runs_dir, f"{spec.name}-mia", spec.to_yaml())
        atomic_write_text(run.artifacts / RELEASE_NOT_PRIVATE, f"{NOT_PRIVATE_REASON}.\nThe figures here are "
                          "computed from sensitive records without noise: do not publish them as a release.\n")
        run.set_status("running", not_private=NOT_PRIVATE_REASON, kind="mia")
        log.warning(NOT_PRIVATE_REASON)
        try:
            study = run_study(release, target.images, target.labels, info.num_classes, shadows=shadows,
                              model=model, seed=spec.seed, fprs=DEFAULT_FPRS,
                              map_fn=ray_map if use_ray else None)
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            run.finish("interrupted" if interrupted else "failed",
                       **({} if interrupted else {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}))
            raise
    res = study.result
    summary = res.summary()
    metrics = {"mia_tpr_at_0.1%fpr": res.tpr_at[0.001], "mia_tpr_at_1%fpr": res.tpr_at[0.01],
               "mia_auc": res.auc, "mia_shadows": float(shadows), "mia_pool": float(pool), "not_private": 1.0}
    run.log_metrics(metrics)
    atomic_write_json(run.path / "mia.json", {
        "attack": "LiRA (Carlini et al. 2022), online, leave-one-out over shadow runs",
        "method": spec.method.name, "kind": spec.kind, "epsilon": spec.privacy.epsilon,
        "dataset": info.name, "not_private": NOT_PRIVATE_REASON, **summary,
    })
    plot_roc(res.fpr, res.tpr, run.artifacts / "roc.png",
             title=f"LiRA · {spec.method.name} (ε={spec.privacy.epsilon}) · {shadows} shadows, pool {pool}")
    run.finish("completed", not_private=NOT_PRIVATE_REASON, kind="mia")
    return study, run.path


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, path: Path, *, title: str = "LiRA") -> Path:
    """The ROC on log-log axes (the low-FPR corner is what matters) with the chance line; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    floor = 1e-4
    ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label="LiRA")
    ax.plot([floor, 1], [floor, 1], "--", color="grey", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
