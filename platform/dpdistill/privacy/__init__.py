"""Privacy core: mechanisms, accountants (PLD authoritative; RDP, PRV, GDP beside it), calibration, the
ledger and budget allocation. Neighbouring relation: add-or-remove-one record of the sensitive split.
"""

from dpdistill.errors import BudgetExceeded, PrivacyError
from dpdistill.privacy.accountant import (
    GDP_FLAG_REL_TOL,
    METHODS,
    AccountingReport,
    accounting_report,
    delta_for,
    epsilon,
)
from dpdistill.privacy.allocation import AllocationResult, allocate_sigma
from dpdistill.privacy.analysis.gdp import (
    gdp_compose,
    gdp_delta,
    gdp_epsilon,
    gdp_mu,
    gdp_mu_for,
    gdp_mu_of,
    sigma_for_mu,
)
from dpdistill.privacy.analysis.pld import pld_interval
from dpdistill.privacy.calibration import (
    Calibration,
    calibrate_gaussian,
    calibrate_mechanism,
    calibrate_sigma,
    calibrate_sigma_details,
    calibrate_sigma_opacus,
)
from dpdistill.privacy.defaults import (
    check_delta,
    default_delta,
    validate_delta,
    validate_epsilon,
    validate_n,
    validate_positive,
    validate_q,
    validate_sigma,
    validate_steps,
)
from dpdistill.privacy.ledger import PrivacyLedger
from dpdistill.privacy.mechanisms import (
    Composed,
    Gaussian,
    Laplace,
    Mechanism,
    Parallel,
    PoissonGaussian,
    RandomizedResponse,
    mechanism_from_dict,
)
from dpdistill.privacy.neighbouring import (
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    replace_one_guarantee,
)
from dpdistill.privacy.noise import PrivacyRandomness

__all__ = [
    "ADD_OR_REMOVE_ONE",
    "GDP_FLAG_REL_TOL",
    "METHODS",
    "REPLACE_ONE",
    "AccountingReport",
    "AllocationResult",
    "BudgetExceeded",
    "Calibration",
    "Composed",
    "Gaussian",
    "Laplace",
    "Mechanism",
    "Parallel",
    "PoissonGaussian",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacyRandomness",
    "RandomizedResponse",
    "accounting_report",
    "allocate_sigma",
    "calibrate_gaussian",
    "calibrate_mechanism",
    "calibrate_sigma",
    "calibrate_sigma_details",
    "calibrate_sigma_opacus",
    "check_delta",
    "default_delta",
    "delta_for",
    "epsilon",
    "gdp_compose",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu",
    "gdp_mu_for",
    "gdp_mu_of",
    "mechanism_from_dict",
    "pld_interval",
    "replace_one_guarantee",
    "sigma_for_mu",
    "validate_delta",
    "validate_epsilon",
    "validate_n",
    "validate_positive",
    "validate_q",
    "validate_sigma",
    "validate_steps",
]
