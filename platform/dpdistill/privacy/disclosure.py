"""What a private run may log, and why each value is safe: the declared-disclosure lists the tests enforce.

A private method must never log a number computed from sensitive data without noise (a training loss on a
real batch, a discriminator's score on real records, ...): that number is a release nobody charged. Every key a
run writes — MLflow metrics and params, ``metrics.json``, the JSON report files under ``artifacts/`` — must
therefore be declared here (common keys) or by its method (``DISCLOSURE`` of the method's module or class),
with one of these kinds:

- ``PUBLIC``: a function of the spec, the public facts of the data (sizes, shapes, class counts) and wall
  time; nothing about any record.
- ``ACCOUNTING``: a privacy parameter or figure (ε, δ, σ, q, steps), computed from the plan before any
  sensitive byte is read.
- ``RELEASED``: recomputable from the released artifact alone (plus public data); the tests recompute these.
- ``EVALUATION``: the release scored on the held-out test / validation split (post-processing of the release;
  the guarantee covers the training split, which these never read).
- ``CHARGED``: itself a noisy statistic whose release is charged to the ledger.

Anything else is a leak: the per-method disclosure tests (``tests/test_disclosure_*.py``) fail on an
undeclared key. Patterns use :mod:`fnmatch` syntax (``privacy_epsilon_*``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

PUBLIC = "public"
ACCOUNTING = "accounting"
RELEASED = "released"
EVALUATION = "evaluation"
CHARGED = "charged"
KINDS = (PUBLIC, ACCOUNTING, RELEASED, EVALUATION, CHARGED)

# Keys every job kind may write (runner, ledger, evaluation protocol).
COMMON: dict[str, str] = {
    "wall_seconds": PUBLIC,
    "not_private": PUBLIC,
    "privacy_epsilon": ACCOUNTING,
    "privacy_epsilon_*": ACCOUNTING,
    "privacy_delta": ACCOUNTING,
    "privacy_charges": ACCOUNTING,
    "acc_mean": EVALUATION,
    "acc_std": EVALUATION,
    "val_acc_mean": EVALUATION,
    "val_acc_std": EVALUATION,
    "n_released": PUBLIC,
}


def kind_of(key: str, declared: Mapping[str, str]) -> str | None:
    """The declared kind of ``key`` (exact names win over patterns); None when it is undeclared."""
    if key in declared:
        return declared[key]
    for pattern, kind in declared.items():
        if fnmatchcase(key, pattern):
            return kind
    return None


def undeclared(keys: Iterable[str], *declarations: Mapping[str, str]) -> list[str]:
    """The keys no declaration covers (sorted): each is a value the run released without saying why."""
    merged: dict[str, str] = {}
    for d in (COMMON, *declarations):
        for pattern, kind in d.items():
            if kind not in KINDS:
                raise ValueError(f"disclosure: {pattern!r} has unknown kind {kind!r}")
            merged[pattern] = kind
    return sorted({k for k in keys if kind_of(k, merged) is None})
