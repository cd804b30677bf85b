"""Every job and sweep spec shipped in jobs/ and sweeps/ loads and validates (method options included), so a
renamed option or a typo in a shipped file fails here rather than in a user's first run."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpdistill.runtime.sweeps import load_sweep
from dpdistill.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def test_there_are_shipped_specs():
    assert {"quickstart.yaml", "dpgeng-mnist.yaml", "sfdd-mnist.yaml"} <= {p.name for p in JOBS}
    assert SWEEPS


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_spec_validates(path):
    spec = load_spec(path)
    assert spec.name and spec.kind in {"distill", "synthesize", "sfdd"}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_spec_validates(path):
    from dpdistill.runtime.allocation_sweep import is_allocation_sweep, load_allocation_sweep

    if is_allocation_sweep(path):  # DP-GenG's utility-driven allocation: a DP-GenG job tuned on a public set
        sweep, job = load_allocation_sweep(path)
        assert job.method.name == "dpgeng" and job.method.options()["utility_tuning"] == "glyphs"
        return
    sweep, job_doc, job_path = load_sweep(path)
    assert job_path.is_file() and sweep.metric.startswith("val_")


def test_quickstart_is_dp_geng_on_digits():
    spec = load_spec(ROOT / "jobs" / "quickstart.yaml")
    assert spec.data.name == "digits" and spec.method.name == "dpgeng" and spec.privacy.epsilon is not None
