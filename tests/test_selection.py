"""Evaluation-model selection: Noisy SenV is charged before its choice, reports the noisy choice's accuracy (not the
noise-free best's) and keeps the job's composed ε at its stated total; SynV never reads the validation split; the
report-noisy-max mechanism is accounted as a pure ε-DP release.

The noisy-senv run is the real distill job (tiny NDPDC on ``digits``) through ``runner.run_job``; the protocol
tests call the shared evaluation (``evaluate_protocol`` / ``report_utility``) directly.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from dpdistill import data, distill
from dpdistill.errors import SpecError
from dpdistill.evaluation.selection import (
    COMPONENT,
    charge_selection,
    evaluate_protocol,
    split_released,
)
from dpdistill.evaluation.utility import evaluate_utility
from dpdistill.pipelines.distill_job import DISCLOSURE, report_utility
from dpdistill.privacy.analysis import pld as pld_analysis
from dpdistill.privacy.disclosure import undeclared
from dpdistill.privacy.ledger import PrivacyLedger
from dpdistill.privacy.mechanisms import Composed, RandomizedResponse, ReportNoisyMax, mechanism_from_dict
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.runner import run_job
from dpdistill.spec import validate_spec

EVAL = {"seeds": 1, "epochs": 2, "parallel": False, "model_options": {"width": 8}}
NDPDC = {"name": "ndpdc", "ipc": 1, "iterations": 2, "net_width": 8, "batch_real": 16}


def _spec(evaluation: dict[str, Any], method: dict[str, Any] | None = None, **extra: Any) -> Any:
    doc = {"name": "selection", "kind": "distill", "data": {"name": "digits"}, "method": method or NDPDC,
           "evaluation": {**EVAL, **evaluation}, **extra}
    if (method or NDPDC)["name"] == "ndpdc":
        doc.setdefault("privacy", {"epsilon": 1.0})
    return validate_spec(doc, "<test>")


# ------------------------------------------------------------------------------------------- the mechanism


def test_report_noisy_max_is_accounted_as_pure_epsilon_dp() -> None:
    delta = 1e-5
    m = ReportNoisyMax(0.7, candidates=3)
    assert mechanism_from_dict(m.to_dict()) == m
    assert m.laplace_scale() == pytest.approx(1 / 0.7) and m.laplace_scale(monotone=False) == pytest.approx(2 / 0.7)
    # Independent: the dominating pair of ε-DP (loss ±ε) has δ(ε') = (e^ε − e^ε') / (1 + e^ε), so at δ the
    # ε is log(e^ε − δ(1 + e^ε)).
    expected = math.log(math.exp(0.7) - delta * (1 + math.exp(0.7)))
    ledger = PrivacyLedger(None, 5.0, delta)
    assert ledger.would_cost(m) == pytest.approx(expected, abs=0.02)
    # Composed with anything, it costs what any other ε-DP release (randomised response at ε) costs.
    ledger.charge("before", ReportNoisyMax(0.3, 4))
    with_rr = PrivacyLedger(None, 5.0, delta)
    with_rr.charge("before", RandomizedResponse(0.3))
    assert ledger.would_cost(m) == pytest.approx(with_rr.would_cost(RandomizedResponse(0.7)), rel=1e-9)
    assert pld_analysis.pld_epsilon(ReportNoisyMax(0.7, 2, count=2), delta) == pytest.approx(
        pld_analysis.pld_epsilon(RandomizedResponse(0.7, count=2), delta), rel=1e-9)


# ------------------------------------------------------------------------------------------ noisy-senv


class _Noise:
    """The run's privacy source, watched: every generator it hands out must come after the selection's charge."""

    def __init__(self, seed: int, ledger: PrivacyLedger) -> None:
        self.inner, self.ledger, self.draws = PrivacyRandomness.reproducible(seed), ledger, 0

    def numpy(self) -> np.random.Generator:
        assert any(e["component"] == COMPONENT for e in self.ledger.entries), "noise drawn before the charge"
        self.draws += 1
        return self.inner.numpy()


def _stub_evaluate(calls: list[dict[str, Any]]):
    """Two candidates (1 and 2 epochs): the noise-free validation best (1 epoch, 60 of 100) has the worse test
    accuracy (0.70 against 0.90 for 2 epochs, 59 of 100)."""
    table = {1: (0.60, 0.70), 2: (0.59, 0.90)}

    def evaluate(train_x, train_y, test_x, test_y, *, model, model_kwargs, epochs, lr, extra_sets):
        calls.append({"epochs": epochs, "extra": sorted(extra_sets)})
        val, test = table[epochs]
        out = {"test": {"mean": test, "std": 0.0, "accuracies": [test]}}
        if "val" in extra_sets:
            out["val"] = {"mean": val, "std": 0.0, "accuracies": [val]}
        return out

    return evaluate


def test_noisy_senv_reports_the_noisy_choice_not_the_noise_free_best() -> None:
    ev = _spec({"selection": "noisy-senv", "selection_epochs": [1, 2], "selection_lrs": [0.01],
                "selection_epsilon": 0.05}).evaluation
    val = (torch.zeros(100, 1, 8, 8), torch.zeros(100, dtype=torch.long))
    test = (torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))
    release = (torch.zeros(20, 1, 8, 8), torch.arange(20) % 10)
    scale = 1 / 0.05  # Laplace scale on the correct counts (sensitivity 1, monotone)
    for seed in range(200):
        # Independently of the code under test: does this reproducible noise move the max to candidate 1?
        draws = PrivacyRandomness.reproducible(seed).numpy().laplace(0.0, scale, size=2)
        if int(np.argmax(np.array([60.0, 59.0]) + draws)) == 1:
            break
    else:
        pytest.fail("no seed below 200 flips the choice")
    ledger = PrivacyLedger(None, 1.0, 1e-5)
    calls: list[dict[str, Any]] = []
    noise = _Noise(seed, ledger)
    outcome = evaluate_protocol(ev, *release, evaluate=_stub_evaluate(calls), test=test, val=lambda: val,
                                num_classes=10, seed=0, ledger=ledger, noise=noise)
    assert noise.draws == 1
    assert [e["component"] for e in ledger.entries] == [COMPONENT]
    assert mechanism_from_dict(ledger.entries[0]["mechanism"]) == ReportNoisyMax(0.05, 2)
    assert outcome.choice.index == 1 and outcome.choice.chosen.epochs == 2
    metrics = outcome.metrics()
    # The reported figure is the noisy choice's test accuracy; the noise-free best (1 epoch) would give 0.70.
    assert metrics["acc_mean"] == pytest.approx(0.90)
    assert metrics["noisy_senv_choice"] == 1 and metrics["noisy_senv_epochs"] == 2
    # Nothing noise-free from the validation split is reported.
    assert not any(k.startswith("val_") for k in metrics)
    assert all(c["extra"] == ["val"] for c in calls)
    # Charging again (the pipeline charges before the method, the protocol again before the choice) is one charge.
    charge_selection(ev, ledger)
    assert len(ledger.entries) == 1


@pytest.fixture()
def tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the temporary sqlite store under runs/


def test_noisy_senv_run_charges_first_and_lands_on_the_stated_epsilon(tmp_path: Path, tracking) -> None:
    import mlflow

    spec = _spec({"selection": "noisy-senv", "selection_epochs": [1, 3], "selection_lrs": [0.01],
                  "selection_epsilon": 0.2})
    result = run_job(spec, tmp_path / "runs", progress=False)
    assert result.status == "completed"
    ledger = json.loads((result.run_dir / "ledger.json").read_text())
    entries = ledger["entries"]
    # The selection is charged first, before the method's releases, and once.
    assert entries[0]["component"] == COMPONENT
    assert mechanism_from_dict(entries[0]["mechanism"]) == ReportNoisyMax(0.2, 2)
    assert [e["component"] for e in entries].count(COMPONENT) == 1 and len(entries) > 1
    # The composed ε of the selection and the method is the job's stated ε (the method filled what was left).
    total = PrivacyLedger.load(result.run_dir / "ledger.json").spent_epsilon()
    assert 0.99 <= total <= 1.0 * (1 + 1e-9)
    method_alone = pld_analysis.pld_epsilon(Composed(tuple(mechanism_from_dict(e["mechanism"]) for e in entries[1:])),
                                            ledger["delta"])
    assert method_alone < total - 0.05  # the selection's share is in the total, not on top of it
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert "val_acc_mean" not in metrics and metrics["noisy_senv_choice"] in (0.0, 1.0)
    # The charge was on disk before the choice was logged.
    client = mlflow.MlflowClient(tracking_uri=result.mlflow_uri)
    logged = client.get_metric_history(result.mlflow_run_id, "noisy_senv_choice")[0].timestamp / 1000
    charged = datetime.strptime(entries[0]["recorded_at"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    assert charged < logged
    # acc_mean is the chosen configuration's test accuracy, recomputed from the release.
    chosen_epochs = int(metrics["noisy_senv_epochs"])
    assert chosen_epochs == [1, 3][int(metrics["noisy_senv_choice"])]
    release = torch.load(result.run_dir / "artifacts" / "distilled.pt")
    splits = data.load_splits("digits")
    info = data.get("digits").info
    again = evaluate_utility(release["images"], release["labels"], splits["test"].images, splits["test"].labels,
                             num_classes=10, model="convnet", model_kwargs={"width": 8}, seeds=[spec.seed * 1000],
                             epochs=chosen_epochs, lr=0.01, batch_size=256, mean=info.mean, std=info.std,
                             progress=False)
    assert metrics["acc_mean"] == pytest.approx(again.mean, abs=1e-12)
    # Every key the run wrote is declared (the choice as CHARGED).
    assert undeclared(metrics, DISCLOSURE, distill.get("ndpdc").disclosure) == []
    assert any(k == "selection" and "noisy-senv" in v for k, v in result.summary)


def test_noisy_senv_is_refused_without_a_budget_or_room(tmp_path: Path, tracking) -> None:
    with pytest.raises(SpecError, match="needs evaluation.selection_epsilon"):
        _spec({"selection": "noisy-senv"})
    with pytest.raises(SpecError, match="at least two candidates"):
        _spec({"selection": "noisy-senv", "selection_epochs": [2], "selection_epsilon": 0.1})
    dm = {"name": "dm", "ipc": 1, "iterations": 0}
    with pytest.raises(SpecError, match="has none \\(no privacy.epsilon\\)"):
        run_job(_spec({"selection": "noisy-senv", "selection_epsilon": 0.1}, method=dm), tmp_path / "runs",
                progress=False)
    with pytest.raises(SpecError, match="must leave the method some of it"):
        run_job(_spec({"selection": "noisy-senv", "selection_epsilon": 1.0}), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("ledger.json"))


# ------------------------------------------------------------------------------------------------ synv


class _Untouchable:
    """A validation split that fails the test if anything reads it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the validation split was read ({name})")


def test_synv_chooses_on_the_release_and_never_reads_the_validation_split() -> None:
    spec = _spec({"selection": "synv", "selection_epochs": [1, 4], "selection_lrs": [0.01, 0.05],
                  "validation": False}, method={"name": "dm", "ipc": 1, "iterations": 0})
    splits = data.load_splits("digits")
    info = data.get("digits").info
    train = splits["train"]
    # A "release" of 5 real images per class (public in this test), so a tenth of each class can be held out.
    idx = torch.cat([(train.labels == k).nonzero().flatten()[:5] for k in range(10)])
    images, labels = train.images[idx], train.labels[idx]
    logged: dict[str, float] = {}
    summary: list[tuple[str, str]] = []
    ctx = SimpleNamespace(spec=spec, ledger=None, noise=None, progress=False, log_metrics=logged.update,
                          add_summary=lambda k, v: summary.append((k, v)))
    p = SimpleNamespace(test=splits["test"], val=_Untouchable(), info=info)
    acc = report_utility(ctx, images, labels, p)

    def utility(x, y, tx, ty, epochs, lr):
        return evaluate_utility(x, y, tx, ty, num_classes=10, model="convnet", model_kwargs={"width": 8},
                                seeds=[spec.seed * 1000], epochs=epochs, lr=lr, batch_size=256, mean=info.mean,
                                std=info.std, progress=False).mean

    (rest_x, rest_y), (held_x, held_y) = split_released(images, labels, 10, spec.seed)
    assert len(held_y) == 10 and len(rest_y) == 40
    grid = [(e, lr) for e in (1, 4) for lr in (0.01, 0.05)]
    held_out = [utility(rest_x, rest_y, held_x, held_y, e, lr) for e, lr in grid]
    best = int(np.argmax(held_out))
    assert logged["synv_choice"] == best
    assert (logged["synv_epochs"], logged["synv_lr"]) == grid[best]
    assert logged["synv_acc_mean"] == pytest.approx(held_out[best], abs=1e-12)
    # The choice retrained on the whole release gives the reported test accuracy.
    final = utility(images, labels, splits["test"].images, splits["test"].labels, *grid[best])
    assert logged["acc_mean"] == pytest.approx(final, abs=1e-12) and acc["test"]["mean"] == logged["acc_mean"]
    assert not any(k.startswith(("val_", "noisy_")) for k in logged)
    assert any(k == "selection" and v.startswith("synv (free)") for k, v in summary)


def test_synv_needs_two_released_images_per_class() -> None:
    images, labels = torch.zeros(10, 1, 8, 8), torch.arange(10)
    with pytest.raises(SpecError, match="class 0 has 1 released image"):
        split_released(images, labels, 10, 0)


def test_noisy_senv_keeps_the_validation_split_from_dpgengs_generated_baseline_too(tmp_path: Path, tracking) -> None:
    """DP-GenG evaluates its DP-generated baseline beside the release; under noisy-senv the validation split is
    the selection's (charged) input, so the baseline must not be scored on it either (no baseline val key)."""
    dpgeng = {"name": "dpgeng", "ipc": 1, "factor": 1, "generated_per_class": 10, "extractors": 1,
              "extractor_epochs": 0, "net_width": 8, "expert_guidance": False, "iterations": 2, "batch_real": 16,
              "generator_options": {"iterations": 5, "num_features": 100}}
    spec = _spec({"selection": "noisy-senv", "selection_epochs": [1, 2], "selection_lrs": [0.01],
                  "selection_epsilon": 0.2}, method=dpgeng, privacy={"epsilon": 1.0})
    result = run_job(spec, tmp_path / "runs", progress=False)
    assert result.status == "completed"
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert "baseline_generated_acc_mean" in metrics and "val_acc_mean" not in metrics
    assert not [k for k in metrics if k.startswith("baseline_generated_val")]
    assert undeclared(metrics, DISCLOSURE, distill.get("dpgeng").disclosure) == []
