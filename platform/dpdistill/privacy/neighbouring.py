"""Neighbouring relations: add-or-remove-one is the platform's; replace-one figures are converted explicitly.

Everything dpdistill accounts is stated for *add-or-remove-one record* of the sensitive training split. Some
papers and libraries state their guarantee or their sensitivity under *replace-one*. The two are not
interchangeable, so nothing converts silently: the helpers below do it in the one direction that is always
sound, or for the one query family where the other direction is.
"""

from __future__ import annotations

import math

from dp_accounting.privacy_accountant import NeighboringRelation

from dpdistill.errors import PrivacyError
from dpdistill.privacy.defaults import validate_delta, validate_epsilon, validate_positive
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


def add_remove_sensitivity(replace_sensitivity: float, query: str) -> float:
    """The add-or-remove-one sensitivity of a query whose replace-one sensitivity a method states.

    Only for ``query="sum"``: a sum (or histogram) of per-record contributions clipped to norm C has
    replace-one sensitivity 2C (one record out, another in) and add-or-remove-one sensitivity C. For any
    other query (a mean over a secret n, a median, ...) there is no general conversion: state the
    add-or-remove-one sensitivity directly.
    """
    s = validate_positive(replace_sensitivity, "replace_sensitivity")
    if query != "sum":
        raise PrivacyError(
            f"query={query!r}: a replace-one sensitivity converts to add-or-remove-one only for query='sum'; "
            "state the add-or-remove-one sensitivity of this query directly"
        )
    return s / 2.0
