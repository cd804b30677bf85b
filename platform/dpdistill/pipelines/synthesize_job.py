"""Job kind ``synthesize``: fit a DP image synthesiser on the sensitive training split, release a synthetic set,
and evaluate its fidelity and utility.

Stages: load (prepare) → pretrain on public data (optional, free) → fit (charges the ledger before each
release) → generate (post-processing) → release (synthetic.npz, class grids, the fitted synthesiser) →
fidelity (FID / IS / precision-recall / FLD against the real TEST split, extractor named) → utility (fresh
classifiers trained on the synthetic set, tested on the real test split: the foundation's protocol).

The spec's method block holds the method's own options (see ``synthesis.get(name).config_type``) plus the job
options of :class:`SynthesizeOptions`, e.g.::

    method: {name: dp-merf, iterations: 2000, n_per_class: 6000, pretrain: glyphs}

Only DP outputs reach the run folder: the synthetic set, the generator and the method's noisy statistics. Every
key the job logs is declared: the job's own in :data:`DISCLOSURE`, the method's in its ``disclosure``
(:func:`disclosure_for` merges them; ``tests/test_disclosure_synthesis.py`` enforces it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpdistill.errors import SpecError
from dpdistill.evaluation.selection import DISCLOSURE as EVALUATION_DISCLOSURE
from dpdistill.privacy.disclosure import ACCOUNTING, EVALUATION, PUBLIC

# A synthesize run's release (the fitted generator) and the set it drew from it (post-processing), in its folder.
GENERATOR_FILE = Path("artifacts") / "synthesizer.pt"
SYNTHETIC_FILE = Path("artifacts") / "synthetic.npz"

log = logging.getLogger("dpdistill.pipelines.synthesize")

# The keys this job writes beside the method's own (metrics.json / MLflow, fit_report.json, fidelity.json,
# MLflow params) and why each is safe; runner/ledger/evaluation keys are privacy.disclosure.COMMON.
# fidelity (metrics and fidelity.json): a generated set against the real TEST split (never the sensitive training
# split). Also an evaluate job's, for a set it draws afresh from a released generator.
FIDELITY_DISCLOSURE: dict[str, str] = {
    "fid": EVALUATION,
    "fld": EVALUATION,  # its bandwidths are fitted on half the real test split, the other half is scored
    "is_mean": EVALUATION,
    "is_std": EVALUATION,
    "precision": EVALUATION,
    "recall": EVALUATION,
    "inception_score": EVALUATION,
    "inception_score_std": EVALUATION,
    "extractor": PUBLIC,
    "n_real": PUBLIC,
    "n_fake": PUBLIC,
    "k": PUBLIC,
}
DISCLOSURE: dict[str, str] = {
    **EVALUATION_DISCLOSURE,  # the evaluation protocol's selection and per-model rows
    **FIDELITY_DISCLOSURE,
    # fit_report.json's additions to the FitReport
    "privacy_note": PUBLIC,
    # plan.json: the charged plan (the mechanisms are what ledger.json holds; params are the public schedule)
    "format": PUBLIC,
    "plan_id": PUBLIC,
    "charges": ACCOUNTING,
    "params.*": ACCOUNTING,
    # MLflow params: the flattened spec (the job's public configuration)
    "name": PUBLIC,
    "kind": PUBLIC,
    "description": PUBLIC,
    "seed": PUBLIC,
    "device": PUBLIC,
    "threads": PUBLIC,
    "compile": PUBLIC,
    "data.*": PUBLIC,
    "method.*": PUBLIC,
    "evaluation.*": PUBLIC,
    "ray.*": PUBLIC,
    "resources.*": PUBLIC,
    "tracking.*": PUBLIC,
    "privacy.*": ACCOUNTING,
}


def disclosure_for(method: str) -> dict[str, str]:
    """Every key a synthesize job of ``method`` may write, with its kind: the job's and the method's."""
    from dpdistill import synthesis

    return {**DISCLOSURE, **synthesis.get(method).disclosure}


@dataclass
class SynthesizeOptions:
    """Job options that sit in the method block beside the method's own."""

    n_per_class: int = 6000  # synthetic images per class (6000: the 60,000 of an MNIST-sized release)
    pretrain: str | None = None  # public dataset to pretrain the generator on (e.g. glyphs); None: none
    fidelity: bool = True
    fidelity_extractor: str = "domain"  # "domain" (ConvNet trained on fidelity_public) or "inception-v3"
    fidelity_public: str = "glyphs"
    inception_weights: str | None = None  # local Inception-v3 state dict (needed for "inception-v3")
    fidelity_samples: int = 10_000  # at most this many real and synthetic images in the fidelity metrics
    # DP-SGD methods (the diffusion synthesisers): Ray Train workers of the fit, each holding one shard of the
    # sensitive split and one GPU when device is cuda (1: in this process). The plan is charged here first.
    train_workers: int = 1
    generate_chunks: int = 1  # > 1: generate as this many parallel Ray tasks (runtime/generation.py)


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(SynthesizeOptions))
_CONFIG_TYPES: dict[str, type] = {}


def job_config_type(method: str) -> type:
    """The method's config dataclass extended with :class:`SynthesizeOptions` (what the spec validates)."""
    from dpdistill import synthesis

    cls = synthesis.get(method)
    if cls.name not in _CONFIG_TYPES:
        clash = set(_JOB_FIELDS) & {f.name for f in dataclasses.fields(cls.config_type)}
        if clash:
            raise TypeError(f"{cls.name}: config fields {sorted(clash)} clash with the job options")
        hints = typing.get_type_hints(SynthesizeOptions)  # real types: the spec validates against them
        extra = [(f.name, hints[f.name], dataclasses.field(default=f.default))
                 for f in dataclasses.fields(SynthesizeOptions)]
        made = dataclasses.make_dataclass(f"{cls.config_type.__name__}Job", extra, bases=(cls.config_type,))
        made.__module__ = __name__
        _CONFIG_TYPES[cls.name] = made
    return _CONFIG_TYPES[cls.name]


def split_options(method: str, options: dict[str, Any]) -> tuple[Any, SynthesizeOptions]:
    """The method's config and the job options from the resolved method block."""
    from dpdistill import synthesis

    cls = synthesis.get(method)
    method_opts = {k: v for k, v in options.items() if k not in _JOB_FIELDS}
    job_opts = {k: v for k, v in options.items() if k in _JOB_FIELDS}
    try:
        return cls.config_type(**method_opts), SynthesizeOptions(**job_opts)
    except TypeError as err:
        raise SpecError(f"method '{method}': {err}") from None


@dataclass
class PreparedSynthesize:
    """Loaded inputs of a synthesize job (kept in memory only)."""

    train: Any  # data.ImageSet, sensitive
    val: Any  # data.ImageSet, sensitive (scored, never released)
    test: Any  # data.ImageSet, for the final evaluation only
    info: Any  # data.DatasetInfo
    method: type  # the Synthesizer class
    config: Any  # the method's config
    job: SynthesizeOptions

    @property
    def n_sensitive(self) -> int:
        return len(self.train)


class SynthesizePipeline:
    """The ``synthesize`` job kind."""

    kind = "synthesize"

    def method_config(self, method: str, source: str) -> Any:
        from dpdistill import synthesis

        if method.lower() not in synthesis.names():
            raise SpecError(
                f"{source}: field 'method.name': unknown synthesis method '{method}'; "
                f"expected one of: {', '.join(synthesis.names())}"
            )
        return job_config_type(method)

    def prepare(self, spec: Any) -> PreparedSynthesize:
        from dpdistill import models, synthesis
        from dpdistill.evaluation.selection import check_plan
        from dpdistill.pipelines import check_evaluation_model, check_public_source, check_public_start
        from dpdistill.pipelines.distill_job import load_splits
        from dpdistill.runtime.device import check_device

        # The device must exist where the synthesiser runs (this process; see runtime.device) before any data
        # is read.
        check_device(spec.device)
        cls = synthesis.get(spec.method.name)
        if spec.privacy.epsilon is None:
            raise SpecError(f"privacy.epsilon: method '{spec.method.name}' is private and needs a budget")
        if spec.evaluation.model not in models.names():
            raise SpecError(f"field 'evaluation.model': unknown model '{spec.evaluation.model}'; "
                            f"expected one of: {', '.join(models.names())}")
        config, job = split_options(spec.method.name, spec.method.options())
        if job.n_per_class < 1:
            raise SpecError(f"field 'method.n_per_class': must be >= 1, got {job.n_per_class}")
        check_public_source(job.pretrain, spec, "method.pretrain")
        if job.fidelity and job.fidelity_extractor == "domain":
            check_public_source(job.fidelity_public, spec, "method.fidelity_public")
        if job.fidelity and job.fidelity_extractor not in ("domain", "inception-v3"):
            raise SpecError(f"field 'method.fidelity_extractor': expected 'domain' or 'inception-v3', got "
                            f"'{job.fidelity_extractor}'")
        if job.fidelity and job.fidelity_extractor == "inception-v3":
            if not job.inception_weights or not Path(job.inception_weights).is_file():
                raise SpecError(f"field 'method.inception_weights': Inception-v3 weights file "
                                f"'{job.inception_weights}' not found (or use fidelity_extractor: domain)")
        if job.fidelity and job.fidelity_samples < 4:  # FLD halves the real sample; k-NN needs a few points
            raise SpecError(f"field 'method.fidelity_samples': must be >= 4, got {job.fidelity_samples}")
        if job.train_workers < 1 or job.generate_chunks < 1:
            raise SpecError("field 'method.train_workers' / 'method.generate_chunks': must be >= 1")
        if job.train_workers > 1 and not cls.runs_dp_sgd:
            raise SpecError(f"field 'method.train_workers': {cls.name} does not train with DP-SGD through an "
                            "executor; only the diffusion synthesisers shard their fit over Ray Train workers")
        # dpdm's config has no base_checkpoint
        check_public_start(cls, job.pretrain, getattr(config, "base_checkpoint", ""), cls.name, "method.pretrain",
                           "method.base_checkpoint")
        train, val, test, info = load_splits(spec)
        if job.train_workers > len(train):  # every worker needs a shard of at least one record
            raise SpecError(f"field 'method.train_workers': {job.train_workers} workers for {len(train)} "
                            "sensitive records; use at most one worker per record")
        # Build once here so a bad option (e.g. a zero width) fails before the run folder exists.
        cls(config, channels=train.channels, image_size=train.image_size, num_classes=info.num_classes,
            seed=spec.seed)
        check_evaluation_model(spec, train.channels, info.num_classes, train.image_size)
        check_plan(spec, train.channels, info.num_classes, train.image_size)
        return PreparedSynthesize(train=train, val=val, test=test, info=info, method=cls, config=config, job=job)

    def execute(self, ctx: Any, p: PreparedSynthesize) -> dict[str, Any]:
        from dpdistill import data
        from dpdistill.evaluation.selection import charge_selection
        from dpdistill.pipelines.distill_job import release_ray
        from dpdistill.runtime.device import record_device, resolve_device

        spec = ctx.spec
        torch.manual_seed(spec.seed)
        device = resolve_device(spec.device)
        record_device(ctx, device)
        art = ctx.run.artifacts
        art.mkdir(parents=True, exist_ok=True)
        # spec.seed: the public randomness (weights, features, latents); ctx.noise: the privacy noise and private
        # sampling (secret, unless the spec turned on the NOT PRIVATE reproducible mode).
        synth = p.method(p.config, channels=p.train.channels, image_size=p.train.image_size,
                         num_classes=p.info.num_classes, seed=spec.seed, device=device,
                         noise=ctx.noise)
        if p.job.pretrain is not None:
            public = data.load(p.job.pretrain, "train", image_size=p.train.image_size)
            with ctx.stage("pretrain (public data)"):
                cached = synth.pretrain(public, progress=ctx.progress, cache=True)
            ctx.add_summary("pretrained on", f"{public.name} ({len(public)} public images, no privacy cost"
                            f"{'; restored from the public pre-training cache' if cached else ''})")

        def on_step(step: int, values: dict[str, float]) -> None:
            ctx.log_metrics({k: float(v) for k, v in values.items()}, step=step)

        with _ray_if(p.job.train_workers > 1, spec):
            if p.job.train_workers > 1:  # before anything is charged: Ray Train would wait forever
                from dpdistill.runtime.dp_train import check_train_capacity, cluster_nodes

                check_train_capacity(cluster_nodes(), p.job.train_workers, device.type == "cuda")
            # A noisy-senv selection is paid out of the job's ε: charged now, the fit fills what is left.
            charge_selection(spec.evaluation, ctx.ledger)
            with ctx.stage(f"fit ({synth.name})"):
                report = synth.fit(p.train, ctx.ledger, progress=ctx.progress, callback=on_step,
                                   executor=_dp_sgd_executor(p.job.train_workers, device, ctx))
        if synth.last_plan is not None:  # what was charged, as data (public: σ, q, steps, clip, ...)
            (art / "plan.json").write_text(json.dumps(synth.last_plan.to_dict(), indent=2) + "\n")
        # The release is the fitted synthesiser: saved before generation (post-processing), so that a failed
        # generation never loses what was charged.
        synth.save(art / GENERATOR_FILE.name)
        with release_ray(ctx, p.job.generate_chunks > 1):
            self._release(ctx, p, synth, report, device)
        return {}

    def _release(self, ctx: Any, p: PreparedSynthesize, synth: Any, report: Any, device: torch.device) -> None:
        """Draw the released set from the fitted (saved) ``synth``, write it, and measure it: post-processing."""
        from dpdistill.pipelines.distill_job import report_utility

        spec, art = ctx.spec, ctx.run.artifacts
        images, labels = draw_set(ctx, synth, p.job.n_per_class, p.job.generate_chunks)
        save_synthetic(art, images, labels, p.info, synth.name)
        ctx.add_summary("made", f"{len(labels)} DP synthetic images ({p.job.n_per_class}/class) of {p.info.name} "
                        f"by {synth.name.upper()}")
        ctx.add_summary("privacy", f"ε={report.epsilon:.3f}, δ={report.delta:.3g} (add-or-remove-one; "
                        f"replace-one equivalent ε={report.replace_one[0]:.3f}); "
                        f"{'; '.join(report.mechanisms)}")
        ctx.log_metrics({**report.as_metrics(), "n_released": float(len(labels))})
        fit_info = {"method": synth.name, "paper_neighbouring": synth.paper_neighbouring,
                    "privacy_note": synth.privacy_note, **dataclasses.asdict(report)}
        (art / "fit_report.json").write_text(json.dumps(fit_info, indent=2, default=str) + "\n")

        if p.job.fidelity:
            report_fidelity(ctx, p.job, images, p.test.images, p.train.image_size, device)
        if spec.evaluation.enabled:
            report_utility(ctx, images, labels, p, trained_on=" trained on the synthetic set")


def draw_set(ctx: Any, synth: Any, n_per_class: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` images of every class from a fitted ``synth`` in the run's ``generate`` stage, seeded by
    the spec's public seed: one ``generate`` call, or ``chunks`` > 1 parallel Ray tasks (in this process, with
    the same chunks and seeds, when a local Ray does not start: the same images). Post-processing: no charge.
    The images come back as released (:func:`as_released`): what the run measures is what it writes."""
    from dpdistill.pipelines.distill_job import job_ray_or_here, say_in_process
    from dpdistill.runtime.generation import generate_parallel

    spec = ctx.spec
    with ctx.stage("generate"), job_ray_or_here(ctx, chunks > 1) as where:
        if where.not_started:
            say_in_process(ctx, "generation", where.not_started)
        if chunks > 1:
            images, labels = generate_parallel(synth, n_per_class, spec.seed, use_ray=where.on_ray, chunks=chunks,
                                               threads=spec.threads or 1)
        else:
            images, labels = synth.generate(n_per_class=n_per_class, seed=spec.seed)
    return as_released(images), labels


PIXEL_SCALE = 255  # synthetic.npz holds uint8 pixels over this scale (written as its `scale`)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """``images`` in [0, 1] as the uint8 pixels :func:`save_synthetic` writes: the one 8-bit encoding."""
    return (images.clamp(0, 1) * PIXEL_SCALE).round().to(torch.uint8)


def as_released(images: torch.Tensor) -> torch.Tensor:
    """``images`` at the precision the run releases them: :func:`to_pixels` read back as a reader of
    synthetic.npz does (``float() / scale``), so equal to the bit to what ``dpdistill evaluate RUN`` loads.

    A run measures (fidelity, utility) the set it releases, not the sampler's float output: otherwise
    ``dpdistill evaluate RUN`` of the saved set reads slightly other figures than the run recorded (session 68
    saw up to 0.14 points on MNIST)."""
    return to_pixels(images).float() / float(PIXEL_SCALE)


def _ray_if(needed: bool, spec: Any) -> Any:
    """Ray for a stage that needs it (the job's cluster settings), else nothing."""
    import contextlib

    if not needed:
        return contextlib.nullcontext()
    from dpdistill.runtime.cluster import ray_session

    return ray_session(spec.ray.address, spec.ray.num_cpus, spec.ray.auth_token_path)


def _dp_sgd_executor(workers: int, device: torch.device, ctx: Any) -> Any:
    """None (the method's in-process default) for one worker, else a Ray Train DP-SGD executor."""
    if workers <= 1:
        return None
    import functools

    from dpdistill.runtime.dp_train import fit_dp_sgd

    return functools.partial(fit_dp_sgd, executor="ray-train", num_workers=workers,
                             use_gpu=device.type == "cuda", storage_path=ctx.run.path / "train",
                             progress=ctx.progress)


def report_fidelity(ctx: Any, job: Any, images: torch.Tensor, real_test: torch.Tensor, image_size: int,
                    device: Any) -> None:
    """FID, FLD, IS, precision and recall of ``images`` against the real TEST split, with ``job``'s fidelity
    settings (a SynthesizeOptions): logged, written to artifacts/fidelity.json and summarised."""
    from dpdistill.evaluation.extractors import get_extractor
    from dpdistill.evaluation.fidelity import evaluate_fidelity

    extractor = get_extractor(job.fidelity_extractor, image_size=image_size, inception_weights=job.inception_weights,
                              public=job.fidelity_public, device=device)
    with ctx.stage("fidelity"):
        fid = evaluate_fidelity(real_test, images, extractor, max_samples=job.fidelity_samples, seed=ctx.spec.seed)
    ctx.log_metrics(fid.as_metrics())
    (ctx.run.artifacts / "fidelity.json").write_text(json.dumps(fid.as_dict(), indent=2) + "\n")
    ctx.add_summary("fidelity", f"FID {fid.fid:.2f}, FLD {fid.fld:.2f}, IS {fid.inception_score:.2f}, precision "
                    f"{fid.precision:.3f}, recall {fid.recall:.3f} (extractor {fid.extractor}; vs real test)")


def save_synthetic(folder: Any, images: torch.Tensor, labels: torch.Tensor, info: Any, method: str) -> None:
    """A generated set as a run writes it: ``synthetic.npz`` (uint8 images, labels, dataset, method), an overview
    grid and one grid per class. Post-processing of a DP release (a synthesize run, or an evaluate run that draws
    a fresh set from one)."""
    from dpdistill.evaluation.grids import save_class_grid

    np.savez_compressed(
        Path(folder) / SYNTHETIC_FILE.name, images=to_pixels(images).numpy(),
        labels=labels.numpy(), num_classes=info.num_classes, dataset=info.name, method=method, scale=PIXEL_SCALE,
    )
    save_class_grid(images, labels, Path(folder) / "synthetic_grid.png", num_classes=info.num_classes,
                    per_class=10)
    _per_class_grids(images, labels, info.num_classes, folder)


def _per_class_grids(images: torch.Tensor, labels: torch.Tensor, num_classes: int, folder: Any,
                     per_class: int = 64) -> None:
    """One 8-wide grid of synthetic images per class: grid_class<k>.png."""
    import torch.nn.functional as F
    from torchvision.utils import save_image

    for k in range(num_classes):
        x = images[(labels == k).nonzero().flatten()[:per_class]]
        if len(x) == 0:
            continue
        if x.shape[-1] < 32:  # 8x8 digits are unreadable at native size
            x = F.interpolate(x, scale_factor=max(1, 32 // x.shape[-1]), mode="nearest")
        save_image(x.clamp(0, 1), str(folder / f"grid_class{k}.png"), nrow=8, padding=2, pad_value=0.5)
