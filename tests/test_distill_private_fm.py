"""DP feature matching's privacy pieces: clipping bounds the sensitivity, per-class Poisson rates, the charge."""

from __future__ import annotations

import pytest
import torch

from dpdistill import data, models
from dpdistill.distill.loop import require_ledger
from dpdistill.distill.private_matching import check_per_record_network, feature_matching_mechanism
from dpdistill.distill.synthetic import private_normalizer
from dpdistill.errors import BudgetExceeded, PrivacyError, SpecError
from dpdistill.privacy import Parallel, PoissonGaussian, PrivacyLedger, epsilon
from dpdistill.privacy.dp_ops import (
    PoissonClassSampler,
    clip_rows,
    clipped_sum,
    noisy_mean,
    sigma_for_share,
    solve_free_sigma,
)
from dpdistill.privacy.noise import PrivacyRandomness


@pytest.fixture(scope="module")
def digits_train() -> data.ImageSet:
    return data.load("digits", "train")


def test_clip_rows_caps_every_norm_and_keeps_short_rows() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 16, generator=g) * torch.linspace(0.01, 10, 50).unsqueeze(1)
    clipped = clip_rows(f, 1.5)
    norms = clipped.norm(dim=1)
    assert float(norms.max()) <= 1.5 + 1e-5
    short = f.norm(dim=1) <= 1.5
    assert short.any() and torch.allclose(clipped[short], f[short])
    # Long rows keep their direction.
    long = ~short
    cos = torch.nn.functional.cosine_similarity(clipped[long], f[long], dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


@pytest.mark.parametrize("clip", [0.1, 1.0, 5.0])
def test_one_record_moves_the_noiseless_class_sum_by_at_most_c(digits_train, clip: float) -> None:
    """Add-or-remove-one: the per-class clipped sum of embeddings changes by at most C, whatever the record."""
    torch.manual_seed(0)
    # No normalisation layer: the embedding grows with the input, so an outlier really is large.
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=16, norm="none")
    idx = digits_train.per_class_indices()[3][:40]
    x = (digits_train.images[idx] - 0.3) / 0.37
    # An adversarial extra record: huge pixel values, so its embedding is far outside the clip ball.
    x_extra = torch.cat([x, 1000 * torch.ones(1, 1, 8, 8)])
    with torch.no_grad():
        base = clipped_sum(net.embed(x), clip)
        for neighbour in (x[1:], x_extra, torch.cat([x[:7], x[8:]])):
            moved = (clipped_sum(net.embed(neighbour), clip) - base).norm()
            assert float(moved) <= clip * (1 + 1e-5)
        # Without clipping the extra record moves the sum far more: the test can fail.
        raw = (net.embed(x_extra).sum(0) - net.embed(x).sum(0)).norm()
        assert float(raw) > 2 * clip


def test_poisson_sampler_rates_and_batch_sizes(digits_train) -> None:
    sampler = PoissonClassSampler(digits_train, 32)
    counts = digits_train.class_counts().tolist()
    assert sampler.rates == pytest.approx([32 / n for n in counts])
    assert sampler.max_rate == pytest.approx(32 / min(counts))
    assert sampler.expected_size(0) == pytest.approx(32.0)
    noise = PrivacyRandomness.secret()
    sizes = torch.tensor([len(sampler.sample(2, noise)) for _ in range(300)], dtype=torch.float32)
    assert 30 < float(sizes.mean()) < 34 and float(sizes.std()) > 1  # random sizes, not a fixed batch
    # A class smaller than the batch is taken whole (q = 1).
    assert PoissonClassSampler(digits_train, 10_000).max_rate == 1.0


def test_noisy_mean_has_the_stated_noise() -> None:
    total = torch.zeros(20_000)
    out = noisy_mean(total, clip=2.0, sigma=3.0, expected=4.0, noise=PrivacyRandomness.secret())
    assert float(out.std()) == pytest.approx(2.0 * 3.0 / 4.0, rel=0.03)
    with pytest.raises(PrivacyError, match="noise std"):  # no noise is refused, never released
        noisy_mean(total, clip=2.0, sigma=0.0, expected=4.0, noise=PrivacyRandomness.secret())


def test_mechanism_is_parallel_over_classes_and_costs_one_class() -> None:
    mech = feature_matching_mechanism(0.05, 2.0, 100, 10)
    assert isinstance(mech, Parallel) and mech.partitions == 10 and "label" in mech.argument
    assert epsilon(mech, 1e-5) == pytest.approx(epsilon(PoissonGaussian(0.05, 2.0, 100), 1e-5), rel=1e-9)


def test_batch_norm_in_training_mode_is_refused() -> None:
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, norm="batch")
    with pytest.raises(SpecError, match="batch norm"):
        check_per_record_network(net.train(), "test")
    check_per_record_network(net.eval(), "test")  # frozen statistics do not mix records
    check_per_record_network(models.get("convnet", channels=1, num_classes=10, image_size=8, width=8), "test")
    for m in net.modules():  # without running statistics even an eval-mode batch norm uses the batch's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():  # the premise: one record's output depends on the others in its batch
        assert not torch.allclose(net.eval()(x)[:1], net(x[:1]), atol=1e-4)
    with pytest.raises(SpecError, match="batch norm"):
        check_per_record_network(net.eval(), "test")


def test_private_normaliser_never_reads_the_data() -> None:
    n = private_normalizer(None, None, 3, "cpu")
    assert n.mean.flatten().tolist() == [0.5] * 3 and n.std.flatten().tolist() == [0.5] * 3
    assert private_normalizer([0.1], [0.2], 1, "cpu").mean.item() == pytest.approx(0.1)


def test_solve_free_sigma_fills_the_budget() -> None:
    ledger = PrivacyLedger(None, 2.0, 1e-5)
    ledger.charge("first", PoissonGaussian(0.01, 1.5, 200))
    make = lambda s: feature_matching_mechanism(0.04, s, 300, 10)  # noqa: E731
    sigma = solve_free_sigma(ledger, make)
    total = ledger.charge("free", make(sigma))
    assert total == pytest.approx(2.0, rel=0.01) and total <= 2.0 * (1 + 1e-9)
    with pytest.raises(BudgetExceeded):
        ledger.charge("more", PoissonGaussian(0.1, 1.0, 100))


def test_sigma_for_share_calibrates_alone() -> None:
    make = lambda s: PoissonGaussian(0.02, s, 500)  # noqa: E731
    sigma = sigma_for_share(make, 0.5, 1e-5)
    assert epsilon(make(sigma), 1e-5) == pytest.approx(0.5, rel=0.01)


def test_private_methods_need_a_ledger() -> None:
    with pytest.raises(PrivacyError, match="ledger"):
        require_ledger(None, "ndpdc")
