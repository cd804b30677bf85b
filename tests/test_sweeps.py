"""Ray Tune + Optuna sweeps over job fields: spec checks, and a real two-trial sweep on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dpdistill.errors import SpecError
from dpdistill.runtime.sweeps import load_sweep, run_sweep

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
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow_uri"])
    exp = client.get_experiment_by_name("sweep-s")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all("val_acc_mean" in r.data.metrics for r in runs)
