"""Noise calibration: the smallest σ whose PLD ε meets a target (ε, δ), and opacus' own figure beside it.

The solver brackets the target by extrapolating along log ε against log σ (ε falls roughly as a power
of σ, so a secant lands close), then narrows the bracket with secant steps, a geometric bisection every
third step (so the worst case is bisection speed if ε(σ) has small jumps: it does, where the PLD
discretisation interval changes with σ) and, once ε is within rel_tol, one probe 1 % below. Typically
4-6 PLD evaluations. It returns the upper end ``hi`` of a bracket [lo, hi] with ε(lo) > target ≥ ε(hi),
hi ≤ lo·(1 + rel_tol), and ε(hi) ≥ (1 − rel_tol)·target, so calibrate-then-account lands within rel_tol of
the target on both σ and ε (the ε condition is dropped only if the bracket shrinks below 1e-9 relative).
The ε evaluated is exactly the one the ledger charges, so a calibrated charge that fits the budget passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dpdistill.errors import PrivacyError
from dpdistill.privacy.analysis import gdp
from dpdistill.privacy.analysis.pld import pld_epsilon
from dpdistill.privacy.defaults import validate_delta, validate_epsilon, validate_q, validate_steps
from dpdistill.privacy.mechanisms import Gaussian, Mechanism, PoissonGaussian
from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE

SIGMA_MIN = 1e-4
SIGMA_MAX = 1e6
_MAX_EVALS = 80


@dataclass(frozen=True)
class Calibration:
    """A solved σ with the ε it gives and how many PLD evaluations it took."""

    sigma: float
    epsilon: float
    evaluations: int


def _log_secant(x0: float, f0: float, x1: float, f1: float, aim: float) -> float | None:
    """Where the line through (log x, log f) at the two points reaches log aim; None if undefined."""
    if f0 <= 0 or f1 <= 0 or f0 == f1 or x0 == x1:
        return None
    t = (math.log(aim) - math.log(f0)) / (math.log(f1) - math.log(f0))
    log_x = math.log(x0) + t * (math.log(x1) - math.log(x0))
    return math.exp(min(max(log_x, -700.0), 700.0))  # callers clamp the step; this only avoids overflow


def solve_sigma(
    epsilon_of: Callable[[float], float],
    target_epsilon: float,
    guess: float,
    rel_tol: float = 0.01,
    what: str = "sigma",
) -> Calibration:
    """The smallest σ (within rel_tol) with epsilon_of(σ) ≤ target, for ε non-increasing in σ."""
    target = validate_epsilon(target_epsilon, "target_epsilon")
    if not 0 < rel_tol < 1:
        raise PrivacyError(f"rel_tol must lie in (0, 1), got {rel_tol!r}")
    aim = target * (1.0 - rel_tol / 2.0)
    evals = 0

    def f(s: float) -> float:
        nonlocal evals
        evals += 1
        return epsilon_of(s)

    def clamp(s: float) -> float:
        return min(max(s, SIGMA_MIN), SIGMA_MAX)

    x0 = clamp(guess if guess > 0 and math.isfinite(guess) else 1.0)
    f0 = f(x0)
    # First move: assume ε ∝ 1/σ (the large-σ Gaussian regime) for one step, at most ×4 either way.
    ratio = 0.5 if f0 <= 0 else min(max(f0 / aim, 0.25), 4.0)
    x1 = clamp(x0 * ratio)
    f1 = f(x1) if x1 != x0 else f0
    # Bracket: extrapolate along the log-log secant (at most ×4 per move) until the target is straddled.
    while (f0 <= target) == (f1 <= target):
        if evals >= _MAX_EVALS:
            raise PrivacyError(f"{what}: could not bracket epsilon={target:g} in {evals} evaluations")
        below = f1 <= target  # both meet the target: move to less noise
        if below and x1 <= SIGMA_MIN:
            return Calibration(SIGMA_MIN, f1, evals)  # even the least noise considered meets the target
        if not below and x1 >= SIGMA_MAX:
            raise PrivacyError(
                f"{what}: no noise up to {SIGMA_MAX:g} brings epsilon to {target:g} (at {SIGMA_MAX:g}: "
                f"epsilon={f1:.4g}); the other charges may already exceed the target"
            )
        x = _log_secant(x0, f0, x1, f1, aim)
        lo_step, hi_step = (0.25, 1.0 / 1.05) if below else (1.05, 4.0)
        step = (x / x1) if x is not None and x > 0 else (0.5 if below else 2.0)
        x0, f0 = x1, f1
        x1 = clamp(x1 * min(max(step, lo_step), hi_step))
        f1 = f(x1)
    (lo, f_lo), (hi, f_hi) = sorted([(x0, f0), (x1, f1)])

    step = 0
    while True:
        if hi <= lo * (1.0 + rel_tol) and f_hi >= (1.0 - rel_tol) * target:
            break
        if hi <= lo * (1.0 + 1e-9) or evals >= _MAX_EVALS:
            break  # hi still meets the target; only the tightness is short of rel_tol
        step += 1
        if f_hi >= (1.0 - rel_tol) * target:
            # ε is already close at hi: test whether σ can go 1 % lower, which closes the bracket either way.
            x = hi / (1.0 + rel_tol * 0.999)
        else:
            x = _log_secant(lo, f_lo, hi, f_hi, aim) if step % 3 else None
            mid = math.sqrt(lo * hi)
            if x is None or not lo < x < hi:
                x = mid
            else:
                # Stay inside the bracket's middle 90 % (in log σ) so a poor secant still shrinks it.
                span = math.log(hi) - math.log(lo)
                t = min(max((math.log(x) - math.log(lo)) / span, 0.05), 0.95)
                x = math.exp(math.log(lo) + t * span)
        fx = f(x)
        if fx <= target:
            hi, f_hi = x, fx
        else:
            lo, f_lo = x, fx
    return Calibration(hi, f_hi, evals)


def calibrate_sigma(
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    rel_tol: float = 0.01,
    neighbouring: str = ADD_OR_REMOVE_ONE,
) -> float:
    """The smallest noise multiplier σ (within rel_tol) for which ``steps`` Poisson-Gaussian steps at rate q
    are (target_epsilon, delta)-DP by PLD."""
    return calibrate_sigma_details(target_epsilon, delta, q, steps, rel_tol, neighbouring).sigma


def calibrate_sigma_details(
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    rel_tol: float = 0.01,
    neighbouring: str = ADD_OR_REMOVE_ONE,
) -> Calibration:
    """:func:`calibrate_sigma` with the ε reached and the number of PLD evaluations."""
    target = validate_epsilon(target_epsilon, "target_epsilon")
    delta, q, steps = validate_delta(delta), validate_q(q), validate_steps(steps)
    # The CLT σ is a good start with many steps (and low with few, which the bracketing fixes).
    guess = gdp.sigma_for_mu(gdp.gdp_mu_for(target, delta), q, steps)
    return solve_sigma(
        lambda s: pld_epsilon(PoissonGaussian(q, s, steps), delta, neighbouring), target, guess, rel_tol
    )


def calibrate_gaussian(
    target_epsilon: float,
    delta: float,
    count: int = 1,
    rel_tol: float = 0.01,
    neighbouring: str = ADD_OR_REMOVE_ONE,
) -> float:
    """The smallest noise multiplier (noise std / sensitivity) for ``count`` plain Gaussian releases to be
    (target_epsilon, delta)-DP by PLD; multiply by the sensitivity for the noise std."""
    target = validate_epsilon(target_epsilon, "target_epsilon")
    delta, count = validate_delta(delta), validate_steps(count, "count")
    guess = math.sqrt(count) / gdp.gdp_mu_for(target, delta)  # exact for the Gaussian: PLD lands close
    return solve_sigma(
        lambda s: pld_epsilon(Gaussian(s, 1.0, count), delta, neighbouring), target, guess, rel_tol
    ).sigma


def calibrate_mechanism(
    make: Callable[[float], Mechanism],
    target_epsilon: float,
    delta: float,
    guess: float = 1.0,
    rel_tol: float = 0.01,
    neighbouring: str = ADD_OR_REMOVE_ONE,
) -> Calibration:
    """The smallest parameter s (within rel_tol) with PLD ε of ``make(s)`` ≤ target; ε must fall as s grows."""
    delta = validate_delta(delta)
    return solve_sigma(lambda s: pld_epsilon(make(s), delta, neighbouring), target_epsilon, guess, rel_tol)


def calibrate_sigma_opacus(
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """opacus' own calibration (``get_noise_multiplier``), for comparison; ``accountant`` is "prv" (opacus'
    PrivacyEngine default) or "rdp"."""
    target = validate_epsilon(target_epsilon, "target_epsilon")
    delta, q, steps = validate_delta(delta), validate_q(q), validate_steps(steps)
    if accountant not in ("prv", "rdp"):
        raise PrivacyError(f"accountant must be 'prv' or 'rdp', got {accountant!r}")
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus warns when its RDP orders are at the edge of their range
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=epsilon_tolerance,
                )
            )
        except ValueError as err:
            raise PrivacyError(f"opacus could not calibrate sigma for epsilon={target:g}: {err}") from None
