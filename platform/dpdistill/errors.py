"""User-facing errors: one line that names the file or field and what was expected; the CLI exits 2.

Internal bugs raise ordinary exceptions (and a traceback); anything a user can fix by changing their input,
their spec or their data raises a subclass of :class:`DpdistillError`.
"""

from __future__ import annotations


class DpdistillError(Exception):
    """Base of every error a user can fix. ``str(err)`` is a single line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Collapse to one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))


class SpecError(DpdistillError):
    """A job spec is missing, unparsable, or has an unknown / ill-typed / out-of-range field."""


class DataError(DpdistillError):
    """A dataset is missing, malformed, or asked for in a way it cannot provide."""


class PrivacyError(DpdistillError):
    """A privacy parameter is invalid (e.g. delta >= 1/n, sigma <= 0, q outside (0, 1])."""


class BudgetExceeded(PrivacyError):
    """A ledger charge would overflow the job's (epsilon, delta) budget; nothing was recorded."""


class ClusterError(DpdistillError):
    """A Ray cluster cannot be reached or refused the connection."""


class TrialsFailed(DpdistillError):
    """Work a sweep depends on failed on the cluster (the trial's own error is in its Tune folder)."""

    exit_code = 1
