"""k8s/mlflow.yaml's server, started here with the Deployment's own arguments (SQLite standing in for the
PostgreSQL store, temporary folders for the claim, loopback for 0.0.0.0), answers in-cluster clients: requests
with `Host: dpdistill-mlflow:5000` are served and artifacts land in --artifacts-destination. Without the
manifest's --allowed-hosts the same request gets MLflow 3.17's 403 (what the old manifest got)."""

from __future__ import annotations

import json
import threading

import pytest

from k8s_local import mlflow_server, request
from ray_head import _session_members

IN_CLUSTER_HOST = "dpdistill-mlflow:5000"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The manifest's server and the same without --allowed-hosts, started side by side (startup is slow)."""
    urls: dict[str, str] = {}
    errors: list[BaseException] = []
    ready = threading.Barrier(3)
    done = threading.Event()

    def serve(name: str, allowed: bool) -> None:
        try:
            with mlflow_server(tmp_path_factory.mktemp(name), allowed_hosts=allowed) as url:
                urls[name] = url
                ready.wait()
                done.wait()
        except BaseException as e:  # noqa: BLE001 - reported in the test's thread
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=serve, args=(n, a)) for n, a in (("manifest", True), ("no_flag", False))]
    for t in threads:
        t.start()
    try:
        ready.wait(timeout=240)
    except threading.BrokenBarrierError:
        done.set()
        for t in threads:
            t.join()
        raise (errors[0] if errors else RuntimeError("mlflow servers did not start")) from None
    yield urls
    done.set()
    for t in threads:
        t.join()


def _create_experiment(url: str, host: str, name: str) -> tuple[int, bytes]:
    return request(url, "/api/2.0/mlflow/experiments/create", host, "POST", json.dumps({"name": name}).encode())


def test_in_cluster_host_is_served(servers):
    status, body = _create_experiment(servers["manifest"], IN_CLUSTER_HOST, "k8s")
    assert status == 200, body
    assert json.loads(body)["experiment_id"]
    status, body = request(servers["manifest"], "/api/2.0/mlflow/experiments/get-by-name?experiment_name=k8s",
                           "dpdistill-mlflow.default.svc.cluster.local:5000")
    assert status == 200, body


def test_without_allowed_hosts_the_same_request_is_refused(servers):
    status, body = _create_experiment(servers["no_flag"], IN_CLUSTER_HOST, "k8s")
    assert status == 403 and b"Invalid Host header" in body


def test_other_hosts_are_still_refused_and_probes_pass(servers):
    status, _ = _create_experiment(servers["manifest"], "attacker.example:5000", "evil")
    assert status == 403
    # The kubelet's probes send the pod IP as Host; /health is exempt from the check.
    status, _ = request(servers["manifest"], "/health", "10.1.2.3:5000")
    assert status == 200


def test_artifacts_go_through_the_server_to_the_claim(servers, tmp_path_factory):
    """Ray pods upload artifacts over HTTP (--serve-artifacts); the server writes --artifacts-destination."""
    url = servers["manifest"]
    status, body = _create_experiment(url, IN_CLUSTER_HOST, "artifacts")
    assert status == 200, body
    experiment_id = json.loads(body)["experiment_id"]
    status, body = request(url, "/api/2.0/mlflow/runs/create", IN_CLUSTER_HOST, "POST",
                           json.dumps({"experiment_id": experiment_id}).encode())
    assert status == 200, body
    run = json.loads(body)["run"]["info"]
    assert run["artifact_uri"].startswith("mlflow-artifacts:/")
    relative = run["artifact_uri"].removeprefix("mlflow-artifacts:/").lstrip("/")
    status, body = request(url, f"/api/2.0/mlflow-artifacts/artifacts/{relative}/ledger.json", IN_CLUSTER_HOST,
                           "PUT", b'{"epsilon": 1.0}', "application/octet-stream")
    assert status == 200, body
    base = next(p for p in tmp_path_factory.getbasetemp().glob("manifest*"))
    (stored,) = (base / "artifacts").rglob("ledger.json")
    assert json.loads(stored.read_text()) == {"epsilon": 1.0}


def test_the_server_runs_no_job_runner(servers):
    """The manifest turns MLflow's GenAI job runner off: no huey consumer among the server's processes (MLflow 3
    starts six by default, each a Python process in the pod's 2-CPU limit)."""
    import k8s_local

    proc, _ = k8s_local._servers[servers["manifest"]]
    commands = []
    for pid in _session_members(proc.pid):
        try:
            commands.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode())
        except OSError:
            continue
    assert any("uvicorn" in c or "mlflow" in c for c in commands), commands
    assert not [c for c in commands if "huey" in c], commands
