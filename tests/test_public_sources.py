"""A "public data" option that names the sensitive dataset is refused before anything is read or written.

Pretraining, utility tuning, public initialisation and the fidelity extractor cost no privacy only because
their data is public; pointed at the job's own dataset they would read its records without noise or charge.
"""

from __future__ import annotations

import pytest

from dpdistill.errors import SpecError
from dpdistill.runner import run_job
from dpdistill.spec import validate_spec

DIGITS = {"data": {"name": "digits"}, "tracking": {"enabled": False}, "evaluation": {"enabled": False}}

CASES = {
    "dpgeng public": ({"kind": "distill", "privacy": {"epsilon": 1.0},
                       "method": {"name": "dpgeng", "public": "digits"}}, "method.public"),
    "dpgeng utility_tuning": ({"kind": "distill", "privacy": {"epsilon": 1.0},
                               "method": {"name": "dpgeng", "allocation": "utility", "utility_tuning": "digits"}},
                              "method.utility_tuning"),
    "synthesize pretrain": ({"kind": "synthesize", "privacy": {"epsilon": 1.0},
                             "method": {"name": "dp-merf", "pretrain": "digits"}}, "method.pretrain"),
    "synthesize fidelity_public": ({"kind": "synthesize", "privacy": {"epsilon": 1.0},
                                    "method": {"name": "dp-merf", "fidelity": True, "fidelity_public": "digits"}},
                                   "method.fidelity_public"),
    "sfdd public init": ({"kind": "sfdd", "privacy": {"epsilon": 1.0},
                          "method": {"name": "sfdd", "n_clients": 2, "defence": "localdp", "init": "public",
                                     "public_data": "digits"}}, "method.public_data"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_sensitive_set_as_public_data_is_refused_and_nothing_is_written(case, tmp_path) -> None:
    doc, field = CASES[case]
    spec = validate_spec({"name": "public-source", **DIGITS, **doc})
    with pytest.raises(SpecError, match=f"'{field}': 'digits' is the sensitive dataset itself"):
        run_job(spec, tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_another_public_set_is_accepted() -> None:
    from dpdistill.pipelines import check_public_source

    spec = validate_spec({"name": "public-source", "kind": "distill", **DIGITS, "privacy": {"epsilon": 1.0},
                          "method": {"name": "dpgeng", "public": "glyphs"}})
    check_public_source("glyphs", spec, "method.public")  # no error
    check_public_source(None, spec, "method.public")
