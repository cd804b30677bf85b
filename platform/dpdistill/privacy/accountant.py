"""ε(δ) and δ(ε) of any mechanism by PLD (the authority) and, beside it, RDP, PRV and GDP/CLT.

The reported guarantee is always the PLD figure (pessimistic estimate: an upper bound). The others are
there to compare with the literature: RDP and PRV are looser or comparable upper bounds, and the GDP/CLT
figure the papers use is an approximation that can be far below the truth with few steps; a GDP figure
below the PLD one is flagged, never reported as the guarantee.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dpdistill.errors import PrivacyError
from dpdistill.privacy.analysis import gdp, pld, prv, rdp
from dpdistill.privacy.defaults import validate_delta
from dpdistill.privacy.mechanisms import Mechanism
from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE, check_relation

METHODS = ("pld", "rdp", "prv", "gdp")

# PLD's pessimistic rounding may sit up to ~0.7 % above the true ε (see analysis/pld.py); a GDP figure is
# flagged only when it is further below than that, so an exact GDP figure (plain Gaussian) is not flagged.
GDP_FLAG_REL_TOL = 0.01


def _check(mechanism: Mechanism, method: str, neighbouring: str) -> None:
    if not isinstance(mechanism, Mechanism):
        raise PrivacyError(f"mechanism must be a dpdistill.privacy mechanism, got {type(mechanism).__name__}")
    if method not in METHODS:
        raise PrivacyError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_relation(mechanism, neighbouring)


def epsilon(
    mechanism: Mechanism, delta: float, method: str = "pld", neighbouring: str = ADD_OR_REMOVE_ONE
) -> float:
    """ε at ``delta`` of ``mechanism`` by one accountant; PrivacyError where that accountant does not apply."""
    _check(mechanism, method, neighbouring)
    delta = validate_delta(delta)
    if method == "pld":
        return pld.pld_epsilon(mechanism, delta, neighbouring)
    if method == "rdp":
        value = rdp.rdp_epsilon(mechanism, delta, neighbouring)
    elif method == "prv":
        value = prv.prv_epsilon(mechanism, delta, neighbouring)
    else:
        mu = gdp.gdp_mu_of(mechanism) if neighbouring == ADD_OR_REMOVE_ONE else None
        value = None if mu is None else gdp.gdp_epsilon(mu, delta)
    if value is None:
        raise PrivacyError(f"method={method!r} gives no figure for {mechanism.describe()} ({neighbouring})")
    return value


def delta_for(
    mechanism: Mechanism, epsilon: float, method: str = "pld", neighbouring: str = ADD_OR_REMOVE_ONE
) -> float:
    """δ at ``epsilon`` of ``mechanism`` by one accountant; PrivacyError where it does not apply."""
    _check(mechanism, method, neighbouring)
    if not (isinstance(epsilon, int | float) and epsilon >= 0 and math.isfinite(epsilon)):
        raise PrivacyError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    eps = float(epsilon)
    if method == "pld":
        return pld.pld_delta(mechanism, eps, neighbouring)
    if method == "rdp":
        value = rdp.rdp_delta(mechanism, eps, neighbouring)
    elif method == "prv":
        value = prv.prv_delta(mechanism, eps, neighbouring)
    else:
        mu = gdp.gdp_mu_of(mechanism) if neighbouring == ADD_OR_REMOVE_ONE else None
        value = None if mu is None else gdp.gdp_delta(mu, eps)
    if value is None:
        raise PrivacyError(f"method={method!r} gives no figure for {mechanism.describe()} ({neighbouring})")
    return value


@dataclass(frozen=True)
class AccountingReport:
    """ε at one δ by every accountant; ``epsilon`` (= ``pld``) is the reported guarantee."""

    mechanism: str
    delta: float
    neighbouring: str
    pld: float
    rdp: float | None
    prv: float | None
    gdp: float | None
    gdp_mu: float | None
    gdp_underestimates: bool
    pld_interval: float

    @property
    def epsilon(self) -> float:
        """The reported ε: the PLD figure."""
        return self.pld

    def to_dict(self) -> dict:
        """A JSON-ready dict (``epsilon`` included)."""
        return {**asdict(self), "epsilon": self.epsilon}


def gdp_flag(gdp_epsilon: float | None, pld_epsilon: float) -> bool:
    """Whether a GDP/CLT figure understates the PLD one beyond PLD's own rounding."""
    return gdp_epsilon is not None and gdp_epsilon < pld_epsilon * (1.0 - GDP_FLAG_REL_TOL)


def accounting_report(
    mechanism: Mechanism, delta: float, neighbouring: str = ADD_OR_REMOVE_ONE, include_prv: bool = True
) -> AccountingReport:
    """Every accountant's ε at ``delta``; prv / gdp are None where they do not apply (or PRV is skipped)."""
    _check(mechanism, "pld", neighbouring)
    delta = validate_delta(delta)
    eps_pld = pld.pld_epsilon(mechanism, delta, neighbouring)
    mu = gdp.gdp_mu_of(mechanism) if neighbouring == ADD_OR_REMOVE_ONE else None
    eps_gdp = None if mu is None else gdp.gdp_epsilon(mu, delta)
    return AccountingReport(
        mechanism=mechanism.describe(),
        delta=delta,
        neighbouring=neighbouring,
        pld=eps_pld,
        rdp=rdp.rdp_epsilon(mechanism, delta, neighbouring),
        prv=prv.prv_epsilon(mechanism, delta, neighbouring) if include_prv else None,
        gdp=eps_gdp,
        gdp_mu=mu,
        gdp_underestimates=gdp_flag(eps_gdp, eps_pld),
        pld_interval=pld.pld_interval(mechanism),
    )
