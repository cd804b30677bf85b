"""Job kind ``distill``: distil the sensitive training split into a few images per class, then evaluate.

Stages: load (prepare) → distil (the method from ``distill.get``) → release (distilled set + grid) → evaluate
(fresh models trained on the distilled set, tested on the real test split). The distilled set is the only
thing written to the run folder; the sensitive split never is.

What it logs, by kind (:mod:`dpdistill.privacy.disclosure`): the job's own keys in :data:`DISCLOSURE`, the
method's in its registry record (``Distiller.disclosure``); the per-step ``distill_loss`` of a private method is
logged only when the method declares it CHARGED (computed from noisy, charged targets alone).

A non-private method (DM, DC) releases a set computed from real training images without noise (with
``init: real`` and ``iterations: 0`` it IS real records). Such a run says so in the run folder
(``artifacts/RELEASE_NOT_PRIVATE.txt``, ``not_private`` in status.json and metrics.json), the summary and an
MLflow tag, and its images stay out of MLflow unless ``tracking.log_nonprivate_images`` is on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpdistill.errors import SpecError
from dpdistill.evaluation.selection import DISCLOSURE as EVALUATION_DISCLOSURE
from dpdistill.pipelines import (
    check_evaluation_model,
    check_generator,
    check_generator_public,
    check_public_source,
)
from dpdistill.pipelines.not_private import mark_release_not_private
from dpdistill.privacy.disclosure import ACCOUNTING, CHARGED, PUBLIC, RELEASED, kind_of
from dpdistill.spec import JobSpec

log = logging.getLogger("dpdistill.pipelines.distill")

# Every key a distill job logs itself (the runner's and ledger's are in disclosure.COMMON, the method's in its
# registry record). ipc and n_released are recomputed from distilled.pt by the disclosure tests.
DISCLOSURE: dict[str, str] = {
    **EVALUATION_DISCLOSURE,  # the evaluation protocol's selection and per-model rows
    "ipc": RELEASED,
    "n_released": RELEASED,
    "sigma_*": ACCOUNTING,  # a multi-stage method's noise multipliers, fixed by the plan before any data is read
    "seconds_*": PUBLIC,  # its stage times (wall time)
    # MLflow params: the resolved spec, written by the user (public by definition).
    **{k: PUBLIC for name in JobSpec.model_fields for k in (name, f"{name}.*")},
}

IMAGE_ARTIFACTS = ("distilled_grid.png",)


def not_private_release(method: str) -> str:
    """The line that marks a non-private method's release (run folder, summary, status, MLflow)."""
    return (f"NOT PRIVATE: method '{method}' gives no privacy guarantee; the distilled set is computed from real "
            "training images without noise and may reproduce them (with init 'real' and iterations 0 it is real "
            "training records)")


@dataclass
class PreparedDistill:
    """Loaded inputs of a distill job (kept in memory only)."""

    train: Any  # data.ImageSet, sensitive
    val: Any  # data.ImageSet, sensitive (validation; scored, never released)
    test: Any  # data.ImageSet, used only for the final evaluation
    info: Any  # data.DatasetInfo
    method: Any  # distill registry record
    config: Any  # the method's config object

    @property
    def n_sensitive(self) -> int:
        return len(self.train)


def load_splits(spec: Any) -> tuple[Any, Any, Any, Any]:
    """Load the train, validation and test splits the spec names (train_limit applies to train only)."""
    from dpdistill import data

    source = data.get(spec.data.name)
    splits = data.load_splits(spec.data.name, root=spec.data.root, download=spec.data.download,
                              image_size=spec.data.image_size, val_seed=spec.data.val_seed)
    train, val, test = splits["train"], splits["val"], splits["test"]
    if spec.data.train_limit is not None and spec.data.train_limit < len(train):
        # The public seed may pick the subset: it chooses positions without looking at any record, and the
        # records left out are never read (the sensitive split is the subset).
        g = torch.Generator().manual_seed(spec.seed)
        train = train.subset(torch.randperm(len(train), generator=g)[: spec.data.train_limit])
    return train, val, test, source.info


def record_real_precision(ctx: Any, config: Any, device: Any) -> None:
    """With ``method.real_precision: auto``: the arithmetic it resolves to on this run's host, in the run's
    metrics (``real_precision_bfloat16``: 1 or 0) and summary, since the spec (and its hash) only say 'auto'.
    A property of the machine, not of the data."""
    from dpdistill.distill.embedding import auto_precision_reason, resolve_precision

    if getattr(config, "real_precision", None) != "auto":
        return
    overridden = getattr(config, "overridden_options", None)
    if overridden is not None and "real_precision" in overridden():  # e.g. decoupled matching: float32 anyway
        return
    resolved = resolve_precision("auto", device)
    ctx.log_metrics({"real_precision_bfloat16": 1.0 if resolved == "bfloat16" else 0.0})
    ctx.add_summary("real precision", f"auto: {resolved} ({auto_precision_reason(device)})")


class DistillPipeline:
    """The ``distill`` job kind."""

    kind = "distill"

    def method_config(self, method: str, source: str) -> Any:
        from dpdistill import distill

        if method not in distill.names():
            raise SpecError(
                f"{source}: field 'method.name': unknown distillation method '{method}'; "
                f"expected one of: {', '.join(distill.names())}"
            )
        return distill.get(method).config

    def unaccounted_reason(self, spec: Any) -> str | None:
        """Why the spec's method options make a run not covered by its ε (None: covered); see the runner."""
        from dpdistill import distill

        method = distill.get(spec.method.name)
        if method.unaccounted is None:
            return None
        return method.unaccounted(method.make_config(**spec.method.options()))

    def prepare(self, spec: Any) -> PreparedDistill:
        from dpdistill import distill, models
        from dpdistill.evaluation.selection import check_plan
        from dpdistill.runtime.device import check_device

        # The device must exist where the method runs (this process; see runtime.device) before any data is read.
        check_device(spec.device)
        method = distill.get(spec.method.name)
        if method.private and spec.privacy.epsilon is None:
            raise SpecError(f"privacy.epsilon: method '{spec.method.name}' is private and needs a budget")
        if not method.private and spec.privacy.epsilon is not None:
            raise SpecError(
                f"privacy.epsilon: method '{spec.method.name}' gives no privacy guarantee; remove privacy.epsilon"
            )
        if spec.evaluation.model not in models.names():
            raise SpecError(
                f"field 'evaluation.model': unknown model '{spec.evaluation.model}'; "
                f"expected one of: {', '.join(models.names())}"
            )
        config = method.make_config(**spec.method.options())
        # Options that name a PUBLIC set (DP-GenG's generator pretraining and utility tuning): never the sensitive
        # one ('sensitive' as utility_tuning is the explicit, NOT PRIVATE-stamped choice; see unaccounted_reason).
        for option in ("public", "utility_tuning"):
            value = getattr(config, option, None)
            if value != "sensitive":
                check_public_source(value, spec, f"method.{option}")
        check_generator_public(config)
        train, val, test, info = load_splits(spec)
        check_evaluation_model(spec, train.channels, info.num_classes, train.image_size)
        check_plan(spec, train.channels, info.num_classes, train.image_size)
        check_generator(config, spec.seed, train.channels, info.num_classes, train.image_size)
        return PreparedDistill(train=train, val=val, test=test, info=info, method=method, config=config)

    def execute(self, ctx: Any, p: PreparedDistill) -> dict[str, Any]:
        from dpdistill.evaluation.grids import save_class_grid
        from dpdistill.evaluation.selection import charge_selection
        from dpdistill.runtime.device import record_device, resolve_device

        spec = ctx.spec
        torch.manual_seed(spec.seed)
        device = resolve_device(spec.device)
        record_device(ctx, device)
        record_real_precision(ctx, p.config, device)
        if not p.method.private:
            mark_not_private(ctx, spec.method.name)
        # A private method's step loss is logged only if the method declares it a function of charged noisy
        # targets; a loss on a real batch without noise would be an unaccounted release.
        log_loss = not p.method.private or kind_of("distill_loss", p.method.disclosure) == CHARGED

        def on_step(iteration: int, loss: float) -> None:
            if log_loss and iteration % 10 == 0:
                ctx.log_metrics({"distill_loss": float(loss)}, step=iteration)

        # Normalisation statistics are the dataset's published constants, never computed from the sensitive
        # split (that would be an unaccounted release).
        # The method puts its synthetic images, networks and real batches on ``device``; its noise is drawn on
        # the device of the statistic it perturbs.
        kwargs: dict[str, Any] = {"seed": spec.seed, "progress": ctx.progress, "callback": on_step,
                                  "mean": list(p.info.mean), "std": list(p.info.std), "device": device}
        if p.method.private:
            # The job's privacy randomness (secret unless privacy.reproducible_noise): all noise and private
            # sampling of the method come from it, never from spec.seed.
            kwargs["ledger"] = ctx.ledger
            kwargs["noise"] = ctx.noise
            # A noisy-senv selection is paid out of the job's ε: charged now, the method fills what is left.
            charge_selection(spec.evaluation, ctx.ledger)
        with ctx.stage(f"distil ({spec.method.name})"):
            synthetic = p.method.run(p.train, p.config, **kwargs)
        images, labels = synthetic.export()
        art = ctx.run.artifacts
        save_image_set(art / "distilled.pt", images, labels, p.info, spec.method.name)
        save_class_grid(images, labels, art / "distilled_grid.png", num_classes=p.info.num_classes,
                        per_class=min(10, max(1, len(labels) // p.info.num_classes)))
        baseline = getattr(synthetic, "report", {}).get("baseline")
        if baseline is not None:
            # DP-GenG's reference point (ipc images per class of the DP generator's output: a DP output, charged
            # with the generator) is kept beside the release, so `dpdistill evaluate` can re-score both.
            save_image_set(art / "baseline_generated.pt", *baseline, p.info,
                           f"{spec.method.name} (DP-generated baseline)")
        ipc = len(labels) // p.info.num_classes
        ctx.add_summary("made", f"{len(labels)} distilled images ({ipc}/class) of {p.info.name} by "
                        f"{spec.method.name.upper()}")
        metrics: dict[str, float] = {"ipc": float(ipc), "n_released": float(len(labels))}
        ctx.log_metrics(metrics)
        if spec.evaluation.enabled:
            if baseline is None:
                report_utility(ctx, images, labels, p)
            else:
                report_with_baseline(ctx, images, labels, baseline, p)
        report = getattr(synthetic, "report", None)
        if isinstance(report, dict):
            # The noise multipliers and stage times of a multi-stage method (DP output, no data).
            ctx.log_metrics({f"sigma_{k}": float(v) for k, v in report.get("sigma", {}).items()})
            ctx.log_metrics({f"seconds_{k}": float(v) for k, v in report.get("seconds", {}).items()})
            if "factor" in report:  # the multi-formation factor in force ('auto' resolved from the image size)
                ctx.log_metrics({"multiformation_factor": float(report["factor"])})
            if "matching_noise_ratio" in report:  # a plan quantity (σ, feature width, batch): no data
                ratio = float(report["matching_noise_ratio"])
                ctx.log_metrics({"matching_noise_ratio": ratio})
                if report.get("matching") == "none":  # 'auto' gave the matching's share to the generator
                    share = float(report["share_generator"])
                    ctx.log_metrics({"share_generator": share})
                    ctx.add_summary("matching", f"none: per-iteration noise ratio {ratio:.2f}; its share went to "
                                    f"the generator ({share:.2f} of ε); decided from plan quantities and the "
                                    "class sizes of the sensitive split, treated as public")
                else:
                    ctx.add_summary("matching", f"{report.get('matching')} (per-iteration noise ratio {ratio:.2f})")
            for warning in report.get("warnings", []):
                ctx.add_summary("warning", str(warning))
        return {}


def mark_not_private(ctx: Any, method: str) -> None:
    """Mark the run of a non-private method as such everywhere; keep its images out of MLflow unless opted in."""
    mark_release_not_private(ctx, not_private_release(method), IMAGE_ARTIFACTS)


def report_utility(ctx: Any, images: torch.Tensor, labels: torch.Tensor, p: Any,
                   trained_on: str = "", after_submit: Callable[[], None] | None = None,
                   on_ray: bool | None = None) -> dict[str, Any]:
    """Evaluate the release by the spec's protocol, log its figures and summary rows; the primary model's accuracy.

    The one evaluation every job kind runs on its release: ``evaluation.selection`` (none / synv / noisy-senv)
    and ``evaluation.models`` (one row per architecture) as :mod:`dpdistill.evaluation.selection` describes.
    ``p`` needs ``test``, ``info`` and ``val``; ``trained_on`` qualifies the model in the summary (e.g.
    " trained on the synthetic set"). Returns ``{"test": {...}[, "val": {...}]}`` of the primary model.
    ``after_submit``: called once the first models are queued on Ray (see
    :func:`~dpdistill.runtime.parallel.evaluate_seeds`); not called by in-process evaluation.
    ``on_ray``: whether the caller's :func:`evaluation_ray` session runs the models on Ray; None opens one here.
    """
    from dpdistill.evaluation.selection import evaluate_protocol, summary_lines

    spec = ctx.spec
    ev = spec.evaluation
    stage = getattr(ctx, "stage", None)
    # One Ray session for every model the protocol trains (a session already open is reused).
    session = evaluation_ray(ctx) if on_ray is None else contextlib.nullcontext(on_ray)
    with stage("evaluate") if stage is not None else contextlib.nullcontext(), session as use_ray:
        outcome = evaluate_protocol(
            ev, images, labels, evaluate=_evaluator(ctx, p, use_ray, after_submit),
            test=(p.test.images, p.test.labels),
            val=lambda: (p.val.images, p.val.labels) if getattr(p, "val", None) is not None else None,
            num_classes=p.info.num_classes, seed=spec.seed, ledger=ctx.ledger, noise=ctx.noise)
    ctx.log_metrics(outcome.metrics())
    for key, line in summary_lines(outcome, ev.seeds, trained_on):
        ctx.add_summary(key, line)
    return outcome.primary.acc


def _evaluator(ctx: Any, p: Any, use_ray: bool, after_submit: Callable[[], None] | None = None) -> Any:
    """``evaluate(train_x, train_y, test_x, test_y, *, model, model_kwargs, epochs, lr, extra_sets)`` for the
    spec: its seeds, batch size, augmentation, the dataset's published normalisation and the spec's device.
    ``use_ray``: one Ray task per seed, else in this process. ``after_submit`` runs once, after the first
    evaluation's models are queued on Ray."""
    from dpdistill.runtime import parallel

    pending_hook = [after_submit] if after_submit is not None else []

    def evaluate(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 model: str, model_kwargs: dict[str, Any], epochs: int, lr: float,
                 extra_sets: dict[str, Any]) -> dict[str, Any]:
        if use_ray:
            hook = pending_hook.pop() if pending_hook else None
            return parallel.evaluate_seeds(train_x, train_y, test_x, test_y, _seeds(ctx), extra_sets=extra_sets,
                                           use_ray=True, after_submit=hook, model=model, model_kwargs=model_kwargs,
                                           epochs=epochs, lr=lr, **_fixed(ctx, p))
        return parallel.evaluate_seeds(train_x, train_y, test_x, test_y, _seeds(ctx), extra_sets=extra_sets,
                                       use_ray=False, progress=ctx.progress, model=model, model_kwargs=model_kwargs,
                                       epochs=epochs, lr=lr, **_fixed(ctx, p))

    return evaluate


@contextlib.contextmanager
def evaluation_ray(ctx: Any) -> Iterator[bool]:
    """Ray for the evaluation's models when ``evaluation.parallel`` asks for it; yields whether they run on Ray.

    A session already open is reused. A LOCAL Ray that fails to start (Ray waits a fixed 30 s for its node to
    register, which a loaded machine can exceed) must not cost the evaluation of a release that is already
    charged and saved: the models then train in this process, with the same seeds (and, with ``threads``
    pinned, the same figures to the last digit), and the run says so (a warning and a summary line). A
    cluster the job names (``ray.address``, ``--address``, $RAY_ADDRESS) that cannot be reached still fails
    the job: that cluster was asked for."""
    with job_ray_or_here(ctx, ctx.spec.evaluation.parallel) as where:
        if where.not_started:
            say_in_process(ctx, "evaluation", where.not_started)
        yield where.on_ray


@contextlib.contextmanager
def release_ray(ctx: Any, generation_on_ray: bool) -> Iterator[None]:
    """One Ray session for a release's generation chunks AND its evaluation models when both run on Ray.

    Each of them opens its own session (``synthesize_job.draw_set``, :func:`evaluation_ray`), and a session
    already open is reused; without this one, a job that wants both starts a local Ray, stops it, and starts
    another (each start waits for a node: seconds, tens of seconds on a loaded machine). A local start that
    fails here is remembered in ``ctx.local_ray_failed``: both then run in this process without another wait,
    and each says so as before. Opens nothing when at most one of them wants Ray."""
    ev = ctx.spec.evaluation
    with job_ray_or_here(ctx, generation_on_ray and ev.enabled and ev.parallel) as where:
        if where.not_started and hasattr(ctx, "local_ray_failed"):
            ctx.local_ray_failed = where.not_started
        yield


def job_ray_or_here(ctx: Any, wanted: bool) -> Any:
    """:func:`~dpdistill.runtime.cluster.ray_or_here` with the job's cluster settings (``spec.ray``), skipping the
    start when an earlier local start of this run failed (``ctx.local_ray_failed``)."""
    from dpdistill.runtime.cluster import ray_or_here

    ray = ctx.spec.ray
    return ray_or_here(wanted, ray.address, ray.num_cpus, ray.auth_token_path,
                       failed_before=getattr(ctx, "local_ray_failed", None))


def say_in_process(ctx: Any, work: str, reason: str) -> None:
    """Log and summarise that ``work`` ran in this process because a local Ray did not start."""
    log.warning("%s: the %s runs in this process instead", reason, work)
    if hasattr(ctx, "local_ray_failed"):
        ctx.local_ray_failed = reason  # later work in this run does not wait for another failed start
    if hasattr(ctx, "add_summary"):
        ctx.add_summary(f"{work} on", f"this process ({reason})")


def _seeds(ctx: Any) -> list[int]:
    """The evaluation models' seeds (public: from spec.seed)."""
    return [ctx.spec.seed * 1000 + i for i in range(ctx.spec.evaluation.seeds)]


def _fixed(ctx: Any, p: Any) -> dict[str, Any]:
    """The spec's evaluation settings every model shares: classes, batch size, augmentation, the dataset's
    published normalisation and the device."""
    from dpdistill.runtime.device import resolve_device

    ev = ctx.spec.evaluation
    return dict(num_classes=p.info.num_classes, batch_size=ev.batch_size, augment=ev.augmentation(),
                mean=tuple(p.info.mean), std=tuple(p.info.std), device=resolve_device(ctx.spec.device))


def save_image_set(path: Path, images: torch.Tensor, labels: torch.Tensor, info: Any, method: str) -> None:
    """An image set as the run folder keeps it (the release, DP-GenG's DP-generated baseline): the tensors with
    the dataset's name and classes and the method that made them (what `dpdistill evaluate` reads back)."""
    torch.save({"images": images, "labels": labels, "num_classes": info.num_classes, "dataset": info.name,
                "method": method}, path)


def report_with_baseline(ctx: Any, images: torch.Tensor, labels: torch.Tensor, baseline: tuple[Any, Any],
                         p: Any) -> None:
    """The release's evaluation (:func:`report_utility`) and DP-GenG's reference point beside it: ipc images per
    class drawn from the DP generator's output (already paid for), evaluated by the same protocol's model,
    epochs and seeds, on the test split and (when the dataset has one) the validation split, so that a choice
    between the release and its own generator's output can be read on validation like every other choice.

    On Ray the baseline's models are queued right behind the release's first models, so they fill the cores the
    release's last seeds leave idle; in-process they train after the release's.
    """
    from dpdistill.evaluation.selection import reads_validation
    from dpdistill.runtime import parallel

    ev = ctx.spec.evaluation
    pending: list[parallel.PendingSeeds] = []
    on_ray = [False]

    # The validation split under the same rule as the release's own evaluation.
    val = getattr(p, "val", None) if reads_validation(ev) else None
    extra = {"val": (val.images, val.labels)} if val is not None else {}

    def queue_baseline() -> None:
        if not pending:
            pending.append(parallel.submit_seeds(
                *baseline, p.test.images, p.test.labels, _seeds(ctx), extra_sets=extra, use_ray=on_ray[0],
                progress=ctx.progress, model=ev.model, model_kwargs=dict(ev.model_options), epochs=ev.epochs,
                lr=ev.lr, **_fixed(ctx, p)))

    # One Ray session for both evaluations: the queued baseline must outlive the release's evaluation.
    with evaluation_ray(ctx) as use_ray:
        on_ray[0] = use_ray
        try:
            report_utility(ctx, images, labels, p, after_submit=queue_baseline, on_ray=use_ray)
            stage = getattr(ctx, "stage", None)
            with stage("evaluate baseline") if stage is not None else contextlib.nullcontext():
                queue_baseline()  # in-process, or a protocol that never queued on Ray: now
                base = pending[0].result()
        except BaseException as err:
            for job in pending:
                job.abandon(err)
            raise
    ctx.log_metrics({"baseline_generated_acc_mean": base["test"]["mean"],
                     "baseline_generated_acc_std": base["test"]["std"]})
    on_val = ""
    if "val" in base:
        ctx.log_metrics({"baseline_generated_val_acc_mean": base["val"]["mean"],
                         "baseline_generated_val_acc_std": base["val"]["std"]})
        on_val = f" (val {100 * base['val']['mean']:.2f} ± {100 * base['val']['std']:.2f} %)"
    ctx.add_summary(
        "baseline",
        f"{100 * base['test']['mean']:.2f} ± {100 * base['test']['std']:.2f} %{on_val} with "
        f"{len(baseline[1]) // p.info.num_classes} DP-generated images/class (same evaluation)",
    )


def config_as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config.model_dump())
