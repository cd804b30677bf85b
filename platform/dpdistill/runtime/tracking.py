"""MLflow tracking: one MLflow run per job with the spec's params, metrics and released artifacts.

The default store is ``sqlite:///<runs-dir>/mlflow.db`` so a laptop needs no server; ``MLFLOW_TRACKING_URI``
(or ``tracking.uri`` in the spec) points elsewhere. A SQLite store keeps its artifacts beside the database
(``<dir>/mlartifacts``), never in ``./mlruns`` of whatever directory the job happened to start in (for a Ray
Job that is Ray's throw-away working-dir package); a tracking server decides for itself
(``--artifacts-destination``). Only DP outputs, aggregates and evaluation numbers are logged: the caller passes
artifacts from the run folder's ``artifacts/``, which never holds sensitive records.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("dpdistill.tracking")


def resolve_tracking_uri(spec_uri: str | None, runs_dir: Path) -> str:
    """Spec's uri, else $MLFLOW_TRACKING_URI, else a SQLite file beside the run folders."""
    if spec_uri:
        return spec_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(runs_dir).expanduser().resolve() / 'mlflow.db')}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store; None for anything else (a server, an in-memory store)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return Path(db).expanduser().resolve()


def local_artifact_root(uri: str) -> str | None:
    """Where a new experiment in a SQLite store keeps its artifacts: ``mlartifacts/`` beside the database.

    None for anything else (a tracking server or a remote database chooses its own artifact store).
    """
    db = sqlite_file(uri)
    return None if db is None else (db.parent / "mlartifacts").as_uri()


@contextlib.contextmanager
def store_opening_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock (``<db>.lock`` beside a SQLite store) while this process opens the store.

    MLflow creates and migrates a SQLite store's schema the first time a process opens it; two processes that
    open a fresh store at once both migrate and one fails (alembic: "expected to match one row", "table ...
    already exists") — seen with draws of one benchmark started side by side in one runs directory. Once open,
    the store is cached per process, so only the opening needs the lock. Nothing for other stores.
    """
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    from dpdistill.runtime.runfolder import exclusive_lock

    db.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(db.with_name(db.name + ".lock"), "", wait=True):
        yield


def ensure_experiment(mlflow: Any, name: str, uri: str) -> str:
    """The experiment's id, creating it first if needed (its artifacts beside a SQLite store; where the server
    says otherwise); an existing one keeps its location. ``mlflow``: the module or an ``MlflowClient``."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.create_experiment(name, artifact_location=local_artifact_root(uri))
    except MlflowException:
        # Created meanwhile by a concurrent job (sweep trials and side-by-side runs share one store): theirs is
        # as good.
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class Tracker:
    """A thin MLflow wrapper that no-ops when tracking is disabled; mlflow is imported lazily."""

    def __init__(self, enabled: bool, uri: str, experiment: str) -> None:
        self.enabled = enabled
        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        self._mlflow: Any = None

    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str]) -> None:
        """Open the MLflow run for this job and log its (flattened) spec as params."""
        if not self.enabled:
            return
        import mlflow

        # MLflow (which configures its loggers on import) and its alembic migrations log at INFO on a fresh
        # SQLite store; to a user that is noise.
        for noisy in ("alembic", "mlflow"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

        self._mlflow = mlflow
        # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI to this process's environment, and that
        # variable outranks the runs-dir default in resolve_tracking_uri: a second job in the same process
        # (a sweep, a notebook, the tests) would log into the first job's store. Put the environment back;
        # the fluent API keeps the uri in its own state.
        prior = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        if prior is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prior
        with store_opening_lock(self.uri):
            ensure_experiment(mlflow, self.experiment, self.uri)
            mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with MLflow's status (FINISHED, KILLED or FAILED)."""
        if self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None

    def ui_hint(self) -> str:
        """The command that opens this store in the MLflow UI."""
        return f"mlflow ui --backend-store-uri {self.uri}"
