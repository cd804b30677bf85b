"""Waiting on a `dpdistill run` started as a subprocess: the tests that stop or kill one mid-run need it inside
its pipeline first."""

from __future__ import annotations

import time
from pathlib import Path


def wait_for_pipeline(runs: Path, job: str, timeout: float = 120) -> Path:
    """The run folder of ``job`` under ``runs`` once its log says the pipeline started (the 'started' line is
    logged once the MLflow run is open); AssertionError if it does not within ``timeout`` seconds."""
    deadline = time.time() + timeout
    logs: list[Path] = []
    while time.time() < deadline and not any("started (kind=" in p.read_text() for p in logs):
        logs = list(runs.glob(f"{job}/*/log.txt"))
        time.sleep(0.5)
    assert logs and any("started (kind=" in p.read_text() for p in logs), f"{job}: the run never started"
    return logs[0].parent
