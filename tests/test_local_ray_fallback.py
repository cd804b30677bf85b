"""A local Ray that fails to start does not cost the evaluation of a release already charged and saved.

Ray gives a local node a fixed 30 s to register with its GCS (``ray/_private/node.py``); on a loaded 2-core
machine that can run out, and ``ray.init`` raises "The current node timed out during startup". A distill job
enters Ray only to evaluate its release, after the release is saved, so the job trains the evaluation's models
in-process instead (same seeds, same threads, same figures) and says so; a synthesize job does the same with its
generation chunks (the synthesiser is saved before it generates). The failure is injected at Ray's own
node start: the real head node starts (GCS, raylet, reaper), then raises Ray's own message, so the test also
checks that those half-started processes are stopped rather than left running beside the evaluation.

This module starts no Ray cluster of its own: every start in it is made to fail.
"""

from __future__ import annotations

import json

import pytest
import torch

from dpdistill.errors import ClusterError
from dpdistill.runner import run_job
from dpdistill.runtime.cluster import LocalRayStartError, ray_session
from dpdistill.spec import validate_spec
from tiny_jobs import tiny_dpgeng

RAY_TIMEOUT = ("The current node timed out during startup. This could happen because some of the raylet failed "
               "to startup or the GCS has become overloaded.")


@pytest.fixture
def node_start_times_out(monkeypatch):
    """Every local head node starts for real and then fails as Ray's 30 s wait does; yields, per start, the
    processes it had started (GCS, raylet, reaper, ...)."""
    import ray
    import ray._private.node as ray_node

    assert not ray.is_initialized(), "another test left Ray running in this process"
    real_init = ray_node.Node.__init__
    started: list = []

    def start_then_time_out(self, *args, **kwargs):
        try:
            real_init(self, *args, **kwargs)  # on a loaded machine this may itself time out: recorded all the same
        finally:
            if kwargs.get("head"):
                # Ray forgets a process once it has stopped it: keep the handles to check them afterwards.
                started.append([info.process for infos in self.all_processes.values() for info in infos])
        if kwargs.get("head"):
            raise Exception(RAY_TIMEOUT)  # Ray's own type and words (node.py raises a bare Exception)

    monkeypatch.setattr(ray_node.Node, "__init__", start_then_time_out)
    yield started
    assert not ray.is_initialized()


def _stopped(procs) -> bool:
    return len(procs) >= 2 and all(p.poll() is not None for p in procs)


def test_a_failed_local_start_is_one_line_and_leaves_no_processes(node_start_times_out):
    with pytest.raises(LocalRayStartError, match=r"^local Ray did not start \(The current node timed out"):
        with ray_session(num_cpus=1):
            pytest.fail("the session must not open")
    assert isinstance(LocalRayStartError("x"), ClusterError)  # the CLI's one line and exit code 2 elsewhere
    (procs,) = node_start_times_out
    assert _stopped(procs), "the half-started GCS / raylet / reaper are still running"


def _dm(parallel: bool) -> dict:
    return {"name": "dm-fallback", "kind": "distill", "data": {"name": "digits"}, "threads": 1,
            "method": {"name": "dm", "ipc": 1, "iterations": 5},
            "evaluation": {"seeds": 2, "epochs": 3, "model_options": {"width": 8}, "parallel": parallel},
            "tracking": {"enabled": False}}


def test_the_evaluation_runs_in_process_with_the_same_figures(node_start_times_out, tmp_path):
    fell_back = run_job(validate_spec(_dm(True)), tmp_path / "ray", progress=False)
    assert fell_back.status == "completed"
    assert len(node_start_times_out) == 1  # one try, no retry loop
    assert all(_stopped(n) for n in node_start_times_out)
    rows = dict(fell_back.summary)
    assert rows["evaluation on"].startswith("this process (local Ray did not start (The current node timed out")
    in_process = run_job(validate_spec(_dm(False)), tmp_path / "here", progress=False)
    assert "evaluation on" not in dict(in_process.summary)
    figures = [json.loads((r.run_dir / "metrics.json").read_text()) for r in (fell_back, in_process)]
    assert figures[0]["acc_mean"] == figures[1]["acc_mean"]  # DM is deterministic; threads pinned to 1


def test_dpgeng_evaluates_its_release_and_baseline_in_process(node_start_times_out, tmp_path):
    """The job that evaluates two sets in one session (release, DP-generated baseline) tries Ray once."""
    doc = {"name": "dpgeng-fallback", "kind": "distill", "data": {"name": "digits"}, "privacy": {"epsilon": 2.0},
           "method": tiny_dpgeng(),
           "evaluation": {"seeds": 1, "epochs": 2, "model_options": {"width": 8}, "parallel": True},
           "tracking": {"enabled": False}}
    result = run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    assert len(node_start_times_out) == 1 and _stopped(node_start_times_out[0])
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert 0 <= metrics["acc_mean"] <= 1 and 0 <= metrics["baseline_generated_acc_mean"] <= 1
    assert (result.run_dir / "artifacts" / "distilled.pt").exists()


def test_a_synthesize_job_generates_and_evaluates_in_process(node_start_times_out, tmp_path):
    """Generation in chunks (Ray tasks) and the evaluation both fall back, after ONE failed start; the images
    are the in-process chunks' (same chunks, same seeds), and the release was saved before generation began."""
    import numpy as np

    from dpdistill import synthesis
    from dpdistill.runtime.generation import generate_parallel

    doc = {"name": "merf-fallback", "kind": "synthesize", "data": {"name": "digits"}, "privacy": {"epsilon": 2.0},
           "method": {"name": "dp-merf", "num_features": 64, "iterations": 3, "batch_size": 40, "n_per_class": 6,
                      "generate_chunks": 3, "fidelity": False},
           "evaluation": {"seeds": 1, "epochs": 1, "model_options": {"width": 8}, "parallel": True},
           "tracking": {"enabled": False}}
    result = run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    # One try: the start both share (release_ray) failed, so both run here without waiting for a second one.
    assert len(node_start_times_out) == 1 and _stopped(node_start_times_out[0])
    rows = dict(result.summary)
    assert rows["generation on"].startswith("this process (local Ray did not start")
    assert rows["evaluation on"].startswith("this process (local Ray did not start")
    art = result.run_dir / "artifacts"
    synth = synthesis.load(art / "synthesizer.pt")
    images, labels = generate_parallel(synth, 6, 0, chunks=3, use_ray=False)
    npz = np.load(art / "synthetic.npz")
    assert np.array_equal(npz["images"], (images * 255).round().to(torch.uint8).numpy())
    assert np.array_equal(npz["labels"], labels.numpy())
