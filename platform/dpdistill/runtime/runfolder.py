"""The run folder: the unit of reproducibility (spec, ledger, metrics, artifacts, log, status).

Layout::

    runs/<job-name>/<UTC timestamp>/
      spec.yaml      the fully resolved spec
      status.json    running | completed | interrupted | failed, with times (written atomically); ``error``
                     (type and one line) when failed, ``interrupted_by`` (SIGINT / SIGTERM), ``summary``
                     (the rows ``dpdistill run`` printed, shown again by ``dpdistill report``), ``provenance``
                     (dpdistill's version and source commit, package versions: runtime/provenance.py)
      ledger.json    privacy charges (written by the ledger itself, before each release)
      metrics.json   final (or, when interrupted, partial) metrics
      artifacts/     released outputs only: DP / distilled sets, image grids, plots
      log.txt        start, each stage's start and end with seconds, heartbeats, warnings, the error, the outcome

Every file is written atomically (temp file + fsync + rename), so Ctrl-C or a crash never leaves a torn file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dpdistill.runtime.liveness import owner
from dpdistill.runtime.provenance import code_provenance


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, busy: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an advisory lock on ``lock_path`` (created if missing) for the block; when another process holds it
    and ``wait`` is false, raise :class:`~dpdistill.errors.SpecError` with the one line ``busy``. The lock goes
    with the process, so a killed holder never leaves it stuck."""
    import fcntl

    from dpdistill.errors import SpecError

    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise SpecError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def utc_stamp() -> str:
    """A UTC timestamp usable as a folder name, sortable, with microseconds to avoid clashes."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


@dataclass
class RunFolder:
    """One job's run folder; create it only after the spec and data have passed their checks."""

    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # set by create (the code that made the run)
    _log_handler: logging.Handler | None = None

    @classmethod
    def create(cls, runs_dir: Path, job_name: str, spec_yaml: str) -> RunFolder:
        """Make ``runs_dir/<job_name>/<timestamp>/`` with spec.yaml, status.json and artifacts/."""
        base = Path(runs_dir).expanduser().resolve() / job_name
        base.mkdir(parents=True, exist_ok=True)
        while True:
            path = base / utc_stamp()
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        run = cls(path=path, provenance=code_provenance())
        (path / "artifacts").mkdir()
        atomic_write_text(path / "spec.yaml", spec_yaml)
        run.set_status("running", provenance=run.provenance)
        run._attach_log()
        return run

    @classmethod
    def reopen(cls, path: Path) -> RunFolder:
        """An existing run folder, to continue it (a resumed study): its metrics so far are kept, and the log
        is appended to."""
        run = cls(path=Path(path))
        metrics = run.path / "metrics.json"
        if metrics.is_file():
            run.metrics = {k: float(v) for k, v in json.loads(metrics.read_text()).items()}
        run._attach_log()
        return run

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def ledger_path(self) -> Path:
        return self.path / "ledger.json"

    def _attach_log(self) -> None:
        handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("dpdistill").addHandler(handler)
        logging.getLogger("dpdistill").setLevel(logging.INFO)
        self._log_handler = handler

    def set_status(self, status: str, **extra: Any) -> None:
        """Record the run's state (running / completed / interrupted / failed) atomically; ``running`` also
        records this process as the folder's owner."""
        path = self.path / "status.json"
        current: dict[str, Any] = {}
        if path.exists():
            current = json.loads(path.read_text())
        now = datetime.now(UTC).isoformat()
        current.setdefault("started", now)
        current["status"] = status
        if status != "running":
            current["ended"] = now
        else:  # who writes the outcome: readers show the folder as lost once this process is gone (liveness.py)
            current["process"] = owner()
        current.update(extra)
        atomic_write_json(path, current)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Merge metrics and rewrite metrics.json (so an interrupted run keeps what it had)."""
        self.metrics.update({k: float(v) for k, v in metrics.items()})
        atomic_write_json(self.path / "metrics.json", self.metrics)

    def finish(self, status: str, **extra: Any) -> None:
        """Write final metrics and status; detach the log file (log the outcome before calling this)."""
        atomic_write_json(self.path / "metrics.json", self.metrics)
        self.set_status(status, **extra)
        if self._log_handler is not None:
            logging.getLogger("dpdistill").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
