"""Run folder, tracking-URI resolution and Ray connection checks (no cluster needed)."""

from __future__ import annotations

import json
import os

import pytest

from dpdistill.errors import ClusterError
from dpdistill.runtime.cluster import ray_session
from dpdistill.runtime.runfolder import RunFolder, atomic_write_json
from dpdistill.runtime.tracking import resolve_tracking_uri


def test_run_folder_layout_and_status(tmp_path):
    run = RunFolder.create(tmp_path, "job", "name: job\n")
    assert run.path.parent == (tmp_path / "job").resolve()
    assert (run.path / "spec.yaml").read_text() == "name: job\n"
    assert json.loads((run.path / "status.json").read_text())["status"] == "running"
    run.log_metrics({"a": 1})
    run.finish("interrupted")
    assert json.loads((run.path / "status.json").read_text())["status"] == "interrupted"
    assert json.loads((run.path / "metrics.json").read_text()) == {"a": 1.0}


def test_two_runs_of_one_job_get_distinct_folders(tmp_path):
    a = RunFolder.create(tmp_path, "job", "x: 1\n")
    b = RunFolder.create(tmp_path, "job", "x: 1\n")
    assert a.path != b.path
    a.finish("completed")
    b.finish("completed")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_a_job_does_not_leave_its_tracking_uri_in_the_environment(tmp_path, monkeypatch):
    """Two jobs in one process with different run folders log to their own stores (mlflow exports the uri)."""
    from dpdistill.runtime.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uris = []
    for name in ("a", "b"):
        uri = resolve_tracking_uri(None, tmp_path / name)
        tracker = Tracker(True, uri, "t")
        tracker.start(name, {"p": "1"}, {})
        tracker.end()
        uris.append(uri)
        assert "MLFLOW_TRACKING_URI" not in os.environ
    assert uris[0] != uris[1]
    assert (tmp_path / "a" / "mlflow.db").is_file() and (tmp_path / "b" / "mlflow.db").is_file()


def test_cluster_without_token_is_a_clear_error(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "DPDISTILL_RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no default token file either
    import dpdistill.runtime.cluster as cluster

    monkeypatch.setattr(cluster, "DEFAULT_TOKEN_FILE", tmp_path / ".ray" / "auth_token")
    with pytest.raises(ClusterError, match=r"127\.0\.0\.1:1.*RAY_AUTH_TOKEN"):
        with ray_session(address="127.0.0.1:1"):
            pass


def test_missing_token_file_in_spec_is_a_clear_error(tmp_path):
    with pytest.raises(ClusterError, match="ray.auth_token_path"):
        with ray_session(address="127.0.0.1:1", auth_token_path=str(tmp_path / "nope")):
            pass
