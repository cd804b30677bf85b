"""`dpdistill privacy`: account a Poisson-Gaussian run, calibrate its σ, print a run (or sweep) folder's ledger,
or show a data owner budget store (``--budgets``)."""

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
    budgets: str | None = None,
) -> int:
    """Print ε by PLD/RDP/PRV/GDP (GDP underestimate flagged), or calibrate σ to --target-epsilon, or print
    RUN_DIR's ledger as a table, or the owner budget store ``budgets``; returns the exit code. Bad input raises
    PrivacyError (one line)."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if budgets is not None:
        if run_dir is not None or any(v is not None for v in (q, sigma, steps, target_epsilon, delta)):
            raise PrivacyError("give --budgets STORE alone (not with a run folder or --q/--sigma/--steps/--delta)")
        return _print_store(Path(budgets), console)
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


def _print_store(store: Path, console) -> int:
    """One table of the store's accounts (a dataset each), then one table of each account's runs."""
    from rich.table import Table

    from dpdistill.privacy.owner_budget import CHARGED, read_store

    accounts = read_store(store)
    if not accounts:
        console.print(f"{store}: no owner budget accounts yet (a run with privacy.owner_budget opens one)")
        return 0
    table = Table(title=f"owner budgets in {store}")
    for name, justify in (("dataset", "left"), ("records", "right"), ("fingerprint", "left"),
                          ("ε spent", "right"), ("ε total", "right"), ("δ", "right"), ("runs", "right"),
                          ("reserved", "right")):
        table.add_column(name, justify=justify)
    for a in accounts:
        c = a.get("composed", {})
        names = ", ".join(f"{d['name']} ({d['root']})" for d in a.get("datasets", []))
        table.add_row(names, str(a.get("n_records", "")), a["fingerprint"][:16], f"{c.get('epsilon', 0.0):.4g}",
                      f"{a['epsilon_total']:g}", f"{a['delta']:.3g}", str(c.get("runs_charged", "")),
                      str(c.get("reservations_pending", "")))
    table.caption = ("ε spent: every run's charges composed by PLD at the owner's δ, with each pending reservation "
                     "counted at its run's whole (ε, δ)")
    console.print(table)
    for a in accounts:
        runs = Table(title=f"{a['fingerprint'][:16]}: runs", show_lines=False)
        for name in ("job", "state", "status", "ε budget", "ε spent (run)", "δ (run)", "run folder"):
            runs.add_column(name)
        for e in a["entries"]:
            spent = f"{e['epsilon_run']:.4g}" if e["state"] == CHARGED and "epsilon_run" in e else "—"
            runs.add_row(e.get("job", ""), e["state"], e.get("status", ""), f"{e['epsilon_budget']:g}", spent,
                         f"{e['delta']:.3g}", e.get("run_dir") or "")
        console.print(runs)
    return 0
