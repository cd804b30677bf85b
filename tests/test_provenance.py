"""Every run folder names the code that made it: dpdistill's version, the source commit, package versions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpdistill.runtime.provenance import code_provenance, mlflow_tags
from dpdistill.runtime.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _is_checkout() -> bool:
    try:
        return Path(_git("rev-parse", "--show-toplevel")).resolve() == ROOT
    except (OSError, subprocess.CalledProcessError):
        return False


@pytest.mark.skipif(not _is_checkout(), reason="the tests do not run from a git checkout")
def test_a_run_folder_records_the_commit_and_versions_it_ran_with(tmp_path: Path, monkeypatch) -> None:
    # A real checkout wins over the variable that names an exported copy's commit.
    monkeypatch.setenv("DPDISTILL_SOURCE_COMMIT", "not-this-one")
    run = RunFolder.create(tmp_path, "job", "name: job\n")
    prov = json.loads((run.path / "status.json").read_text())["provenance"]
    assert prov == json.loads(json.dumps(code_provenance()))
    assert prov["commit"] == _git("rev-parse", "HEAD")
    assert prov["dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no", "--", "platform", "jobs",
                                      "pyproject.toml"))
    assert torch.__version__.startswith(prov["versions"]["torch"])
    run.finish("completed")
    assert json.loads((run.path / "status.json").read_text())["provenance"] == prov  # kept by later writes
    tags = mlflow_tags(prov)
    assert tags["dpdistill.commit"].startswith(prov["commit"]) and "torch" in tags["dpdistill.versions"]


def _provenance_of_copy(where: Path, env: dict[str, str]) -> dict:
    """code_provenance() as seen by a copy of the package exported to ``where`` (as bench_runs --snapshot does)."""
    shutil.copytree(ROOT / "platform" / "dpdistill", where / "platform" / "dpdistill",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import json, dpdistill; from dpdistill.runtime.provenance import code_provenance; "
            "print(json.dumps({'file': dpdistill.__file__, **code_provenance()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(where / "platform"), **env}).stdout
    found = json.loads(out)
    assert Path(found["file"]).resolve().is_relative_to(where.resolve())  # the copy ran, not the checkout
    return found


@pytest.mark.skipif(not _is_checkout(), reason="needs git")
def test_an_exported_copy_inside_another_repository_does_not_borrow_its_commit(tmp_path: Path,
                                                                              monkeypatch) -> None:
    other = tmp_path / "other"
    other.mkdir()
    _git("init", "-q", cwd=other)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-q", "--allow-empty", "-m", "x", cwd=other)
    monkeypatch.delenv("DPDISTILL_SOURCE_COMMIT", raising=False)
    found = _provenance_of_copy(other / "snapshot", {})
    assert found["commit"] is None and found["dirty"] is None
    named = _provenance_of_copy(tmp_path / "named", {"DPDISTILL_SOURCE_COMMIT": "abc123"})
    assert named["commit"] == "abc123"


def test_the_html_report_names_the_code(tmp_path: Path) -> None:
    from dpdistill.runtime.report_html import render_run_report

    run = RunFolder.create(tmp_path, "job", "name: job\nkind: distill\n")
    run.finish("completed")
    page = render_run_report(run.path)
    prov = code_provenance()
    assert 'id="job-code"' in page and f"dpdistill {prov['dpdistill']}" in page
    assert (prov["commit"] or "not a git checkout") in page and f"torch {prov['versions']['torch']}" in page
