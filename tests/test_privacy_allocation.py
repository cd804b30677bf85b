"""Allocation: with some components fixed, the free σ makes the whole job meet its total under PLD, and
DP-GenG Theorem 2's GDP figure for the same split is reported beside it."""

from __future__ import annotations

import math

import pytest

from dpdistill.errors import BudgetExceeded, PrivacyError
from dpdistill.privacy import (
    Composed,
    Gaussian,
    Laplace,
    PoissonGaussian,
    allocate_sigma,
    epsilon,
    gdp_mu,
    gdp_mu_for,
    sigma_for_mu,
)

FIXED = {"generator": PoissonGaussian(0.01, 1.2, 300), "expert": PoissonGaussian(0.02, 1.5, 100)}


def test_free_sigma_meets_the_total_under_pld():
    total, delta, q, steps = 4.0, 1e-5, 0.05, 40
    res = allocate_sigma(total, delta, FIXED, (q, steps))
    whole = Composed([*FIXED.values(), PoissonGaussian(q, res.sigma, steps)])
    eps = epsilon(whole, delta)
    assert eps == pytest.approx(res.epsilon_total, rel=1e-12)
    assert 0.99 * total <= eps <= total
    tighter = Composed([*FIXED.values(), PoissonGaussian(q, res.sigma / 1.01, steps)])
    assert epsilon(tighter, delta) > total
    assert res.epsilon_fixed == pytest.approx(epsilon(Composed(list(FIXED.values())), delta), rel=1e-12)
    assert res.epsilon_fixed < res.epsilon_total
    assert res.fixed == {k: m.describe() for k, m in FIXED.items()}


def test_theorem2_sigma_is_the_gdp_closed_form_and_overspends_with_few_steps():
    total, delta, q, steps = 4.0, 1e-5, 0.05, 40
    res = allocate_sigma(total, delta, FIXED, (q, steps))
    mu_total = gdp_mu_for(total, delta)
    mu_fixed_sq = sum(gdp_mu(m.q, m.sigma, m.steps) ** 2 for m in FIXED.values())
    expected = sigma_for_mu(math.sqrt(mu_total**2 - mu_fixed_sq), q, steps)
    assert res.gdp_theorem2_sigma == pytest.approx(expected, rel=1e-8)
    assert res.gdp_mu_total == pytest.approx(mu_total)
    # The CLT understates ε with few steps: Theorem 2's σ is smaller and really costs more than the total.
    assert res.gdp_theorem2_sigma < res.sigma
    assert res.gdp_theorem2_epsilon_pld > total
    assert res.gdp_theorem2_overspends


def test_callable_free_component():
    # The free part is a Gaussian release of a sum with clipping norm C = 2; σ here is a noise multiplier.
    res = allocate_sigma(
        3.0, 1e-6, {"expert": PoissonGaussian(0.01, 1.0, 500)}, lambda s: Gaussian(2.0 * s, 2.0, 5)
    )
    eps = epsilon(Composed([PoissonGaussian(0.01, 1.0, 500), Gaussian(2.0 * res.sigma, 2.0, 5)]), 1e-6)
    assert 0.99 * 3.0 <= eps <= 3.0
    assert res.gdp_theorem2_sigma is not None


def test_non_gdp_fixed_part_has_no_theorem2_figure():
    res = allocate_sigma(3.0, 1e-5, {"labels": Laplace(2.0)}, (0.01, 100))
    assert res.gdp_theorem2_sigma is None and res.gdp_theorem2_epsilon_pld is None
    assert not res.gdp_theorem2_overspends
    assert res.to_dict()["sigma"] == res.sigma


def test_fixed_parts_over_budget_are_refused():
    with pytest.raises(BudgetExceeded, match="already cost ε .* >= total 0.5"):
        allocate_sigma(0.5, 1e-5, {"generator": PoissonGaussian(0.1, 0.8, 1000)}, (0.01, 100))
    with pytest.raises(PrivacyError, match="free must be a callable"):
        allocate_sigma(3.0, 1e-5, {}, "q=0.01")
