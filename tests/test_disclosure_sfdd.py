"""Declared disclosure of a private SFDD run (LocalDP): every key it logs or writes is declared with a kind.

One tiny LocalDP job on `digits` through ``run_job`` with MLflow tracking on (a temporary sqlite store); the
test collects every key of metrics.json, every MLflow metric key (per-round and final, all steps), every MLflow
param, and every key (nested ones too) of the JSON files under artifacts/, and fails on any key neither
``privacy.disclosure.COMMON`` nor ``sfdd_job.DISCLOSURE`` declares. Client-side numbers computed from real
records without noise (local matching loss, client compute time, sizes) must be absent altogether.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpdistill.pipelines.sfdd_job import DISCLOSURE
from dpdistill.privacy.disclosure import KINDS, kind_of, undeclared
from dpdistill.spec import validate_spec

ray = pytest.importorskip("ray")

ROUNDS = 2
WITHHELD = {"local_loss", "loss", "client_seconds", "n_samples", "class_counts", "round_seconds", "seconds"}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # One local cluster for the module (ray.init makes its own auth token); the job's ray_session reuses it.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def spec_doc(tmp: Path) -> dict:
    return {
        "name": "sfdd-disclosure", "kind": "sfdd", "seed": 0, "data": {"name": "digits"},
        "privacy": {"epsilon": 50.0},
        "method": {"name": "sfdd", "n_clients": 3, "rounds": ROUNDS, "defence": "localdp", "localdp_sigma": 2.0,
                   "localdp_clip": 1.0, "ipc": 1, "outer_loop": 2, "inner_loop": 1, "net_width": 8, "net_depth": 2,
                   "batch_real": 16, "batch_train": 16, "eval_every": 1, "eval_epochs": 3, "pool_size": 2,
                   "actor_cpus": 0.5},
        "evaluation": {"epochs": 3, "seeds": 1, "parallel": False, "model_options": {"width": 8}},
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "ray": {"num_cpus": 2},
    }


def json_keys(value) -> set[str]:
    """Every dict key in a JSON document, at any depth (through lists too)."""
    if isinstance(value, dict):
        return set(value) | set().union(*(json_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(json_keys(v) for v in value)) if value else set()
    return set()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from dpdistill.runner import run_job

    tmp = tmp_path_factory.mktemp("sfdd-disclosure")
    spec = validate_spec(spec_doc(tmp))
    result = run_job(spec, tmp / "runs", progress=False)
    assert result.status == "completed"
    return spec, result


@pytest.fixture(scope="module")
def logged(finished):
    import mlflow

    _, result = finished
    client = mlflow.MlflowClient(tracking_uri=result.mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    metric_keys = set(run.data.metrics)
    steps = {k: sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, k)) for k in metric_keys}
    art = result.run_dir / "artifacts"
    files = {p.name: json_keys(json.loads(p.read_text())) for p in sorted(art.rglob("*.json"))}
    return {"metrics.json": set(json.loads((result.run_dir / "metrics.json").read_text())),
            "mlflow metrics": metric_keys, "mlflow params": set(run.data.params), "steps": steps,
            "files": files, "tags": run.data.tags}


def test_every_logged_key_is_declared(logged):
    assert {"rounds.json", "client_privacy.json", "accuracy_by_round.json"} <= set(logged["files"])
    sources = {"metrics.json": logged["metrics.json"], "mlflow metrics": logged["mlflow metrics"],
               "mlflow params": logged["mlflow params"],
               **{f"artifacts/{name}": keys for name, keys in logged["files"].items()}}
    for where, keys in sources.items():
        assert keys, where
        assert undeclared(keys, DISCLOSURE) == [], where


def test_per_round_metrics_are_logged_at_every_step_and_only_server_side_figures(logged):
    steps = logged["steps"]
    for key in ("clients_answered", "clients_dropped", "round_attempts", "acc"):
        assert steps[key] == list(range(ROUNDS)), key
    stepped = {k for k, s in steps.items() if s != [0]}
    # Not round_seconds: a round's wall time is the slowest client's compute time, which LocalDP clients withhold.
    assert stepped == {"clients_answered", "clients_dropped", "round_attempts", "acc"}


def test_nothing_a_client_computed_from_its_records_without_noise_is_written(logged):
    everything = logged["metrics.json"] | logged["mlflow metrics"] | set().union(*logged["files"].values())
    assert everything.isdisjoint(WITHHELD), everything & WITHHELD
    # And none of them could slip in declared: the declaration names no such key.
    assert all(kind_of(k, DISCLOSURE) is None for k in WITHHELD)


def test_params_are_the_resolved_spec_and_the_run_is_tagged_private(finished, logged):
    spec, _ = finished
    assert logged["mlflow params"] == set(spec.flat_params())
    assert logged["tags"]["dpdistill.privacy"] == "private"
    assert "dpdistill.release" not in logged["tags"]  # a LocalDP release is not stamped NOT PRIVATE
    assert not (finished[1].run_dir / "artifacts" / "RELEASE_NOT_PRIVATE.txt").exists()
    assert all(kind in KINDS for kind in DISCLOSURE.values())


def test_client_privacy_states_the_relation_and_the_secret_noise(finished):
    _, result = finished
    doc = json.loads((result.run_dir / "artifacts" / "client_privacy.json").read_text())
    assert "keyed hash" in doc["neighbouring"] and "exactly one client" in doc["neighbouring"]
    assert doc["noise"].startswith("each client's own secret source")
    assert sorted(c["client"] for c in doc["clients"]) == [0, 1, 2]
    assert all(c["dispatches"] == ROUNDS for c in doc["clients"])
    summary = dict(result.summary)
    assert "one record changes one client's data" in summary["neighbouring"]
    assert json.loads((result.run_dir / "ledger.json").read_text())["noise"] == "secret"
    assert result.metrics["n_released"] == 10


def test_no_per_round_timing_reaches_the_log_or_mlflow(finished):
    """A round's end time is the slowest client's compute time, which LocalDP clients withhold: the per-round
    figures are logged after the rounds are over, and log.txt has no per-round line."""
    import re
    from datetime import datetime

    import mlflow

    _, result = finished
    text = (result.run_dir / "log.txt").read_text()
    assert not re.search(r"round \d+: ", text)
    ended = re.search(r"^(\S+ \S+) INFO \S+: stage federated distillation .* completed", text, re.MULTILINE)
    stage_end_ms = datetime.strptime(ended.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000
    client = mlflow.MlflowClient(tracking_uri=result.mlflow_uri)
    for key in ("clients_answered", "acc"):
        stamps = [m.timestamp for m in client.get_metric_history(result.mlflow_run_id, key)]
        assert len(stamps) == ROUNDS and min(stamps) >= stage_end_ms - 1, key  # none logged during the rounds
