"""Rich tables for people: an accounting report (PLD beside RDP, PRV, GDP) and a ledger's charges."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from dpdistill.privacy.accountant import AccountingReport
    from dpdistill.privacy.ledger import PrivacyLedger


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.4e}"


def accounting_table(report: AccountingReport, title: str | None = None) -> Table:
    """ε at δ by each accountant; the PLD row is the guarantee and a low GDP figure is flagged."""
    table = Table(title=title or f"{report.mechanism} at δ={report.delta:.3g}")
    table.add_column("accountant")
    table.add_column("ε", justify="right")
    table.add_column("note")
    table.add_row(
        "PLD (dp-accounting)",
        _fmt(report.pld),
        f"reported guarantee; pessimistic, interval {report.pld_interval:g}",
        style="bold",
    )
    table.add_row("RDP (dp-accounting)", _fmt(report.rdp), "upper bound" if report.rdp is not None else "n/a")
    table.add_row(
        "PRV (opacus)",
        _fmt(report.prv),
        "upper bound (eps_error 0.01)" if report.prv is not None else "n/a for this mechanism / size",
    )
    if report.gdp is None:
        gdp_note = "n/a (not a Gaussian mechanism)"
    elif report.gdp_underestimates:
        gdp_note = f"[red]UNDERESTIMATE[/red]: CLT approximation below PLD by {report.pld - report.gdp:.3g}"
    else:
        gdp_note = "CLT approximation (papers' figure)"
    mu = f" (μ={report.gdp_mu:.4g})" if report.gdp_mu is not None else ""
    table.add_row(f"GDP / CLT{mu}", _fmt(report.gdp), gdp_note)
    table.caption = f"neighbouring: {report.neighbouring}"
    return table


def ledger_table(ledger: PrivacyLedger) -> Table:
    """One row per charge (component, mechanism, ε alone, share, ε total after); totals in the caption."""
    where = str(ledger.path) if ledger.path is not None else "in-memory ledger"
    table = Table(title=f"privacy ledger · {where}")
    for name, justify in (
        ("#", "right"),
        ("component", "left"),
        ("mechanism", "left"),
        ("ε alone", "right"),
        ("share", "right"),
        ("ε total after", "right"),
        ("note", "left"),
    ):
        table.add_column(name, justify=justify)
    for row in ledger.breakdown():
        note = row["note"]
        if row["argument"]:
            note = f"{note}; disjoint: {row['argument']}" if note else f"disjoint: {row['argument']}"
        table.add_row(
            str(row["index"]),
            row["component"],
            row["mechanism"],
            _fmt(row["epsilon_alone"]),
            f"{100 * row['share']:.1f}%",
            _fmt(row["epsilon_total_after"]),
            note,
        )
    table.caption = (
        f"ε spent {ledger.spent_epsilon():.4g} of {ledger.epsilon_budget:g} (PLD, composed), "
        f"δ={ledger.delta:.3g}, {ledger.neighbouring}; share apportions the sum of ε-alone figures"
    )
    return table
