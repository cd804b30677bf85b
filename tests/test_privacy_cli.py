"""`dpdistill privacy`: ε by every accountant with the GDP flag, σ calibration, and a run folder's ledger."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from dpdistill.errors import PrivacyError
from dpdistill.privacy import PoissonGaussian, PrivacyLedger, epsilon
from dpdistill.privacy.cli import privacy_command


def run(*args, **kwargs) -> tuple[int, str]:
    console = Console(record=True, width=160, force_terminal=False)
    code = privacy_command(*args, console=console, **kwargs)
    return code, console.export_text()


def test_accounts_by_every_method_and_flags_gdp():
    code, out = run(None, q=0.01, sigma=1.0, steps=10, delta=1e-5, target_epsilon=None)
    assert code == 0
    for name in ("PLD", "RDP", "PRV", "GDP"):
        assert name in out
    assert "UNDERESTIMATE" in out and "GDP/CLT underestimates ε" in out
    assert re.search(r"PLD \(dp-accounting\)\s+│\s+0\.3[78]\d*\s", out)


def test_target_epsilon_calibrates_sigma():
    code, out = run(None, q=0.01, sigma=None, steps=500, delta=1e-5, target_epsilon=1.5)
    assert code == 0
    sigma = float(re.search(r"σ = ([0-9.]+): smallest noise multiplier", out).group(1))
    assert 0.99 * 1.5 <= epsilon(PoissonGaussian(0.01, sigma, 500), 1e-5) <= 1.5 + 1e-3
    assert "opacus get_noise_multiplier (prv)" in out and "opacus get_noise_multiplier (rdp)" in out


def test_run_dir_prints_the_ledger(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=5.0, delta=1e-5)
    ledger.charge("expert", PoissonGaussian(0.02, 1.5, 100), note="trajectory 0")
    code, out = run(str(tmp_path), None, None, None, None, None)
    assert code == 0
    assert "expert" in out and "PoissonGaussian(q=0.02, σ=1.5, T=100)" in out and "trajectory 0" in out
    with pytest.raises(PrivacyError, match="no ledger.json"):
        run(str(tmp_path / "elsewhere"), None, None, None, None, None)
    with pytest.raises(PrivacyError, match="either a run folder or"):
        run(str(tmp_path), 0.01, None, None, None, None)
