"""The shared DP building blocks (privacy/dp_ops.py, distill/private_matching.py): clipping bounds, noise draws, σ.

- Clipping: every record's clipped contribution has norm ≤ C (rows, one tensor, or a gradient spread over several
  tensors clipped jointly), so adding or removing one record moves a clipped sum by at most C.
- Noise: the private matchers draw exactly the Gaussian noise their ledger entry accounts for (counted through a
  PrivacyRandomness twin that logs every draw), each with std σC, and Poisson masks only from that source.
- σ: the one solver lands the ledger within SIGMA_REL_TOL below the target and never above, with or without
  earlier charges; a share's σ alone likewise; the synthesisers' and the distillers' σ come from that one solver.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dpdistill import data
from dpdistill.distill.ndpdc import NDPDCConfig, run_ndpdc
from dpdistill.distill.private_matching import charge_matching, feature_matching_mechanism
from dpdistill.distill.psg import PSGConfig, run_psg
from dpdistill.errors import PrivacyError
from dpdistill.federated.defences import LocalDP
from dpdistill.privacy import Gaussian, PoissonGaussian, PrivacyLedger, epsilon
from dpdistill.privacy.dp_ops import (
    SIGMA_REL_TOL,
    PoissonClassSampler,
    clip_rows,
    clip_tensor,
    clipped_per_example_sum,
    noisy_mean,
    sigma_for_share,
    solve_free_sigma,
)
from dpdistill.privacy.ledger import BUDGET_REL_TOL
from dpdistill.privacy.noise import REPRODUCIBLE, PrivacyRandomness
from dpdistill.synthesis.base import calibrate_for_ledger

DELTA = 1e-5


class CountingNoise(PrivacyRandomness):
    """A reproducible (NOT PRIVATE, test-only) privacy source that logs every Gaussian draw and Poisson mask."""

    def __init__(self, seed: int = 7) -> None:
        super().__init__(REPRODUCIBLE, seed)
        self.draws: list[tuple[tuple[int, ...], float]] = []
        self.masks = 0

    def gaussian(self, shape: Any, std: float, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.draws.append((tuple(shape), float(std)))
        return super().gaussian(shape, std, device, dtype)

    def poisson_mask(self, n: int, q: float) -> torch.Tensor:
        self.masks += 1
        return super().poisson_mask(n, q)


@pytest.fixture(scope="module")
def digits() -> data.ImageSet:
    return data.load("digits", "train")


# ------------------------------------------------------------------------------------------------ clipping


def test_per_example_clipping_bounds_each_records_joint_norm_and_its_effect_on_the_sum() -> None:
    g = torch.Generator().manual_seed(0)
    # Three "parameter tensors" per record, some records far outside the ball, some inside it.
    scales = torch.logspace(-2, 3, 12)
    per = [torch.randn(12, *shape, generator=g) * scales.view(-1, *[1] * len(shape)) for shape in [(4, 3), (5,), (2, 2, 2)]]
    clip = 1.5
    total = clipped_per_example_sum(per, clip)
    assert [t.shape for t in total] == [p.shape[1:] for p in per]
    for i in range(12):
        alone = clipped_per_example_sum([p[i:i + 1] for p in per], clip)
        norm = torch.sqrt(sum(t.pow(2).sum() for t in alone))
        assert float(norm) <= clip * (1 + 1e-5)  # the record's whole contribution, across every tensor
        without = clipped_per_example_sum([torch.cat([p[:i], p[i + 1:]]) for p in per], clip)
        moved = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(total, without, strict=True)))
        assert float(moved) <= clip * (1 + 1e-5)
    # A record already inside the ball is summed as it is (clipping only ever shrinks).
    small = [p[:1] for p in per]
    assert all(torch.allclose(a, b[0]) for a, b in zip(clipped_per_example_sum(small, clip), small, strict=True))
    # Control (the test can fail): clipping each tensor on its own lets one large record move the sum by ~√3·C.
    per_tensor = [clip_rows(p[-1:].reshape(1, -1), clip) for p in per]
    assert float(torch.sqrt(sum(t.pow(2).sum() for t in per_tensor))) > 1.5 * clip


def test_rows_and_single_tensors_are_clipped_to_the_ball() -> None:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(40, 8, generator=g) * torch.logspace(-2, 2, 40).unsqueeze(1)
    assert float(clip_rows(rows, 0.7).norm(dim=1).max()) <= 0.7 * (1 + 1e-6)
    big = torch.randn(3, 5, generator=g) * 100
    assert float(clip_tensor(big, 2.0).norm()) == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(clip_tensor(big / 1e4, 2.0), big / 1e4)


# ------------------------------------------------------------------------------------------------ noise


def test_noisy_mean_draws_once_with_std_sigma_c() -> None:
    noise = CountingNoise()
    out = noisy_mean(torch.zeros(30_000), clip=2.0, sigma=1.5, expected=3.0, noise=noise)
    assert noise.draws == [((30_000,), 3.0)]
    assert float(out.std()) == pytest.approx(1.0, rel=0.03)


def test_localdp_releases_the_clipped_update_with_one_draw() -> None:
    noise = CountingNoise()
    update = torch.full((10, 10), 5.0)
    released = LocalDP(sigma=0.5, clip=1.0).privatise(update, noise)
    assert noise.draws == [((10, 10), 0.5)]
    # The clipped update (norm 1) plus N(0, 0.25): far from the raw update (norm 50), i.e. it was clipped.
    assert float((released - update).norm()) > 40


@pytest.mark.parametrize("sigma", [None, 2.0])
def test_ndpdc_draws_one_noisy_class_mean_per_class_and_step(digits, sigma: float | None) -> None:
    cfg = NDPDCConfig(ipc=1, iterations=3, batch_real=16, net_width=8, net_depth=2, sigma=sigma, clip=0.8)
    ledger = PrivacyLedger(None, 2.0, DELTA)
    noise = CountingNoise()
    syn = run_ndpdc(digits, cfg, seed=0, ledger=ledger, noise=noise, progress=False)
    (entry,) = ledger.entries
    releases = cfg.iterations * digits.num_classes  # Parallel(PoissonGaussian(q, σ, T), k): k·T releases
    assert entry["mechanism"]["mechanism"]["steps"] == cfg.iterations
    assert len(noise.draws) == releases and noise.masks == releases
    assert [std for _, std in noise.draws] == pytest.approx([syn.sigma * cfg.clip] * len(noise.draws))


def test_psg_draws_one_noisy_gradient_per_tensor_class_and_step(digits) -> None:
    cfg = PSGConfig(ipc=1, iterations=2, outer_loop=2, inner_loop=1, batch_real=16, net_width=8, net_depth=2,
                    clip=0.5)
    ledger = PrivacyLedger(None, 2.0, DELTA)
    noise = CountingNoise()
    syn = run_psg(digits, cfg, seed=0, ledger=ledger, noise=noise, progress=False)
    (entry,) = ledger.entries
    steps = cfg.iterations * cfg.outer_loop
    assert entry["mechanism"]["mechanism"]["steps"] == steps
    from dpdistill.distill.dm import build_net

    tensors = sum(1 for p in build_net(cfg, digits, torch.Generator().manual_seed(0), torch.device("cpu")).parameters()
                  if p.requires_grad)
    assert noise.masks == steps * digits.num_classes
    assert len(noise.draws) == steps * digits.num_classes * tensors  # one draw per parameter tensor per release
    assert [std for _, std in noise.draws] == pytest.approx([syn.sigma * cfg.clip] * len(noise.draws))


def test_the_sampler_takes_its_masks_from_the_privacy_source(digits) -> None:
    sampler = PoissonClassSampler(digits, 20)
    a = sampler.sample(4, PrivacyRandomness.reproducible(3))
    b = sampler.sample(4, PrivacyRandomness.reproducible(3))
    c = sampler.sample(4, PrivacyRandomness.reproducible(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ σ


CASES = [
    ("gaussian", [], lambda s: Gaussian(s, 1.0), 1.0),
    ("poisson", [Gaussian(4.0, 1.0)], lambda s: PoissonGaussian(0.02, s, 400), 2.0),
    ("matching", [PoissonGaussian(0.01, 1.5, 200)], lambda s: feature_matching_mechanism(0.04, s, 300, 10), 2.0),
    ("high-eps", [], lambda s: feature_matching_mechanism(0.05, s, 200, 10), 10.0),
]


@pytest.mark.parametrize("name, earlier, make, budget", CASES, ids=[c[0] for c in CASES])
def test_the_solver_lands_within_tolerance_below_the_target(name: str, earlier: list, make: Any,
                                                            budget: float) -> None:
    ledger = PrivacyLedger(None, budget, DELTA)
    for m in earlier:
        ledger.charge("earlier", m)
    sigma = solve_free_sigma(ledger, make)
    total = ledger.charge("free", make(sigma))  # the charge the solver promised passes
    assert budget * (1 - SIGMA_REL_TOL) <= total <= budget * (1 + BUDGET_REL_TOL)
    # Smallest within tolerance: a σ SIGMA_REL_TOL lower would not fit.
    fresh = PrivacyLedger(None, budget, DELTA)
    for m in earlier:
        fresh.charge("earlier", m)
    assert fresh.would_cost(make(sigma / (1 + SIGMA_REL_TOL))) > budget * (1 - SIGMA_REL_TOL)


def test_a_target_below_the_budget_and_a_share_alone() -> None:
    ledger = PrivacyLedger(None, 4.0, DELTA)
    ledger.charge("earlier", Gaussian(5.0, 1.0))
    make = lambda s: PoissonGaussian(0.02, s, 300)  # noqa: E731
    sigma = solve_free_sigma(ledger, make, target=2.5)
    assert 2.5 * (1 - SIGMA_REL_TOL) <= ledger.would_cost(make(sigma)) <= 2.5
    alone = sigma_for_share(make, 0.5, DELTA)
    assert 0.5 * (1 - SIGMA_REL_TOL) <= epsilon(make(alone), DELTA) <= 0.5 * (1 + 1e-3)
    with pytest.raises(PrivacyError, match="leaves nothing to spend"):
        solve_free_sigma(ledger, make, target=ledger.spent_epsilon())


def test_one_solver_and_one_charge_for_every_private_method(digits) -> None:
    import dpdistill.distill.dpgeng.allocation as dpgeng_allocation

    assert calibrate_for_ledger is solve_free_sigma  # the synthesisers' calibration is the same solver
    assert not hasattr(dpgeng_allocation, "solve_free_sigma")  # DP-GenG keeps no solver of its own
    ledger = PrivacyLedger(None, 1.0, DELTA)
    sampler = PoissonClassSampler(digits, 16)
    sigma = charge_matching(ledger, "x/matching", sampler, 50, None, 1.0)
    assert ledger.spent_epsilon() == pytest.approx(1.0, rel=SIGMA_REL_TOL)
    assert ledger.entries[0]["mechanism"]["mechanism"]["sigma"] == pytest.approx(sigma)
    assert charge_matching(ledger, "x/none", sampler, 0, None, 1.0) is None and len(ledger.entries) == 1
