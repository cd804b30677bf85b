"""Privacy loss distributions (dp-accounting): the authoritative, tight ε(δ) and δ(ε) of any composition.

Each mechanism is turned into a dp-accounting ``PrivacyLossDistribution`` exactly as dp-accounting's own
``PLDAccountant`` does for the equivalent ``DpEvent`` (same constructors, arguments and composition order),
so the figures equal a direct ``PLDAccountant`` computation at the same discretisation. Estimates are
pessimistic: dp-accounting rounds privacy losses up, so the ε reported is an upper bound.

Discretisation. One fixed value_discretization_interval does not fit every mechanism: a step of
Poisson-subsampled Gaussian with small q and large σ has privacy losses spread over ~1e-4, and an interval
of 1e-3 then puts the whole step in one or two bins and overstates ε by up to ~60 % after a thousand steps
(measured: q=0.0012, σ=3.36, T=1242, δ=1.4e-4 gives 0.0393 at 1e-3 and 0.0249 at 1e-5). The interval is
therefore chosen from the mechanism: a fifth of the spread of one step's privacy loss (its GDP μ for
Gaussian steps; a hundredth of ε for pure-ε steps, whose two atoms are rounded up), capped at 1e-3
(or, for very wide Gaussian steps, spread/200 up to 1e-2, where ε is in the tens to thousands and 1e-3
only costs time: measured relative change < 1e-5), floored at 1e-6, and rounded down to 1, 2 or 5 × 10^k
so that intervals are few and compositions share them. Measured, that keeps the pessimistic overshoot
within ~0.5 % of the 1e-5-interval figure. The cost of a PLD scales with (loss range / interval), so a
finer interval on a narrow mechanism costs about what a coarse one costs on a wide mechanism.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from dp_accounting.pld import common as pld_common
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from dpdistill.privacy.mechanisms import (
    Gaussian,
    Laplace,
    Mechanism,
    PoissonGaussian,
    RandomizedResponse,
    ReportNoisyMax,
)
from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE, check_relation, to_dp_accounting

# Pure ε-DP releases, accounted by the dominating pair of every ε-DP mechanism (loss ±ε).
_PURE = (RandomizedResponse, ReportNoisyMax)

MAX_INTERVAL = 1e-3  # for mechanisms whose single-step loss spread is below ~0.2 (the usual DP-SGD regime)
WIDE_MAX_INTERVAL = 1e-2  # for very wide steps (spread > 2: σ ≲ 0.7 at q ≈ 1), where ε is in the tens or more
MIN_INTERVAL = 1e-6
_GAUSSIAN_BINS_PER_SPREAD = 5.0
_WIDE_BINS_PER_SPREAD = 200.0
_PURE_BINS_PER_EPSILON = 100.0
_INTERVAL_SPAN = 10.0

PLD = pld_lib.PrivacyLossDistribution


def _nice_floor(x: float) -> float:
    """The largest of 1, 2, 5 × 10^k not above x, clamped to [MIN_INTERVAL, WIDE_MAX_INTERVAL]."""
    if not x > MIN_INTERVAL:
        return MIN_INTERVAL
    if x >= WIDE_MAX_INTERVAL:
        return WIDE_MAX_INTERVAL
    k = math.floor(math.log10(x))
    for m in (5.0, 2.0, 1.0):
        v = float(f"{m}e{k}")  # a decimal literal, so equal intervals compare equal
        if v <= x * (1 + 1e-12):
            return v
    return float(f"1e{k}")


def _gaussian_interval(spread: float) -> float:
    cap = min(max(MAX_INTERVAL, spread / _WIDE_BINS_PER_SPREAD), WIDE_MAX_INTERVAL)
    return _nice_floor(min(spread / _GAUSSIAN_BINS_PER_SPREAD, cap))


def _leaf_interval(leaf: Mechanism) -> float:
    if isinstance(leaf, PoissonGaussian):
        # One step's privacy loss has spread ~ its CLT μ = q·sqrt(e^{1/σ²} − 1).
        return _gaussian_interval(leaf.q * math.sqrt(math.expm1(min(1.0 / leaf.sigma**2, 700.0))))
    if isinstance(leaf, Gaussian):
        # dp-accounting folds `count` Gaussian releases into one with noise / sqrt(count).
        return _gaussian_interval(math.sqrt(leaf.count) / leaf.noise_multiplier)
    if isinstance(leaf, Laplace):
        return min(_nice_floor((1.0 / leaf.noise_multiplier) / _PURE_BINS_PER_EPSILON), MAX_INTERVAL)
    if isinstance(leaf, _PURE):
        return min(_nice_floor(leaf.epsilon / _PURE_BINS_PER_EPSILON), MAX_INTERVAL)
    raise TypeError(f"not an elementary mechanism: {leaf!r}")


def interval_for_leaves(leaves: tuple[Mechanism, ...] | list[Mechanism]) -> float:
    """The interval for composing ``leaves``: the finest any part needs, but no finer than a tenth of the
    coarsest part's. A part much narrower than another adds little to the composed ε, and its rounding
    error (a fraction of the interval) is small against that ε; without the floor, one nearly free charge
    (say a Gaussian with σ = 1e6) would force a 1e-6 grid on every other part and tens of millions of bins."""
    intervals = [_leaf_interval(leaf) for leaf in leaves]
    return max(min(intervals), _nice_floor(max(intervals) / _INTERVAL_SPAN))


def pld_interval(mechanism: Mechanism) -> float:
    """The value_discretization_interval dpdistill uses for ``mechanism`` (see :func:`interval_for_leaves`)."""
    return interval_for_leaves(mechanism.leaves())


# Bounded: one PLD of 10^4 steps on a fine grid is a few MB, and calibration visits many σ.
@lru_cache(maxsize=128)
def leaf_pld(leaf: Mechanism, interval: float, neighbouring: str = ADD_OR_REMOVE_ONE) -> PLD:
    """The PLD of one elementary mechanism, built as dp-accounting's PLDAccountant builds it."""
    rel = to_dp_accounting(neighbouring)
    if isinstance(leaf, PoissonGaussian):
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=leaf.sigma,
            value_discretization_interval=interval,
            sampling_prob=leaf.q,
            neighboring_relation=rel,
        ).self_compose(leaf.steps)
    if isinstance(leaf, Gaussian):
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=leaf.noise_multiplier / math.sqrt(leaf.count),
            value_discretization_interval=interval,
            neighboring_relation=rel,
        )
    if isinstance(leaf, Laplace):
        # A Laplace release's PLD depends only on scale / sensitivity, under either relation.
        return pld_lib.from_laplace_mechanism(
            parameter=leaf.noise_multiplier, value_discretization_interval=interval
        ).self_compose(leaf.count)
    if isinstance(leaf, _PURE):
        # The dominating pair of every pure ε-DP mechanism (loss ±ε), valid under either relation;
        # dp-accounting's RR event is limited to replace-one, so it is not used here.
        params = pld_common.DifferentialPrivacyParameters(epsilon=leaf.epsilon, delta=0.0)
        return pld_lib.from_privacy_parameters(params, value_discretization_interval=interval).self_compose(
            leaf.count
        )
    raise TypeError(f"not an elementary mechanism: {leaf!r}")


def compose(leaves: tuple[Mechanism, ...], interval: float, neighbouring: str = ADD_OR_REMOVE_ONE) -> PLD:
    """The PLD of leaves composed in order, starting from the identity as PLDAccountant does."""
    pld = pld_lib.identity(value_discretization_interval=interval)
    for leaf in leaves:
        pld = pld.compose(leaf_pld(leaf, interval, neighbouring))
    return pld


@lru_cache(maxsize=64)
def mechanism_pld(
    mechanism: Mechanism, interval: float | None = None, neighbouring: str = ADD_OR_REMOVE_ONE
) -> PLD:
    """The PLD of a (possibly composed) mechanism; cached on its hashable form."""
    check_relation(mechanism, neighbouring)
    return compose(mechanism.leaves(), interval or pld_interval(mechanism), neighbouring)


def epsilon_for_delta(pld: PLD, delta: float) -> float:
    """ε(δ) of a PLD: dp-accounting's figure, or where that overflows to inf, the same quantity by bisection.

    dp-accounting 0.6 inverts δ(ε) through e^{-loss} sums that underflow once ε passes ~700 (e.g.
    q=0.5, σ=0.5, T=707, δ=1e-8 returns inf while ε ≈ 1400). Its δ(ε) uses expm1(ε − loss) and stays exact,
    so the fallback bisects on that to a 1e-9 relative bracket and returns the upper end (δ there ≤ target).
    """
    with np.errstate(over="ignore", divide="ignore"):  # the overflow is what the fallback handles
        eps = float(pld.get_epsilon_for_delta(delta))
    if math.isfinite(eps):
        return eps

    def d(e: float) -> float:
        return float(pld.get_delta_for_epsilon(e))

    hi = 1024.0
    while d(hi) > delta:
        hi *= 2.0
        if hi > 1e9:
            return math.inf  # the infinite-loss mass alone exceeds delta
    lo = 0.0
    if d(lo) <= delta:
        return 0.0
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if d(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def pld_epsilon(
    mechanism: Mechanism, delta: float, neighbouring: str = ADD_OR_REMOVE_ONE, interval: float | None = None
) -> float:
    """Pessimistic ε(δ) of ``mechanism`` by PLD (math.inf if no finite ε reaches δ)."""
    return epsilon_for_delta(mechanism_pld(mechanism, interval, neighbouring), delta)


def pld_delta(
    mechanism: Mechanism, epsilon: float, neighbouring: str = ADD_OR_REMOVE_ONE, interval: float | None = None
) -> float:
    """Pessimistic δ(ε) of ``mechanism`` by PLD."""
    return float(mechanism_pld(mechanism, interval, neighbouring).get_delta_for_epsilon(epsilon))
