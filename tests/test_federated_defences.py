"""SFDD's defences and server strategy without Ray: LDPO-RLD soft labels, LocalDP (clip, noise, ledger), the
(σ, C) grid search, FedAvg weighting, and the config checks."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from dpdistill import data
from dpdistill.federated import (
    ClientContext,
    ClientUpdate,
    FedAvg,
    LocalDP,
    LocalPool,
    SFDDConfig,
    client_epsilons,
    grid_search_localdp,
    initial_set,
    ldpo_rld_soft_labels,
    run_sfdd,
)
from dpdistill.privacy.accountant import epsilon
from dpdistill.privacy.ledger import PrivacyLedger
from dpdistill.privacy.mechanisms import Gaussian
from dpdistill.privacy.noise import PrivacyRandomness

INFO = data.get("digits").info


# --------------------------------------------------------------------------------------------- LDPO-RLD


@pytest.mark.parametrize("alpha,k", [(0.3, 3), (0.5, 1), (0.9, 9), (0.2, 20)])
def test_ldpo_rld_rows_sum_to_one_with_one_minus_alpha_on_the_true_class(alpha, k):
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    soft = ldpo_rld_soft_labels(labels, 10, alpha, k, torch.Generator().manual_seed(1))
    assert soft.shape == (500, 10)
    assert torch.allclose(soft.sum(1), torch.ones(500), atol=1e-6)
    assert torch.allclose(soft[torch.arange(500), labels], torch.full((500,), 1 - alpha), atol=1e-7)
    kk = min(k, 9)
    others = soft.clone()
    others[torch.arange(500), labels] = 0
    assert ((others > 0).sum(1) == kk).all()  # exactly k other classes get mass
    # Linearly decreasing weights alpha * (k, k-1, ..., 1) / (k (k+1) / 2).
    expected = torch.arange(kk, 0, -1, dtype=torch.float32) / (kk * (kk + 1) / 2) * alpha
    assert torch.allclose(others.sort(dim=1, descending=True).values[:, :kk], expected.expand(500, kk), atol=1e-6)


def test_ldpo_rld_picks_other_classes_at_random():
    labels = torch.zeros(2000, dtype=torch.int64)
    soft = ldpo_rld_soft_labels(labels, 10, 0.3, 1, torch.Generator().manual_seed(0))
    chosen = soft[:, 1:].argmax(1) + 1
    counts = torch.bincount(chosen, minlength=10)[1:]
    assert counts.min() > 150 and counts.max() < 300  # ~222 each of 9 classes
    again = ldpo_rld_soft_labels(labels, 10, 0.3, 1, torch.Generator().manual_seed(0))
    assert torch.equal(soft, again)


# ------------------------------------------------------------------------------------------------ LocalDP


def test_localdp_clips_then_adds_noise_of_std_sigma_c():
    ldp = LocalDP(sigma=0.5, clip=2.0)
    big = torch.full((100_000,), 1.0)  # norm 316
    out = ldp.privatise(big, PrivacyRandomness.secret())
    noise = out - big * (2.0 / big.norm())
    assert abs(float(noise.std()) - 1.0) < 0.01  # sigma * clip
    assert not torch.equal(out, ldp.privatise(big))  # the default source is secret: fresh noise every call
    small = torch.full((4,), 0.01)
    zero_noise = LocalDP(1e-9, 2.0).privatise(small)
    assert torch.allclose(zero_noise, small, atol=1e-6)  # within the ball: not rescaled
    debug = PrivacyRandomness.reproducible(5)
    assert torch.equal(ldp.privatise(big, debug.spawn("a")), ldp.privatise(big, debug.spawn("a")))
    assert ldp.mechanism() == Gaussian(sigma=1.0, sensitivity=4.0)  # sensitivity 2C (see defences.py)


def test_grid_search_returns_the_least_noise_meeting_the_threshold():
    calls = []

    def attack(ldp):  # a stand-in attack whose MSE grows with the noise std
        calls.append((ldp.sigma, ldp.clip))
        return ldp.sigma * ldp.clip

    found = grid_search_localdp(attack, sigmas=[2.0, 0.5, 1.0], clips=[1.0, 4.0], threshold=1.9)
    assert (found.sigma, found.clip, found.mse) == (0.5, 4.0, 2.0)
    assert calls == [(0.5, 4.0)]
    found = grid_search_localdp(attack, sigmas=[0.5, 1.0, 2.0], clips=[1.0], threshold=1.5)
    assert (found.sigma, found.clip) == (2.0, 1.0) and [t["meets"] for t in found.tried] == [False, False, True]
    assert not grid_search_localdp(attack, [0.1], [1.0], threshold=5).found


# --------------------------------------------------------------------------------------------- FedAvg


def _update(cid, value, n, counts=None):
    images = torch.full((4, 1, 2, 2), float(value))
    return ClientUpdate(cid, 0, images, n, counts or [n // 2, n - n // 2], 0.0, 0.0)


def test_fedavg_weights_by_size_class_or_uniformly_and_ignores_arrival_order():
    labels = torch.tensor([0, 0, 1, 1])
    current = torch.zeros(4, 1, 2, 2)
    ups = [_update(2, 3.0, 30, [30, 0]), _update(0, 1.0, 10, [5, 5])]
    size = FedAvg(weighting="size").aggregate(0, current, labels, ups)
    assert torch.allclose(size, torch.full_like(size, (1 * 10 + 3 * 30) / 40))
    assert torch.equal(size, FedAvg(weighting="size").aggregate(0, current, labels, ups[::-1]))
    uniform = FedAvg(weighting="uniform").aggregate(0, current, labels, ups)
    assert torch.allclose(uniform, torch.full_like(uniform, 2.0))
    per_class = FedAvg(weighting="class").aggregate(0, current, labels, ups)
    assert torch.allclose(per_class[:2], torch.full((2, 1, 2, 2), (5 * 1 + 30 * 3) / 35))
    assert torch.allclose(per_class[2:], torch.full((2, 1, 2, 2), 1.0))  # client 2 has no class 1


def test_fedavgm_keeps_a_velocity_of_the_aggregate_change_and_is_fedavg_without_momentum():
    labels = torch.tensor([0, 0, 1, 1])
    ups = lambda v: [_update(0, v, 10), _update(1, v, 10)]  # noqa: E731 - both clients answer v
    x0 = torch.zeros(4, 1, 2, 2)
    plain = FedAvg(server_momentum=0.0, server_lr=1.0)
    assert torch.equal(plain.aggregate(0, x0, labels, ups(1.0)), FedAvg().aggregate(0, x0, labels, ups(1.0)))
    assert plain.velocity is None
    m = FedAvg(server_momentum=0.5)
    x1 = m.aggregate(0, x0, labels, ups(1.0))  # Δ = 1, v = 1
    assert torch.allclose(x1, torch.full_like(x1, 1.0))
    x2 = m.aggregate(1, x1, labels, ups(2.0))  # Δ = 1, v = 0.5·1 + 1 = 1.5 -> 2.5 (plain FedAvg: 2.0)
    assert torch.allclose(x2, torch.full_like(x2, 2.5))
    half = FedAvg(server_lr=0.5)
    assert torch.allclose(half.aggregate(0, x0, labels, ups(1.0)), torch.full_like(x0, 0.5))
    for bad in (dict(server_momentum=1.0), dict(server_momentum=-0.1), dict(server_lr=0.0)):
        with pytest.raises(ValueError, match="server_"):
            FedAvg(**bad)


def test_server_momentum_from_the_config_reaches_the_run():
    """Round 1 is plain FedAvg either way (v = Δ); from round 2 on the velocity carries the earlier change."""
    train = data.load("digits", "train")
    part = data.partition.iid(train.labels, 2, seed=0, images=train.images)
    sets = {}
    for beta in (0.0, 0.5):
        cfg = SFDDConfig(n_clients=2, rounds=2, ipc=1, outer_loop=1, inner_loop=0, net_width=8, net_depth=1,
                         batch_real=8, server_momentum=beta, clamp=False)
        init = initial_set(cfg, 10, (1, 8, 8), 0, mean=INFO.mean, std=INFO.std)
        sets[beta] = seen = []
        # The same client draws in both runs (debugging source), so only the server's momentum differs.
        pool = LocalPool(train, part, ClientContext(cfg, INFO.mean, INFO.std), noise=PrivacyRandomness.reproducible(1))
        run_sfdd(pool, init, cfg,
                 callback=lambda rec, syn, seen=seen: seen.append(syn.images.detach().clone()))
    assert torch.equal(sets[0.0][0], sets[0.5][0])
    assert not torch.allclose(sets[0.0][1], sets[0.5][1])


def test_fedavg_samples_a_fraction_and_at_least_min_clients():
    g = torch.Generator().manual_seed(0)
    picked = FedAvg(fraction=0.1, min_clients=1).configure(0, 100, g)
    assert len(picked) == 10 and picked == sorted(set(picked))
    assert len(FedAvg(fraction=0.1, min_clients=3).configure(0, 10, g)) == 3
    assert FedAvg(fraction=1.0).configure(0, 5, g) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------- LocalDP end to end


def test_localdp_run_charges_the_ledger_before_each_round_and_reports_per_client_epsilon(tmp_path):
    train = data.load("digits", "train")
    cfg = SFDDConfig(n_clients=4, rounds=2, fraction=0.5, ipc=1, outer_loop=1, inner_loop=0, net_width=8,
                     net_depth=1, batch_real=8, defence="localdp", localdp_sigma=2.0, localdp_clip=0.5)
    assert cfg.aggregation_weighting == "uniform"
    part = data.partition.iid(train.labels, 4, seed=0, images=train.images)
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=50.0, delta=1e-4)
    charged_before = []

    class Watch(LocalPool):
        def run_round(self, tasks, syn_state, on_dispatch=None):
            charged_before.append(len(ledger.entries))
            return super().run_round(tasks, syn_state, on_dispatch)

    init = initial_set(cfg, 10, (1, 8, 8), 0, mean=INFO.mean, std=INFO.std)
    result = run_sfdd(Watch(train, part, ClientContext(cfg, INFO.mean, INFO.std)), init, cfg, ledger=ledger)
    assert charged_before == [1, 2]  # the charge is on disk before the clients run
    # Nothing un-noised leaves a client: no loss, time, size or class counts in what the server records.
    assert all(math.isnan(r.loss) and "local_loss" not in r.metrics() for r in result.history)
    assert all(math.isnan(r.client_seconds) and "client_seconds" not in r.metrics() for r in result.history)
    assert all({"loss", "client_seconds"}.isdisjoint(r.to_json()) for r in result.history)
    assert [e["component"] for e in ledger.entries] == ["localdp", "localdp"]
    assert ledger.entries[0]["mechanism"]["type"] == "parallel" and ledger.entries[0]["mechanism"]["partitions"] == 2
    two_rounds = epsilon(Gaussian(1.0, 1.0, count=2), 1e-4)
    assert math.isclose(ledger.spent_epsilon(), two_rounds, rel_tol=1e-3)  # rounds compose, clients do not
    eps = client_epsilons(result.dispatches, LocalDP(2.0, 0.5), 1e-4)
    assert sum(result.dispatches.values()) == 4
    assert max(eps.values()) <= ledger.spent_epsilon() * (1 + 1e-6)
    once = epsilon(Gaussian(1.0, 1.0), 1e-4)
    assert all(math.isclose(eps[c], once if n == 1 else two_rounds, rel_tol=1e-3) for c, n in result.dispatches.items())


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("options,message", [
    ({"rounds": 3, "local_steps": 2, "iterations": 5}, "rounds x local_steps = 6"),
    ({"defence": "localdp", "weighting": "size"}, "uniform"),
    ({"net_norm": "batch"}, "batch norm"),
    ({"n_clients": 2, "min_clients": 3}, "min_clients"),
    ({"init": "public"}, "public_data"),
    ({"defence": "secure"}, "defence"),
])
def test_config_refuses_inconsistent_options(options, message):
    with pytest.raises(ValidationError, match=message):
        SFDDConfig(**options)


def test_iterations_is_rounds_times_local_steps():
    cfg = SFDDConfig(rounds=7, local_steps=3)
    assert cfg.iterations == 21
    assert SFDDConfig(**cfg.model_dump()).iterations == 21  # a resolved spec loads again
