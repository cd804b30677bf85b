"""Which code made a run: dpdistill's version, the git commit of its source checkout, the key packages' versions.

Written into every run folder's ``status.json`` (``provenance``), tagged on its MLflow run and stamped on each
attempt of a resumable study, so a figure can be traced to its code without the benchmark harness
(benchmarks/bench_runs.py records the same in runs.json). Nothing here reads data.

The commit is that of the checkout dpdistill is imported from, and only when that directory is itself the top
of a git work tree (an editable install of a clone); an installed wheel or an exported snapshot has none, and
``DPDISTILL_SOURCE_COMMIT`` (set by whoever exported it: bench_runs --snapshot, or the image build's build
argument in k8s/Dockerfile) names it instead. A real checkout wins over the variable (a variable left in a shell
must not relabel a checkout's runs). ``dirty`` says whether tracked files of the checkout's ``platform/``,
``jobs/`` or ``pyproject.toml`` differ from that commit (untracked files, e.g. a user's own job specs, do not
count). The git state is read afresh for every run folder (a long-lived process may outlive a commit);
the package versions, fixed once imported, are read once.
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
    # No GIT_DIR / GIT_INDEX_FILE inherited from a hook or a caller's environment: ask about CHECKOUT only.
    # --no-optional-locks: `git status` must not take index.lock from a user or a parallel run committing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(CHECKOUT), *args], capture_output=True,
                              text=True, timeout=5, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the code dpdistill runs from; (None, None) when unknown."""
    top = _git("rev-parse", "--show-toplevel")
    # A snapshot exported into some other repository's tree must not borrow that repository's commit.
    if top is None or Path(top).resolve() != CHECKOUT:
        return os.environ.get(COMMIT_ENV) or None, None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", "platform", "jobs", "pyproject.toml")
    return commit, (bool(status) if status is not None else None)


@functools.cache
def package_versions() -> dict[str, str]:
    """The installed versions of :data:`PACKAGES` (those present)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def code_provenance() -> dict[str, Any]:
    """dpdistill's version, its source commit (and whether dirty), Python's and the key packages' versions."""
    commit, dirty = source_commit()
    return {"dpdistill": dpdistill.__version__, "commit": commit, "dirty": dirty,
            "python": platform.python_version(), "versions": dict(package_versions())}


def mlflow_tags(prov: dict[str, Any]) -> dict[str, str]:
    """The provenance as MLflow tags (``dpdistill.commit``, ``dpdistill.version``, ``dpdistill.versions``)."""
    commit = prov.get("commit") or "unknown"
    if prov.get("dirty"):
        commit += "+dirty"
    return {"dpdistill.commit": commit, "dpdistill.version": str(prov.get("dpdistill")),
            "dpdistill.versions": ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())}
