"""Neighbouring relations: add-or-remove-one is the platform's; replace-one figures are converted explicitly.

Everything dpdistill accounts is stated for *add-or-remove-one record* of the sensitive training split. Some
papers and libraries state their guarantee or their sensitivity under *replace-one*. The two are not
interchangeable, so nothing converts silently: the helper below converts a guarantee in the one direction that is
always sound (add-or-remove-one to replace-one).

Sensitivities do not convert at all. A replace-one sensitivity does not determine the add-or-remove-one one: a
sum of contributions clipped to a ball of radius C has replace-one sensitivity 2C and add-or-remove-one C (a
ratio of 2), an L2 histogram (one-hot contributions) has √2 and 1 (a ratio of √2). Halving, the old helper's
rule, understated the histogram's sensitivity by √2. A method states the add-or-remove-one sensitivity of its
query directly: for a sum, the largest norm one record's contribution can have.
"""

from __future__ import annotations

import math

from dp_accounting.privacy_accountant import NeighboringRelation

from dpdistill.errors import PrivacyError
from dpdistill.privacy.defaults import validate_delta, validate_epsilon
from dpdistill.privacy.mechanisms import Composed, Mechanism, Parallel

ADD_OR_REMOVE_ONE = "add-or-remove-one"
REPLACE_ONE = "replace-one"
RELATIONS = (ADD_OR_REMOVE_ONE, REPLACE_ONE)


def validate_neighbouring(neighbouring: str) -> str:
    """Refuse a neighbouring relation other than the two dpdistill knows."""
    if neighbouring not in RELATIONS:
        raise PrivacyError(f"neighbouring must be one of {', '.join(RELATIONS)}, got {neighbouring!r}")
    return neighbouring


def check_relation(mechanism: Mechanism, neighbouring: str) -> None:
    """Refuse a relation the mechanism's accounting does not hold under (parallel parts need add/remove)."""
    validate_neighbouring(neighbouring)
    if neighbouring != ADD_OR_REMOVE_ONE and _has_parallel(mechanism):
        raise PrivacyError(
            f"{mechanism.describe()}: parallel composition over disjoint partitions holds under "
            "add-or-remove-one only (under replace-one a record can move between partitions)"
        )


def _has_parallel(mechanism: Mechanism) -> bool:
    if isinstance(mechanism, Parallel):
        return True
    if isinstance(mechanism, Composed):
        return any(_has_parallel(p) for p in mechanism.parts)
    return False


def to_dp_accounting(neighbouring: str) -> NeighboringRelation:
    """The dp-accounting enum for a relation name."""
    validate_neighbouring(neighbouring)
    if neighbouring == ADD_OR_REMOVE_ONE:
        return NeighboringRelation.ADD_OR_REMOVE_ONE
    return NeighboringRelation.REPLACE_ONE


def replace_one_guarantee(epsilon: float, delta: float) -> tuple[float, float]:
    """The replace-one (ε', δ') implied by an add-or-remove-one (ε, δ) guarantee, to set beside a paper's figure.

    Replacing a record is removing it and adding another: group privacy for a group of two gives
    (2ε, (1 + e^ε)·δ). This direction holds for every mechanism.
    """
    eps = validate_epsilon(epsilon)
    d = validate_delta(delta)
    return 2.0 * eps, (1.0 + math.exp(eps)) * d
