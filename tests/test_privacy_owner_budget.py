"""A data owner's budget across runs: the store is keyed by the records' content, every run reserves its whole ε
before its run folder exists and settles to its ledger's charges after, and a run that would exceed the owner's
total is refused in one line (exit 2 through the CLI) with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from dpdistill import data
from dpdistill.errors import BudgetExceeded, PrivacyError, SpecError
from dpdistill.privacy import Gaussian, PrivacyLedger, default_delta
from dpdistill.privacy.cli import privacy_command
from dpdistill.privacy.owner_budget import (
    CHARGED,
    RESERVED,
    DatasetIdentity,
    OwnerBudget,
    composed_epsilon,
    dataset_identity,
    fingerprint,
    resolve_store,
)
from dpdistill.spec import validate_spec

ROOT = Path(__file__).resolve().parents[1]
DIGITS_TRAIN = 1294  # records in digits' training split (the run's n)
DIGITS_OWNER = 1294 + 144  # training and validation records: what the owner's account covers


def job(owner_budget: float | None = 1.5, **privacy) -> dict:
    """NDPDC on digits, two iterations, no evaluation: a private run of a few seconds."""
    return {
        "name": "ndpdc-tiny", "kind": "distill", "data": {"name": "digits"},
        "privacy": {"epsilon": 1.0, "owner_budget": owner_budget, **privacy},
        "method": {"name": "ndpdc", "ipc": 1, "iterations": 2, "net_width": 8, "batch_real": 16},
        "evaluation": {"enabled": False}, "tracking": {"enabled": False},
    }


def run(doc: dict, runs: Path):
    from dpdistill.runner import run_job

    return run_job(validate_spec(doc), runs, progress=False)


def account_files(store: Path) -> list[Path]:
    return sorted(store.glob("*.json")) if store.exists() else []


def run_folders(runs: Path, name: str = "ndpdc-tiny") -> list[Path]:
    return sorted((runs / name).iterdir()) if (runs / name).exists() else []


# ------------------------------------------------------------------------------------------------ identity


KEY = bytes(range(32))  # a store key for the identity tests (a real store draws 32 random bytes)


def test_fingerprint_is_the_records_not_their_order_split_or_folder():
    digits = dataset_identity(validate_spec(job()), KEY)
    assert digits.name == "digits" and digits.root == "embedded" and digits.n_records == DIGITS_OWNER
    # Another validation split of the same records, or a subset run (train_limit), is the same owner's data.
    assert dataset_identity(validate_spec({**job(), "data": {"name": "digits", "val_seed": 3}}), KEY) == digits
    assert dataset_identity(validate_spec({**job(), "data": {"name": "digits", "train_limit": 100}}), KEY) == digits
    splits = data.load_splits("digits")
    train, val = splits["train"], splits["val"]
    parts = ((train.images, train.labels), (val.images, val.labels))
    assert fingerprint(*parts, key=KEY) == (digits.fingerprint, DIGITS_OWNER)
    perm = torch.randperm(len(train))
    assert fingerprint((val.images, val.labels), (train.images[perm], train.labels[perm]), key=KEY)[0] \
        == digits.fingerprint
    # One pixel or one label of one record makes it other data.
    nudged = train.images.clone()
    nudged[7, 0, 3, 3] += 1 / 16
    assert fingerprint((nudged, train.labels), (val.images, val.labels), key=KEY)[0] != digits.fingerprint
    relabelled = train.labels.clone()
    relabelled[7] = (relabelled[7] + 1) % 10
    assert fingerprint((train.images, relabelled), (val.images, val.labels), key=KEY)[0] != digits.fingerprint


def test_the_shown_fingerprint_cannot_test_membership_without_the_store_key(tmp_path):
    # An unkeyed hash of the records, shown in the summary and the MLflow tag, would let anyone holding every record
    # but x compute it with and without x. Keyed, the same records give unrelated fingerprints under other keys,
    # and the store's key is a private 0600 file written with its first account.
    splits = data.load_splits("digits")
    parts = ((splits["train"].images, splits["train"].labels), (splits["val"].images, splits["val"].labels))
    assert fingerprint(*parts, key=KEY)[0] != fingerprint(*parts, key=bytes(32))[0]
    runs = tmp_path / "runs"
    result = run(job(), runs)
    assert result.status == "completed"
    key_file = runs / "budgets" / ".owner-key"
    assert key_file.exists() and (key_file.stat().st_mode & 0o077) == 0 and len(key_file.read_bytes()) == 32
    shown = json.loads(account_files(runs / "budgets")[0].read_text())["fingerprint"]
    assert shown == fingerprint(*parts, key=key_file.read_bytes())[0]
    assert shown != fingerprint(*parts, key=KEY)[0]


def test_a_run_on_another_split_of_the_owners_records_is_refused(tmp_path):
    # Ledgers of runs on different cuts of the owner's records do not compose into a bound for those records.
    runs = tmp_path / "runs"
    assert run(job(), runs).status == "completed"
    with pytest.raises(PrivacyError, match="split"):
        run({**job(), "data": {"name": "digits", "val_seed": 3}}, runs)
    assert len(run_folders(runs)) == 1


def test_store_location_spec_then_environment_then_runs_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("DPDISTILL_BUDGETS", raising=False)
    assert resolve_store(None, tmp_path / "runs") == (tmp_path / "runs" / "budgets").resolve()
    monkeypatch.setenv("DPDISTILL_BUDGETS", str(tmp_path / "env"))
    assert resolve_store(None, tmp_path / "runs") == (tmp_path / "env").resolve()
    assert resolve_store(str(tmp_path / "spec"), tmp_path / "runs") == (tmp_path / "spec").resolve()


# ------------------------------------------------------------------------------------------------ the account

IDENTITY = DatasetIdentity("toy", "embedded", "ab" * 32, 1000)
OWNER_DELTA = 1 / 2000


def test_a_pending_reservation_counts_its_whole_epsilon_until_settled(tmp_path):
    """The crash-safe order: a run that never settles (crashed) keeps its whole ε reserved."""
    store = tmp_path / "budgets"
    owner = OwnerBudget(store, IDENTITY, 1.5)
    assert owner.delta == OWNER_DELTA  # 1/(2N)
    first = owner.reserve("a", 1.0, 1e-4)
    account = json.loads(owner.path.read_text())
    assert [e["state"] for e in account["entries"]] == [RESERVED]
    before = owner.path.read_bytes()
    with pytest.raises(BudgetExceeded, match=r"reserves a run of ε 1 .* > total 1\.5"):
        owner.reserve("b", 1.0, 1e-4)  # a: (1, 1e-4)-DP as far as anyone knows; two of those are ~2
    assert owner.path.read_bytes() == before
    # a ran and its ledger charged far less than it reserved: settling frees the rest.
    ledger = PrivacyLedger(tmp_path / "ledger.json", 1.0, 1e-4, n_records=1000)
    ledger.charge("x", Gaussian(8.0))
    assert owner.settle(first, ledger, tmp_path, "completed") == pytest.approx(
        composed_epsilon([Gaussian(8.0)], [], OWNER_DELTA))
    second = owner.reserve("b", 1.0, 1e-4)
    entries = json.loads(owner.path.read_text())["entries"]
    assert [e["state"] for e in entries] == [CHARGED, RESERVED] and entries[1]["id"] == second
    assert entries[0]["mechanisms"] == [Gaussian(8.0).to_dict()] and entries[0]["status"] == "completed"


def test_a_refused_first_run_creates_no_store_and_the_total_is_the_owners(tmp_path):
    store = tmp_path / "budgets"
    with pytest.raises(BudgetExceeded):
        OwnerBudget(store, IDENTITY, 0.5).reserve("a", 1.0, 1e-4)
    assert not store.exists()
    OwnerBudget(store, IDENTITY, 2.0).reserve("a", 1.0, 1e-4)
    with pytest.raises(PrivacyError, match=r"owner_budget=5 but .* records the owner's total ε=2"):
        OwnerBudget(store, IDENTITY, 5.0)
    with pytest.raises(BudgetExceeded, match="no finite ε at the owner's δ"):
        OwnerBudget(store, IDENTITY, 2.0).reserve("b", 0.1, 4.5e-4)  # 4.5e-4 + 1e-4 pending > δ = 5e-4


def test_owner_budget_needs_a_private_secret_run():
    for privacy, match in (({"epsilon": None}, "owner_budget needs epsilon"),
                           ({"reproducible_noise": True}, "NOT PRIVATE"),
                           ({"epsilon": 2.0}, "exceeds owner_budget")):
        with pytest.raises(SpecError, match=match):
            validate_spec({**job(), "privacy": {**job()["privacy"], **privacy}})


# ------------------------------------------------------------------------------------------------ runs


def test_second_run_over_the_owner_budget_is_refused_in_one_line_and_writes_nothing(tmp_path):
    runs = tmp_path / "runs"
    first = run(job(owner_budget=1.5), runs)
    assert first.status == "completed"
    (account,) = account_files(runs / "budgets")
    recorded = json.loads(account.read_text())
    assert [e["state"] for e in recorded["entries"]] == [CHARGED]
    assert recorded["entries"][0]["run_dir"] == str(first.run_dir)
    assert any(what == "owner budget" and "of the owner's 1.5" in value for what, value in first.summary)
    before = account.read_bytes()
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job(owner_budget=1.5)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DPDISTILL_BUDGETS", None)
    done = subprocess.run([sys.executable, "-m", "dpdistill.cli", "run", str(spec_file), "--runs-dir", str(runs),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("dpdistill: error: owner budget for digits")
    assert "> total 1.5" in err and "nothing was run" in err
    assert run_folders(runs) == [first.run_dir]  # no run folder for the refused run
    assert account.read_bytes() == before and account_files(runs / "budgets") == [account]


def test_two_runs_that_fit_are_both_recorded_and_composed(tmp_path, monkeypatch):
    monkeypatch.setenv("DPDISTILL_BUDGETS", str(tmp_path / "owner-store"))
    runs = tmp_path / "runs"
    results = [run(job(owner_budget=3.0), runs) for _ in range(2)]
    assert [r.status for r in results] == ["completed", "completed"]
    (account,) = account_files(tmp_path / "owner-store")
    recorded = json.loads(account.read_text())
    assert [e["run_dir"] for e in recorded["entries"]] == [str(r.run_dir) for r in results]
    assert [e["state"] for e in recorded["entries"]] == [CHARGED, CHARGED]
    ledgers = [PrivacyLedger.load(r.run_dir / "ledger.json") for r in results]
    for entry, ledger in zip(recorded["entries"], ledgers, strict=True):
        assert entry["mechanisms"] == [m.to_dict() for m in ledger.mechanisms]
        assert entry["delta"] == ledger.delta == default_delta(DIGITS_TRAIN)
    # The account: both runs' charges composed by PLD at the owner's δ, computed here with dp-accounting alone.
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant

    from dpdistill.privacy.analysis.pld import interval_for_leaves

    owner_delta = 1 / (2 * DIGITS_OWNER)
    assert recorded["delta"] == owner_delta
    mechanisms = [m for ledger in ledgers for m in ledger.mechanisms]
    accountant = PLDAccountant(value_discretization_interval=interval_for_leaves(
        [leaf for m in mechanisms for leaf in m.leaves()]))
    for m in mechanisms:
        inner = m.mechanism  # NDPDC's per-class Parallel: one record reaches one class's batch
        step = dp_event.PoissonSampledDpEvent(inner.q, dp_event.GaussianDpEvent(inner.sigma))
        accountant.compose(dp_event.SelfComposedDpEvent(step, inner.steps))
    expected = accountant.get_epsilon(owner_delta)
    assert recorded["composed"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert ledgers[0].spent_epsilon() < expected < 2 * ledgers[0].spent_epsilon()
    assert any(what == "owner budget" and "over 2 run(s)" in value for what, value in results[1].summary)
    console = Console(record=True, width=200, force_terminal=False)
    assert privacy_command(None, None, None, None, None, None, console=console,
                           budgets=str(tmp_path / "owner-store")) == 0
    out = console.export_text()
    assert "digits (embedded)" in out and recorded["fingerprint"][:16] in out and f"{expected:.4g}" in out
    assert all(str(r.run_dir) in out for r in results)
    with pytest.raises(PrivacyError, match="--budgets STORE alone"):
        privacy_command(str(results[0].run_dir), None, None, None, None, None, budgets=str(tmp_path))


def test_the_store_is_keyed_by_content(tmp_path):
    runs = tmp_path / "runs"
    assert run(job(owner_budget=1.5), runs).status == "completed"  # digits' account is nearly spent
    # A subset run of the same records is the same owner's data, and its cut of them is not the account's: refused
    # (the ledgers of runs on different cuts do not compose into a bound for the owner's records).
    with pytest.raises(PrivacyError, match="owner budget for digits .* split"):
        run({**job(owner_budget=1.5), "data": {"name": "digits", "train_limit": 500}}, runs)
    # The same cut again is charged to the same account, and refused there: it would exceed the total.
    with pytest.raises(BudgetExceeded, match="owner budget for digits"):
        run(job(owner_budget=1.5), runs)
    # Different records (MNIST, a subset run of it) open an account of their own.
    mnist = Path(os.environ.get("DPDISTILL_DATA") or ROOT.parent / "shared" / "data")
    if not data.get("mnist").is_present(mnist):
        pytest.skip(f"MNIST is not under {mnist}")
    subset = {**job(owner_budget=1.5), "data": {"name": "mnist", "root": str(mnist), "train_limit": 200}}
    with pytest.raises(BudgetExceeded, match="no finite ε at the owner's δ"):
        run(subset, runs)  # 200 records' default δ = 1/(200 ln 200), far above the owner's 1/(2·60000)
    subset["privacy"] = {**subset["privacy"], "delta": 1e-6}
    result = run(subset, runs)
    assert result.status == "completed"
    accounts = [json.loads(p.read_text()) for p in account_files(runs / "budgets")]
    assert len(accounts) == 2
    by_name = {a["datasets"][0]["name"]: a for a in accounts}
    assert by_name["mnist"]["datasets"][0]["root"] == str(mnist.resolve()) and by_name["mnist"]["n_records"] == 60_000
    assert [len(a["entries"]) for a in (by_name["digits"], by_name["mnist"])] == [1, 1]
    assert by_name["digits"]["fingerprint"] != by_name["mnist"]["fingerprint"]


def test_without_an_owner_budget_the_summary_says_budget_per_run(tmp_path):
    result = run(job(owner_budget=None), tmp_path / "runs")
    assert ("budget", "per run: earlier runs on this data are not counted (no privacy.owner_budget)") in result.summary
    assert not (tmp_path / "runs" / "budgets").exists()
