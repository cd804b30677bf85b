"""Privacy random variables (Gopi et al. 2021, opacus' implementation), reported beside the PLD figure.

opacus models only Poisson-subsampled Gaussian steps (a plain Gaussian release is one with q = 1), so
compositions containing Laplace or randomised-response parts get no PRV figure. The figure is opacus'
``eps_upper`` (estimate + eps_error), the one opacus reports as a guarantee. opacus discretises on a mesh
whose size grows with the composed ε and the number of steps; past :data:`MAX_BINS` points (seconds and
gigabytes, e.g. q=0.5, σ=0.5, T=2000 took 170 s and returned inf) no PRV figure is given.
"""

from __future__ import annotations

import warnings

import numpy as np

from dpdistill.privacy.mechanisms import Gaussian, Mechanism, PoissonGaussian
from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE

MAX_BINS = 2_000_000
EPS_ERROR = 0.01


def prv_history(mechanism: Mechanism) -> list[tuple[float, float, int]] | None:
    """opacus PRVAccountant history (noise_multiplier, sample_rate, steps), or None if not representable."""
    history = []
    for leaf in mechanism.leaves():
        if isinstance(leaf, PoissonGaussian):
            history.append((leaf.sigma, leaf.q, leaf.steps))
        elif isinstance(leaf, Gaussian):
            history.append((leaf.noise_multiplier, 1.0, leaf.count))
        else:
            return None
    return history


def _dprv(history: list[tuple[float, float, int]], eps_error: float, delta_error: float):
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        compute_safe_domain_size,
        discretize,
    )

    # The same steps as opacus.accountants.PRVAccountant._get_dprv, with a size check before the
    # discretisation so a hopeless case costs milliseconds, not minutes.
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [steps for _, _, steps in history]
    half_width = compute_safe_domain_size(
        prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error
    )
    mesh = eps_error / np.sqrt(sum(counts) * np.log(12 / delta_error) / 2)
    if not np.isfinite(half_width) or 2 * half_width / mesh > MAX_BINS:
        return None
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    tprvs = [TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max) for p in prvs]
    return compose_heterogeneous(dprvs=[discretize(t, domain) for t in tprvs], num_self_compositions=counts)


def prv_epsilon(
    mechanism: Mechanism, delta: float, neighbouring: str = ADD_OR_REMOVE_ONE, eps_error: float = EPS_ERROR
) -> float | None:
    """ε(δ) by opacus' PRV accountant (its upper bound), or None where it does not apply or fails."""
    history = prv_history(mechanism)
    if history is None or neighbouring != ADD_OR_REMOVE_ONE:
        return None
    delta_error = delta / 1000
    with warnings.catch_warnings():
        # opacus warns from its RDP domain sizing and overflows harmlessly in exp() at the domain edges.
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            try:
                dprv = _dprv(history, eps_error, delta_error)
                if dprv is None:
                    return None
                eps = float(dprv.compute_epsilon(delta, delta_error, eps_error)[2])
            except (RuntimeError, ValueError, OverflowError, FloatingPointError):
                # opacus raises these when its numerical domain cannot represent the case; PRV is advisory.
                return None
    return eps if np.isfinite(eps) else None


def prv_delta(
    mechanism: Mechanism, epsilon: float, neighbouring: str = ADD_OR_REMOVE_ONE, eps_error: float = EPS_ERROR
) -> float | None:
    """δ(ε) estimate by opacus' PRV accountant, or None where it does not apply or fails."""
    history = prv_history(mechanism)
    if history is None or neighbouring != ADD_OR_REMOVE_ONE:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            try:
                # delta_error only sizes the domain here; 1e-10 is opacus-typical for δ ~ 1e-5..1e-7.
                dprv = _dprv(history, eps_error, 1e-10)
                if dprv is None:
                    return None
                return float(dprv.compute_delta_estimate(epsilon))
            except (RuntimeError, ValueError, OverflowError, FloatingPointError):
                return None
