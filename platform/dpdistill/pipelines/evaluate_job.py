"""The ``evaluate`` job kind: re-score a finished run's released images under another evaluation protocol.

A run's release (``artifacts/distilled.pt`` of a distill or SFDD run) is a DP output. Training fresh models on
it and scoring them on the test (and validation) split is post-processing: an evaluate job charges nothing and
has no ledger. That is what lets a researcher compare releases under one protocol (another model, epoch grid,
selection rule, augmentation) without spending budget again, e.g. ``dpdistill evaluate RUN_DIR --set
'evaluation.models=[convnet, resnet18]'``. What it may not do is make a charged choice: ``noisy-senv`` reads
the sensitive validation split through a mechanism whose charge belongs in a ledger, and this job has none
(refused before anything is read).

The job's spec is built from the source run's ``spec.yaml`` (:func:`evaluate_spec`): the same data, seed, device
and evaluation block, with ``--set`` overrides restricted to the fields that describe how a release is scored.
The source is checked before any sensitive byte is read: the run finished (``status.json`` says completed), its
release file is there, and the release's dataset, classes and image shape match the data the spec loads.

A synthesize run's release is its fitted generator (``artifacts/synthesizer.pt``); the set it drew
(``artifacts/synthetic.npz``) is post-processing of it. evaluate re-scores that set, or, given any of the sampling
options in ``GENERATION`` (``--set method.n_per_class=1000 --set method.guidance_scale=3``), draws a fresh set from
the released generator first (seeded by the evaluate spec's public seed, like the synthesize job's own draw) and
scores that: more images, or another guidance scale or DDIM schedule, without spending budget again. The draw
runs as the synthesize job's does (``synthesize_job.draw_set``): in ``method.generate_chunks`` parallel Ray tasks
when that is above 1 — unset, the source's own setting, since the chunks fix the latents' seeds. The fresh set
is written to the evaluate run's folder as a synthesize run writes its own. With the source's own options and seed
it is the source's set, so the source's figures are reproduced.

A DP-GenG run also keeps its DP-generated baseline (``artifacts/baseline_generated.pt``: ipc images per class of
the generator's output, a DP output charged with the generator). When the source has one, it is checked the same
way and re-scored beside the release under the same protocol (``baseline_generated_*``), as the distill job
reports it, so "the release against its own generator" can be read under any protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from dpdistill.errors import SpecError
from dpdistill.evaluation.selection import DISCLOSURE as EVALUATION_DISCLOSURE
from dpdistill.pipelines import check_evaluation_model
from dpdistill.pipelines.distill_job import load_splits, report_utility, report_with_baseline
from dpdistill.pipelines.not_private import mark_release_not_private
from dpdistill.pipelines.synthesize_job import FIDELITY_DISCLOSURE
from dpdistill.privacy.disclosure import ACCOUNTING, EVALUATION, PUBLIC
from dpdistill.spec import JobSpec

METHOD = "release"
RELEASE_FILE = Path("artifacts") / "distilled.pt"
# Sampling options of a synthesize run's released generator that an evaluate job may set (method.<name>): a fresh
# draw from the release is post-processing. guidance_scale, sample_steps and sample_eta exist for the diffusion
# synthesisers.
GENERATION = ("n_per_class", "guidance_scale", "sample_steps", "sample_eta")
# A fresh draw's chunks (each a Ray task, runtime/generation.py). They fix the latents' seeds, so 1 chunk and 2
# draw different sets; unset, the source's method.generate_chunks, so that the source's options give its set.
CHUNKS = "generate_chunks"
FRESH_DRAW = (*GENERATION, CHUNKS)  # every method.<name> an evaluate job may set
BASELINE_FILE = Path("artifacts") / "baseline_generated.pt"  # DP-GenG's DP-generated baseline, when kept
# The top-level fields an override may change: how a release is scored and where the scoring runs. The data,
# the method and the privacy block come from the source run (the release was made from them).
OVERRIDABLE = ("evaluation", "seed", "device", "threads", "compile", "ray", "resources", "tracking", "name",
               "description")
# The data fields that say where the files are, not which records: they may differ from the source's.
DATA_LOCATION = ("root", "download")

# Every key an evaluate job logs (the runner's are in disclosure.COMMON): the protocol's figures, facts about
# the (public) release, and the source ledger's totals.
DISCLOSURE: dict[str, str] = {
    **EVALUATION_DISCLOSURE,
    "ipc": PUBLIC,  # counted from the released file
    "run": PUBLIC, "release": PUBLIC, "sha256": PUBLIC, "commit": PUBLIC, "method": PUBLIC,  # source.json
    "baseline": PUBLIC, "baseline_sha256": PUBLIC,  # source.json: the DP-generated baseline file, when re-scored
    **{f"baseline_generated_{split}acc_{stat}": EVALUATION for split in ("", "val_") for stat in ("mean", "std")},
    "epsilon": ACCOUNTING, "delta": ACCOUNTING,  # source.json: the source ledger's composed (ε, δ)
    # source.json of a synthesize source: the released generator, its sha256, and the options of a fresh draw
    "generator": PUBLIC, "generator_sha256": PUBLIC, "generated": PUBLIC,
    **FIDELITY_DISCLOSURE,  # a fresh draw's fidelity, when the source measured its own set's
    **{k: PUBLIC for name in JobSpec.model_fields for k in (name, f"{name}.*")},  # MLflow params: the spec
}


class ReleaseSource(BaseModel):
    """The ``method`` block of an evaluate job: which finished run's release to re-score."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(min_length=1, description="the finished run folder whose release is re-scored")
    # A synthesize source only: draw a fresh set from its released generator with these sampling options (unset:
    # the source's own) and score that instead of the source's synthetic.npz.
    n_per_class: int | None = Field(default=None, ge=1, description="images per class to draw from the generator")
    guidance_scale: float | None = Field(default=None, ge=0, description="classifier-free guidance (diffusion)")
    sample_steps: int | None = Field(default=None, ge=1, description="DDIM steps (diffusion)")
    sample_eta: float | None = Field(default=None, ge=0, le=1, description="DDIM's η: 0 deterministic, 1 DDPM's "
                                     "posterior noise (diffusion)")
    generate_chunks: int | None = Field(default=None, ge=1, description="draw as this many parallel Ray tasks "
                                        "(unset: as the source did; the chunks fix the images' seeds)")

    def generation(self) -> dict[str, Any]:
        """The sampling options this job sets (empty: score the source's own set)."""
        return {k: getattr(self, k) for k in FRESH_DRAW if getattr(self, k) is not None}


@dataclass
class PreparedEvaluate:
    """The release to re-score and the splits that score it (kept in memory only)."""

    images: torch.Tensor
    labels: torch.Tensor
    source: dict[str, Any]  # run folder, release sha256, source method / ε: public facts about the release
    val: Any
    test: Any
    info: Any
    baseline: tuple[torch.Tensor, torch.Tensor] | None = None  # DP-GenG's DP-generated baseline, when kept
    generator: Any = None  # a synthesize source's loaded generator, when this job draws a fresh set from it
    n_per_class: int = 0  # how many images per class that draw makes
    chunks: int = 1  # > 1: that draw runs as this many Ray tasks (the source's generate_chunks unless set)
    fidelity: Any = None  # the source's fidelity settings (SynthesizeOptions), when it measured its own set

    @property
    def n_sensitive(self) -> int:  # nothing is charged: no ledger is made for this job
        return 0


def read_source(run_dir: Path) -> dict[str, Any]:
    """The source run's status, spec name, method and composed ε, checked; SpecError naming the file if not a
    finished run with an image release. Reads only the run folder's own records (no sensitive data)."""
    if not run_dir.is_dir():
        raise SpecError(f"{run_dir}: not a run folder (expected the folder holding spec.yaml and status.json)")
    status_path = run_dir / "status.json"
    try:
        status = json.loads(status_path.read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"{status_path}: cannot read the run's status ({type(e).__name__})") from None
    if not isinstance(status, dict):
        raise SpecError(f"{status_path}: expected a JSON object")
    if status.get("status") != "completed":
        raise SpecError(f"{status_path}: the run is '{status.get('status')}', not completed; only a finished "
                        "run's release can be re-scored")
    from dpdistill.pipelines.synthesize_job import GENERATOR_FILE, SYNTHETIC_FILE

    release = run_dir / RELEASE_FILE
    generator = run_dir / GENERATOR_FILE
    if not release.is_file() and generator.is_file():  # a synthesize run: the set drawn from its generator
        release = run_dir / SYNTHETIC_FILE
        if not release.is_file():
            raise SpecError(f"{release}: missing; a finished synthesize run holds the set it drew from its generator")
    if not release.is_file():
        raise SpecError(f"{release}: missing; the run released no image set. evaluate re-scores released image "
                        "sets (distill, sfdd and synthesize runs)")
    epsilon = delta = None
    ledger_path = run_dir / "ledger.json"
    if ledger_path.is_file():
        try:
            composed = json.loads(ledger_path.read_text())["composed"]
            epsilon, delta = float(composed["epsilon"]), float(composed["delta"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SpecError(f"{ledger_path}: cannot read the composed ε, δ ({type(e).__name__})") from None
    from dpdistill.runtime.report_html import read_run

    # The source's NOT PRIVATE reasons as every reader of a run folder sees them (status.json, the ledger's
    # guarantee, metrics.json), not only status.json's.
    not_private = read_run(run_dir).not_private
    baseline = run_dir / BASELINE_FILE
    return {"run": str(run_dir.resolve()), "release": str(release.resolve()), "epsilon": epsilon, "delta": delta,
            "not_private": not_private, "commit": (status.get("provenance") or {}).get("commit"),
            "baseline": str(baseline.resolve()) if baseline.is_file() else None,
            "generator": str(generator.resolve()) if generator.is_file() else None}


def load_release(source: dict[str, Any], key: str = "release") -> tuple[dict[str, Any], str]:
    """The image file ``source[key]``'s contents (the release, or the DP-generated baseline) and the sha256 of
    the very bytes loaded; SpecError naming the file."""
    path = source[key]
    try:
        raw = Path(path).read_bytes()  # one read (closed at once), hashed and loaded
        if str(path).endswith(".npz"):  # a synthesize run's set: uint8 images over `scale`
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                saved = {"images": torch.from_numpy(z["images"]).float() / float(z["scale"]),
                         "labels": torch.from_numpy(z["labels"]).long(), "dataset": str(z["dataset"]),
                         "method": str(z["method"])}
        else:
            saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)  # tensors, ints, strings
            saved["images"], saved["labels"] = saved["images"].float(), saved["labels"].long()
    except Exception as e:  # noqa: BLE001 - any unreadable release is the same one-line error
        raise SpecError(f"{path}: not a readable release ({type(e).__name__})") from None
    return saved, hashlib.sha256(raw).hexdigest()


def source_spec(run_dir: Path) -> Any:
    """The source run's resolved spec.yaml; SpecError naming the file when it is missing or invalid."""
    from dpdistill.spec import load_run_spec

    spec_path = run_dir / "spec.yaml"
    if not spec_path.is_file():
        raise SpecError(f"{spec_path}: missing; cannot tell which data and protocol the release belongs to")
    return load_run_spec(spec_path)


def evaluate_spec(run_dir: str | Path, overrides: list[str] | None = None) -> Any:
    """The evaluate job for ``run_dir``: its spec.yaml's data, seed, device and evaluation, method ``release``,
    no privacy block, then ``overrides`` (only the fields in OVERRIDABLE). SpecError naming the file or field."""
    from dpdistill.spec import apply_overrides, parse_override, validate_spec

    run_dir = Path(run_dir)
    source = read_source(run_dir)
    src = source_spec(run_dir)
    for text in overrides or []:
        keys, _ = parse_override(text)
        if keys[0] not in OVERRIDABLE and not (keys[0] == "data" and keys[1:2] and keys[1] in DATA_LOCATION) \
                and not (keys[0] == "method" and keys[1:] and keys[1] in FRESH_DRAW and len(keys) == 2):
            raise SpecError(f"--set {text}: field '{'.'.join(keys)}' comes from the source run; evaluate can set "
                            f"only {', '.join(OVERRIDABLE)}, data.{' / data.'.join(DATA_LOCATION)} and (a "
                            f"synthesize run's fresh draw) method.{' / method.'.join(FRESH_DRAW)}")
    doc = src.model_dump(mode="json")
    doc = {k: doc[k] for k in ("seed", "device", "threads", "compile", "data", "evaluation", "ray", "resources",
                               "tracking")}
    doc.update(name=f"{src.name[:90]}-evaluate", kind="evaluate", method={"name": METHOD, "run": source["run"]},
               description=f"re-score of {source['run']}")
    return validate_spec(apply_overrides(doc, overrides or []), f"evaluate {run_dir}")


def check_same_data(spec: Any, src: Any, run_dir: Path) -> None:
    """Refuse an evaluate spec whose data block names other records than the source run's (``src``, its
    resolved spec): another ``val_seed`` (or image size, subset, dataset) would carve the validation or test
    split out of records the release was made from, and report a figure on them as held out. Only where the
    files are may differ."""
    theirs = src.data.model_dump(mode="json")
    ours = spec.data.model_dump(mode="json")
    for key in sorted(set(theirs) | set(ours)):
        if key not in DATA_LOCATION and theirs.get(key) != ours.get(key):
            raise SpecError(f"field 'data.{key}': {ours.get(key)!r}, but the release of {run_dir} was made with "
                            f"{theirs.get(key)!r}; an evaluate job scores a release on its own run's splits")


class EvaluatePipeline:
    """The ``evaluate`` job kind (see the module docstring)."""

    kind = "evaluate"

    def method_config(self, method: str, source: str) -> Any:
        if method != METHOD:
            raise SpecError(f"{source}: field 'method.name': job kind 'evaluate' re-scores a finished run's "
                            f"release; expected '{METHOD}', got '{method}'")
        return ReleaseSource

    def prepare(self, spec: Any) -> PreparedEvaluate:
        from dpdistill import models
        from dpdistill.evaluation.selection import check_plan
        from dpdistill.runtime.device import check_device

        check_device(spec.device)
        if spec.privacy.epsilon is not None:
            raise SpecError("privacy.epsilon: an evaluate job releases nothing and charges nothing; remove it "
                            "(the release's ε is the source run's)")
        if not spec.evaluation.enabled:
            raise SpecError("field 'evaluation.enabled': an evaluate job with evaluation off would do nothing")
        if spec.evaluation.model not in models.names():
            raise SpecError(f"field 'evaluation.model': unknown model '{spec.evaluation.model}'; "
                            f"expected one of: {', '.join(models.names())}")
        release_source = ReleaseSource(**spec.method.options())
        run_dir = Path(release_source.run)
        source = read_source(run_dir)
        src_spec = source_spec(run_dir)  # read once: the data check and the fidelity settings agree
        check_same_data(spec, src_spec, run_dir)
        saved, source["sha256"] = load_release(source)
        images, labels = saved["images"], saved["labels"]
        from dpdistill import data

        info = data.get(spec.data.name).info
        size = spec.data.image_size or info.image_size
        check_images(saved, source["release"], info, size)
        baseline = None
        if source["baseline"] is not None:
            saved_baseline, source["baseline_sha256"] = load_release(source, "baseline")
            check_images(saved_baseline, source["baseline"], info, size)
            baseline = (saved_baseline["images"], saved_baseline["labels"])
        generator, n_per_class, fidelity, chunks = None, 0, None, 1
        if release_source.generation():
            generator, n_per_class, chunks = load_generator(source, release_source, run_dir, info, size,
                                                            spec.device, len(labels), src_spec)
            fidelity = source_fidelity(src_spec)
        check_evaluation_model(spec, info.channels, info.num_classes, size)
        check_plan(spec, info.channels, info.num_classes, size)
        _, val, test, info = load_splits(spec)
        source["method"] = saved.get("method")
        return PreparedEvaluate(images=images, labels=labels, source=source, val=val, test=test, info=info,
                                baseline=baseline, generator=generator, n_per_class=n_per_class,
                                fidelity=fidelity, chunks=chunks)

    def execute(self, ctx: Any, p: PreparedEvaluate) -> dict[str, Any]:
        from dpdistill.pipelines.distill_job import release_ray
        from dpdistill.runtime.device import record_device, resolve_device

        record_device(ctx, resolve_device(ctx.spec.device))
        with release_ray(ctx, p.generator is not None and p.chunks > 1):
            self._score(ctx, p)
        return {}

    def _score(self, ctx: Any, p: PreparedEvaluate) -> None:
        """Draw the fresh set (when the source released a generator), record the source, evaluate."""
        src = p.source
        eps = "no privacy" if src["epsilon"] is None else f"ε={src['epsilon']:.3f} (its own ledger)"
        if p.generator is not None:
            p.images, p.labels = draw_fresh_set(ctx, p)
            if p.fidelity is not None:  # measured as the source measured its own set: comparable figures
                from dpdistill.pipelines.synthesize_job import report_fidelity
                from dpdistill.runtime.device import resolve_device

                report_fidelity(ctx, p.fidelity, p.images, p.test.images, p.images.shape[-1],
                                resolve_device(ctx.spec.device))
            ctx.add_summary("release", f"{len(p.labels)} images drawn here from the generator {src['method']} "
                            f"released by {src['run']}, {eps}; sha256 {src['generator_sha256'][:16]}; sampling "
                            f"{src['generated']}; post-processing, nothing charged")
        else:
            ctx.add_summary("release", f"{len(p.labels)} images by {src['method'] or 'unknown'} from {src['run']}, "
                            f"{eps}; sha256 {src['sha256'][:16]}; re-scored here, nothing charged")
        if src["not_private"]:
            # The figures describe a release without a guarantee: the run says so wherever a reader looks, and
            # the images of a fresh draw (the only ones it writes) stay out of MLflow.
            drawn = () if p.generator is None else (
                "synthetic_grid.png", *(f"grid_class{k}.png" for k in range(p.info.num_classes)))
            mark_release_not_private(ctx, f"re-score of a release that is {src['not_private']}", drawn)
        (ctx.run.artifacts / "source.json").write_text(json.dumps(src, indent=2) + "\n")
        ipc = len(p.labels) // p.info.num_classes
        ctx.log_metrics({"ipc": float(ipc), "n_released": float(len(p.labels))})
        if p.baseline is None:
            report_utility(ctx, p.images, p.labels, p)
        else:
            report_with_baseline(ctx, p.images, p.labels, p.baseline, p)


def load_generator(source: dict[str, Any], options: ReleaseSource, run_dir: Path, info: Any, size: int,
                   device: str, source_count: int, src_spec: Any) -> tuple[Any, int, int]:
    """A synthesize source's released generator with this job's sampling options applied, the images per class
    to draw and the chunks to draw them in (the job's, else the source's own). SpecError naming the field when
    the source has no generator or the generator has no such option. Reads the release only (no sensitive data)."""
    from dpdistill.errors import DataError
    from dpdistill.runtime.device import resolve_device
    from dpdistill.synthesis import Synthesizer

    wanted = options.generation()
    first = next(iter(wanted))
    if source["generator"] is None:
        raise SpecError(f"field 'method.{first}': {run_dir} released an image set, not a generator; only a "
                        "synthesize run's generator can draw a fresh set")
    path = Path(source["generator"])
    try:
        raw = path.read_bytes()  # one read, hashed and loaded
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        synth = Synthesizer.from_state(state, device=resolve_device(device))
    except (DataError, SpecError) as e:
        raise SpecError(f"{path}: cannot load the released generator ({e})") from None
    except Exception as e:  # noqa: BLE001 - any unreadable release is the same one-line error
        raise SpecError(f"{path}: not a readable generator ({type(e).__name__})") from None
    if (synth.channels, synth.image_size, synth.num_classes) != (info.channels, size, info.num_classes):
        raise SpecError(f"{path}: a generator of {synth.channels}x{synth.image_size}x{synth.image_size} images in "
                        f"{synth.num_classes} classes, the spec's data {info.channels}x{size}x{size} in "
                        f"{info.num_classes}")
    sampling = {k: v for k, v in wanted.items() if k not in ("n_per_class", CHUNKS)}
    for key in sampling:
        if not hasattr(synth.config, key):
            raise SpecError(f"field 'method.{key}': {synth.name}'s generator has no such option (only the "
                            "diffusion synthesisers sample with a guidance scale, DDIM steps and η)")
    if "sample_steps" in sampling and sampling["sample_steps"] > synth.config.train_timesteps:
        raise SpecError(f"field 'method.sample_steps': {sampling['sample_steps']} DDIM steps, more than the "
                        f"generator's {synth.config.train_timesteps} training timesteps")
    synth.config = dataclasses.replace(synth.config, **sampling)
    # Unset: as many per class as the source drew (its set is balanced: n_per_class of each class).
    n_per_class = wanted.get("n_per_class") or max(1, source_count // info.num_classes)
    chunks = wanted.get(CHUNKS) or source_options(src_spec).generate_chunks
    source["generator_sha256"] = hashlib.sha256(raw).hexdigest()
    source["generated"] = {"n_per_class": n_per_class,
                           **{k: getattr(synth.config, k) for k in GENERATION[1:] if hasattr(synth.config, k)},
                           CHUNKS: int(chunks)}
    return synth, n_per_class, int(chunks)


def source_options(src: Any) -> Any:
    """The source synthesize run's job options (SynthesizeOptions) from its resolved spec ``src``."""
    from dpdistill.pipelines.synthesize_job import split_options

    return split_options(src.method.name, src.method.options())[1]


def source_fidelity(src: Any) -> Any:
    """The source synthesize run's fidelity settings (extractor, public set, samples) from its resolved spec
    ``src``, or None when it measured none: a fresh draw is measured the same way, so its FID reads beside the
    source's."""
    job = source_options(src)
    return job if job.fidelity else None


def draw_fresh_set(ctx: Any, p: PreparedEvaluate) -> tuple[torch.Tensor, torch.Tensor]:
    """The fresh set from the released generator, drawn as the synthesize job draws its own (the spec's public
    seed; ``p.chunks`` Ray tasks when > 1) and written to this run's artifacts as a synthesize run writes it."""
    from dpdistill.pipelines.synthesize_job import draw_set, save_synthetic

    images, labels = draw_set(ctx, p.generator, p.n_per_class, p.chunks)
    ctx.run.artifacts.mkdir(parents=True, exist_ok=True)
    save_synthetic(ctx.run.artifacts, images, labels, p.info, p.generator.name)
    return images, labels


def check_images(saved: dict[str, Any], path: str, info: Any, size: int) -> None:
    """Refuse (SpecError naming ``path``) an image file that does not fit the spec's data: another dataset,
    mismatched counts, labels outside the classes, or another image shape. Reads no split: ``info`` and
    ``size`` are what the splits will have."""
    images, labels = saved["images"], saved["labels"]
    if saved.get("dataset") not in (None, info.name):
        raise SpecError(f"field 'data.name': {path} is of '{saved.get('dataset')}', the spec loads '{info.name}'")
    if images.dim() != 4 or len(images) != len(labels) or len(labels) == 0:
        raise SpecError(f"{path}: expected N images (N, C, H, W) and N labels")
    if int(labels.min()) < 0 or int(labels.max()) >= info.num_classes:
        raise SpecError(f"{path}: labels outside 0..{info.num_classes - 1}")
    if tuple(images.shape[1:]) != (info.channels, size, size):
        raise SpecError(f"{path}: images are {'x'.join(map(str, images.shape[1:]))}, the spec's data "
                        f"{info.channels}x{size}x{size}")
