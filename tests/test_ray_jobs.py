"""Against a real Ray head on loopback with token auth on: joining it with the documented token variables,
refusing a bad token at once, and Ray Jobs (`dpdistill submit` / `dpdistill jobs`) end to end on `digits`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpdistill.runtime.cluster import TOKEN_HELP
from ray_head import ray_head

ROOT = Path(__file__).resolve().parents[1]

CONNECT = """
import sys
from dpdistill.errors import ClusterError
from dpdistill.runtime.cluster import ray_session
address, token_path = sys.argv[1] or None, sys.argv[2] or None
try:
    with ray_session(address, num_cpus=1, auth_token_path=token_path) as resources:
        print("connected", int(resources["CPU"]))
except ClusterError as e:
    print("ClusterError:", e)
"""


@pytest.fixture(scope="module")
def head():
    with ray_head(start_params=("--num-cpus=2",)) as h:
        yield h


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address / auth settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("DPDISTILL_RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["OMP_NUM_THREADS"] = "1"
    return env | extra


def _connect(address: str, env: dict[str, str], token_path: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CONNECT, address, token_path], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("how", ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ray.auth_token_path", "RAY_ADDRESS"])
def test_documented_token_variables_join_an_explicit_address(head, tmp_path, how):
    """Without RAY_AUTH_MODE in the environment (the old code then sent no token: 20 s of retries and
    'cannot connect'). RAY_ADDRESS is how a Ray Job's driver finds its cluster."""
    token_file = tmp_path / "token"
    token_file.write_text(head.token + "\n")
    env = _clean_env(HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
    address, token_path = head.gcs, ""
    if how == "RAY_AUTH_TOKEN":
        env["RAY_AUTH_TOKEN"] = head.token
    elif how == "RAY_AUTH_TOKEN_PATH":
        env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    elif how == "ray.auth_token_path":
        token_path = str(token_file)
    else:
        env |= {"RAY_ADDRESS": head.gcs, "RAY_AUTH_TOKEN": head.token}
        address = ""
    proc = _connect(address, env, token_path)
    assert "connected 2" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "RAY_AUTH_MODE=disabled" not in proc.stdout + proc.stderr  # no banner inviting users to opt out


def test_a_bad_token_is_one_line_before_ray_starts(head, tmp_path):
    proc = _connect(head.gcs, _clean_env(HOME=str(tmp_path), RAY_AUTH_TOKEN="not-the-token"))
    assert proc.stdout.startswith(f"ClusterError: Ray cluster {head.gcs} refused the auth token from "
                                  "RAY_AUTH_TOKEN;"), proc.stdout + proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 1
    assert "gcs_client" not in proc.stderr  # ray.init's retry loop never ran


def test_no_token_names_the_variables(head, tmp_path):
    proc = _connect(head.gcs, _clean_env(HOME=str(tmp_path)))
    assert "requires an auth token and none was found; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH" in proc.stdout


# The quick-start made tiny: a few generator steps and matching iterations, one 1-epoch evaluation model.
TINY_QUICKSTART = [
    "--set", "method.generator_options.iterations=20", "--set", "method.generated_per_class=20",
    "--set", "method.ipc=2", "--set", "method.expert_pretrain_epochs=1", "--set", "method.expert_dp_epochs=0.2",
    "--set", "method.iterations=5", "--set", "evaluation.seeds=1", "--set", "evaluation.epochs=1",
]


def _dpdistill(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpdistill.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def _printed(stdout: str, label: str) -> str:
    """The command `submit` printed after ``label``."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith(label))
    return line.removeprefix(label).strip()


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """`dpdistill submit` of the tiny quick-start, then the `wait` command it printed, run as printed."""
    home = tmp_path_factory.mktemp("home")
    runs = tmp_path_factory.mktemp("durable") / "runs"
    mlflow_db = runs.parent / "mlflow" / "store.db"
    mlflow_db.parent.mkdir()
    env = _clean_env(HOME=str(home), RAY_AUTH_TOKEN=head.token,
                     PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    sub = _dpdistill("submit", "jobs/quickstart.yaml", "--address", head.dashboard, "--runs-dir", str(runs),
                     "--tracking-uri", f"sqlite:///{mlflow_db}", *TINY_QUICKSTART, env=env)
    assert sub.returncode == 0, sub.stdout + sub.stderr[-3000:]
    wait_cmd = _printed(sub.stdout, "wait for it:")
    waited = subprocess.run(wait_cmd, shell=True, capture_output=True, text=True, env=env, timeout=600, cwd=home)
    return {"sub": sub, "waited": waited, "runs": runs, "mlflow_db": mlflow_db, "env": env,
            "job_id": sub.stdout.split("as Ray job ", 1)[1].split()[0]}


def test_submitted_job_completes_with_results_in_the_durable_runs_dir(submitted):
    """The old `submit` wrote into Ray's working-dir package (relative runs dir) and its job died at
    `ray.init(num_cpus=...)` inside the driver."""
    waited, runs = submitted["waited"], submitted["runs"]
    assert waited.returncode == 0, waited.stdout + waited.stderr[-3000:]
    assert "SUCCEEDED" in waited.stdout
    run_dirs = list((runs / "quickstart").iterdir())
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert f"run folder: {run_dir}" in waited.stdout
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["acc_mean"] <= 1.0 and metrics["privacy_epsilon"] <= 10.0
    assert (run_dir / "ledger.json").is_file() and (run_dir / "artifacts").is_dir()


def test_submitted_job_logs_to_the_mlflow_store_it_was_given(submitted):
    import mlflow

    run_dir = next((submitted["runs"] / "quickstart").iterdir())
    status = json.loads((run_dir / "status.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{submitted['mlflow_db']}")
    run = client.get_run(status["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dpdistill.run_dir"] == str(run_dir)
    assert run.data.metrics["acc_mean"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["acc_mean"])
    # Artifacts beside the store, not in the job's throw-away working directory.
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "ledger.json", "metrics.json"} <= names
    assert run.info.artifact_uri.startswith((submitted["mlflow_db"].parent / "mlartifacts").as_uri())


def test_the_driver_is_placed_by_the_specs_resources(head, tmp_path):
    """The driver runs the stages, so Ray places it by the spec's ``resources``: a reservation no node of this
    2-CPU head can hold leaves the job pending (not running on whatever node is free), until it is stopped."""

    env = _clean_env(HOME=str(tmp_path), RAY_AUTH_TOKEN=head.token)
    sub = _dpdistill("submit", "jobs/quickstart.yaml", "--address", head.dashboard, "--runs-dir",
                     str(tmp_path / "runs"), *TINY_QUICKSTART, "--set", "resources.cpus=64", env=env)
    assert sub.returncode == 0, sub.stderr[-2000:]
    job_id = sub.stdout.split("as Ray job ", 1)[1].split()[0]
    time.sleep(5)
    status = _dpdistill("jobs", "status", job_id, "--address", head.dashboard, env=env)
    assert f"{job_id}: PENDING" in status.stdout, status.stdout + status.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran
    stop = _dpdistill("jobs", "stop", job_id, "--address", head.dashboard, env=env)
    assert stop.returncode == 0, stop.stdout + stop.stderr


def test_a_cuda_job_without_a_gpu_for_its_driver_is_refused_before_submitting(tmp_path):
    proc = _dpdistill("submit", "jobs/quickstart.yaml", "--address", "http://127.0.0.1:9", "--runs-dir",
                      str(tmp_path / "runs"), "--set", "device=cuda", env=_clean_env(HOME=str(tmp_path)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "field 'resources.gpus'" in proc.stderr


def test_jobs_status_and_logs(submitted, head):
    env, job_id = submitted["env"], submitted["job_id"]
    status = _dpdistill("jobs", "status", job_id, "--address", head.dashboard, env=env)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    assert "run folder: " + str(submitted["runs"] / "quickstart") in status.stdout
    logs = _dpdistill("jobs", "logs", job_id, "--address", head.dashboard, env=env)
    assert "completed after" in logs.stdout and "privacy" in logs.stdout
    missing = _dpdistill("jobs", "status", "no-such-job", "--address", head.dashboard, env=env)
    assert missing.returncode == 2 and missing.stderr.startswith("dpdistill: error: Ray job no-such-job")


def test_jobs_stop(head, tmp_path):
    env = _clean_env(HOME=str(tmp_path), RAY_AUTH_TOKEN=head.token)
    sub = _dpdistill("submit", "jobs/quickstart.yaml", "--address", head.dashboard, "--runs-dir",
                     str(tmp_path / "runs"), "--driver-cpus", "0", *TINY_QUICKSTART,
                     "--set", "method.iterations=1000000", env=env)
    assert sub.returncode == 0, sub.stderr[-2000:]
    job_id = sub.stdout.split("as Ray job ", 1)[1].split()[0]
    # Stop it once the run is inside its pipeline (the driver has joined the cluster by then, and ray.init
    # replaces the SIGTERM handler: the run must still end 'interrupted', not 'failed').
    deadline, logs = time.time() + 180, []
    while time.time() < deadline and not any("started (kind=" in p.read_text() for p in logs):
        logs = list((tmp_path / "runs").glob("quickstart/*/log.txt"))
        time.sleep(0.5)
    assert logs, "the submitted run never started"
    stop = _dpdistill("jobs", "stop", job_id, "--address", head.dashboard, env=env)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    waited = _dpdistill("jobs", "wait", job_id, "--address", head.dashboard, env=env)
    assert waited.returncode == 1 and f"{job_id}: STOPPED" in waited.stdout
    status = json.loads((logs[0].parent / "status.json").read_text())
    assert status["status"] == "interrupted" and status["interrupted_by"] == "SIGTERM", status


def test_submit_refuses_a_relative_runs_dir_before_contacting_the_cluster(tmp_path):
    """A relative --runs-dir would resolve inside the job's throw-away working directory (the old default,
    `runs`, did exactly that)."""
    env = _clean_env(HOME=str(tmp_path))
    proc = _dpdistill("submit", "jobs/quickstart.yaml", "--address", "http://127.0.0.1:1", "--runs-dir", "runs",
                      env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("dpdistill: error: --runs-dir runs: a submitted job needs an absolute path")
    proc = _dpdistill("submit", "jobs/quickstart.yaml", "--address", "http://127.0.0.1:1", "--runs-dir", "/runs",
                      "--tracking-uri", "sqlite:///mlflow.db", env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("dpdistill: error: --tracking-uri sqlite:///mlflow.db: a submitted job needs an "
                                  "absolute path")


def test_submit_with_a_bad_token_is_one_line(head, tmp_path):
    env = _clean_env(HOME=str(tmp_path), RAY_AUTH_TOKEN="not-the-token")
    proc = _dpdistill("submit", "jobs/quickstart.yaml", "--address", head.dashboard, "--runs-dir", "/runs",
                      env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"dpdistill: error: Ray job server {head.dashboard} refused the auth token "
                                   f"from RAY_AUTH_TOKEN; {TOKEN_HELP}")


def test_run_with_a_bad_token_fails_before_any_data_is_read(head, tmp_path):
    # The runner's preflight reaches and authenticates the cluster first: no run folder, no charge, one line.
    runs = tmp_path / "runs"
    proc = _dpdistill("run", "jobs/quickstart.yaml", "--address", head.gcs, "--runs-dir", str(runs),
                      "--no-progress", *TINY_QUICKSTART,
                      env=_clean_env(HOME=str(tmp_path), RAY_AUTH_TOKEN="not-the-token"), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert "refused the auth token" in proc.stdout + proc.stderr
    assert not runs.exists() or not any(runs.rglob("status.json"))
