"""Cross-architecture utility: ``evaluation.models`` evaluates one release with several architectures in one run,
one summary row and one ``acc_mean_<model>`` each, equal to evaluating the release with each model separately.

The run is the real distill job (DM on ``digits``, a few iterations) through ``runner.run_job``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpdistill import data, models
from dpdistill.errors import SpecError
from dpdistill.evaluation.utility import evaluate_utility
from dpdistill.pipelines.distill_job import DISCLOSURE
from dpdistill.privacy.disclosure import EVALUATION, kind_of, undeclared
from dpdistill.runner import run_job
from dpdistill.spec import validate_spec

MODELS = ["convnet", "resnet18", "lenet5", "mlp"]


def _spec(evaluation: dict) -> object:
    doc = {"name": "cross-arch", "kind": "distill", "data": {"name": "digits"},
           "method": {"name": "dm", "ipc": 2, "iterations": 3},
           "evaluation": {"seeds": 2, "epochs": 2, "parallel": False, "model_options": {"width": 8}, **evaluation}}
    return validate_spec(doc, "<test>")


def test_mlp_is_a_registered_model() -> None:
    net = models.get("mlp", channels=3, num_classes=7, image_size=8, width=16, depth=3)
    x = torch.rand(5, 3, 8, 8)
    assert net(x).shape == (5, 7) and net.embed(x).shape == (5, net.feature_dim) == (5, 16)
    with pytest.raises(SpecError, match="option 'width' must be a positive integer"):
        models.get("mlp", channels=1, num_classes=10, image_size=8, width=0)


@pytest.mark.parametrize(("name", "learns"), [("convnet", True), ("lenet5", True), ("mlp", True), ("lenet", False)])
def test_cross_architecture_models_learn_real_digits_under_the_evaluation_schedule(name: str, learns: bool) -> None:
    """The models the cross-architecture table names are working classifiers under the evaluation protocol's SGD
    (lr 0.01, momentum 0.9): 200 real digits, 80 epochs of batches of 32, > 60 % on the test split (measured
    82-87 %; chance 10 %). DLG's sigmoid LeNet (``lenet``, a gradient-inversion target) stays at chance under
    it (9.7 %): the first MNIST cross-architecture run listed it and scored 9.6 %, hence ``lenet5``. (ResNet-18
    is left out for time: 40 s here; it is the batch-norm model the cross-architecture run checks.)"""
    from dpdistill.evaluation.training import accuracy, train_classifier

    splits = data.load_splits("digits")
    info = data.get("digits").info
    train, test = splits["train"], splits["test"]
    torch.manual_seed(0)
    net = models.get(name, channels=1, num_classes=10, image_size=8)
    train_classifier(net, train.images[:200], train.labels[:200], epochs=80, batch_size=32, mean=info.mean,
                     std=info.std, generator=torch.Generator().manual_seed(0), num_threads=1)
    acc = accuracy(net, test.images, test.labels, mean=info.mean, std=info.std)
    assert (acc > 0.6) if learns else (acc < 0.2), acc


def test_models_must_include_the_primary_and_exist(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(SpecError, match="must include evaluation.model"):
        _spec({"models": ["lenet5", "mlp"]})
    with pytest.raises(SpecError, match="each model once"):
        _spec({"models": ["convnet", "mlp", "mlp"]})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SpecError, match="evaluation.models.*unknown model"):
        run_job(_spec({"models": ["convnet", "vgg"]}), tmp_path / "runs", progress=False)


def test_one_row_per_model_equal_to_separate_evaluations(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = _spec({"models": MODELS})
    result = run_job(spec, tmp_path / "runs", progress=False)
    assert result.status == "completed"
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    rows = {k: v for k, v in result.summary if k.startswith("test accuracy")}
    assert sorted(rows) == sorted(["test accuracy", *(f"test accuracy ({m})" for m in MODELS[1:])])
    release = torch.load(result.run_dir / "artifacts" / "distilled.pt")
    splits = data.load_splits("digits")
    info = data.get("digits").info
    for name in MODELS:
        # The primary model alone gets evaluation.model_options; the others their defaults.
        kwargs = {"width": 8} if name == "convnet" else {}
        separate = evaluate_utility(release["images"], release["labels"], splits["test"].images,
                                    splits["test"].labels, num_classes=10, model=name, model_kwargs=kwargs,
                                    seeds=[spec.seed * 1000, spec.seed * 1000 + 1], epochs=2, lr=0.01,
                                    batch_size=256, mean=info.mean, std=info.std, progress=False,
                                    extra_sets={"val": (splits["val"].images, splits["val"].labels)})
        assert metrics[f"acc_mean_{name}"] == pytest.approx(separate.mean, abs=1e-12), name
        assert metrics[f"acc_std_{name}"] == pytest.approx(separate.std, abs=1e-12), name
        val = torch.tensor(separate.extra["val"], dtype=torch.float64)
        assert metrics[f"val_acc_mean_{name}"] == pytest.approx(float(val.mean()), abs=1e-12), name
        assert f"{100 * separate.mean:.2f} ± {100 * separate.std:.2f} % ({name}," in rows[
            "test accuracy" if name == "convnet" else f"test accuracy ({name})"]
    # The primary model's figures stay acc_mean / acc_std.
    assert metrics["acc_mean"] == metrics["acc_mean_convnet"] and metrics["acc_std"] == metrics["acc_std_convnet"]
    assert undeclared(metrics, DISCLOSURE) == []
    assert {kind_of(f"acc_mean_{m}", DISCLOSURE) for m in MODELS} == {EVALUATION}


def test_without_models_there_are_no_per_model_rows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_job(_spec({"seeds": 1}), tmp_path / "runs", progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert "acc_mean" in metrics and not any(k.startswith("acc_mean_") for k in metrics)
    assert [k for k, _ in result.summary if k.startswith("test accuracy")] == ["test accuracy"]
