"""Opacus' DP-SGD noise goes through the privacy source's guarded gaussian(): counted, secret, never zero."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from dpdistill.errors import PrivacyError
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.privacy.opacus_noise import draw_noise_from


class Counting(PrivacyRandomness):
    """A reproducible source that records every gaussian() it is asked for."""

    def __init__(self, seed: int) -> None:
        super().__init__("reproducible", seed)
        self.draws: list[tuple[tuple[int, ...], float]] = []

    def gaussian(self, shape, std, device="cpu", dtype=torch.float32):
        self.draws.append((tuple(shape), float(std)))
        return super().gaussian(shape, std, device, dtype)


def _step(sigma: float, noise: PrivacyRandomness) -> torch.nn.Module:
    torch.manual_seed(0)
    net = GradSampleModule(torch.nn.Linear(4, 3), loss_reduction="sum")
    opt = draw_noise_from(DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=sigma,
                                      max_grad_norm=1.0, expected_batch_size=8, loss_reduction="sum"), noise)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
    opt.step()
    return net


def test_every_parameter_gets_one_draw_of_std_sigma_c_from_the_source():
    noise = Counting(3)
    _step(0.7, noise)
    assert noise.draws == [((3, 4), pytest.approx(0.7)), ((3,), pytest.approx(0.7))]


def test_a_zero_noise_multiplier_is_refused_not_a_silent_noiseless_step():
    # Opacus' own _generate_noise returns zeros for std 0; through the source it is a PrivacyError.
    with pytest.raises(PrivacyError, match="noise std must be a finite number > 0"):
        _step(0.0, Counting(3))


def test_secret_draws_differ_and_reproducible_ones_repeat():
    a, b = (_step(1.0, PrivacyRandomness.secret())._module.weight.detach().clone() for _ in range(2))
    assert not torch.equal(a, b)
    c, d = (_step(1.0, PrivacyRandomness.reproducible(5))._module.weight.detach().clone() for _ in range(2))
    assert torch.equal(c, d)
