"""Calibration: the σ found is the smallest (within 1 %) that meets the target, and accounting it lands within
1 % of the target; opacus' own calibration is exposed beside it."""

from __future__ import annotations

import pytest

from dpdistill.errors import PrivacyError
from dpdistill.privacy import (
    Composed,
    Gaussian,
    Laplace,
    PoissonGaussian,
    calibrate_gaussian,
    calibrate_mechanism,
    calibrate_sigma,
    calibrate_sigma_details,
    calibrate_sigma_opacus,
    epsilon,
)

CASES = [
    (1.0, 1e-5, 0.01, 1000),
    (8.0, 1e-5, 0.004, 10_000),
    (0.38, 1e-5, 0.01, 10),  # the few-step regime
    (3.0, 1e-6, 0.2, 50),
    (0.1, 1e-7, 0.001, 1000),
    (10.0, 1e-5, 1.0, 1),
]


@pytest.mark.parametrize("target, delta, q, steps", CASES)
def test_calibrate_then_account_round_trips_within_one_percent(target, delta, q, steps):
    sigma = calibrate_sigma(target, delta, q, steps)
    eps = epsilon(PoissonGaussian(q, sigma, steps), delta)
    assert (1 - 0.01) * target <= eps <= target
    # Smallest within 1 %: 1 % less noise overshoots the target.
    assert epsilon(PoissonGaussian(q, sigma / 1.01, steps), delta) > target


def test_calibration_is_monotone_in_the_target():
    sigmas = [calibrate_sigma(t, 1e-5, 0.01, 500) for t in (0.5, 1.0, 2.0, 4.0)]
    assert sigmas == sorted(sigmas, reverse=True)


def test_calibration_reports_its_work():
    c = calibrate_sigma_details(2.0, 1e-5, 0.01, 2000)
    assert c.epsilon == epsilon(PoissonGaussian(0.01, c.sigma, 2000), 1e-5)
    assert 2 <= c.evaluations <= 20


def test_calibrate_gaussian_round_trip():
    for target, count in [(1.0, 1), (0.5, 10), (5.0, 3)]:
        nm = calibrate_gaussian(target, 1e-5, count)
        eps = epsilon(Gaussian(nm, 1.0, count), 1e-5)
        assert 0.99 * target <= eps <= target
        # The noise std for sensitivity C is nm·C, and the figure does not change.
        assert epsilon(Gaussian(nm * 2.5, 2.5, count), 1e-5) == pytest.approx(eps, rel=1e-9)


def test_calibrate_any_mechanism_with_a_fixed_part():
    fixed = PoissonGaussian(0.01, 1.0, 200)

    def make(scale: float):
        return Composed([fixed, Laplace(scale)])

    c = calibrate_mechanism(make, 3.0, 1e-5)
    assert 0.99 * 3.0 <= epsilon(make(c.sigma), 1e-5) <= 3.0
    assert epsilon(make(c.sigma / 1.01), 1e-5) > 3.0


def test_opacus_calibration_beside_ours():
    ours = calibrate_sigma(2.0, 1e-5, 0.02, 200)
    prv = calibrate_sigma_opacus(2.0, 1e-5, 0.02, 200, accountant="prv")
    rdp = calibrate_sigma_opacus(2.0, 1e-5, 0.02, 200, accountant="rdp")
    assert prv == pytest.approx(ours, rel=0.03)  # PRV is tight too; its tolerance is absolute (0.01 in ε)
    assert rdp > ours  # RDP is looser, so it asks for more noise
    assert epsilon(PoissonGaussian(0.02, rdp, 200), 1e-5) <= 2.0


def test_unreachable_target_is_refused():
    with pytest.raises(PrivacyError, match="no noise up to"):
        calibrate_mechanism(lambda s: Composed([Laplace(0.1), Gaussian(s)]), 1.0, 1e-5)
    with pytest.raises(PrivacyError, match="accountant must be 'prv' or 'rdp'"):
        calibrate_sigma_opacus(1.0, 1e-5, 0.01, 100, accountant="gdp")
