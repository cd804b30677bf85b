"""End to end through the CLI on `digits`: run folder contents, MLflow run, Ray evaluation, the log and
`report`, Ctrl-C and SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from run_processes import wait_for_pipeline

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--set", "method.ipc=2", "--set", "method.iterations=5",
    "--set", "evaluation.seeds=2", "--set", "evaluation.epochs=3", "--set", "ray.num_cpus=2",
]


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpdistill.cli", *args], capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    proc = _cli("run", "jobs/dm-digits.yaml", "--runs-dir", str(runs), "--no-progress", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((runs / "dm-digits").iterdir())
    assert len(run_dirs) == 1
    return runs, run_dirs[0], proc


def test_run_folder_holds_spec_metrics_grid(finished_run):
    runs, run_dir, proc = finished_run
    for name in ("spec.yaml", "metrics.json", "status.json", "log.txt", "artifacts/distilled_grid.png",
                 "artifacts/distilled.pt"):
        assert (run_dir / name).is_file(), name
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert spec["method"]["ipc"] == 2 and spec["evaluation"]["seeds"] == 2  # overrides applied
    assert "lr_img" in spec["method"] or len(spec["method"]) > 3  # defaults filled in
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["acc_mean"] <= 1.0 and metrics["n_released"] == 20
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert str(run_dir) in proc.stdout and "test accuracy" in proc.stdout


def test_mlflow_run_has_the_same_metrics(finished_run):
    import mlflow

    runs, run_dir, _ = finished_run
    status = json.loads((run_dir / "status.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(status["mlflow_run_id"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("acc_mean", "acc_std", "n_released"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    assert run.data.params["method.name"] == "dm"
    assert run.data.metrics["wall_seconds"] == pytest.approx(metrics["wall_seconds"])  # it never reached MLflow
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "metrics.json"} <= artifacts


def test_log_records_stages_and_outcome(finished_run):
    """log.txt used to hold only the 'started' line: the handler was detached before the outcome was logged."""
    _, run_dir, _ = finished_run
    log = (run_dir / "log.txt").read_text()
    assert "started (kind=distill, method=dm)" in log
    for stage in ("distil (dm)", "evaluate"):
        assert f"stage {stage} started" in log and re.search(rf"stage {re.escape(stage)} completed in [0-9.]+ s", log)
    assert re.search(r"run .* completed after [0-9.]+ s", log)
    status = json.loads((run_dir / "status.json").read_text())
    assert "error" not in status and dict(map(tuple, status["summary"]))["test accuracy"].endswith("epochs)")


def test_report_takes_the_job_folder_and_prints_percentages(finished_run):
    runs, run_dir, _ = finished_run
    proc = _cli("report", str(runs / "dm-digits"))  # the job folder: its latest run
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert str(run_dir) in out and "status: completed" in out
    assert f"{100 * metrics['acc_mean']:.2f} %" in out  # a percentage, not the raw fraction
    assert "test accuracy" in out  # the summary `run` printed
    proc = _cli("report", str(runs))  # neither a run nor a job folder: one line, exit 2
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a run folder" in proc.stderr


def test_no_sensitive_record_in_run_folder(finished_run):
    """The released set must not contain any real training image verbatim (DM starts from real images,
    so this fails if the export forgot to release the optimised images instead of the initial ones)."""
    import torch

    from dpdistill import data

    _, run_dir, _ = finished_run
    released = torch.load(run_dir / "artifacts" / "distilled.pt")["images"]
    train = data.load("digits", "train").images
    d = torch.cdist(released.flatten(1), train.flatten(1)).min(dim=1).values
    assert (d > 1e-4).all()


def test_ctrl_c_leaves_consistent_folder_marked_interrupted(tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpdistill.cli", "run", "jobs/dm-digits.yaml", "--runs-dir", str(runs),
         "--no-progress", "--set", "method.iterations=100000", "--set", "tracking.enabled=false"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    status_files: list[Path] = []
    while time.time() < deadline and not status_files:
        status_files = list(runs.glob("dm-digits/*/status.json"))
        time.sleep(0.5)
    assert status_files, "the run never started"
    time.sleep(3)  # well inside the distillation loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    run_dir = status_files[0].parent
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and "ended" in status
    json.loads((run_dir / "metrics.json").read_text())  # parses: not torn
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["name"] == "dm-digits"
    assert not list(run_dir.rglob("*.tmp"))


def test_sigterm_marks_the_run_interrupted_and_the_mlflow_run_killed(tmp_path):
    """SIGTERM is what `ray job stop`, a pod's eviction and activeDeadlineSeconds send: it used to kill the
    process with status.json 'running' and the MLflow run RUNNING."""
    import mlflow

    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "dpdistill"), "run", "jobs/dm-digits.yaml", "--runs-dir", str(runs),
         "--no-progress", "--set", "method.iterations=100000", "--set", "evaluation.parallel=false"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    run_dir = wait_for_pipeline(runs, "dm-digits")
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM" in err and "Traceback" not in err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["interrupted_by"] == "SIGTERM" and "ended" in status
    metrics = json.loads((run_dir / "metrics.json").read_text())  # the partial metrics are kept
    assert metrics["wall_seconds"] > 0
    assert re.search(r"stage distil \(dm\) interrupted after", (run_dir / "log.txt").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    assert client.get_run(status["mlflow_run_id"]).info.status == "KILLED"
