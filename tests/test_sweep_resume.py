"""An interrupted sweep resumes and finishes with all its trials (issue 21), against a real Ray head on loopback
with token auth on, through the `dpdistill sweep` CLI as a user runs it.

SIGTERM (what `ray job stop` and pod eviction send) lands while a private trial is running, after it charged its
ledger: the sweep exits 130 and prints how to resume; the stopped trial's run folder says `interrupted`; its
charge stays in the sweep's ledger. `dpdistill sweep --resume DIR` reruns the unfinished trial and finishes the
rest; the sweep's ledger composes every attempt's charges; MLflow holds one parent run with a child per trial
attempt that ended, each carrying the trial's full resolved spec and its run folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ray_head import ray_head

DPDISTILL = str(Path(sys.executable).parent / "dpdistill")

# A private job whose trials take some seconds (so the signal lands inside one), with a charge made up front.
JOB = {
    "name": "ndpdc-resume", "kind": "distill", "data": {"name": "digits"}, "privacy": {"epsilon": 1.0},
    "method": {"name": "ndpdc", "ipc": 1, "iterations": 3000, "net_width": 8, "batch_real": 16},
    "evaluation": {"seeds": 1, "epochs": 2, "model_options": {"width": 8}},
}
# The first trial only has to complete, the second has to be running when the signal lands: Optuna's seeded
# start (seed 0) gives trial 1 the 300-iteration choice and trial 2 the 3,000 one, so the completed trial is
# short and only the interrupted one (run twice) pays the long schedule (about 50 s less). Checked below.
SWEEP = {
    "name": "resumable", "job": "job.yaml",
    "search": {"method.lr_img": {"loguniform": [1.0, 100.0]}, "method.iterations": {"choice": [3000, 300]}},
    "metric": "val_acc_mean", "num_samples": 2, "max_concurrent": 1,
}


@pytest.fixture(scope="module")
def head():
    with ray_head(start_params=("--num-cpus=2",)) as h:
        yield h


def _env(head) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    return env | {"OMP_NUM_THREADS": "1", "RAY_AUTH_TOKEN": head.token}


def _status(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


def _runs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (sweep_dir / "trials").glob("*/*/*/status.json"))


def _charged(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "ledger.json").read_text())["entries"])
    except (OSError, ValueError, KeyError):
        return False


def _wait_for_a_charged_running_trial_after_a_completed_one(runs: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for sweep_dir in (runs / "sweeps" / "resumable").glob("*"):
            folders = _runs(sweep_dir)
            done = [f for f in folders if _status(f)["status"] == "completed"]
            running = [f for f in folders if _status(f)["status"] == "running" and _charged(f)]
            if done and running:
                return sweep_dir
        time.sleep(0.2)
    raise AssertionError("no second trial started within 10 minutes")


def test_an_interrupted_sweep_resumes_and_finishes_with_all_trials(tmp_path, head):
    import mlflow

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(JOB))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    runs = tmp_path / "runs"
    cmd = [DPDISTILL, "sweep", "sweep.yaml", "--runs-dir", str(runs), "--address", head.gcs]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(head), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        sweep_dir = _wait_for_a_charged_running_trial_after_a_completed_one(runs, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err[-3000:])
    assert f"resume with: dpdistill sweep --resume {sweep_dir}" in out
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["completed_trials"] == 1
    interrupted = [f for f in _runs(sweep_dir) if _status(f)["status"] == "interrupted"]
    # It charged before it was stopped. (A trial must outlast the seconds Tune takes to stop it: at 400
    # iterations the second trial completed after the SIGTERM and no attempt was interrupted; at 1000, once the
    # CPU loops got faster, a trial took 9.7 s and the same happened.)
    assert interrupted and all(_charged(f) for f in interrupted), [(f, _status(f)) for f in _runs(sweep_dir)]
    iterations = {yaml.safe_load((f / "spec.yaml").read_text())["method"]["iterations"] for f in interrupted}
    assert iterations == {3000}, f"premise: the interrupted trial is the long one, got {iterations}"
    assert not [f for f in _runs(sweep_dir) if _status(f)["status"] == "running"]
    charged_before = sum(_charged(f) for f in _runs(sweep_dir))
    assert json.loads((sweep_dir / "ledger.json").read_text())["composed"]["charges"] == charged_before

    resumed = subprocess.run([DPDISTILL, "sweep", "--resume", str(sweep_dir), "--address", head.gcs], cwd=tmp_path,
                             env=_env(head), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr[-3000:])
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["completed_trials"] == 2 and summary["failed_trials"] == 0
    folders = _runs(sweep_dir)
    trials = {f.parent.parent.name for f in folders}
    assert len(trials) == 2
    newest = {t: max((f for f in folders if f.parent.parent.name == t), key=lambda f: f.name) for t in trials}
    assert all(_status(f)["status"] == "completed" for f in newest.values())
    for f in interrupted:  # the interrupted attempt keeps its folder and status; its trial was rerun
        assert _status(f)["status"] == "interrupted" and newest[f.parent.parent.name] != f
    # Every attempt's charges composed: the interrupted one's too.
    sweep_ledger = json.loads((sweep_dir / "ledger.json").read_text())
    assert sweep_ledger["composed"]["charges"] == sum(_charged(f) for f in folders) == len(folders)
    assert summary["sweep_epsilon"] == sweep_ledger["composed"]["epsilon"]
    assert Path(summary["best_run_dir"]) in newest.values()

    # MLflow: one parent run; a child per ended attempt with the full resolved spec and a link to its folder.
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow_uri"])
    exp = client.get_experiment_by_name("sweep-resumable")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dpdistill.sweep_role` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.info.run_id == summary["mlflow_parent_run_id"]
    assert parent.data.metrics["privacy_sweep_epsilon"] == pytest.approx(summary["sweep_epsilon"])
    children = client.search_runs([exp.experiment_id], "tags.`dpdistill.sweep_role` = 'trial'")
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 2
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for child in finished:
        run_dir = Path(child.data.tags["dpdistill.run_dir"])
        assert run_dir in newest.values()
        resolved = yaml.safe_load((run_dir / "spec.yaml").read_text())
        assert child.data.params["method.name"] == "ndpdc" and child.data.params["data.name"] == "digits"
        assert float(child.data.params["method.lr_img"]) == pytest.approx(resolved["method"]["lr_img"])
        assert child.data.metrics["privacy_epsilon"] == pytest.approx(1.0, rel=0.01)
        assert "val_acc_mean" in child.data.metrics
    assert not (tmp_path / "mlruns").exists()  # artifacts beside the store, not in the working directory
    assert exp.artifact_location.startswith((runs / "mlartifacts").resolve().as_uri())

    again = subprocess.run([DPDISTILL, "sweep", "--resume", str(sweep_dir)], cwd=tmp_path, env=_env(head),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "completed already" in again.stderr
