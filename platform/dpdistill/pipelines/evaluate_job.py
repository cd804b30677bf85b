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

A DP-GenG run also keeps its DP-generated baseline (``artifacts/baseline_generated.pt``: ipc images per class of
the generator's output, a DP output charged with the generator). When the source has one, it is checked the same
way and re-scored beside the release under the same protocol (``baseline_generated_*``), as the distill job
reports it, so "the release against its own generator" can be read under any protocol.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dpdistill.errors import SpecError
from dpdistill.evaluation.selection import DISCLOSURE as EVALUATION_DISCLOSURE
from dpdistill.pipelines import check_evaluation_model
from dpdistill.pipelines.distill_job import load_splits, report_utility, report_with_baseline
from dpdistill.pipelines.not_private import mark_release_not_private
from dpdistill.privacy.disclosure import ACCOUNTING, EVALUATION, PUBLIC
from dpdistill.spec import JobSpec

METHOD = "release"
RELEASE_FILE = Path("artifacts") / "distilled.pt"
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
    **{k: PUBLIC for name in JobSpec.model_fields for k in (name, f"{name}.*")},  # MLflow params: the spec
}


class ReleaseSource(BaseModel):
    """The ``method`` block of an evaluate job: which finished run's release to re-score."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(min_length=1, description="the finished run folder whose artifacts/distilled.pt is re-scored")


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
    release = run_dir / RELEASE_FILE
    if not release.is_file():
        made = "a synthesizer (artifacts/synthesizer.pt)" if (run_dir / "artifacts" / "synthesizer.pt").is_file() \
            else "no image set"
        raise SpecError(f"{release}: missing; the run released {made}. evaluate re-scores released image sets "
                        "(distill and sfdd runs)")
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
            "baseline": str(baseline.resolve()) if baseline.is_file() else None}


def load_release(source: dict[str, Any], key: str = "release") -> tuple[dict[str, Any], str]:
    """The image file ``source[key]``'s contents (the release, or the DP-generated baseline) and the sha256 of
    the very bytes loaded; SpecError naming the file."""
    path = source[key]
    try:
        raw = open(path, "rb").read()  # noqa: SIM115 - one read, hashed and loaded
        saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)  # tensors, ints, strings
        saved["images"], saved["labels"] = saved["images"].float(), saved["labels"].long()
    except Exception as e:  # noqa: BLE001 - any unreadable release is the same one-line error
        raise SpecError(f"{path}: not a readable release ({type(e).__name__})") from None
    return saved, hashlib.sha256(raw).hexdigest()


def source_spec(run_dir: Path) -> Any:
    """The source run's resolved spec.yaml; SpecError naming the file when it is missing or invalid."""
    from dpdistill.spec import load_spec

    spec_path = run_dir / "spec.yaml"
    if not spec_path.is_file():
        raise SpecError(f"{spec_path}: missing; cannot tell which data and protocol the release belongs to")
    return load_spec(spec_path)


def evaluate_spec(run_dir: str | Path, overrides: list[str] | None = None) -> Any:
    """The evaluate job for ``run_dir``: its spec.yaml's data, seed, device and evaluation, method ``release``,
    no privacy block, then ``overrides`` (only the fields in OVERRIDABLE). SpecError naming the file or field."""
    from dpdistill.spec import apply_overrides, parse_override, validate_spec

    run_dir = Path(run_dir)
    source = read_source(run_dir)
    src = source_spec(run_dir)
    for text in overrides or []:
        keys, _ = parse_override(text)
        if keys[0] not in OVERRIDABLE and not (keys[0] == "data" and keys[1:2] and keys[1] in DATA_LOCATION):
            raise SpecError(f"--set {text}: field '{'.'.join(keys)}' comes from the source run; evaluate can set "
                            f"only {', '.join(OVERRIDABLE)} and data.{' / data.'.join(DATA_LOCATION)}")
    doc = src.model_dump(mode="json")
    doc = {k: doc[k] for k in ("seed", "device", "threads", "compile", "data", "evaluation", "ray", "resources",
                               "tracking")}
    doc.update(name=f"{src.name[:90]}-evaluate", kind="evaluate", method={"name": METHOD, "run": source["run"]},
               description=f"re-score of {source['run']}")
    return validate_spec(apply_overrides(doc, overrides or []), f"evaluate {run_dir}")


def check_same_data(spec: Any, run_dir: Path) -> None:
    """Refuse an evaluate spec whose data block names other records than the source run's: another
    ``val_seed`` (or image size, subset, dataset) would carve the validation or test split out of records
    the release was made from, and report a figure on them as held out. Only where the files are may differ."""
    theirs = source_spec(run_dir).data.model_dump(mode="json")
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
        run_dir = Path(ReleaseSource(**spec.method.options()).run)
        source = read_source(run_dir)
        check_same_data(spec, run_dir)
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
        check_evaluation_model(spec, info.channels, info.num_classes, size)
        check_plan(spec, info.channels, info.num_classes, size)
        _, val, test, info = load_splits(spec)
        source["method"] = saved.get("method")
        return PreparedEvaluate(images=images, labels=labels, source=source, val=val, test=test, info=info,
                                baseline=baseline)

    def execute(self, ctx: Any, p: PreparedEvaluate) -> dict[str, Any]:
        from dpdistill.runtime.device import record_device, resolve_device

        record_device(ctx, resolve_device(ctx.spec.device))
        src = p.source
        eps = "no privacy" if src["epsilon"] is None else f"ε={src['epsilon']:.3f} (its own ledger)"
        ctx.add_summary("release", f"{len(p.labels)} images by {src['method'] or 'unknown'} from {src['run']}, "
                        f"{eps}; sha256 {src['sha256'][:16]}; re-scored here, nothing charged")
        if src["not_private"]:
            # The figures describe a release without a guarantee: the run says so wherever a reader looks (it
            # writes no images, so there are none to keep out of MLflow).
            mark_release_not_private(ctx, f"re-score of a release that is {src['not_private']}", ())
        (ctx.run.artifacts / "source.json").write_text(json.dumps(src, indent=2) + "\n")
        ipc = len(p.labels) // p.info.num_classes
        ctx.log_metrics({"ipc": float(ipc), "n_released": float(len(p.labels))})
        if p.baseline is None:
            report_utility(ctx, p.images, p.labels, p)
        else:
            report_with_baseline(ctx, p.images, p.labels, p.baseline, p)
        return {}


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
