"""`dpdistill privacy`: account a Poisson-Gaussian run, calibrate its σ, or print a run folder's ledger."""

from __future__ import annotations

from pathlib import Path

from dpdistill.errors import PrivacyError

LEDGER_NAME = "ledger.json"


def _require(name: str, value: object, mode: str) -> None:
    if value is None:
        raise PrivacyError(
            f"--{name} is required to {mode} (give --q, --steps, --delta and --sigma or "
            "--target-epsilon, or a run folder)"
        )


def privacy_command(
    run_dir: str | None,
    q: float | None,
    sigma: float | None,
    steps: int | None,
    delta: float | None,
    target_epsilon: float | None,
    console=None,
) -> int:
    """Print ε by PLD/RDP/PRV/GDP (GDP underestimate flagged), or calibrate σ to --target-epsilon, or print
    RUN_DIR's ledger as a table; returns the exit code. Bad input raises PrivacyError (one line)."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if run_dir is not None:
        if any(v is not None for v in (q, sigma, steps, target_epsilon, delta)):
            raise PrivacyError("give either a run folder or --q/--sigma/--steps/--delta, not both")
        return _print_ledger(Path(run_dir), console)

    from dpdistill.privacy.accountant import accounting_report
    from dpdistill.privacy.defaults import validate_delta, validate_epsilon, validate_q, validate_steps
    from dpdistill.privacy.mechanisms import PoissonGaussian
    from dpdistill.privacy.report import accounting_table

    mode = "calibrate sigma" if target_epsilon is not None else "account"
    for name, value in (("q", q), ("steps", steps), ("delta", delta)):
        _require(name, value, mode)
    q, steps, delta = validate_q(q), validate_steps(steps), validate_delta(delta)
    if target_epsilon is not None:
        if sigma is not None:
            raise PrivacyError("give --sigma or --target-epsilon, not both")
        target = validate_epsilon(target_epsilon, "target-epsilon")
        from dpdistill.privacy.calibration import calibrate_sigma, calibrate_sigma_opacus

        sigma = calibrate_sigma(target, delta, q, steps)
        console.print(
            f"σ = {sigma:.4f}: smallest noise multiplier (within 1 %) for ε ≤ {target:g} at δ={delta:.3g} "
            f"by PLD, q={q:g}, {steps} steps"
        )
        for acc in ("prv", "rdp"):
            try:
                console.print(
                    f"  opacus get_noise_multiplier ({acc}): σ = {calibrate_sigma_opacus(target, delta, q, steps, acc):.4f}"
                )
            except PrivacyError as err:
                console.print(f"  opacus get_noise_multiplier ({acc}): {err}")
    else:
        _require("sigma", sigma, mode)
    report = accounting_report(PoissonGaussian(q, sigma, steps), delta)
    console.print(accounting_table(report))
    if report.gdp_underestimates:
        console.print(
            f"[bold red]GDP/CLT underestimates ε[/bold red]: {report.gdp:.4g} vs {report.pld:.4g} by PLD. "
            "The PLD figure is the guarantee."
        )
    return 0


def _print_ledger(run_dir: Path, console) -> int:
    from dpdistill.privacy.ledger import PrivacyLedger

    path = run_dir if run_dir.is_file() else run_dir / LEDGER_NAME
    if not path.is_file():
        raise PrivacyError(f"{run_dir}: no {LEDGER_NAME} (a private run writes it before its first release)")
    ledger = PrivacyLedger.load(path)
    console.print(ledger.table())
    return 0
