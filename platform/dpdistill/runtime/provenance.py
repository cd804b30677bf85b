"""Which code made a run: dpdistill's version, the git commit of its source checkout, the key packages' versions.

Written into every run folder's ``status.json`` (``provenance``), tagged on its MLflow run and stamped on each
attempt of a resumable study, so a figure can be traced to its code without the benchmark harness
(benchmarks/bench_runs.py records the same in runs.json). Nothing here reads data.

The commit is that of the checkout dpdistill is imported from, and only when that directory is itself the top
of a git work tree (an editable install of a clone); an installed wheel or an exported snapshot has none, and
``DPDISTILL_SOURCE_COMMIT`` (set by whoever exported the snapshot, e.g. bench_runs --snapshot) names it instead.
``dirty`` says whether the checkout's ``platform/`` or ``jobs/`` differ from that commit.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import dpdistill

PACKAGES = ("torch", "torchvision", "opacus", "ray", "mlflow", "diffusers", "peft", "numpy")
COMMIT_ENV = "DPDISTILL_SOURCE_COMMIT"
# <checkout>/platform/dpdistill/__init__.py -> <checkout>
CHECKOUT = Path(dpdistill.__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the code dpdistill runs from; (None, None) when unknown."""
    named = os.environ.get(COMMIT_ENV)
    if named:
        return named, None
    top = _git("rev-parse", "--show-toplevel")
    # A snapshot exported into some other repository's tree must not borrow that repository's commit.
    if top is None or Path(top).resolve() != CHECKOUT:
        return None, None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", "platform", "jobs")
    return commit, (bool(status) if status is not None else None)


@functools.cache
def code_provenance() -> dict[str, Any]:
    """dpdistill's version, its source commit (and whether dirty), Python's and the key packages' versions."""
    commit, dirty = source_commit()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"dpdistill": dpdistill.__version__, "commit": commit, "dirty": dirty,
            "python": platform.python_version(), "versions": versions}


def mlflow_tags(prov: dict[str, Any]) -> dict[str, str]:
    """The provenance as MLflow tags (``dpdistill.commit``, ``dpdistill.version``, ``dpdistill.versions``)."""
    commit = prov.get("commit") or "unknown"
    if prov.get("dirty"):
        commit += "+dirty"
    return {"dpdistill.commit": commit, "dpdistill.version": str(prov.get("dpdistill")),
            "dpdistill.versions": ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())}
