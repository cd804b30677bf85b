"""SFDD's attacks on `digits`, in-process: DLG/iDLG reconstruction MSE with and without LDPO-RLD, the LocalDP
grid search against a real attack, and Doorping's attack success rate."""

from __future__ import annotations

import math

import pytest
import torch

from dpdistill import data
from dpdistill.federated import (
    ClientContext,
    LocalPool,
    SFDDConfig,
    grid_search_localdp,
    initial_set,
    ldpo_rld_soft_labels,
    run_sfdd,
)
from dpdistill.federated.attacks import (
    attack_records,
    attack_success_rate,
    evaluate_backdoor,
    idlg_label,
    observed_gradient,
    reconstruction_mse,
    stamp,
)
from dpdistill.federated.attacks.dlg import attack_net
from dpdistill.federated.attacks.doorping import DoorpingClient
from dpdistill.privacy.noise import PrivacyRandomness

INFO = data.get("digits").info


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train():
    return data.load("digits", "train")


@pytest.fixture(scope="module")
def test_split():
    return data.load("digits", "test")


def _attack(train, method, **kw):
    # The sigmoid ConvNet without pooling: DLG's attacker-friendly victim, and fast on 8x8 images.
    return attack_records(train.images[:2], train.labels[:2], num_classes=10, mean=INFO.mean, std=INFO.std,
                          method=method, model="convnet", iterations=20, seed=0, **kw)


@pytest.mark.parametrize("method", ["dlg", "idlg"])
def test_inversion_recovers_an_undefended_record_and_ldpo_rld_defeats_it(train, method):
    plain = _attack(train, method)
    assert plain.mse < 0.01 and plain.label_accuracy == 1.0  # the undefended record comes back
    assert len(plain.per_record) == 2 and plain.seconds > 0

    def soft(y, g):
        return ldpo_rld_soft_labels(y, 10, 0.3, 3, g)

    defended = _attack(train, method, label_fn=soft)
    assert math.isfinite(defended.mse)
    assert defended.mse > 0.3 and defended.mse > 30 * plain.mse


def test_idlg_reads_the_true_label_off_the_last_layer(train):
    net = attack_net("lenet", 1, 10, 8, seed=0)
    normalise = (train.images[:10] - INFO.mean[0]) / INFO.std[0]
    for x, y in zip(normalise, train.labels[:10], strict=True):
        grads = observed_gradient(net, x[None], y[None])
        assert idlg_label(grads) == int(y)


def test_reconstruction_mse_matches_records_before_comparing():
    truth = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    assert reconstruction_mse(truth.flip(0), truth) == 0.0  # order of reconstructions does not matter
    assert reconstruction_mse(truth[:1] + 0.5, truth[:1]) == pytest.approx(0.25)


def test_localdp_grid_search_against_a_real_attack(train):
    def attack_mse(ldp):
        return _attack(train, "idlg", protect=ldp.privatise).mse

    # A clip far above the gradient's norm and almost no noise leave the records exposed (a tight clip alone
    # rescales the gradient, which already throws this attack off); noise std 1000 does not.
    found = grid_search_localdp(attack_mse, sigmas=[1.0, 1e-9], clips=[1e3], threshold=0.5)
    assert found.found and found.sigma == 1.0 and found.clip == 1e3
    assert found.tried[0]["sigma"] == 1e-9 and found.tried[0]["mse"] < 0.05 and not found.tried[0]["meets"]


# --------------------------------------------------------------------------------------------- Doorping


def test_stamp_and_poison_touch_only_the_corner_and_the_target_class(train):
    trigger = torch.full((1, 3, 3), 0.5)
    x = train.images[:4]
    out = stamp(x, trigger)
    assert torch.equal(out[..., -3:, -3:], trigger.expand(4, 1, 3, 3))
    assert torch.equal(out[..., :-3, :], x[..., :-3, :]) and torch.equal(out[..., :, :-3], x[..., :, :-3])
    cfg = SFDDConfig(attack="doorping", target_class=0, trigger_size=3, poison_fraction=0.25)
    client = DoorpingClient(trigger, cfg, train)
    batch = train.images[train.labels == 0][:8]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(client.poison(1, train.images[train.labels == 1][:8], g), train.images[train.labels == 1][:8])
    poisoned = client.poison(0, batch, g)
    assert torch.equal(poisoned[:6], batch[:6])  # ceil(0.25 x 8) = 2 replaced, at the end
    assert torch.equal(poisoned[6:, :, -3:, -3:], trigger.expand(2, 1, 3, 3))


def test_attack_success_rate_counts_stamped_non_target_images_sent_to_the_target(test_split):
    class Constant(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), self.c), 10).float()

    trigger = torch.ones(1, 2, 2)
    kw = dict(mean=INFO.mean, std=INFO.std)
    assert attack_success_rate(Constant(3), test_split.images, test_split.labels, trigger, 3, **kw) == 1.0
    assert attack_success_rate(Constant(4), test_split.images, test_split.labels, trigger, 3, **kw) == 0.0
    assert attack_success_rate(Constant(3), test_split.images, test_split.labels, None, 3, **kw) == 1.0

    lit = (0.99 - INFO.mean[0]) / INFO.std[0]  # a pixel of 1.0 after normalisation

    class CornerDetector(torch.nn.Module):  # class 3 only when the bottom-right pixel is lit
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.where(x[:, 0, -1, -1] > lit, 3, 4), 10).float()

    assert attack_success_rate(CornerDetector(), test_split.images, test_split.labels, trigger, 3, **kw) == 1.0
    assert attack_success_rate(CornerDetector(), test_split.images, test_split.labels, None, 3, **kw) == 0.0


def test_doorping_client_plants_a_backdoor_that_a_clean_run_does_not_have(train, test_split):
    # At this scale (8x8 digits, 2 images per class, 6 rounds) the backdoor's strength depends on the client's
    # random stream: over four debugging streams the success rate ranged 0.10-0.37 against 0-0.05 clean, and
    # the former setting (3 px trigger, half the batch poisoned) reached 0.31 on one stream and ~0.05 on three.
    # So the test fixes the client's stream (reproducible source: a debugging mode) and poisons the whole
    # target batch with a 4 px trigger.
    common = dict(ipc=2, outer_loop=4, inner_loop=2, net_width=16, net_depth=2, batch_real=32, batch_train=32,
                  n_clients=1, rounds=6, trigger_size=4, poison_fraction=1.0)
    results = {}
    for attack in ("doorping", "none"):
        cfg = SFDDConfig(**common, attack=attack, malicious_clients=1)
        part = data.partition.iid(train.labels, 1, seed=0, images=train.images)
        init = initial_set(cfg, 10, (1, 8, 8), 0, mean=INFO.mean, std=INFO.std)
        pool = LocalPool(train, part, ClientContext(cfg, INFO.mean, INFO.std), noise=PrivacyRandomness.reproducible(3))
        results[attack] = run_sfdd(pool, init, cfg)
    attacked, clean = results["doorping"], results["none"]
    assert attacked.malicious == [0] and clean.malicious == [] and not clean.client_states
    trigger = attacked.client_states[0]["trigger"]
    assert trigger.shape == (1, 4, 4) and ((trigger >= 0) & (trigger <= 1)).all()
    kw = dict(num_classes=10, mean=INFO.mean, std=INFO.std, model="convnet", model_kwargs={"width": 16, "depth": 2},
              epochs=60, seed=0)
    on_attacked = evaluate_backdoor(*attacked.synthetic.export(), test_split, trigger, 0, **kw)
    on_clean = evaluate_backdoor(*clean.synthetic.export(), test_split, trigger, 0, **kw)
    assert 0 <= on_clean["asr"] <= 1 and on_attacked["clean_acc"] > 0.5
    assert 0 <= on_attacked["target_rate_unstamped"] <= 1
    assert on_attacked["asr"] > on_clean["asr"] + 0.1
