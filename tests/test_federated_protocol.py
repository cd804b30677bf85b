"""SFDD's protocol on a local Ray cluster (digits): FedAvg aggregation, actor death, determinism in the debugging
mode, secret client randomness in the actors, 100 clients."""

from __future__ import annotations

import logging

import pytest
import torch

from dpdistill import data
from dpdistill.federated import (
    ClientContext,
    ClientTask,
    FedAvg,
    LocalPool,
    SFDDConfig,
    initial_set,
    local_update,
    run_sfdd,
)
from dpdistill.privacy.noise import PrivacyRandomness

ray = pytest.importorskip("ray")

INFO = data.get("digits").info
TINY = dict(ipc=1, outer_loop=2, inner_loop=1, net_width=8, net_depth=2, batch_real=16, batch_train=16)
DEBUG = PrivacyRandomness.reproducible(3)  # the NOT PRIVATE debugging source: clients' draws repeat exactly


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def train():
    return data.load("digits", "train")


def setup(train, **overrides):
    cfg = SFDDConfig(**{**TINY, "n_clients": 4, "rounds": 2, **overrides})
    part = data.partition.iid(train.labels, cfg.n_clients, seed=0, images=train.images)
    init = initial_set(cfg, 10, (1, 8, 8), seed=0, mean=INFO.mean, std=INFO.std)
    return cfg, part, ClientContext(cfg, INFO.mean, INFO.std), init


def actor_pool(train, part, ctx, size, noise=None):
    from dpdistill.runtime.client_pool import ActorPool

    # Half a CPU each, so a second pool fits beside the shared one on the 2-CPU cluster (else its actors
    # would wait for CPUs forever).
    return ActorPool(train, part, ctx, size=size, actor_cpus=0.5, noise=noise)


@pytest.fixture(scope="module")
def pool2(train):
    """Two actors over the 4-client partition, shared by the tests (starting actors is the slow part)."""
    _, part, ctx, _ = setup(train)
    pool = actor_pool(train, part, ctx, 2, noise=DEBUG)
    yield pool
    pool.shutdown()


class Recording(FedAvg):
    """FedAvg that keeps what it was given and what it returned, for the test to check."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def aggregate(self, round, current, labels, updates):
        out = super().aggregate(round, current, labels, updates)
        self.calls.append(([(u.client_id, u.n_samples, u.images.clone()) for u in updates], out.clone()))
        return out


def test_debug_noise_gives_the_same_set_whatever_the_pool_size_and_aggregate_is_the_weighted_mean(train, pool2):
    # digits' 1294 records over 4 clients by keyed hash: sizes differ, so size weights differ.
    cfg, part, ctx, init = setup(train)
    local = LocalPool(train, part, ctx, num_threads=1, noise=DEBUG)
    reference = run_sfdd(local, init, cfg, seed=3).synthetic.images.detach()
    results = {}
    pool1 = actor_pool(train, part, ctx, 1, noise=DEBUG)
    try:
        results[1] = run_sfdd(pool1, init, cfg, seed=3).synthetic.images.detach()
    finally:
        pool1.shutdown()
    pool2.ctx = ctx
    strategy = Recording(cfg.fraction, cfg.min_clients, "size")
    results[2] = run_sfdd(pool2, init, cfg, seed=3, strategy=strategy).synthetic.images.detach()
    assert torch.equal(results[1], results[2])
    assert torch.equal(results[1], reference)
    other_noise = PrivacyRandomness.reproducible(4)
    other = run_sfdd(LocalPool(train, part, ctx, num_threads=1, noise=other_noise), init, cfg, seed=3)
    assert not torch.equal(other.synthetic.images.detach(), reference)

    # The aggregate of each round is the size-weighted mean of the sets the clients returned.
    assert len(strategy.calls) == cfg.rounds
    for answers, out in strategy.calls:
        assert sorted(c for c, _, _ in answers) == [0, 1, 2, 3]
        sizes = torch.tensor([n for _, n, _ in answers], dtype=torch.float64)
        assert len(set(sizes.tolist())) > 1
        stack = torch.stack([im.double() for _, _, im in answers])
        expected = (stack * (sizes / sizes.sum()).reshape(-1, 1, 1, 1, 1)).sum(0).float()
        assert torch.allclose(out, expected, atol=1e-6)
        assert not torch.allclose(out, stack.mean(0).float(), atol=1e-6)  # weights matter, not a plain mean


def test_killing_an_actor_mid_round_drops_its_clients_and_the_run_completes(train, pool2, caplog):
    cfg, part, ctx, init = setup(train, rounds=2, min_clients=1)
    pool2.ctx = ctx
    replaced = pool2.replaced

    def kill_in_round_one(p, tasks):
        if tasks[0].round == 1 and tasks[0].attempt == 0:
            ray.kill(p.actors[0])

    with caplog.at_level(logging.WARNING, logger="dpdistill.federated"):
        result = run_sfdd(pool2, init, cfg, seed=0, on_dispatch=kill_in_round_one)
    assert len(result.history) == 2
    r0, r1 = result.history
    assert r0.answered == [0, 1, 2, 3] and not r0.dropped
    assert sorted(r1.dropped) == [0, 2] and r1.answered == [1, 3]  # actor 0 serves the even clients
    assert all("died" in reason for reason in r1.dropped.values())
    assert pool2.replaced == replaced + 1  # a fresh actor takes its place (it answers in the retry test)
    assert any("dropped" in rec.getMessage() and "client 0" in rec.getMessage() for rec in caplog.records)
    assert torch.isfinite(result.synthetic.images).all()


def test_a_round_below_min_clients_is_retried(train, pool2, caplog):
    cfg, part, ctx, init = setup(train, rounds=1, min_clients=4)
    pool2.ctx = ctx

    def kill_first_attempt(p, tasks):
        if tasks[0].attempt == 0:
            ray.kill(p.actors[1])

    with caplog.at_level(logging.WARNING, logger="dpdistill.federated"):
        result = run_sfdd(pool2, init, cfg, seed=0, on_dispatch=kill_first_attempt)
    (record,) = result.history
    assert record.attempts == 2 and record.answered == [0, 1, 2, 3]
    assert result.dispatches == {0: 2, 1: 2, 2: 2, 3: 2}
    assert any("retrying" in rec.getMessage() for rec in caplog.records)


def test_a_secret_actor_answers_with_noise_no_server_replay_reproduces(train):
    """Each actor makes its own secret randomness: the same task twice, or the server's replay of it on the
    client's own data, differ from the client's answer by about the noise (old code: bit-identical)."""
    sigma = 0.5  # noise std sigma x clip per coordinate, clip 1
    cfg, part, ctx, init = setup(train, defence="localdp", localdp_sigma=sigma, localdp_clip=1.0, rounds=1)
    pool = actor_pool(train, part, ctx, 1)  # no source given: the actor creates a secret one
    task, state = ClientTask(client_id=0, round=0), init.state_dict()
    try:
        first, second = ray.get([pool.actors[0].run.remote(task, state, ctx) for _ in range(2)])
    finally:
        pool.shutdown()
    replay = local_update(LocalPool(train, part, ctx).client_data(0), state, task, ctx)
    for other in (second.images, replay.images):
        residual = first.images - other
        # Two independent noise draws: std sqrt(2) x 0.5 = 0.71 (the clipped updates are at most 1 in norm).
        assert 0.6 < float(residual.std()) < 0.8


def test_hundred_clients_run_on_two_actors(train):
    cfg, part, ctx, init = setup(train, n_clients=100, rounds=1, outer_loop=1, inner_loop=0)
    pool = actor_pool(train, part, ctx, 2)
    seen = []

    class Spy(FedAvg):
        def aggregate(self, round, current, labels, updates):
            seen.extend(updates)
            return super().aggregate(round, current, labels, updates)

    try:
        result = run_sfdd(pool, init, cfg, seed=0, strategy=Spy())
        held = ray.get([a.cached_clients.remote() for a in pool.actors])
    finally:
        pool.shutdown()
    assert pool.size == 2 and len(pool.actors) == 0
    assert result.history[0].answered == list(range(100))
    workers = {u.worker for u in seen}
    assert len(workers) == 2  # every client ran on one of the two actors
    assert sorted(held[0] + held[1]) == list(range(100)) and held[0] == list(range(0, 100, 2))
