"""GDP helpers as DP-GenG uses them: μ from (q, σ, T), composition, μ ↔ (ε, δ), and the underestimate flag."""

from __future__ import annotations

import math

import pytest
from opacus.accountants.analysis import gdp as opacus_gdp

from dpdistill.errors import PrivacyError
from dpdistill.privacy import (
    Composed,
    Gaussian,
    PoissonGaussian,
    accounting_report,
    gdp_compose,
    gdp_delta,
    gdp_epsilon,
    gdp_mu,
    gdp_mu_for,
    gdp_mu_of,
    sigma_for_mu,
)
from dpdistill.privacy.report import accounting_table


def test_mu_formula_and_opacus_agree():
    mu = gdp_mu(0.01, 1.0, 10)
    assert mu == pytest.approx(0.01 * math.sqrt(10 * (math.e - 1)), rel=1e-12)
    for q, s, t in [(0.01, 1.0, 10), (0.004, 0.8, 10_000), (0.3, 2.5, 77)]:
        assert gdp_mu(q, s, t) == pytest.approx(
            opacus_gdp.compute_mu_poisson(steps=t, noise_multiplier=s, sample_rate=q), rel=1e-12
        )


def test_composition_is_root_sum_of_squares():
    assert gdp_compose([3.0, 4.0]) == pytest.approx(5.0)
    assert gdp_compose([]) == 0.0
    parts = [PoissonGaussian(0.01, 1.0, 100), Gaussian(4.0, 2.0, 3)]
    expected = math.hypot(gdp_mu(0.01, 1.0, 100), math.sqrt(3) * 2.0 / 4.0)
    assert gdp_mu_of(Composed(parts)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mu", [0.05, 0.5, 1.0, 3.0, 20.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_mu_epsilon_delta_round_trip(mu, delta):
    eps = gdp_epsilon(mu, delta)
    assert gdp_delta(mu, eps) == pytest.approx(delta, rel=1e-6)
    if eps > 0:
        assert gdp_mu_for(eps, delta) == pytest.approx(mu, rel=1e-6)
    if mu <= 3.0:  # opacus' bracket [0, 500] suffices here
        assert eps == pytest.approx(opacus_gdp.eps_from_mu(mu=mu, delta=delta), rel=1e-6, abs=1e-9)


def test_delta_is_stable_for_large_epsilon():
    # e^ε·Φ(·) overflows naively at ε > 709; the log-space form gives a finite, tiny δ.
    d = gdp_delta(40.0, 1000.0)
    assert 0.0 <= d < 1e-6 and math.isfinite(d)


def test_sigma_for_mu_inverts_gdp_mu():
    for q, t in [(0.01, 10), (0.002, 5000)]:
        for s in (0.7, 1.3, 4.0):
            assert sigma_for_mu(gdp_mu(q, s, t), q, t) == pytest.approx(s, rel=1e-10)


def test_issue_case_is_flagged_as_underestimate():
    report = accounting_report(PoissonGaussian(0.01, 1.0, 10), 1e-5, include_prv=False)
    assert report.gdp == pytest.approx(0.1304, abs=1e-3)
    assert report.pld == pytest.approx(0.38, abs=0.005)
    assert report.gdp_underestimates
    assert report.epsilon == report.pld  # the flagged figure is never the reported one
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(accounting_table(report))
    assert "UNDERESTIMATE" in console.export_text()


def test_exact_gdp_of_a_plain_gaussian_is_not_flagged():
    report = accounting_report(Gaussian(2.0, 1.0, 3), 1e-5, include_prv=False)
    assert report.gdp == pytest.approx(report.pld, rel=1e-3)
    assert not report.gdp_underestimates


def test_gdp_refusals():
    with pytest.raises(PrivacyError, match="mu must be a finite number >= 0"):
        gdp_compose([1.0, -0.5])
    with pytest.raises(PrivacyError, match="delta must lie in"):
        gdp_epsilon(1.0, 0.0)
    with pytest.raises(PrivacyError, match="epsilon must be a finite number > 0"):
        gdp_mu_for(0.0, 1e-5)
