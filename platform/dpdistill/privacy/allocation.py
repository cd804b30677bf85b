"""Budget allocation: solve the noise of the one free component so that the whole job meets its (ε, δ).

Some components' mechanisms are fixed (e.g. DP-GenG's generator and expert); the free one is a function of
its noise σ (or Poisson-Gaussian steps with known q and T). The σ returned is the smallest (within rel_tol)
for which the sequential composition of every part meets the total under PLD.

Beside it: the σ that DP-GenG's Theorem 2 would give for the same split. The paper composes the parts as
μ-GDP, μ_total = sqrt(Σ μ_i²) with the CLT μ_i = q_i·sqrt(T_i·(e^{1/σ_i²} − 1)), sets μ_total from the
target (ε, δ) and solves the free part's μ. Because the CLT understates ε with few steps, that σ can be
too small: ``epsilon_at_gdp_sigma`` is what PLD says the job would then really cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from dpdistill.errors import BudgetExceeded, PrivacyError
from dpdistill.privacy.analysis import gdp
from dpdistill.privacy.analysis.pld import pld_epsilon
from dpdistill.privacy.calibration import solve_sigma
from dpdistill.privacy.defaults import validate_delta, validate_epsilon, validate_q, validate_steps
from dpdistill.privacy.ledger import BUDGET_REL_TOL
from dpdistill.privacy.mechanisms import Composed, Mechanism, PoissonGaussian
from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE


@dataclass(frozen=True)
class AllocationResult:
    """The solved σ of the free component, what each part costs, and DP-GenG Theorem 2's figure beside it."""

    sigma: float
    free_mechanism: str
    epsilon_total: float  # PLD ε of the whole composition at the solved σ (≤ the target)
    epsilon_target: float
    delta: float
    epsilon_fixed: float  # PLD ε of the fixed parts composed, without the free one
    epsilon_free_alone: float  # PLD ε of the free part on its own at the solved σ
    fixed: dict[str, str]
    gdp_theorem2_sigma: float | None  # None where a part is not GDP (Laplace, randomised response)
    gdp_mu_total: float | None
    gdp_theorem2_epsilon_pld: float | None  # PLD ε of the whole job if Theorem 2's σ were used
    gdp_theorem2_overspends: bool
    neighbouring: str

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def _free_maker(free: Callable[[float], Mechanism] | tuple[float, int]) -> Callable[[float], Mechanism]:
    if callable(free):
        return free
    try:
        q, steps = free
    except (TypeError, ValueError):
        raise PrivacyError(
            f"free must be a callable sigma -> mechanism or a (q, steps) pair, got {free!r}"
        ) from None
    q, steps = validate_q(q), validate_steps(steps)
    return lambda s: PoissonGaussian(q, s, steps)


def _gdp_sigma(make: Callable[[float], Mechanism], mu_free: float, guess: float) -> float | None:
    """σ with GDP μ(make(σ)) = mu_free (μ falls as σ grows), by bisection in log σ."""
    if gdp.gdp_mu_of(make(guess)) is None:
        return None
    lo, hi = guess, guess
    while gdp.gdp_mu_of(make(lo)) < mu_free:
        lo /= 2.0
        if lo < 1e-6:
            return None
    while gdp.gdp_mu_of(make(hi)) > mu_free:
        hi *= 2.0
        if hi > 1e7:
            return None
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if gdp.gdp_mu_of(make(mid)) > mu_free:
            lo = mid
        else:
            hi = mid
        if hi <= lo * (1 + 1e-12):
            break
    return hi


def allocate_sigma(
    total_epsilon: float,
    delta: float,
    fixed: Mapping[str, Mechanism],
    free: Callable[[float], Mechanism] | tuple[float, int],
    rel_tol: float = 0.01,
    neighbouring: str = ADD_OR_REMOVE_ONE,
    guess: float = 1.0,
) -> AllocationResult:
    """The smallest σ (within rel_tol) for the free component so that fixed ∘ free(σ) is (total_epsilon,
    delta)-DP by PLD, with DP-GenG Theorem 2's σ for the same split beside it."""
    target = validate_epsilon(total_epsilon, "total_epsilon")
    delta = validate_delta(delta)
    for name, m in fixed.items():
        if not isinstance(m, Mechanism):
            raise PrivacyError(f"fixed[{name!r}] must be a mechanism, got {type(m).__name__}")
    make = _free_maker(free)
    parts = tuple(fixed.values())
    eps_fixed = pld_epsilon(Composed(parts), delta, neighbouring) if parts else 0.0
    if eps_fixed >= target:
        raise BudgetExceeded(
            f"fixed components {', '.join(fixed)} already cost ε {eps_fixed:.4g} >= total {target:g} at "
            f"δ={delta:.3g}; nothing is left for the free component"
        )

    def whole(s: float) -> Mechanism:
        return Composed((*parts, make(s)))

    # GDP first: its σ is a good starting guess for the PLD solve (and the figure to report anyway).
    mus = [gdp.gdp_mu_of(m) for m in parts]
    mu_total = gdp.gdp_mu_for(target, delta)
    gdp_sigma = None
    if all(m is not None for m in mus):
        mu_free_sq = mu_total**2 - math.fsum(m * m for m in mus)
        if mu_free_sq > 0:
            gdp_sigma = _gdp_sigma(make, math.sqrt(mu_free_sq), guess)
    start = gdp_sigma if gdp_sigma is not None else guess
    solved = solve_sigma(
        lambda s: pld_epsilon(whole(s), delta, neighbouring), target, start, rel_tol, what="allocate_sigma"
    )
    eps_at_gdp = pld_epsilon(whole(gdp_sigma), delta, neighbouring) if gdp_sigma is not None else None
    return AllocationResult(
        sigma=solved.sigma,
        free_mechanism=make(solved.sigma).describe(),
        epsilon_total=solved.epsilon,
        epsilon_target=target,
        delta=delta,
        epsilon_fixed=eps_fixed,
        epsilon_free_alone=pld_epsilon(make(solved.sigma), delta, neighbouring),
        fixed={name: m.describe() for name, m in fixed.items()},
        gdp_theorem2_sigma=gdp_sigma,
        gdp_mu_total=mu_total if gdp_sigma is not None else None,
        gdp_theorem2_epsilon_pld=eps_at_gdp,
        gdp_theorem2_overspends=eps_at_gdp is not None and eps_at_gdp > target * (1.0 + BUDGET_REL_TOL),
        neighbouring=neighbouring,
    )
