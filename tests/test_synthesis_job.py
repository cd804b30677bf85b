"""The ``synthesize`` job kind: a run folder with the synthetic set, grids, fidelity, utility and the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpdistill import models
from dpdistill.errors import SpecError
from dpdistill.evaluation.extractors import DomainSpec
from dpdistill.spec import load_spec, validate_spec

JOBS = Path(__file__).resolve().parents[1] / "jobs"
METHODS = ("dp-merf", "dp-ntk", "dp-kernel", "dp-gan", "gs-wgan")


@pytest.fixture
def cached_extractor(tmp_path, monkeypatch):
    """A pre-cached (untrained) glyph extractor for 8x8 images: the job finds it instead of training one."""
    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path / "cache"))
    spec = DomainSpec(public="glyphs", image_size=8)
    path = tmp_path / "cache" / "extractors" / f"{spec.name}.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=spec.width, depth=spec.depth)
    torch.save(net.state_dict(), path)
    return spec.name


def digits_doc(**method) -> dict:
    return {
        "name": "synth-test", "kind": "synthesize", "data": {"name": "digits"}, "privacy": {"epsilon": 4.0},
        "method": {"name": "dp-merf", "num_features": 400, "iterations": 40, "batch_size": 100,
                   "n_per_class": 30, **method},
        "evaluation": {"epochs": 2, "seeds": 1, "parallel": False, "model_options": {"width": 16}},
        "tracking": {"enabled": False},
    }


def test_synthesize_job_writes_release_metrics_and_ledger(tmp_path, cached_extractor):
    from dpdistill.runner import run_job

    result = run_job(validate_spec(digits_doc()), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    art = result.run_dir / "artifacts"
    npz = np.load(art / "synthetic.npz")
    assert npz["images"].shape == (300, 1, 8, 8) and npz["images"].dtype == np.uint8
    assert np.array_equal(np.bincount(npz["labels"], minlength=10), np.full(10, 30))
    assert (art / "synthetic_grid.png").is_file()
    assert all((art / f"grid_class{k}.png").is_file() for k in range(10))
    fidelity = json.loads((art / "fidelity.json").read_text())
    assert fidelity["extractor"] == cached_extractor
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    for key in ("fid", "is_mean", "precision", "recall", "acc_mean", "fit_seconds"):
        assert key in metrics
    ledger = json.loads((result.run_dir / "ledger.json").read_text())
    assert abs(ledger["composed"]["epsilon"] - 4.0) / 4.0 < 0.01
    assert [e["component"] for e in ledger["entries"]] == ["dp-merf/embedding"]
    assert any(what == "fidelity" and cached_extractor in value for what, value in result.summary)
    # The fitted synthesiser comes back from the run folder.
    from dpdistill import synthesis

    again = synthesis.load(art / "synthesizer.pt")
    assert again.fitted and again.name == "dp-merf"


def test_synthesize_job_pretrains_on_public_data(tmp_path, cached_extractor, monkeypatch):
    from dpdistill import data
    from dpdistill.runner import run_job

    seen: list[str] = []
    real_load = data.load

    def spy(name, split="train", **kwargs):
        seen.append(name)
        if name == "glyphs":  # keep the test fast: a handful of rendered glyphs
            from dpdistill.data.glyphs import render

            return render(5, int(kwargs.get("image_size") or 28), seed=0)
        return real_load(name, split, **kwargs)

    monkeypatch.setattr(data, "load", spy)
    doc = digits_doc(pretrain="glyphs", pretrain_iterations=5)
    doc["method"]["fidelity"] = False
    doc["evaluation"]["enabled"] = False
    result = run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    assert result.status == "completed" and "glyphs" in seen
    pretrained = [value for what, value in result.summary if what == "pretrained on"]
    assert pretrained and "cache" not in pretrained[0]
    # A second run of the same spec restores the public pre-training from the cache (DPDISTILL_CACHE here).
    assert any((tmp_path / "cache" / "synth-pretrain").iterdir())
    again = run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    assert again.status == "completed"
    assert any(what == "pretrained on" and "restored from the public pre-training cache" in value
               for what, value in again.summary)


def test_a_failed_generation_keeps_the_charged_fit(tmp_path, cached_extractor, monkeypatch):
    """The release is the fitted synthesiser: it is saved before generation (post-processing), so a generation
    that fails leaves the charged fit in the run folder, loadable, beside a ledger that holds its charge."""
    from dpdistill.runner import run_job
    from dpdistill.synthesis.base import Synthesizer

    real_generate = Synthesizer.generate

    doc = digits_doc()
    wanted = doc["method"]["n_per_class"]  # the job's generation stage (the fit's release_mmd draws 10 a class)

    def broken(self, labels=None, **kwargs):
        if kwargs.get("n_per_class") == wanted:
            raise RuntimeError("generation broke")
        return real_generate(self, labels, **kwargs)

    monkeypatch.setattr(Synthesizer, "generate", broken)  # fault injection after the real fit
    doc["method"]["fidelity"] = False
    with pytest.raises(RuntimeError, match="generation broke"):
        run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    (run_dir,) = [p.parent for p in (tmp_path / "runs").rglob("status.json")]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert not (run_dir / "artifacts" / "synthetic.npz").exists()
    fitted = Synthesizer.load(run_dir / "artifacts" / "synthesizer.pt")
    assert fitted.name == "dp-merf"
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["entries"] and ledger["composed"]["epsilon"] == pytest.approx(4.0, rel=0.02)


def test_spec_errors_before_any_run_folder(tmp_path):
    from dpdistill.runner import run_job

    with pytest.raises(SpecError, match="unknown synthesis method 'dp-nope'.*dp-merf"):
        validate_spec({**digits_doc(), "method": {"name": "dp-nope"}})
    with pytest.raises(SpecError, match="unknown key 'method.widht'"):
        validate_spec(digits_doc(widht=3))
    with pytest.raises(SpecError, match="pretrain"):
        run_job(validate_spec(digits_doc(pretrain="digits")), tmp_path / "runs", progress=False)
    with pytest.raises(SpecError, match="inception_weights"):
        run_job(validate_spec(digits_doc(fidelity_extractor="inception-v3", inception_weights="/no/such.pt")),
                tmp_path / "runs", progress=False)
    with pytest.raises(SpecError, match="'method.fidelity_samples': must be >= 4"):
        run_job(validate_spec(digits_doc(fidelity=True, fidelity_samples=3)), tmp_path / "runs", progress=False)
    no_budget = digits_doc()
    no_budget["privacy"] = {}
    with pytest.raises(SpecError, match="privacy.epsilon"):
        run_job(validate_spec(no_budget), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", METHODS)
def test_shipped_job_specs_validate(method):
    spec = load_spec(JOBS / f"synth-{method}-mnist.yaml", ["privacy.epsilon=1"])
    assert spec.kind == "synthesize" and spec.method.name == method
    assert spec.data.name == "mnist" and spec.privacy.epsilon == 1.0 and spec.privacy.delta == 1e-5
    options = spec.method.options()
    assert options["n_per_class"] == 6000 and options["fidelity_extractor"] == "domain"
