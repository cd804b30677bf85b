"""Rényi DP (dp-accounting's RDP accountant): a looser upper bound reported beside the PLD figure.

Each elementary mechanism gets an RDP curve over dp-accounting's default orders; curves of a sequential
composition add; ε(δ) and δ(ε) use dp-accounting's conversion. Pure ε-DP label releases are given the RDP
of binary randomised response with loss ±ε, the largest RDP any ε-DP mechanism can have (Mironov 2017,
Prop. 3), because dp-accounting's RR curve exists only under replace-one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dpdistill.privacy.mechanisms import Mechanism, PoissonGaussian, RandomizedResponse, ReportNoisyMax
from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE, REPLACE_ONE, to_dp_accounting

ORDERS = np.array(rdp_lib.DEFAULT_RDP_ORDERS, dtype=np.float64)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # dp-accounting logs a warning for every fractional order whose series does not converge; the order is
    # then dropped, which only loosens the bound. Thousands of such lines would drown the user's log.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rr_rdp(epsilon: float, orders: np.ndarray) -> np.ndarray:
    # D_α of binary RR with loss ±ε: log((e^{αε} + e^{(1-α)ε}) / (1 + e^ε)) / (α - 1), in log space.
    a = orders
    return (np.logaddexp(a * epsilon, (1 - a) * epsilon) - np.logaddexp(0.0, epsilon)) / (a - 1)


@lru_cache(maxsize=4096)
def _leaf_rdp(leaf: Mechanism, neighbouring: str) -> tuple[float, ...] | None:
    if isinstance(leaf, RandomizedResponse | ReportNoisyMax):
        return tuple(leaf.count * _rr_rdp(leaf.epsilon, ORDERS))
    if isinstance(leaf, PoissonGaussian) and neighbouring == REPLACE_ONE:
        return None  # dp-accounting has no RDP for Poisson sampling under replace-one
    acc = rdp_lib.RdpAccountant(orders=list(ORDERS), neighboring_relation=to_dp_accounting(neighbouring))
    with _quiet_absl():
        acc.compose(leaf.to_dp_event())
    return tuple(acc.rdp)


def rdp_curve(mechanism: Mechanism, neighbouring: str = ADD_OR_REMOVE_ONE) -> np.ndarray | None:
    """The RDP of ``mechanism`` at :data:`ORDERS`, or None where dp-accounting has no RDP analysis."""
    total = np.zeros_like(ORDERS)
    for leaf in mechanism.leaves():
        curve = _leaf_rdp(leaf, neighbouring)
        if curve is None:
            return None
        total += np.asarray(curve)
    return total


def rdp_epsilon(mechanism: Mechanism, delta: float, neighbouring: str = ADD_OR_REMOVE_ONE) -> float | None:
    """ε(δ) of ``mechanism`` by RDP, or None where not applicable."""
    curve = rdp_curve(mechanism, neighbouring)
    if curve is None:
        return None
    with _quiet_absl():
        return float(rdp_lib.compute_epsilon(ORDERS, curve, delta)[0])


def rdp_delta(mechanism: Mechanism, epsilon: float, neighbouring: str = ADD_OR_REMOVE_ONE) -> float | None:
    """δ(ε) of ``mechanism`` by RDP, or None where not applicable."""
    curve = rdp_curve(mechanism, neighbouring)
    if curve is None:
        return None
    with _quiet_absl():
        return float(rdp_lib.compute_delta(ORDERS, curve, epsilon)[0])
