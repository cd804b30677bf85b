"""DP-GenG's utility-driven allocation as a Tune sweep: candidate shares as parallel trials on public data, the
paper's criterion applied to what they measured, and a job with the chosen shares that `dpdistill run` accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from dpdistill.errors import SpecError
from dpdistill.runtime.allocation_sweep import load_allocation_sweep, run_allocation_sweep, smallest_good
from dpdistill.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # the quick-start, shrunk: a few seconds per fit
    "method.utility_tuning=glyphs", "method.generator_options.iterations=40", "method.generated_per_class=20",
    "method.expert_pretrain_epochs=1", "method.expert_dp_epochs=0.5", "method.ipc=2", "method.iterations=5",
    "evaluation.seeds=1", "evaluation.epochs=5",
]


def _sweep_file(tmp_path: Path, **patch) -> Path:
    doc = {"kind": "utility-allocation", "name": "alloc", "job": str(ROOT / "jobs" / "quickstart.yaml"),
           "set": TINY, "grid": 2, "max_concurrent": 2}
    doc.update(patch)
    path = tmp_path / "alloc.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_criterion_picks_the_smallest_good_share():
    fids = {1.0: 10.0, 0.05: 30.0, 0.4: 11.5, 0.75: 10.5}
    assert smallest_good(fids, lambda v: v <= 12.0, 0.75) == 0.4
    assert smallest_good(fids, lambda v: v <= 5.0, 0.75) == 0.75  # none good: the largest candidate
    assert smallest_good({1.0: 0.9, 0.05: 0.2, 0.75: 0.85}, lambda v: v >= 0.81, 0.75) == 0.75


def test_sensitive_tuning_and_other_methods_are_refused(tmp_path):
    with pytest.raises(SpecError, match="utility_tuning 'sensitive' is not allowed in a sweep"):
        load_allocation_sweep(_sweep_file(tmp_path, set=[*TINY, "method.utility_tuning=sensitive"]))
    with pytest.raises(SpecError, match="tunes DP-GenG's shares; .* method 'ndpdc'"):
        load_allocation_sweep(_sweep_file(tmp_path, job=str(ROOT / "jobs" / "ndpdc-mnist.yaml"), set=[]))
    proc = subprocess.run([sys.executable, "-m", "dpdistill.cli", "sweep", str(_sweep_file(tmp_path, grid=1)),
                           "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "field 'grid'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_candidates_run_as_trials_and_the_job_gets_the_chosen_shares(tmp_path, ray_cluster):
    sweep, spec = load_allocation_sweep(_sweep_file(tmp_path))
    summary = run_allocation_sweep(sweep, spec, tmp_path / "runs")
    fids = {float(k): v for k, v in summary["generator_fid"].items()}
    accs = {float(k): v for k, v in summary["expert_accuracy"].items()}
    assert sorted(fids) == sorted(accs) == [0.05, 0.75, 1.0]  # grid 2 in [0.05, 0.75] plus the full budget
    # The paper's criterion, applied here to the measurements the sweep recorded.
    assert summary["fid_target"] == pytest.approx(1.2 * fids[1.0])
    share_g = smallest_good(fids, lambda v: v <= summary["fid_target"], 0.75)
    share_e = smallest_good(accs, lambda v: v >= 0.9 * accs[1.0], 0.75)
    scale = min(1.0, 0.8 / (share_g + share_e))
    assert summary["share_generator"] == pytest.approx(share_g * scale)
    assert summary["share_expert"] == pytest.approx(share_e * scale)
    assert summary["tuned_on"] == "glyphs" and summary["privacy"].startswith("free")
    # The job it wrote runs with those shares fixed and is otherwise the job.
    job = load_spec(summary["job"])
    assert job.method.options()["allocation"] == "fixed"
    assert job.method.options()["share_generator"] == pytest.approx(summary["share_generator"])
    assert job.privacy.epsilon == spec.privacy.epsilon and job.data.name == "digits"
    assert json.loads((Path(summary["sweep_dir"]) / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # Every candidate was a Tune trial (two phases), each a child of the sweep's MLflow run.
    tune_dir = Path(summary["sweep_dir"]) / "tune"
    assert len(list((tune_dir / "generator").glob("*/result.json"))) == 3
    assert len(list((tune_dir / "expert").glob("*/result.json"))) == 3
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow_uri"])
    exp = client.get_experiment_by_name("sweep-alloc")
    children = client.search_runs([exp.experiment_id], "tags.`dpdistill.sweep_role` = 'trial'")
    assert len(children) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {summary["mlflow_parent_run_id"]}
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.data.metrics["share_generator"] == pytest.approx(summary["share_generator"])


def test_nothing_from_the_sensitive_split_reaches_the_trials(tmp_path):
    """What the trials get (probe_inputs) holds the public tuning sets only: no sensitive image, no tensor of
    the sensitive split's size."""
    import torch

    from dpdistill.pipelines import get_pipeline
    from dpdistill.runtime.allocation_sweep import probe_inputs

    sweep, spec = load_allocation_sweep(_sweep_file(tmp_path))
    sensitive = get_pipeline(spec.kind).prepare(spec).train.images.flatten(1)
    args, _ = probe_inputs(sweep, spec)
    assert (args["tune"].name, args["held_out"].name) == ("glyphs/train", "glyphs/test")
    tensors = [v for v in args.values() if isinstance(v, torch.Tensor)]
    tensors += [s.images for s in (args["tune"], args["held_out"])] + [s.labels for s in (args["tune"],
                                                                                          args["held_out"])]
    for t in tensors:
        assert len(t) != len(sensitive)
        if t.dim() == 4:  # images: none equals a sensitive image
            rows = t.flatten(1)
            assert not any(bool((rows == row).all(1).any()) for row in sensitive[:500])
