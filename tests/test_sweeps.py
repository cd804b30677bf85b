"""Ray Tune + Optuna sweeps over job fields: spec checks, and a real two-trial sweep on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dpdistill.errors import BudgetExceeded, SpecError
from dpdistill.runtime.sweeps import load_sweep, plan_privacy, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def _sweep_file(tmp_path: Path, **patch) -> Path:
    doc = {
        "name": "s",
        "job": str(ROOT / "jobs" / "dm-digits.yaml"),
        "set": ["method.ipc=1", "evaluation.seeds=1", "evaluation.epochs=2", "method.iterations=2"],
        "search": {"method.lr_img": {"loguniform": [0.5, 5.0]}},
        "metric": "val_acc_mean",
        "num_samples": 2,
        "max_concurrent": 2,
    }
    doc.update(patch)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_test_set_metric_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"field 'metric'.*validation metric.*leak the test set"):
        load_sweep(_sweep_file(tmp_path, metric="acc_mean"))


def test_bad_distribution_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"search\.method\.lr_img.*low < high"):
        load_sweep(_sweep_file(tmp_path, search={"method.lr_img": {"uniform": [2.0, 1.0]}}))


def test_search_bound_out_of_range_for_the_job_is_refused_up_front(tmp_path):
    with pytest.raises(SpecError, match=r"method\.ipc"):
        load_sweep(_sweep_file(tmp_path, search={"method.ipc": {"choice": [1, -3]}}))


def test_a_misspelled_metric_is_refused_before_any_trial(tmp_path):
    with pytest.raises(SpecError, match=r"field 'metric': a distill job does not report 'val_acc_maen'.*val_acc_mean"):
        load_sweep(_sweep_file(tmp_path, metric="val_acc_maen"))
    with pytest.raises(SpecError, match=r"'synv_acc_mean' is reported only with evaluation.selection: synv"):
        load_sweep(_sweep_file(tmp_path, metric="synv_acc_mean"))
    load_sweep(_sweep_file(tmp_path, metric="privacy_epsilon", mode="min"))  # accounting figures are reported


QUICKSTART = str(ROOT / "jobs" / "quickstart.yaml")  # DP-GenG on digits


@pytest.mark.parametrize(("fixed", "searched"), [
    (["method.allocation=utility", "method.utility_tuning=glyphs"], "method.share_generator"),
    ([], "method.utility_fid_ratio"),  # allocation 'fixed' never reads it
])
def test_a_searched_option_the_method_overrides_is_refused(tmp_path, fixed, searched):
    bounds = {"method.share_generator": [0.2, 0.5], "method.utility_fid_ratio": [1.1, 1.5]}[searched]
    with pytest.raises(SpecError, match=rf"search\.{searched}': method 'dpgeng' ignores"):
        load_sweep(_sweep_file(tmp_path, job=QUICKSTART, set=fixed, search={searched: {"uniform": bounds}}))


def test_a_searched_allocation_that_would_override_a_searched_share_is_refused(tmp_path):
    search = {"method.share_generator": {"uniform": [0.2, 0.5]},
              "method.allocation": {"choice": ["fixed", "utility"]}}
    with pytest.raises(SpecError, match=r"ignores share_generator with method.allocation=\"utility\""):
        load_sweep(_sweep_file(tmp_path, job=QUICKSTART, set=["method.utility_tuning=glyphs"], search=search))
    # The shipped DP-GenG budget sweep searches shares under allocation 'fixed': accepted.
    load_sweep(ROOT / "sweeps" / "dpgeng-budget-digits.yaml")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_trial_sweep_runs_jobs_and_logs_to_mlflow(tmp_path, ray_cluster):
    import mlflow

    sweep, base, _ = load_sweep(_sweep_file(tmp_path))
    summary = run_sweep(sweep, base, tmp_path / "runs")
    assert summary["trials"] == 2 and summary["failed_trials"] == 0, summary["errors"]
    assert 0.0 <= summary["best_value"] <= 1.0
    assert "non-private" in summary["selection"]
    best_run = Path(summary["best_run_dir"])
    assert json.loads((best_run / "status.json").read_text())["status"] == "completed"
    assert yaml.safe_load((best_run / "spec.yaml").read_text())["method"]["lr_img"] == pytest.approx(
        summary["best_config"]["method.lr_img"])
    assert summary["privacy"] == "none: the trials are not private" and "sweep_epsilon" not in summary
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow_uri"])
    exp = client.get_experiment_by_name("sweep-s")
    runs = client.search_runs([exp.experiment_id], "tags.`dpdistill.sweep_role` = 'trial'")
    assert len(runs) == 2 and all("val_acc_mean" in r.data.metrics for r in runs)


# A private job small enough for a sweep test: NDPDC on digits, two iterations, tiny evaluation.
PRIVATE_JOB = {
    "name": "ndpdc-tiny", "kind": "distill", "data": {"name": "digits"}, "privacy": {"epsilon": 1.0},
    "method": {"name": "ndpdc", "ipc": 1, "iterations": 2, "net_width": 8, "batch_real": 16},
    "evaluation": {"seeds": 1, "epochs": 2, "model_options": {"width": 8}},
}


def _private_sweep_file(tmp_path: Path, **patch) -> Path:
    job = tmp_path / "ndpdc-tiny.yaml"
    job.write_text(yaml.safe_dump(PRIVATE_JOB))
    return _sweep_file(tmp_path, job=str(job), set=[], search={"method.lr_img": {"loguniform": [1.0, 100.0]}},
                       name="p", **patch)


def _independent_epsilon(ledgers: list[dict], delta: float, interval: float) -> float:
    """Every trial's charges composed with dp-accounting's own PLDAccountant, from the JSON alone."""
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant

    def event(m: dict) -> dp_event.DpEvent:
        if m["type"] == "parallel":  # per-class partitions: one record reaches one copy
            return event(m["mechanism"])
        assert m["type"] == "poisson_gaussian", m
        step = dp_event.PoissonSampledDpEvent(m["q"], dp_event.GaussianDpEvent(m["sigma"]))
        return dp_event.SelfComposedDpEvent(step, m["steps"])

    accountant = PLDAccountant(value_discretization_interval=interval)
    for ledger in ledgers:
        for entry in ledger["entries"]:
            accountant.compose(event(entry["mechanism"]))
    return accountant.get_epsilon(delta)


def test_private_sweep_reports_every_trials_charges_composed(tmp_path, ray_cluster):
    import mlflow

    sweep, base, _ = load_sweep(_private_sweep_file(tmp_path))
    summary = run_sweep(sweep, base, tmp_path / "runs")
    assert summary["trials"] == 2 and summary["failed_trials"] == 0, summary["errors"]
    sweep_dir = Path(summary["sweep_dir"])
    trial_ledgers = [json.loads(p.read_text()) for p in sorted((sweep_dir / "trials").glob("*/*/*/ledger.json"))]
    assert len(trial_ledgers) == 2
    trial_eps = [t["composed"]["epsilon"] for t in trial_ledgers]
    assert all(e == pytest.approx(1.0, rel=0.01) for e in trial_eps)
    assert summary["trial_epsilon"] == pytest.approx(max(trial_eps), rel=1e-12)
    # The sweep's ε: both trials composed at the trials' δ, strictly more than one trial's.
    delta = trial_ledgers[0]["delta"]
    assert summary["sweep_delta"] == delta and summary["sweep_budget"] is None
    assert summary["sweep_epsilon"] > summary["trial_epsilon"] * 1.1
    sweep_ledger = json.loads((sweep_dir / "ledger.json").read_text())
    assert sweep_ledger["composed"]["epsilon"] == summary["sweep_epsilon"]
    assert sweep_ledger["composed"]["charges"] == 2
    interval = sweep_ledger["accountant"]["value_discretization_interval"]
    assert summary["sweep_epsilon"] == pytest.approx(_independent_epsilon(trial_ledgers, delta, interval), rel=1e-9)
    assert "sweep ε = " in summary["privacy"] and "per trial ε ≤ " in summary["privacy"]
    assert "sensitive validation split" in summary["selection"] and "non-private" in summary["selection"]
    assert json.loads((sweep_dir / "summary.json").read_text())["sweep_epsilon"] == summary["sweep_epsilon"]
    assert summary["mlflow_uri"].startswith(f"sqlite:///{tmp_path}")  # not an earlier sweep's store
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow_uri"])
    exp = client.get_experiment_by_name("sweep-p")
    (run,) = client.search_runs([exp.experiment_id], "tags.`dpdistill.sweep_role` = 'sweep'")
    assert run.data.metrics["privacy_sweep_epsilon"] == pytest.approx(summary["sweep_epsilon"])
    assert run.data.metrics["privacy_trial_epsilon"] == pytest.approx(summary["trial_epsilon"])


def test_a_sweep_budget_the_trials_could_exceed_is_refused_before_any_trial(tmp_path):
    sweep, base, _ = load_sweep(_private_sweep_file(tmp_path, budget={"epsilon": 1.5}))
    with pytest.raises(BudgetExceeded) as err:
        run_sweep(sweep, base, tmp_path / "runs")
    msg = str(err.value)
    assert "\n" not in msg and "2 trials of ε ≤ 1" in msg and "above the sweep budget 1.5" in msg
    assert not (tmp_path / "runs").exists()  # nothing ran, no sweep folder


def test_a_sweep_budget_splits_delta_between_the_trials(tmp_path):
    from dpdistill.privacy import default_delta
    from dpdistill.privacy.owner_budget import composed_epsilon

    sweep, base, _ = load_sweep(_private_sweep_file(tmp_path, budget={"epsilon": 2.5}))
    plan = plan_privacy(sweep, base, tmp_path / "runs")
    n = 1294  # digits' training split
    assert plan.sweep_delta == default_delta(n) and plan.trial_delta == plan.sweep_delta / 2
    assert f"privacy.delta={json.dumps(plan.trial_delta)}" in plan.overrides
    # The worst case: two arbitrary (1, δ/2)-DP trials, composed at δ: just under 2.
    assert plan.worst_case == composed_epsilon([], [(1.0, plan.trial_delta)] * 2, plan.sweep_delta)
    assert 1.9 < plan.worst_case <= 2.0 and plan.budget == 2.5
    with pytest.raises(SpecError, match="field 'budget'.*not private"):
        load_sweep(_sweep_file(tmp_path, budget={"epsilon": 1.0}))


def test_a_sweep_on_an_owner_budget_checks_every_trial_up_front(tmp_path, monkeypatch):
    monkeypatch.delenv("DPDISTILL_BUDGETS", raising=False)
    job = {**PRIVATE_JOB, "privacy": {"epsilon": 1.0, "owner_budget": 1.5}}
    (tmp_path / "owned.yaml").write_text(yaml.safe_dump(job))
    sweep, base, _ = load_sweep(_sweep_file(tmp_path, job=str(tmp_path / "owned.yaml"), set=[], name="o",
                                            search={"method.lr_img": {"loguniform": [1.0, 100.0]}}))
    with pytest.raises(BudgetExceeded, match=r"owner budget for digits .* sweep 'o' reserves 2 runs of ε 1"):
        run_sweep(sweep, base, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    # Trials run under the sweep's folder: they are pointed at the store a plain run would charge.
    sweep, base, _ = load_sweep(_sweep_file(tmp_path, job=str(tmp_path / "owned.yaml"), name="o",
                                            set=["privacy.owner_budget=3"],
                                            search={"method.lr_img": {"loguniform": [1.0, 100.0]}}))
    plan = plan_privacy(sweep, base, tmp_path / "runs")
    store = (tmp_path / "runs" / "budgets").resolve()
    assert plan.overrides == [f"privacy.budget_store={json.dumps(str(store))}"]


def test_a_resume_is_refused_when_the_charges_so_far_plus_the_remaining_trials_could_exceed_the_budget(tmp_path):
    """Interrupted trials charged before their release and are rerun: a resume must count both."""
    from dpdistill.privacy import Gaussian, calibrate_mechanism

    sweep, base, _ = load_sweep(_private_sweep_file(tmp_path, num_samples=3, budget={"epsilon": 3.2}))
    plan = plan_privacy(sweep, base, tmp_path / "runs")
    assert plan.worst_case < 3.2  # three trials of ε 1 fit
    trial = Gaussian(sigma=calibrate_mechanism(lambda s: Gaussian(sigma=s), 1.0, plan.trial_delta).sigma)
    plan_privacy(sweep, base, tmp_path / "runs", charged=(trial,), remaining=2)  # 1 charged + 2 to come: fits
    for charged, remaining in (((trial, trial), 2), ((trial,), 3)):  # an interrupted attempt, rerun: too much
        with pytest.raises(BudgetExceeded, match=r"charged so far plus \d more trial.*above the sweep budget 3.2"):
            plan_privacy(sweep, base, tmp_path / "runs", charged=charged, remaining=remaining)


def test_a_resume_is_refused_while_another_driver_holds_the_sweep(tmp_path):
    import fcntl

    from dpdistill.runtime.sweeps import STATE_FILE, SweepSpec, resume_sweep

    sweep, base, _ = load_sweep(_sweep_file(tmp_path))
    folder = tmp_path / "runs" / "sweeps" / "s" / "stamp"
    (folder / "tune" / "s").mkdir(parents=True)
    (folder / "tune" / "s" / "tuner.pkl").write_bytes(b"")
    (folder / STATE_FILE).write_text(json.dumps({"sweep": SweepSpec.model_dump(sweep, mode="json"), "base": base,
                                                 "runs_dir": str(tmp_path / "runs")}))
    with open(folder / "sweep.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SpecError, match="another dpdistill process is running this sweep"):
            resume_sweep(folder)
    with pytest.raises(SpecError, match="not a sweep folder"):
        resume_sweep(tmp_path)


def test_bounds_that_are_only_invalid_together_are_left_to_their_trial(tmp_path):
    # share_generator + share_expert < 1 fails only at the corner (0.6, 0.5): each bound alone is valid.
    search = {"method.share_generator": {"uniform": [0.2, 0.6]}, "method.share_expert": {"uniform": [0.05, 0.5]}}
    load_sweep(_sweep_file(tmp_path, job=QUICKSTART, set=[], search=search))


def test_a_validation_metric_with_validation_off_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"field 'metric': 'val_acc_mean' .* evaluation.validation"):
        load_sweep(_sweep_file(tmp_path, set=["evaluation.validation=false", "method.ipc=1"]))
