"""Deterministic threading: with the spec's ``threads`` pinned, Ray and in-process evaluation agree to the last digit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dpdistill import data
from dpdistill.evaluation import training
from dpdistill.evaluation.training import THREADS_ENV, free_cores, resolve_threads, thread_limit
from dpdistill.runner import Terminated, pinned_threads, run_job
from dpdistill.runtime.parallel import PendingSeeds, evaluate_seeds, submit_seeds
from dpdistill.spec import validate_spec
from tiny_jobs import tiny_dpgeng


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_pinned_count_wins_over_the_load_heuristic(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    assert resolve_threads(None) == 2 and resolve_threads(1) == 1
    with thread_limit(None) as n:
        assert n == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv(THREADS_ENV)
    prior = torch.get_num_threads()
    with pinned_threads(1):
        assert os.environ[THREADS_ENV] == "1" and torch.get_num_threads() == 1
    assert THREADS_ENV not in os.environ and torch.get_num_threads() == prior


@pytest.fixture
def fresh_measure(monkeypatch):
    """free_cores measures anew (no answer reused from an earlier test) and no pinned count hides it."""
    monkeypatch.setattr(training, "_free_cores_seen", None)
    monkeypatch.delenv(THREADS_ENV, raising=False)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="free_cores measures from /proc")
def test_other_processes_busy_on_every_core_leave_one_thread(fresh_measure):
    cores = len(training._affinity())
    if (training.cgroup_cpus() or cores) < cores:  # throttled spinners would not fill every core of the mask
        pytest.skip("this container's CPU quota is below its affinity mask")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)  # the interpreters start and spin
        assert free_cores() == 1
        assert resolve_threads(None) == 1
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="free_cores measures from /proc")
def test_a_stale_load_average_and_this_process_s_own_work_do_not_count(fresh_measure, monkeypatch):
    """The 1-min load average counted work that had ended, the job's own included: a job started within a minute
    of heavy work ran a whole stage on one thread of an idle machine. It is no longer read where /proc exists,
    and this process's own CPU time is taken out of the busy time."""
    def stale(*_):
        raise AssertionError("free_cores read the load average")

    monkeypatch.setattr(os, "getloadavg", stale)
    free_cores()  # measures from /proc only
    cores = training._affinity()
    hz = os.sysconf("SC_CLK_TCK")
    machine0, own0 = training._busy_ticks(cores), training._own_ticks()
    x = torch.randn(512, 512)
    deadline = time.monotonic() + 30  # CPU time, not wall time: the machine may be shared with other tests
    while training._own_ticks() - own0 < 0.3 * hz and time.monotonic() < deadline:
        x = (x @ x).tanh()
    own = training._own_ticks() - own0
    machine = training._busy_ticks(cores) - machine0
    assert own >= 0.3 * hz  # our own work is seen ...
    assert machine >= 0.9 * own  # ... inside the machine's busy time (two clocks), from which free_cores takes it


def test_a_container_quota_caps_the_threads(fresh_measure, monkeypatch, tmp_path):
    """A pod limited to fewer CPUs than its affinity mask shows (Kubernetes on a large node) gets at most its
    quota, however idle the node; the quota files of cgroup v2 and v1 are both read."""
    monkeypatch.setattr(training, "_affinity", lambda: list(range(8)))
    monkeypatch.setattr(training, "_others_busy", lambda cores: 0.0)  # an idle node
    v2 = tmp_path / "cpu.max"
    v1 = tmp_path / "cpu" / "cpu.cfs_quota_us"
    v1.parent.mkdir()
    (v1.parent / "cpu.cfs_period_us").write_text("100000\n")
    for files, text, expected in (((str(v2),), "150000 100000\n", 2), ((str(v2),), "max 100000\n", 8),
                                  ((str(tmp_path / "none"), str(v1)), "300000\n", 3),
                                  ((str(tmp_path / "none"), str(v1)), "-1\n", 8)):
        (v2 if files == (str(v2),) else v1).write_text(text)
        monkeypatch.setattr(training, "CGROUP_CPU_FILES", files)
        monkeypatch.setattr(training, "_free_cores_seen", None)
        assert free_cores() == expected, (files, text)


def test_without_proc_the_load_average_decides(fresh_measure, monkeypatch):
    monkeypatch.setattr(training, "_others_busy", lambda cores: None)
    cores = len(training._affinity())
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0))
    assert free_cores() == 1
    monkeypatch.setattr(training, "_free_cores_seen", None)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert free_cores() == cores


@pytest.mark.parametrize("threads", [1, 2])
def test_ray_and_in_process_evaluation_agree_to_the_last_digit(ray_cluster, threads):
    train = data.load("digits", "train").subset(torch.arange(200))
    test = data.load("digits", "test")
    kw = dict(num_classes=10, model="convnet", model_kwargs={"width": 8, "depth": 2}, epochs=3, batch_size=64,
              lr=0.01, mean=(0.5,), std=(0.5,), num_threads=threads)
    on_ray = evaluate_seeds(train.images, train.labels, test.images, test.labels, [0, 1], use_ray=True, **kw)
    here = evaluate_seeds(train.images, train.labels, test.images, test.labels, [0, 1], use_ray=False,
                          progress=False, **kw)
    assert on_ray["test"]["accuracies"] == here["test"]["accuracies"]  # exact, not approx


def test_an_evaluation_queued_behind_another_gives_its_own_figures(ray_cluster):
    """DP-GenG's baseline is queued behind the release's models (after_submit): both evaluations come back with
    the figures each gives alone, to the last digit (one thread each)."""
    digits = data.load("digits", "train")
    a, b = digits.subset(torch.arange(200)), digits.subset(torch.arange(200, 300))
    test = data.load("digits", "test")
    kw = dict(num_classes=10, model="convnet", model_kwargs={"width": 8, "depth": 2}, epochs=3, batch_size=64,
              lr=0.01, mean=(0.5,), std=(0.5,), num_threads=1, use_ray=True)
    alone_a = evaluate_seeds(a.images, a.labels, test.images, test.labels, [0, 1], **kw)
    alone_b = evaluate_seeds(b.images, b.labels, test.images, test.labels, [0, 1], **kw)
    queued = []
    both_a = evaluate_seeds(a.images, a.labels, test.images, test.labels, [0, 1], **kw, after_submit=lambda:
                            queued.append(submit_seeds(b.images, b.labels, test.images, test.labels, [0, 1], **kw)))
    assert len(queued) == 1
    assert both_a["test"]["accuracies"] == alone_a["test"]["accuracies"]
    assert queued[0].result()["test"]["accuracies"] == alone_b["test"]["accuracies"]
    assert alone_a["test"]["accuracies"] != alone_b["test"]["accuracies"]  # the two sets are told apart

    def broken() -> None:
        raise RuntimeError("the queued evaluation failed to start")

    with pytest.raises(RuntimeError, match="failed to start"):  # the first evaluation's tasks are cancelled
        evaluate_seeds(a.images, a.labels, test.images, test.labels, [0, 1], **kw, after_submit=broken)


def test_abandoned_seeds_are_cancelled_after_a_failure_but_not_after_an_interrupt() -> None:
    """A failure may leave the driver running: its queued seeds are stopped. Ctrl-C or SIGTERM ends the driver
    (Ray then kills the job's workers) and a cancel would race the tasks' replies (Ray 2.60 aborts the driver):
    nothing is cancelled."""
    cancels = []
    pending = PendingSeeds(lambda: {}, lambda: cancels.append(1))
    pending.abandon(RuntimeError("the queued evaluation failed to start"))
    assert cancels == [1]
    for interrupt in (KeyboardInterrupt(), Terminated()):
        pending.abandon(interrupt)
    assert cancels == [1]


def test_a_job_with_threads_pinned_gives_the_same_figure_on_ray_and_in_process(ray_cluster, tmp_path):
    doc = {"name": "dm-threads", "kind": "distill", "data": {"name": "digits"}, "threads": 1,
           "method": {"name": "dm", "ipc": 1, "iterations": 5},
           "evaluation": {"seeds": 2, "epochs": 3, "model_options": {"width": 8}}, "tracking": {"enabled": False}}
    figures = []
    for parallel in (True, False):
        doc["evaluation"]["parallel"] = parallel
        result = run_job(validate_spec(doc), tmp_path / f"runs-{parallel}", progress=False)
        figures.append(json.loads((result.run_dir / "metrics.json").read_text())["acc_mean"])
    assert figures[0] == figures[1]


def test_dpgeng_queues_its_baseline_behind_the_release_on_ray(ray_cluster, tmp_path, monkeypatch):
    """Through the job: the release's models are queued, then the DP-generated baseline's, and only then does
    the job wait for either (a spy around the real submit_seeds records the order)."""
    import dpdistill.runtime.parallel as parallel

    events: list[tuple[str, int]] = []
    real_submit = parallel.submit_seeds

    def recording_submit(*args, **kwargs):
        pending, n = real_submit(*args, **kwargs), len(args[1])
        events.append(("queued", n))
        collect = pending.result

        def result():
            events.append(("waited", n))
            return collect()

        pending.result = result
        return pending

    monkeypatch.setattr(parallel, "submit_seeds", recording_submit)
    doc = {"name": "dpgeng-queue", "kind": "distill", "data": {"name": "digits"}, "privacy": {"epsilon": 2.0},
           "method": tiny_dpgeng(factor=2),
           "evaluation": {"seeds": 2, "epochs": 2, "model_options": {"width": 8}, "parallel": True},
           "tracking": {"enabled": False}}
    result = run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    # factor 2: the release decodes to 4 images per stored one (40), the baseline is ipc x classes (10).
    assert events == [("queued", 40), ("queued", 10), ("waited", 40), ("waited", 10)]
    assert 0 <= metrics["baseline_generated_acc_mean"] <= 1 and 0 <= metrics["acc_mean"] <= 1



def test_an_unpinned_job_fits_on_the_cores_free_cores_measures(fresh_measure, tmp_path, monkeypatch, caplog):
    """The unpinned path end to end (the rest of the suite pins one thread): a synthesize job with no ``threads``
    fits on free_cores()'s count and its log says so; here the measurement is fixed to a known answer."""
    monkeypatch.setattr(training, "free_cores", lambda: 2)
    doc = {"name": "unpinned-fit", "kind": "synthesize", "data": {"name": "digits"},
           "privacy": {"epsilon": 10.0, "delta": 1e-5},
           "method": {"name": "dp-merf", "iterations": 3, "num_features": 50, "batch_size": 50},
           "evaluation": {"enabled": False}, "tracking": {"enabled": False}}
    with caplog.at_level("INFO", logger="dpdistill.synthesis.base"):
        result = run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    expected = min(torch.get_num_threads(), 2)
    assert f"dp-merf: fitting on {expected} intra-op thread{'' if expected == 1 else 's'}" in caplog.text
