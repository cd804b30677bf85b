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


def ray_map(fn: Callable[..., np.ndarray], jobs: list[tuple[Any, ...]],
            on_result: Callable[[int, np.ndarray], None] | None = None, *, num_cpus: float = 1,
            num_gpus: float = 0) -> list[np.ndarray]:
    """Run ``fn(*job)`` for every shadow job of :func:`~dpdistill.evaluation.lira.run_study` as Ray tasks (Ray
    must be initialised); the release, pool images and labels, shared by every job, are put in the store once.

    ``on_result(i, row)`` is called as each task finishes (in the order they finish), so a study can persist
    every finished shadow before the next one ends. An interrupt (Ctrl-C, SIGTERM) propagates at once; the
    tasks not yet finished end with this driver: Ray kills a job's workers, running or queued, when its driver
    disconnects (test_lira's SIGTERM test checks that the cluster's CPUs are free again).
    """
    import ray

    if not jobs:
        return []
    release, images, labels = jobs[0][:3]
    shared = ray.put((release, images, labels))
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_shadow_task)
    refs = [task.remote(fn, shared, job[3], job[4], tuple(job[5:])) for job in jobs]
    index = {ref: i for i, ref in enumerate(refs)}
    out: list[np.ndarray | None] = [None] * len(refs)
    pending = list(refs)
    # No ray.cancel on an interrupt, forced or not: cancelling races the tasks' replies in Ray 2.60's core worker,
    # which then aborts the driver ("Tried to complete task that was not pending", task_manager.cc) and a SIGTERM'd
    # study exits 1 instead of 143 — 4 of 20 SIGTERMs with a plain cancel, 0 of 40 without, on 2 loaded cores.
    # The driver's exit ends the tasks anyway (see above).
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            i = index[ref]
            out[i] = ray.get(ref)
            if on_result is not None:
                on_result(i, out[i])
    return out  # type: ignore[return-value]


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
        from dpdistill.pipelines import check_generator_public

        record = distill.get(spec.method.name)
        config = record.make_config(**spec.method.options())  # a bad option fails here, before any data is read
        check_generator_public(config)  # a nested generator and method.public agree, as the distill job checks
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
        from dpdistill import synthesis

        if synthesis.get(spec.method.name).needs_public:
            raise SpecError(f"method.name: {spec.method.name} needs a public set (method.pretrain), which a "
                            "membership-inference study does not give its shadow generators; study it as DP-GenG's "
                            "generator (method.public) instead")
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


STUDY_FILE = "study.json"  # the study's settings and attempts
SHADOW_DIR = "shadows"  # one <index>.json per finished shadow run: its pool confidences
STUDY_LOCK = "study.lock"  # held by the process running the study


def _busy(study_dir: Path) -> str:
    return f"{study_dir}: another dpdistill process is running this study; wait for it or stop it first"


def run_mia(spec: Any, *, shadows: int, pool: int, runs_dir: Path, use_ray: bool = True,
            address: str | None = None) -> tuple[LiraStudy, Path]:
    """Run a LiRA study of ``spec``'s release pipeline and write ``runs_dir/<name>-mia/<stamp>/``.

    The folder holds spec.yaml, study.json (shadows, pool, attempts), status.json (``not_private``),
    shadows/<m>.json (each finished shadow's pool confidences, written as it finishes), metrics.json (TPRs,
    AUC), mia.json (the figures, the settings and a thinned ROC), artifacts/roc.png and
    artifacts/RELEASE_NOT_PRIVATE.txt. Ctrl-C or SIGTERM marks it interrupted with the finished shadows kept;
    :func:`resume_mia` runs the rest.
    """
    from dpdistill.runtime.runfolder import RunFolder, atomic_write_json, exclusive_lock

    check_mia_spec(spec)
    if shadows < 4:
        raise SpecError(f"--shadows: LiRA needs at least 4 shadow runs, got {shadows}")
    with _study_session(spec, use_ray, address) as (train, release, model, info):
        target = select_pool(train, pool, spec.seed)
        run = RunFolder.create(runs_dir, f"{spec.name}-mia", spec.to_yaml())
        atomic_write_json(run.path / STUDY_FILE, {"shadows": shadows, "pool": pool, "seed": spec.seed,
                                                  "attempts": []})
        with exclusive_lock(run.path / STUDY_LOCK, _busy(run.path)):
            return _conduct(run, spec, target, release, model, info, use_ray=use_ray, done={})


def resume_mia(study_dir: Path, *, use_ray: bool = True, address: str | None = None) -> tuple[LiraStudy, Path]:
    """Finish an interrupted study in its own folder: the shadows it has are kept, the others run.

    The spec, shadow count and pool come from the folder (spec.yaml, study.json), so the membership halves
    and shadow seeds are the ones the first attempt used; each shadow's release draws fresh secret noise, as
    every shadow does. Refused (one line, nothing read) when the folder is not a study, completed already, or
    is being run by another process.
    """
    from dpdistill.runtime.runfolder import RunFolder, exclusive_lock
    from dpdistill.spec import load_run_spec

    study_dir = Path(study_dir).expanduser().resolve()
    state = _read_study(study_dir)
    spec = load_run_spec(study_dir / "spec.yaml")
    check_mia_spec(spec)
    with exclusive_lock(study_dir / STUDY_LOCK, _busy(study_dir)):
        done = load_shadows(study_dir, state["shadows"], state["pool"])
        with _study_session(spec, use_ray, address) as (train, release, model, info):
            target = select_pool(train, state["pool"], spec.seed)
            run = RunFolder.reopen(study_dir)
            log.info("resuming the study: %d of %d shadows finished before", len(done), state["shadows"])
            return _conduct(run, spec, target, release, model, info, use_ray=use_ray, done=done)


def _read_study(study_dir: Path) -> dict[str, Any]:
    """study.json of a study folder that can be resumed (else SpecError naming the folder)."""
    import json

    path = study_dir / STUDY_FILE
    if not path.is_file() or not (study_dir / "spec.yaml").is_file():
        raise SpecError(f"{study_dir}: not a membership-inference study folder ({STUDY_FILE} or spec.yaml is "
                        "missing); give the folder `dpdistill mia` printed, e.g. runs/<name>-mia/<stamp>")
    try:
        state = json.loads(path.read_text())
        shadows, pool = int(state["shadows"]), int(state["pool"])
        status = json.loads((study_dir / "status.json").read_text()).get("status")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{path}: unreadable study state ({(str(e).splitlines() or [''])[0]})") from None
    if status == "completed":
        raise SpecError(f"{study_dir}: the study completed already; nothing to resume")
    return {**state, "shadows": shadows, "pool": pool}


def load_shadows(study_dir: Path, shadows: int, pool: int) -> dict[int, np.ndarray]:
    """The finished shadows' confidences in a study folder, by index (a file that does not fit is skipped:
    that shadow runs again)."""
    import json

    done: dict[int, np.ndarray] = {}
    for path in sorted((Path(study_dir) / SHADOW_DIR).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            m, row = int(doc["shadow"]), np.asarray(doc["confidences"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: unreadable; that shadow runs again", path)
            continue
        if 0 <= m < shadows and row.shape == (pool,) and np.isfinite(row).all():
            done[m] = row
        else:
            log.warning("%s: does not fit this study (%d shadows, pool %d); that shadow runs again", path,
                        shadows, pool)
    return done


@contextlib.contextmanager
def _study_session(spec: Any, use_ray: bool, address: str | None) -> Any:
    """Ray (when used) and the study's inputs: yields (training split, release callable, shadow model, info).
    SIGTERM during the block is raised as :class:`~dpdistill.runner.Terminated` (handled like Ctrl-C)."""
    from dpdistill.pipelines.distill_job import load_splits
    from dpdistill.runner import sigterm_interrupts
    from dpdistill.runtime.cluster import ray_session

    session = (ray_session(address or spec.ray.address, spec.ray.num_cpus, spec.ray.auth_token_path) if use_ray
               else contextlib.nullcontext())
    with sigterm_interrupts(), session:
        # The cluster is reached (and authenticated) before any sensitive record is read.
        train, _, _, info = load_splits(spec)
        release = release_for_spec(spec, info.num_classes, list(info.mean), list(info.std))
        model = shadow_model_for_spec(spec, list(info.mean), list(info.std))
        yield train, release, model, info


def _conduct(run: Any, spec: Any, target: Any, release: Callable[..., Any], model: ShadowModel, info: Any, *,
             use_ray: bool, done: dict[int, np.ndarray]) -> tuple[LiraStudy, Path]:
    """Run the study's missing shadows into ``run`` (each persisted as it finishes), then attack and write the
    figures; an interruption leaves the folder interrupted, with how to resume it."""
    import json
    import time
    from datetime import UTC, datetime

    from dpdistill.pipelines.not_private import RELEASE_NOT_PRIVATE
    from dpdistill.runner import is_sigterm
    from dpdistill.runtime.provenance import code_provenance
    from dpdistill.runtime.runfolder import atomic_write_json, atomic_write_text

    state_path = run.path / STUDY_FILE
    state = json.loads(state_path.read_text())
    shadows, pool = int(state["shadows"]), int(state["pool"])
    atomic_write_text(run.artifacts / RELEASE_NOT_PRIVATE, f"{NOT_PRIVATE_REASON}.\nThe figures here are "
                      "computed from sensitive records without noise: do not publish them as a release.\n")
    run.set_status("running", not_private=NOT_PRIVATE_REASON, kind="mia")
    log.warning(NOT_PRIVATE_REASON)
    # This attempt's record is rewritten as every shadow finishes, so one killed outright (SIGKILL, the machine
    # gone) still says how far it got and how long that took.
    # Each attempt names its code: a study resumed across commits says which shadows which commit ran.
    prov = code_provenance()
    attempt = {"started": datetime.now(UTC).isoformat(), "shadows_before": len(done), "shadows_run": 0,
               "seconds": 0.0, "outcome": "running", "commit": prov["commit"], "dirty": prov["dirty"],
               "dpdistill": prov["dpdistill"]}
    for earlier in state.get("attempts", []):  # we hold the study's lock: an attempt still "running" was killed
        if earlier.get("outcome") == "running":
            earlier["outcome"] = "killed"
    state["attempts"] = [*state.get("attempts", []), attempt]
    t0 = time.monotonic()

    def save_attempt(outcome: str) -> None:
        attempt.update(seconds=round(time.monotonic() - t0, 1), outcome=outcome)
        if outcome != "running":
            attempt["ended"] = datetime.now(UTC).isoformat()
        atomic_write_json(state_path, state)

    def persist(m: int, row: np.ndarray) -> None:
        atomic_write_json(run.path / SHADOW_DIR / f"{m:04d}.json", {"shadow": m, "confidences": row.tolist()})
        attempt["shadows_run"] += 1
        save_attempt("running")
        log.info("shadow %d finished (%d of %d)", m, len(done) + attempt["shadows_run"], shadows)

    save_attempt("running")
    try:
        study = run_study(release, target.images, target.labels, info.num_classes, shadows=shadows, model=model,
                          seed=spec.seed, fprs=DEFAULT_FPRS, map_fn=ray_map if use_ray else None, done=done,
                          on_shadow=persist)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            by = "SIGTERM" if is_sigterm(e) else "SIGINT"
            save_attempt("interrupted")
            log.warning("study interrupted by %s with %d of %d shadows finished; resume with: dpdistill mia "
                        "--resume %s", by, len(done) + attempt["shadows_run"], shadows, run.path)
            run.finish("interrupted", interrupted_by=by, resume=f"dpdistill mia --resume {run.path}")
            e.add_note(f"dpdistill mia --resume {run.path}")  # the CLI prints it
        else:
            save_attempt("failed")
            run.finish("failed", error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        raise
    save_attempt("completed")
    res = study.result
    summary = res.summary()
    seconds = sum(a.get("seconds", 0.0) for a in state["attempts"])
    metrics = {"mia_tpr_at_0.1%fpr": res.tpr_at[0.001], "mia_tpr_at_1%fpr": res.tpr_at[0.01],
               "mia_auc": res.auc, "mia_shadows": float(shadows), "mia_pool": float(pool), "not_private": 1.0,
               "mia_seconds": seconds}
    run.log_metrics(metrics)
    atomic_write_json(run.path / "mia.json", {
        "attack": "LiRA (Carlini et al. 2022), online, leave-one-out over shadow runs",
        "method": spec.method.name, "kind": spec.kind, "epsilon": spec.privacy.epsilon,
        "dataset": info.name, "not_private": NOT_PRIVATE_REASON, **summary,
        "attempts": len(state["attempts"]), "seconds": seconds,
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
