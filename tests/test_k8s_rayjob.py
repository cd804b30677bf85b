"""k8s/rayjob-quickstart.yaml run here as KubeRay would run it: a head and a CPU worker started with the
manifest's rayStartParams, resource limits and environment (token auth on, as KubeRay's authOptions sets it),
the entrypoint submitted verbatim by `ray job submit` with the manifest's entrypointNumCpus (what KubeRay's
submitter pod does), logging to the MLflow server of k8s/mlflow.yaml. Only pod-local names are mapped (see
k8s_local): /app (the image's WORKDIR) to this checkout, the volume mounts /runs and /data to temporary
folders, http://dpdistill-mlflow:5000 to the local server. The old manifest's job died in the driver at
`ray.init(num_cpus=...)`."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from k8s_local import ROOT, container_env, kuberay_start_params, manifest, mlflow_server, wait_healthy
from ray_head import VENV_BIN, alive_nodes, ray_head, ray_worker

pytestmark = pytest.mark.slow


def _mapped_entrypoint(entrypoint: str, paths: dict[str, Path]) -> str:
    """The entrypoint with each absolute path's pod-local prefix replaced; any other absolute path fails."""
    out = []
    for token in shlex.split(entrypoint):
        if token.startswith("/"):
            prefix = next((p for p in sorted(paths, key=len, reverse=True)
                           if token == p or token.startswith(p.rstrip("/") + "/")), None)
            assert prefix is not None, f"{token}: not a mount path or the image's WORKDIR"
            token = str(paths[prefix]) + token[len(prefix.rstrip("/")):]
        out.append(token)
    return shlex.join(out)


@pytest.fixture(scope="module")
def rayjob_run(tmp_path_factory):
    job = manifest("rayjob-quickstart.yaml", "RayJob")["spec"]
    cluster = job["rayClusterSpec"]
    head_group = cluster["headGroupSpec"]
    (worker_group,) = cluster["workerGroupSpecs"]
    base = tmp_path_factory.mktemp("rayjob")
    runs, data = base / "runs", base / "data"
    runs.mkdir()
    data.mkdir()
    # Pod-local paths: every volume mount of the pods, and the image's WORKDIR (/app, holding jobs/).
    mounts = {m["mountPath"] for g in (head_group, worker_group)
              for m in g["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert {"/runs", "/data"} <= mounts
    assert "WORKDIR /app" in (ROOT / "k8s" / "Dockerfile").read_text()
    paths = {"/app": ROOT, "/runs": runs, "/data": data}
    with ExitStack() as stack:
        mlflow_url = stack.enter_context(mlflow_server(base / "mlflow", wait=False))
        values = {"/data": str(data), "http://dpdistill-mlflow:5000": mlflow_url}
        head = stack.enter_context(ray_head(env=container_env(head_group, values),
                                            start_params=kuberay_start_params(head_group)))
        stack.enter_context(ray_worker(head, env=container_env(worker_group, values),
                                       start_params=kuberay_start_params(worker_group)))
        wait_healthy(mlflow_url)
        entrypoint = _mapped_entrypoint(job["entrypoint"], paths)
        # KubeRay's submitter pod: `ray job submit` with the cluster's token (KubeRay injects RAY_AUTH_* there).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token,
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        submit = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard, "--no-wait",
             "--submission-id", "dpdistill-quickstart", "--entrypoint-num-cpus", str(job["entrypointNumCpus"]),
             "--runtime-env-json", json.dumps(yaml.safe_load(job["runtimeEnvYAML"])),
             "--", *shlex.split(entrypoint)],
            capture_output=True, text=True, env=env, timeout=300, cwd=base)
        assert submit.returncode == 0, submit.stdout + submit.stderr[-3000:]
        waited = subprocess.run(
            [sys.executable, "-m", "dpdistill.cli", "jobs", "wait", "dpdistill-quickstart", "--address",
             head.dashboard], capture_output=True, text=True, env=env, timeout=900, cwd=base)
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient(head.dashboard, headers={"Authorization": f"Bearer {head.token}"}
                                   ).get_job_info("dpdistill-quickstart")
        nodes = dict(alive_nodes(head.gcs, head.token))
        logs = subprocess.run(
            [sys.executable, "-m", "dpdistill.cli", "jobs", "logs", "dpdistill-quickstart", "--address",
             head.dashboard], capture_output=True, text=True, env=env, timeout=120, cwd=base).stdout
        yield {"waited": waited, "logs": logs, "runs": runs, "mlflow_url": mlflow_url, "base": base,
               "driver_on_head": nodes.get(info.driver_node_id), "runtime_env": info.runtime_env}


def test_the_rayjob_entrypoint_completes(rayjob_run):
    waited = rayjob_run["waited"]
    assert waited.returncode == 0, waited.stdout + waited.stderr[-3000:] + rayjob_run["logs"][-3000:]
    (run_dir,) = (rayjob_run["runs"] / "quickstart").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["privacy_epsilon"] <= 10.0 and "acc_mean" in metrics


def test_the_rayjob_driver_ran_on_the_worker_not_the_cpu_less_head(rayjob_run):
    """The head offers no CPUs (num-cpus 0); entrypointNumCpus made Ray place the driver on the worker."""
    assert re.search(r"Running entrypoint for job dpdistill-quickstart", rayjob_run["logs"])
    assert rayjob_run["driver_on_head"] is False  # a known node, and not the head


def test_the_rayjob_logs_to_the_manifest_mlflow_server(rayjob_run):
    import mlflow

    (run_dir,) = (rayjob_run["runs"] / "quickstart").iterdir()
    run_id = json.loads((run_dir / "status.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=rayjob_run["mlflow_url"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dpdistill.run_dir"] == str(run_dir)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    # Uploaded through the server into its --artifacts-destination (the claim, here a folder).
    stored = {p.name for p in (rayjob_run["base"] / "mlflow" / "artifacts").rglob("*") if p.is_file()}
    assert {"spec.yaml", "ledger.json", "metrics.json"} <= stored


def test_the_rayjob_gives_a_stopped_driver_time_to_finish_its_files(rayjob_run):
    """The manifest's runtimeEnvYAML reached the job: its supervisor waits jobs.STOP_GRACE_SECONDS (60), not
    Ray's 3, before SIGKILL."""
    from dpdistill.runtime.jobs import STOP_GRACE_SECONDS

    assert rayjob_run["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(STOP_GRACE_SECONDS)
