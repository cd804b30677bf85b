"""Privacy defaults (δ from the size of the sensitive split) and the checks that refuse bad parameters.

Every check raises :class:`~dpdistill.errors.PrivacyError` with one line naming the parameter, the value
given and what was expected, so the CLI can print it as is.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from dpdistill.errors import PrivacyError


def _number(name: str, value: object) -> float:
    # bool is an int in Python; a True noise multiplier is a bug in the caller's input, not a 1.0.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise PrivacyError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise PrivacyError(f"{name} must be a number, got NaN")
    return v


def validate_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """Refuse ε ≤ 0 or non-finite ε; returns ε as a float."""
    v = _number(name, epsilon)
    if v <= 0 or math.isinf(v):
        raise PrivacyError(f"{name} must be a finite number > 0, got {epsilon!r}")
    return v


def validate_delta(delta: float, name: str = "delta") -> float:
    """Refuse δ outside (0, 1); returns δ as a float (see :func:`check_delta` for the δ < 1/n rule)."""
    v = _number(name, delta)
    if not 0 < v < 1:
        raise PrivacyError(f"{name} must lie in (0, 1), got {delta!r}")
    return v


def validate_q(q: float, name: str = "q") -> float:
    """Refuse a Poisson sampling rate outside (0, 1]; returns q as a float."""
    v = _number(name, q)
    if not 0 < v <= 1:
        raise PrivacyError(f"{name} (sampling rate) must lie in (0, 1], got {q!r}")
    return v


def validate_sigma(sigma: float, name: str = "sigma") -> float:
    """Refuse σ ≤ 0 or non-finite σ; returns σ as a float."""
    v = _number(name, sigma)
    if v <= 0 or math.isinf(v):
        raise PrivacyError(f"{name} (noise) must be a finite number > 0, got {sigma!r}")
    return v


def validate_steps(steps: int, name: str = "steps") -> int:
    """Refuse a step / release count that is not an integer ≥ 1; returns it as an int."""
    if isinstance(steps, bool) or not isinstance(steps, Integral):
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        else:
            raise PrivacyError(f"{name} must be an integer >= 1, got {steps!r}")
    if steps < 1:
        raise PrivacyError(f"{name} must be an integer >= 1, got {steps!r}")
    return int(steps)


def validate_positive(value: float, name: str) -> float:
    """Refuse a scale or sensitivity that is not a finite number > 0."""
    v = _number(name, value)
    if v <= 0 or math.isinf(v):
        raise PrivacyError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def validate_n(n: int, name: str = "n_records") -> int:
    """Refuse a sensitive-split size that is not an integer ≥ 2 (δ = 1/(n ln n) needs ln n > 0)."""
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 2:
        raise PrivacyError(
            f"{name} (size of the sensitive training split) must be an integer >= 2, got {n!r}"
        )
    return int(n)


def default_delta(n: int) -> float:
    """δ = 1/(n·ln n) for a sensitive training split of n records: below 1/n, so no record is likely released."""
    n = validate_n(n)
    return 1.0 / (n * math.log(n))


def check_delta(delta: float, n: int) -> float:
    """Refuse δ ≥ 1/n for a split of n records (such a δ allows releasing a record outright); returns δ."""
    d = validate_delta(delta)
    n = validate_n(n)
    if d >= 1.0 / n:
        raise PrivacyError(
            f"delta={delta!r} must be < 1/n = {1.0 / n:.3g} for n={n} sensitive records "
            f"(default 1/(n ln n) = {default_delta(n):.3g})"
        )
    return d
