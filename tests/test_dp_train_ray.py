"""DP-SGD sharded over Ray Train workers (runtime/dp_train.py, gloo on CPU) against a real Ray head on loopback
with token auth on: the noise is added once per step (not once per worker, not zero), the global expected batch
is q·n, a worker failure after a checkpoint resumes from it without losing or repeating steps (and the failed
attempt's unregistered checkpoint does not stay in the run folder), a Ray Train fit returns a state of the
in-process fit's layout, and capacity is counted per node. One head and one (crashed and resumed) 2-worker fit for
the module: each Ray Train fit costs ~20 s of start-up."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import dp_objectives
from dp_objectives import ZeroGradient, noise_gain
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.runtime.dp_train import STATE_FILE, fit_dp_sgd, shard_indices
from dpdistill.training.dp_sgd import DPSGDSchedule
from ray_head import joined_head

N, D = 400, 100
# The release is the weights' moving average (ema_decay): the crashed fit must carry it through its checkpoint.
SCHEDULE = DPSGDSchedule(sigma=1.3, q=0.8, steps=6, clip=0.7, n_records=N, lr=1.0, optimizer="sgd",
                         max_physical_batch=512, checkpoint_every=2, ema_decay=0.9)


@dataclass(frozen=True)
class CrashOnceAfter:
    """An on_step hook: logs (pid, rank, step) and makes rank 0 raise once, at step ``at``. Before raising it
    leaves ``orphan``: a checkpoint folder holding a state of the failed attempt, as an upload Ray never
    registered would (runtime/dp_train.py, drop_unregistered_checkpoints)."""

    log: str
    marker: str
    at: int
    orphan: str = ""

    def __call__(self, step: int, info: dict) -> None:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {info['rank']} {step}\n")
        if info["rank"] == 0 and step == self.at and not os.path.exists(self.marker):
            if self.orphan:
                Path(self.orphan).mkdir(parents=True)
                torch.save({"step": step, "net": {"weight": torch.zeros(1)}}, Path(self.orphan) / STATE_FILE)
            Path(self.marker).touch()
            raise RuntimeError(f"injected failure after step {step}")


@pytest.fixture(scope="module")
def cluster():
    import ray
    import ray.cloudpickle

    # The workers cannot import the tests folder: this module's hook and the shared objective travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(dp_objectives)
    with joined_head():
        yield ray.cluster_resources()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g), torch.randint(0, 10, (N,), generator=g)


@dataclass(frozen=True)
class CrashedFit:
    state: dict
    rows_dir: Path
    attempts: dict  # (pid, rank) -> the steps that worker ran, in order


_FIT: list[CrashedFit] = []
ORPHAN = "checkpoint_left-by-the-failed-attempt"


def _crashed_fit(tmp_path_factory) -> CrashedFit:
    """The module's one Ray Train fit (each costs ~20 s of worker-group start-up, so the tests share it): 2
    workers, zero per-sample gradients, a checkpoint every 2 steps, and rank 0 raising once after step 3."""
    if not _FIT:
        work = tmp_path_factory.mktemp("crash")
        hook = CrashOnceAfter(str(work / "steps.log"), str(work / "crashed"), at=3,
                              orphan=str(work / "train" / "crash" / ORPHAN))
        images, labels = _data()
        state = fit_dp_sgd(ZeroGradient(d=D, log_dir=str(work)), None, images, labels, SCHEDULE,
                           PrivacyRandomness.reproducible(7), num_workers=2, executor="ray-train",
                           storage_path=work / "train", run_name="crash", max_failures=1, on_step=hook)
        assert (work / "crashed").exists()  # the crash happened (the hook left the orphan just before)
        attempts: dict[tuple[int, int], list[int]] = defaultdict(list)
        for line in (work / "steps.log").read_text().splitlines():
            pid, rank, step = map(int, line.split())
            attempts[(pid, rank)].append(step)
        _FIT.append(CrashedFit(state, work, dict(attempts)))
    return _FIT[0]


def test_a_failed_worker_resumes_from_the_checkpoint(cluster, tmp_path_factory):
    """Rank 0 raises once after step 3 (checkpoint at step 2): Ray Train restarts the worker group, which
    resumes at step 2 and runs steps 3..6: the run ends after exactly `steps` steps counted from the
    checkpoint (the lost step 3 is redone once, nothing else repeats, nothing is missing)."""
    fit = _crashed_fit(tmp_path_factory)
    rank0 = [steps for (_, rank), steps in fit.attempts.items() if rank == 0]
    assert rank0 == [[1, 2, 3], [3, 4, 5, 6]], fit.attempts
    assert sorted(steps for (_, rank), steps in fit.attempts.items() if rank == 1)[-1] == [3, 4, 5, 6]
    assert set(fit.state) == {"weight", "bias"}


def test_a_failed_attempts_unregistered_checkpoint_is_removed(cluster, tmp_path_factory):
    """The failed attempt left a checkpoint folder Ray never registered (a continuation of charged steps the
    restart trains again with fresh noise): after the fit it is gone, and what is left is the registered lineage,
    at most num_to_keep (2) folders, the newest the final step."""
    run_dir = _crashed_fit(tmp_path_factory).rows_dir / "train" / "crash"
    assert not (run_dir / ORPHAN).exists()
    left = sorted(d for d in run_dir.glob("checkpoint_*") if d.is_dir())
    assert 1 <= len(left) <= 2, left
    steps = sorted(int(torch.load(d / STATE_FILE, weights_only=True)["step"]) for d in left)
    assert steps[-1] == SCHEDULE.steps and all(s % SCHEDULE.checkpoint_every == 0 for s in steps), steps


def test_noise_is_added_once_per_step(cluster, tmp_path_factory):
    """Zero per-sample gradients, SGD lr 1: the release (the moving average of the iterates, each the sum of its
    steps' noise draws / (q·n)) moved each coordinate with std noise_gain·σC/(q·n) (tests/dp_objectives.py),
    within 5 % over 10,100 coordinates. Noise on every worker would be √2 too large, none zero, and the crashed
    step's noise kept as well as its redo about 1.08 too large."""
    state = _crashed_fit(tmp_path_factory).state
    start = ZeroGradient(d=D).build().state_dict()
    moved = torch.cat([(state[k] - start[k]).reshape(-1) for k in start])
    expected = noise_gain(SCHEDULE) * SCHEDULE.noise_std / SCHEDULE.expected_batch
    assert abs(float(moved.std()) / expected - 1) < 0.05, (float(moved.std()), expected)


def test_two_workers_sample_the_global_rate(cluster, tmp_path_factory):
    """Over the resumed attempt's 4 steps, the records the 2 workers' losses saw average q·n per step (each
    samples its shard at the global q: sampling at q·N_workers or q/N_workers would be off by 2x). Both workers
    took part. (The crashed attempt is left out: its last step may have run on one worker only.)"""
    fit = _crashed_fit(tmp_path_factory)
    resumed = [pid for (pid, _), steps in fit.attempts.items() if steps == [3, 4, 5, 6]]
    assert len(resumed) == 2, fit.attempts
    rows = [sum(int(v) for v in (fit.rows_dir / f"rows-{pid}.txt").read_text().split()) for pid in resumed]
    assert all(rows), rows
    mean = sum(rows) / 4
    # sd of the mean: sqrt(n q (1-q) / 4) = 4 records; 5 % of 320 is 4 sd. (q is high so that 4 steps suffice;
    # at 2q the rate saturates at 1: 25 % off.)
    assert abs(mean / (SCHEDULE.q * N) - 1) < 0.05, mean


def test_ray_train_returns_the_state_layout_of_an_in_process_fit(cluster, tmp_path_factory, tmp_path):
    one = fit_dp_sgd(ZeroGradient(d=D, log_dir=str(tmp_path)), None, *_data(), SCHEDULE,
                     PrivacyRandomness.reproducible(7), executor="in-process")
    two = _crashed_fit(tmp_path_factory).state
    assert {k: (v.shape, v.dtype) for k, v in one.items()} == {k: (v.shape, v.dtype) for k, v in two.items()}


def test_shards_partition_the_records():
    """The driver's shards are disjoint, cover every record, and are balanced (a private permutation cut in
    contiguous pieces)."""
    pieces = shard_indices(10, 3, PrivacyRandomness.reproducible(0))
    assert sorted(torch.cat(pieces).tolist()) == list(range(10))
    assert [len(p) for p in pieces] == [4, 3, 3]


def test_capacity_is_counted_per_node(monkeypatch):
    """A worker needs its threads' CPUs and (on cuda) a GPU on ONE node: cluster totals are not enough."""
    from dpdistill.errors import SpecError
    from dpdistill.runtime.dp_train import check_train_capacity

    check_train_capacity([{"CPU": 2.0}], 2, False)
    with pytest.raises(SpecError, match=r"'method.train_workers': 3 Ray Train workers need 1 CPU each .* hold 2"):
        check_train_capacity([{"CPU": 2.0}], 3, False)
    with pytest.raises(SpecError, match="and 1 GPU each"):
        check_train_capacity([{"CPU": 8.0}], 2, True)
    check_train_capacity([{"CPU": 8.0, "GPU": 2.0}], 2, True)
    monkeypatch.setenv("DPDISTILL_THREADS", "4")
    # 10 CPUs in all and 2 GPUs, but the GPU node has 2 CPUs: no 4-thread GPU worker fits anywhere.
    with pytest.raises(SpecError, match="hold 0"):
        check_train_capacity([{"CPU": 2.0, "GPU": 2.0}, {"CPU": 8.0}], 1, True)
    check_train_capacity([{"CPU": 8.0}, {"CPU": 4.0}], 3, False)
    with pytest.raises(SpecError, match="hold 2"):  # 12 CPUs in all, but a 4-CPU worker fits once per node
        check_train_capacity([{"CPU": 6.0}, {"CPU": 6.0}], 3, False)


def test_a_fit_whose_workers_cannot_be_placed_fails_instead_of_hanging(cluster, tmp_path, monkeypatch):
    """Capacity is there (the check before charging passes) but held: an actor takes every CPU of the head.
    Ray Train V2 would retry the worker group's start forever; with the placement retries bounded the fit
    fails with one ClusterError line after 1 + retries timed-out starts (2 s each here)."""
    import re
    import threading

    import ray

    from dpdistill.errors import ClusterError

    @ray.remote(num_cpus=cluster["CPU"])
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "2")  # propagated to Ray Train's controller
    monkeypatch.setenv("DPDISTILL_TRAIN_PLACEMENT_RETRIES", "1")
    outcome: list[BaseException] = []

    def fit() -> None:
        try:
            fit_dp_sgd(ZeroGradient(d=D), None, *_data(), SCHEDULE, PrivacyRandomness.reproducible(7),
                       num_workers=1, executor="ray-train", storage_path=tmp_path / "train", run_name="held")
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    # In a thread: a regression (retries without limit) must fail this test, not hang the suite.
    worker = threading.Thread(target=fit, daemon=True)
    try:
        worker.start()
        worker.join(timeout=180)
        assert not worker.is_alive(), "the fit still waits for its workers after 180 s"
    finally:
        ray.kill(hog)
    assert len(outcome) == 1 and isinstance(outcome[0], ClusterError), outcome
    assert re.search(r"could not start 1 worker\(s\).*in 2 attempt\(s\)", str(outcome[0])), outcome[0]


def test_ray_train_v1_is_refused_before_the_charge(monkeypatch):
    """Under Train V1 the bounded retries do not exist (V1's FailureConfig has no controller_failure_limit):
    refused in the capacity check, which runs before the plan is charged, not with a TypeError after it."""
    from dpdistill.errors import SpecError
    from dpdistill.runtime.dp_train import check_train_capacity

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    with pytest.raises(SpecError, match=r"Ray Train V2 is required.*RAY_TRAIN_V2_ENABLED"):
        check_train_capacity([{"CPU": 64.0}], 1, use_gpu=False)
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    check_train_capacity([{"CPU": 64.0}], 1, use_gpu=False)


@pytest.mark.parametrize("value", ["abc", "-1", "2.5"])
def test_a_bad_placement_retry_setting_is_refused_before_the_charge(monkeypatch, value):
    """The capacity check runs before the plan is charged: a malformed retry count fails there, not after."""
    from dpdistill.errors import SpecError
    from dpdistill.runtime.dp_train import check_train_capacity

    monkeypatch.setenv("DPDISTILL_TRAIN_PLACEMENT_RETRIES", value)
    with pytest.raises(SpecError, match=r"\$DPDISTILL_TRAIN_PLACEMENT_RETRIES"):
        check_train_capacity([{"CPU": 4.0}], 1, use_gpu=False)
