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


@pytest.fixture
def ray_env(tmp_path, monkeypatch):
    """No Ray address, token or auth mode from the environment, and no default token file."""
    import dpdistill.runtime.cluster as cluster

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "DPDISTILL_RAY_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cluster, "DEFAULT_TOKEN_FILE", tmp_path / ".ray" / "auth_token")
    return cluster


def test_unreachable_cluster_is_one_clear_line(ray_env):
    """Checked by one GCS call before ray.init (the old code let ray.init retry for 20 s, then 'cannot connect')."""
    with pytest.raises(ClusterError, match=r"127\.0\.0\.1:1: cannot reach its GCS") as err:
        with ray_session(address="127.0.0.1:1"):
            pass
    assert "\n" not in str(err.value)


def test_dashboard_address_given_to_run_says_what_to_do(ray_env):
    with pytest.raises(ClusterError, match="dashboard.*dpdistill submit"):
        with ray_session(address="http://127.0.0.1:8265"):
            pass


def test_missing_token_file_in_spec_is_a_clear_error(tmp_path, ray_env):
    with pytest.raises(ClusterError, match="ray.auth_token_path"):
        with ray_session(address="127.0.0.1:1", auth_token_path=str(tmp_path / "nope")):
            pass


def test_a_ray_job_driver_joins_its_cluster(ray_env, monkeypatch):
    """Inside a Ray Job, Ray sets RAY_ADDRESS: the job joins that cluster (the old code started a local one with
    num_cpus, which Ray refuses: 'When connecting to an existing cluster, num_cpus ... must not be provided')."""
    assert ray_env.cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_env.cluster_address(None) == "10.0.0.5:6379"
    monkeypatch.setenv("DPDISTILL_RAY_ADDRESS", "10.0.0.6:6379")
    assert ray_env.cluster_address(None) == "10.0.0.6:6379"
    assert ray_env.cluster_address("10.0.0.7:6379") == "10.0.0.7:6379"


def test_token_precedence_follows_ray(tmp_path, ray_env, monkeypatch):
    """RAY_AUTH_TOKEN, then the spec's / RAY_AUTH_TOKEN_PATH file, then ~/.ray/auth_token; a named empty or
    missing file is an error, not a silent fall-back."""
    assert ray_env.find_token() is None
    ray_env.DEFAULT_TOKEN_FILE.parent.mkdir(parents=True)
    ray_env.DEFAULT_TOKEN_FILE.write_text("default\n")
    assert ray_env.find_token().value == "default"
    (tmp_path / "env_tok").write_text("from-path-env")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "env_tok"))
    assert ray_env.find_token().value == "from-path-env"
    (tmp_path / "spec_tok").write_text(" from-spec \n")
    assert ray_env.find_token(str(tmp_path / "spec_tok")).value == "from-spec"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_env.find_token(str(tmp_path / "spec_tok")).value == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClusterError, match="empty"):
        ray_env.find_token(str(tmp_path / "empty"))


def test_a_given_token_turns_client_token_mode_on(tmp_path, ray_env, monkeypatch):
    """Ray 2.60 sends no token to an explicit address unless RAY_AUTH_MODE=token in the client."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert ray_env.use_token_auth() is None and "RAY_AUTH_MODE" not in os.environ
    (tmp_path / "tok").write_text("abc")
    token = ray_env.use_token_auth(str(tmp_path / "tok"))
    assert token.value == "abc" and "ray.auth_token_path" in token.source
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert get_authentication_mode() == AuthenticationMode.TOKEN  # Ray's cached config was refreshed
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a user's explicit choice is left alone
    assert ray_env.use_token_auth(str(tmp_path / "tok")) is None
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.undo()  # and let Ray's cached config follow the restored environment
    from ray._raylet import Config

    Config.initialize("")


def test_only_the_opt_out_banner_is_hidden():
    import logging

    from dpdistill.runtime.cluster import _BANNER_LOGGER, quiet_auth_banner

    quiet_auth_banner()
    quiet_auth_banner()  # idempotent
    logger = logging.getLogger(_BANNER_LOGGER)
    assert len(logger.filters) == 1
    banner = logger.makeRecord(_BANNER_LOGGER, logging.WARNING, __file__, 1, (
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."), (), None)
    other = logger.makeRecord(_BANNER_LOGGER, logging.WARNING, __file__, 1,
                              "Token authentication is enabled but no token was found.", (), None)
    assert not logger.filter(banner) and logger.filter(other)


def test_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    """Not in ./mlruns of the current directory (a Ray Job's is its throw-away working-dir package)."""
    import mlflow

    from dpdistill.runtime.tracking import Tracker, local_artifact_root

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "job-working-dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "runs"
    uri = resolve_tracking_uri(None, store)
    (tmp_path / "spec.yaml").write_text("name: x\n")
    tracker = Tracker(True, uri, "t")
    tracker.start("x", {"p": "1"}, {})
    tracker.log_artifact(tmp_path / "spec.yaml")
    tracker.end()
    assert not (elsewhere / "mlruns").exists()
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith((store / "mlartifacts").resolve().as_uri())
    assert list((store / "mlartifacts").rglob("spec.yaml"))
    assert local_artifact_root("http://mlflow:5000") is None


def test_a_local_cluster_prints_no_opt_out_banner(tmp_path):
    """Ray 2.60 logs 'Set RAY_AUTH_MODE=disabled to opt out' on every local ray.init; auth stays on, quietly."""
    import subprocess
    import sys

    code = ("from dpdistill.runtime.cluster import ray_session\n"
            "import ray._private.authentication.authentication_utils as au\n"
            "with ray_session(None, num_cpus=1):\n"
            "    print('token auth on:', au.is_token_auth_enabled())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "DPDISTILL_RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env | {"HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert "token auth on: True" in proc.stdout, proc.stderr[-2000:]
    assert "RAY_AUTH_MODE=disabled" not in proc.stdout + proc.stderr


def _open_store_at_once(uri: str, barrier, results, name: str) -> None:
    """A job's tracking start in a fresh process, released together with the others by ``barrier``."""
    import mlflow  # noqa: F401 - imported before the barrier, so the processes reach the store together

    from dpdistill.runtime.tracking import Tracker

    barrier.wait(timeout=120)
    try:
        tracker = Tracker(True, uri, "side-by-side")
        tracker.start(name, {"p": "1"}, {})
        tracker.end()
        results.put((name, None))
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put((name, f"{type(e).__name__}: {e}"))


def test_jobs_started_side_by_side_open_one_fresh_sqlite_store(tmp_path):
    """Draws of a benchmark start together in one runs directory: each process's first open of a fresh SQLite
    store migrates its schema, and without store_opening_lock one of them failed (alembic: "expected to match
    one row", "table ... already exists") before its run began."""
    import multiprocessing

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spawn = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = spawn.Barrier(n), spawn.Queue()
    procs = [spawn.Process(target=_open_store_at_once, args=(uri, barrier, results, f"job{i}")) for i in range(n)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == {f"job{i}": None for i in range(n)}
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("side-by-side")
    assert len(client.search_runs([exp.experiment_id])) == n
