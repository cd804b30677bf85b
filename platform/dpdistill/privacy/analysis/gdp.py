"""Gaussian DP and its central-limit approximation, as the DP-GenG paper uses them.

The CLT figure for T Poisson-subsampled Gaussian steps, μ = q·sqrt(T·(e^{1/σ²} − 1)) (Bu et al. 2020,
Dong et al. 2022), is an asymptotic approximation, not a bound: with few steps it underestimates ε (at
q=0.01, σ=1, T=10, δ=1e-5 it gives ε ≈ 0.13 where PLD gives ≈ 0.38). dpdistill reports it beside the PLD
figure and flags it when it is lower; it is never the guarantee. For plain Gaussian releases μ is exact.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr, ndtri

from dpdistill.errors import PrivacyError
from dpdistill.privacy.defaults import (
    validate_delta,
    validate_epsilon,
    validate_q,
    validate_sigma,
    validate_steps,
)
from dpdistill.privacy.mechanisms import Composed, Gaussian, Mechanism, Parallel, PoissonGaussian

_XTOL = 1e-12


def gdp_mu(q: float, sigma: float, steps: int) -> float:
    """CLT μ of ``steps`` Poisson-subsampled Gaussian steps: q·sqrt(T·(e^{1/σ²} − 1))."""
    q, sigma, steps = validate_q(q), validate_sigma(sigma), validate_steps(steps)
    return q * math.sqrt(steps * math.expm1(1.0 / sigma**2))


def gdp_compose(mus: list[float] | tuple[float, ...]) -> float:
    """μ of a sequential composition of μ_i-GDP mechanisms: sqrt(Σ μ_i²)."""
    for mu in mus:
        _check_mu(mu)
    return math.sqrt(math.fsum(mu * mu for mu in mus))


def _check_mu(mu: float) -> float:
    if not (isinstance(mu, int | float) and mu >= 0 and math.isfinite(mu)):
        raise PrivacyError(f"mu must be a finite number >= 0, got {mu!r}")
    return float(mu)


def gdp_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2)."""
    mu = _check_mu(mu)
    if mu == 0:
        return 0.0
    eps = float(epsilon)
    # e^ε·Φ(b) overflows for large ε long before the product does; take it in log space.
    second = math.exp(eps + float(log_ndtr(-eps / mu - mu / 2)))
    return max(0.0, float(ndtr(-eps / mu + mu / 2)) - second)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε ≥ 0 with δ(ε) ≤ delta for μ-GDP."""
    mu = _check_mu(mu)
    delta = validate_delta(delta)
    if mu == 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    # Φ(−ε/μ + μ/2) < δ once ε > μ(μ/2 − Φ⁻¹(δ)), and δ(ε) is below that term.
    hi = mu * (mu / 2 - float(ndtri(delta))) + 1.0
    return float(brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=_XTOL, rtol=1e-12))


def gdp_mu_for(epsilon: float, delta: float) -> float:
    """The μ whose μ-GDP guarantee is exactly (ε, δ)-DP (δ(ε) grows with μ)."""
    eps, delta = validate_epsilon(epsilon), validate_delta(delta)
    lo, hi = 1e-9, 1.0
    while gdp_delta(hi, eps) < delta:
        hi *= 2.0
        if hi > 1e6:
            raise PrivacyError(f"no finite mu gives (epsilon={epsilon}, delta={delta})")
    return float(brentq(lambda m: gdp_delta(m, eps) - delta, lo, hi, xtol=_XTOL, rtol=1e-12))


def sigma_for_mu(mu: float, q: float, steps: int) -> float:
    """The σ at which ``steps`` Poisson-Gaussian steps at rate q have CLT μ = mu (inverse of gdp_mu)."""
    mu = _check_mu(mu)
    q, steps = validate_q(q), validate_steps(steps)
    if mu == 0:
        raise PrivacyError("mu must be > 0 to solve for sigma")
    return 1.0 / math.sqrt(math.log1p(mu * mu / (q * q * steps)))


def gdp_mu_of(mechanism: Mechanism) -> float | None:
    """μ of a mechanism where GDP applies (CLT for Poisson-Gaussian, exact for Gaussian), else None."""
    if isinstance(mechanism, PoissonGaussian):
        return gdp_mu(mechanism.q, mechanism.sigma, mechanism.steps)
    if isinstance(mechanism, Gaussian):
        return math.sqrt(mechanism.count) / mechanism.noise_multiplier
    if isinstance(mechanism, Parallel):
        return gdp_mu_of(mechanism.mechanism)
    if isinstance(mechanism, Composed):
        mus = [gdp_mu_of(p) for p in mechanism.parts]
        return None if any(m is None for m in mus) else gdp_compose(mus)
    return None  # pure-ε mechanisms (Laplace, randomised response) are not μ-GDP for a useful μ
