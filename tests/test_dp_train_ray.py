"""DP-SGD sharded over Ray Train workers (runtime/dp_train.py, gloo on CPU) against a real Ray head on loopback
with token auth on: the noise is added once per step (not once per worker, not zero), the global expected batch
is q·n, a worker failure after a checkpoint resumes from it without losing or repeating steps, and 1- and
2-worker fits return the same shapes. One head for the module, stopped by its process group."""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.runtime.dp_train import fit_dp_sgd, shard_indices
from dpdistill.training.dp_sgd import DPSGDSchedule
from ray_head import ray_head

N, D = 400, 100
SCHEDULE = DPSGDSchedule(sigma=1.3, q=0.2, steps=40, clip=0.7, n_records=N, lr=1.0, optimizer="sgd",
                         max_physical_batch=512)


@dataclass(frozen=True)
class CountingZeroGradient:
    """Per-sample gradients exactly zero, so the update is the noise alone; every losses() call appends the
    number of records it got to ``log_dir``/rows-<pid>.txt (a test hook: never logged by the platform)."""

    log_dir: str
    d: int = D
    m: int = 100

    def build(self) -> nn.Module:
        g = torch.Generator().manual_seed(0)
        net = nn.Linear(self.d, self.m)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return net

    def trainable(self, net: nn.Module) -> list[nn.Parameter]:
        return list(net.parameters())

    def losses(self, net, images, labels, multiplicity, generator):
        with open(Path(self.log_dir) / f"rows-{os.getpid()}.txt", "a") as f:
            f.write(f"{len(images)}\n")
        return (net(images.flatten(1).repeat_interleave(multiplicity, 0)) * 0.0).sum(1)


@dataclass(frozen=True)
class CrashOnceAfter:
    """An on_step hook: logs (pid, rank, step) and makes rank 0 raise once, at step ``at``."""

    log: str
    marker: str
    at: int

    def __call__(self, step: int, info: dict) -> None:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {info['rank']} {step}\n")
        if info["rank"] == 0 and step == self.at and not os.path.exists(self.marker):
            Path(self.marker).touch()
            raise RuntimeError(f"injected failure after step {step}")


@pytest.fixture(scope="module")
def cluster():
    import ray
    import ray.cloudpickle

    from dpdistill.runtime.cluster import ray_session

    # The workers cannot import this test module: its objectives travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with ray_head(start_params=("--num-cpus=2",)) as head, pytest.MonkeyPatch.context() as mp:
        for var in ("RAY_ADDRESS", "DPDISTILL_RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            mp.delenv(var, raising=False)
        mp.setenv("RAY_AUTH_TOKEN", head.token)
        mp.setenv("RAY_AUTH_MODE", "token")  # set here so the monkeypatch undoes it (ray_session would leave it)
        with ray_session(head.gcs) as resources:
            yield resources
    # Ray caches the token it loaded: forget this head's, or the next module's local cluster (a new token) is
    # refused with InvalidAuthToken.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g), torch.randint(0, 10, (N,), generator=g)


_FITS: dict[int, tuple[dict, Path]] = {}


def _fit(workers: int, tmp_path_factory) -> tuple[dict, Path]:
    """One fit per worker count for the module (shared by the tests that read it)."""
    if workers not in _FITS:
        logs = tmp_path_factory.mktemp(f"rows{workers}")
        images, labels = _data()
        state = fit_dp_sgd(CountingZeroGradient(str(logs)), None, images, labels, SCHEDULE,
                           PrivacyRandomness.reproducible(7), num_workers=workers, executor="ray-train",
                           storage_path=tmp_path_factory.mktemp(f"train{workers}"), run_name=f"zero-{workers}")
        _FITS[workers] = (state, logs)
    return _FITS[workers]


@pytest.mark.parametrize("workers", [2, 1])
def test_noise_is_added_once_per_step(cluster, tmp_path_factory, workers):
    """Zero per-sample gradients, SGD lr 1: each coordinate moved by T noise draws / (q·n), std √T·σC/(q·n),
    within 5 % over 10,100 coordinates. Noise on every worker would be √2 too large at 2 workers, none zero."""
    state, _ = _fit(workers, tmp_path_factory)
    start = CountingZeroGradient("").build().state_dict()
    moved = torch.cat([(state[k] - start[k]).reshape(-1) for k in start])
    expected = math.sqrt(SCHEDULE.steps) * SCHEDULE.noise_std / SCHEDULE.expected_batch
    assert abs(float(moved.std()) / expected - 1) < 0.05, (float(moved.std()), expected)


def test_two_workers_sample_the_global_rate(cluster, tmp_path_factory):
    """Over all steps, the records the 2 workers' losses saw average q·n per step (each samples its shard at
    the global q: sampling at q·N_workers or q/N_workers would be off by 2x). Both workers took part."""
    _, logs = _fit(2, tmp_path_factory)
    per_process = {f.name: [int(v) for v in f.read_text().split()] for f in logs.glob("rows-*.txt")}
    assert len(per_process) == 2, per_process.keys()
    mean = sum(sum(v) for v in per_process.values()) / SCHEDULE.steps
    # sd of the mean: sqrt(n q (1-q) / T) = 1.26 records; 5 % of 80 is 3.2 sd.
    assert abs(mean / (SCHEDULE.q * N) - 1) < 0.05, mean


def test_one_and_two_workers_return_the_same_shapes(cluster, tmp_path_factory):
    one, _ = _fit(1, tmp_path_factory)
    two, _ = _fit(2, tmp_path_factory)
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}


def test_a_failed_worker_resumes_from_the_checkpoint(cluster, tmp_path):
    """Rank 0 raises once after step 3 (checkpoint at step 2): Ray Train restarts the worker group, which
    resumes at step 2 and runs steps 3..6: the run ends after exactly `steps` steps counted from the
    checkpoint (the lost step 3 is redone once, nothing else repeats, nothing is missing)."""
    sched = DPSGDSchedule(sigma=1.0, q=0.2, steps=6, clip=0.7, n_records=N, lr=0.1, checkpoint_every=2)
    hook = CrashOnceAfter(str(tmp_path / "steps.log"), str(tmp_path / "crashed"), at=3)
    images, labels = _data()
    state = fit_dp_sgd(CountingZeroGradient(str(tmp_path)), None, images, labels, sched,
                       PrivacyRandomness.reproducible(3), num_workers=2, executor="ray-train",
                       storage_path=tmp_path / "train", run_name="crash", max_failures=1, on_step=hook)
    assert (tmp_path / "crashed").exists()
    attempts: dict[tuple[int, int], list[int]] = defaultdict(list)  # (pid, rank) -> steps, in order
    for line in (tmp_path / "steps.log").read_text().splitlines():
        pid, rank, step = map(int, line.split())
        attempts[(pid, rank)].append(step)
    rank0 = [steps for (_, rank), steps in attempts.items() if rank == 0]
    assert rank0 == [[1, 2, 3], [3, 4, 5, 6]], attempts
    assert sorted(steps for (_, rank), steps in attempts.items() if rank == 1)[-1] == [3, 4, 5, 6]
    assert set(state) == {"weight", "bias"}


def test_shards_partition_the_records():
    """The driver's shards are disjoint, cover every record, and are balanced (a private permutation cut in
    contiguous pieces)."""
    pieces = shard_indices(10, 3, PrivacyRandomness.reproducible(0))
    assert sorted(torch.cat(pieces).tolist()) == list(range(10))
    assert [len(p) for p in pieces] == [4, 3, 3]
