"""A private run whose options choose something on sensitive data without charging it is stamped NOT PRIVATE."""

from __future__ import annotations

import json

import pytest

from dpdistill.errors import SpecError
from dpdistill.runner import not_private_reason, run_job
from dpdistill.spec import validate_spec

TINY_DPGENG = {
    "name": "unaccounted", "kind": "distill", "seed": 0, "data": {"name": "digits"},
    "privacy": {"epsilon": 5.0},
    "method": {"name": "dpgeng", "ipc": 1, "factor": 1, "generator_options": {"iterations": 5, "num_features": 64},
               "generated_per_class": 4, "extractors": 1, "extractor_epochs": 1, "expert_pretrain_epochs": 1,
               "expert_dp_epochs": 0.05, "iterations": 2, "batch_real": 16, "net_width": 8,
               "allocation": "utility", "utility_tuning": "sensitive", "utility_steps": 0},
    "evaluation": {"enabled": False},
    "tracking": {"enabled": False},
}


def _spec(**method):
    doc = json.loads(json.dumps(TINY_DPGENG))
    doc["method"].update(method)
    return validate_spec(doc)


def test_sensitive_utility_tuning_is_named_and_public_tuning_is_not() -> None:
    assert "utility_tuning" in (not_private_reason(_spec()) or "")
    assert not_private_reason(_spec(allocation="fixed", utility_tuning=None)) is None
    assert not_private_reason(_spec(utility_tuning="glyphs")) is None


def test_a_sensitively_tuned_run_is_stamped_everywhere(tmp_path) -> None:
    result = run_job(_spec(), tmp_path, progress=False)
    assert result.status == "completed"
    assert result.metrics.get("not_private") == 1.0
    ledger = json.loads((result.run_dir / "ledger.json").read_text())
    assert ledger["noise"] == "secret" and ledger["guarantee"].startswith("NOT PRIVATE")
    status = json.loads((result.run_dir / "status.json").read_text())
    assert "utility_tuning" in status["not_private"]
    assert any(what == "NOT PRIVATE" for what, _ in result.summary)


def test_an_owner_budget_refuses_a_run_its_ledger_would_not_bound(tmp_path) -> None:
    doc = json.loads(json.dumps(TINY_DPGENG))
    doc["privacy"]["owner_budget"] = 10.0
    with pytest.raises(SpecError, match="owner_budget.*utility_tuning"):
        run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_sweep_ledger_keeps_a_trials_not_private_caveat(tmp_path) -> None:
    from dpdistill.privacy import Gaussian, PrivacyLedger
    from dpdistill.runtime.sweeps import SweepPrivacy, compose_trial_ledgers

    for i, caveat in enumerate((None, "NOT PRIVATE: a choice made on the sensitive split")):
        folder = tmp_path / "trials" / "job" / f"t{i}"
        folder.mkdir(parents=True)
        ledger = PrivacyLedger(folder / "ledger.json", 5.0, 1e-5, n_records=1000, caveat=caveat)
        ledger.charge("trial", Gaussian(sigma=2.0))
    acc = compose_trial_ledgers(tmp_path, SweepPrivacy(private=True))
    assert acc is not None and acc["not_private"]
    sweep = json.loads((tmp_path / "ledger.json").read_text())
    assert sweep["guarantee"].startswith("NOT PRIVATE")
