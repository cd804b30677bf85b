"""NDPDC and PSG on digits with tiny settings: they run, charge the ledger once and up to its budget, and clip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpdistill import data, distill, models
from dpdistill.distill.ndpdc import NDPDCConfig, run_ndpdc
from dpdistill.distill.psg import PSGConfig, clipped_gradient_sum, per_sample_gradients, run_psg
from dpdistill.errors import BudgetExceeded, PrivacyError, SpecError
from dpdistill.privacy import PrivacyLedger

MEAN, STD = [0.3053], [0.3760]


@pytest.fixture(scope="module")
def digits_train() -> data.ImageSet:
    return data.load("digits", "train")


def _ledger(n: int, eps: float = 2.0) -> PrivacyLedger:
    return PrivacyLedger(None, eps, 1e-4, n_records=n)


def test_ndpdc_runs_and_spends_exactly_its_budget(digits_train) -> None:
    ledger = _ledger(len(digits_train))
    losses: list[float] = []
    cfg = NDPDCConfig(ipc=2, iterations=6, net_width=16, batch_real=16)
    syn = run_ndpdc(digits_train, cfg, seed=0, ledger=ledger, mean=MEAN, std=STD, progress=False,
                    callback=lambda it, loss: losses.append(loss))
    images, labels = syn.export()
    assert images.shape == (20, 1, 8, 8) and labels.bincount().tolist() == [2] * 10
    assert float(images.min()) >= 0 and float(images.max()) <= 1 and len(losses) == 6
    entries = ledger.entries
    assert [e["component"] for e in entries] == ["ndpdc/feature_matching"]
    assert entries[0]["mechanism"]["type"] == "parallel"
    assert entries[0]["mechanism"]["mechanism"]["steps"] == 6
    assert ledger.spent_epsilon() == pytest.approx(2.0, rel=0.01)


def test_ndpdc_is_registered_private_and_refuses_leaky_options(digits_train) -> None:
    record = distill.get("ndpdc")
    assert record.private and record.config is NDPDCConfig
    with pytest.raises(SpecError, match="init"):
        record.make_config(init="real")
    with pytest.raises(SpecError, match="batch norm"):
        record.make_config(net_norm="batch")
    with pytest.raises(PrivacyError, match="ledger"):
        run_ndpdc(digits_train, NDPDCConfig(iterations=1), progress=False)


def test_a_fixed_sigma_that_overspends_is_refused_before_any_release(digits_train) -> None:
    ledger = _ledger(len(digits_train), eps=0.5)
    cfg = NDPDCConfig(ipc=1, iterations=50, net_width=8, batch_real=64, sigma=0.5)
    calls: list[int] = []
    with pytest.raises(BudgetExceeded):
        run_ndpdc(digits_train, cfg, ledger=ledger, progress=False, callback=lambda it, _: calls.append(it))
    assert ledger.entries == [] and calls == []


def test_per_sample_gradients_match_a_loop() -> None:
    torch.manual_seed(0)
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, depth=2)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    per = per_sample_gradients(net, x, y)
    for i in range(5):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        for g_vec, p in zip(per, net.parameters(), strict=True):
            assert torch.allclose(g_vec[i], p.grad, atol=1e-5)


def test_clipped_gradient_sum_bounds_one_records_effect() -> None:
    torch.manual_seed(0)
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, depth=2, norm="none")
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    clip = 0.3

    def flat(gs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.flatten() for g in gs])

    full = flat(clipped_gradient_sum(net, x, y, clip, chunk=5))
    for drop in range(12):
        keep = [i for i in range(12) if i != drop]
        assert float((flat(clipped_gradient_sum(net, x[keep], y[keep], clip)) - full).norm()) <= clip * (1 + 1e-4)


def test_psg_runs_and_spends_exactly_its_budget(digits_train) -> None:
    ledger = _ledger(len(digits_train))
    cfg = PSGConfig(ipc=1, iterations=2, outer_loop=2, inner_loop=1, net_width=8, net_depth=2, batch_real=8)
    syn = run_psg(digits_train, cfg, seed=0, ledger=ledger, mean=MEAN, std=STD, progress=False)
    images, labels = syn.export()
    assert images.shape == (10, 1, 8, 8) and float(images.max()) <= 1
    (entry,) = ledger.entries
    assert entry["component"] == "psg/gradient_matching" and entry["mechanism"]["mechanism"]["steps"] == 4
    assert ledger.spent_epsilon() == pytest.approx(2.0, rel=0.01)
    assert distill.get("psg").private


@pytest.mark.parametrize("method", ["ndpdc", "psg"])
def test_a_non_finite_pixel_is_refused_before_anything_is_charged(digits_train, method) -> None:
    from dpdistill.errors import DataError

    images = digits_train.images.clone()
    images[3, 0, 4, 4] = float("nan")
    broken = data.ImageSet(images, digits_train.labels, digits_train.num_classes, "digits")
    ledger = _ledger(len(broken))
    run, cfg = ((run_ndpdc, NDPDCConfig(ipc=1, iterations=2, net_width=8, batch_real=16)) if method == "ndpdc"
                else (run_psg, PSGConfig(ipc=1, iterations=2, net_width=8, batch_real=8)))
    with pytest.raises(DataError, match="non-finite pixel"):
        run(broken, cfg, seed=0, ledger=ledger, mean=MEAN, std=STD, progress=False)
    assert ledger.entries == []
