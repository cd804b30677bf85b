"""Runs side by side: the table ``dpdistill compare`` prints and its plot of accuracy and FID against ε.

Like report.html, it reads only each run folder's own files (spec.yaml, status.json, metrics.json, ledger.json).
A run whose release is NOT PRIVATE (a non-private method, reproducible noise, an uncharged choice on sensitive
data) is flagged in the table and drawn apart in the plot: its ε, if any, does not describe its release.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpdistill.errors import SpecError
from dpdistill.runtime.report_html import fmt_number, read_run

PLOT_SUFFIXES = (".png", ".svg")


@dataclass
class CompareRow:
    """One run's figures for the comparison (None where the run did not record them)."""

    run_dir: Path
    name: str
    method: str
    epsilon: float | None
    delta: float | None
    acc_mean: float | None
    acc_std: float | None
    val_acc: float | None
    fid: float | None
    fld: float | None
    status: str
    not_private: str | None

    @property
    def label(self) -> str:
        """The job name and the run's stamp: several runs of one job stay apart."""
        return f"{self.name}/{self.run_dir.name}"


def _float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None


def load_row(run_dir: str | Path) -> CompareRow:
    """One run folder's row; a folder that is not a run is a SpecError (one line)."""
    run = read_run(run_dir)
    m = run.metrics
    return CompareRow(run_dir=run.path, name=run.name, method=run.method, epsilon=run.epsilon, delta=run.delta,
                      acc_mean=_float(m.get("acc_mean")), acc_std=_float(m.get("acc_std")),
                      val_acc=_float(m.get("val_acc_mean")), fid=_float(m.get("fid")),
                      fld=_float(m.get("fld")),
                      status=run.state, not_private=run.not_private)


def load_rows(run_dirs: Iterable[str | Path]) -> list[CompareRow]:
    """The rows of several run folders, in the order given."""
    return [load_row(p) for p in run_dirs]


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def cells(row: CompareRow) -> list[str]:
    """The row as the table's text cells: run, method, ε, δ, acc_mean ± std (%), val acc (%), FID, FLD, status."""
    if row.epsilon is None:
        eps = "none"
    else:
        eps = fmt_number(row.epsilon)
    if row.not_private:
        eps += " NOT PRIVATE"
    acc = "—" if row.acc_mean is None else _pct(row.acc_mean) + ("" if row.acc_std is None else f" ± {_pct(row.acc_std)}")
    delta = "—" if row.delta is None else f"{row.delta:.2e}"
    return [row.label, row.method, eps, delta, acc, _pct(row.val_acc), fmt_number(row.fid), fmt_number(row.fld),
            row.status]


HEADERS = ("run", "method", "ε", "δ", "acc % (mean ± std)", "val acc %", "FID", "FLD", "status")


def compare_table(rows: list[CompareRow]) -> Any:
    """The rows as a rich Table, NOT PRIVATE runs in red."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="runs side by side (ε: composed PLD of the run's ledger; accuracy on the test split)")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("run", "method", "status") else "right")
    for row in rows:
        # Text, not str: a run's name is its own text, never rich markup.
        table.add_row(*(Text(c) for c in cells(row)), style="red" if row.not_private else None)
    return table


def check_plot_path(path: str | Path) -> Path:
    """The plot's path if its suffix is one we write (.png, .svg); else a SpecError before anything is read."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise SpecError(f"--plot {path}: expected a .png or .svg file name")
    return path


def plot_rows(rows: list[CompareRow], path: str | Path) -> Path:
    """Write accuracy (left) and FID (right) against ε to ``path`` (.png or .svg).

    ε is on a log axis; runs without a budget sit at the right, in a column labelled "no DP"; NOT PRIVATE
    runs are red crosses (their ε does not describe their release). Test accuracy has its std as an error bar,
    validation accuracy is a hollow marker.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend to set

    path = check_plot_path(path)
    eps = [r.epsilon for r in rows if r.epsilon is not None and r.epsilon > 0]
    lo, hi = (min(eps), max(eps)) if eps else (1.0, 1.0)
    no_dp_x = hi * 4.0

    def x_of(r: CompareRow) -> float:
        if r.epsilon is None:
            return no_dp_x
        return max(r.epsilon, lo / 4.0)  # a run that charged nothing (ε 0) still shows, at the left

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_acc, ax_fid = fig.subplots(1, 2)
    for r in rows:
        x = x_of(r)
        colour = "#cf222e" if r.not_private else "#0969da"
        if r.acc_mean is not None:
            ax_acc.errorbar([x], [100 * r.acc_mean], yerr=[100 * (r.acc_std or 0.0)], fmt="x" if r.not_private
                            else "o", color=colour, capsize=3)
            ax_acc.annotate(r.name + (" (NOT PRIVATE)" if r.not_private else ""), (x, 100 * r.acc_mean),
                            textcoords="offset points", xytext=(5, 4), fontsize=7)
        if r.val_acc is not None:
            ax_acc.plot([x], [100 * r.val_acc], marker="s", mfc="none", color=colour, linestyle="none")
        if r.fid is not None:
            ax_fid.plot([x], [r.fid], marker="x" if r.not_private else "o", color=colour, linestyle="none")
            ax_fid.annotate(r.name, (x, r.fid), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for ax, ylabel in ((ax_acc, "accuracy % (test ● ± std, validation □)"), (ax_fid, "FID (lower is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("ε (PLD)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        xmin, xmax = lo / 8.0, no_dp_x * 2.0
        ax.set_xlim(xmin, xmax)
        if any(r.epsilon is None for r in rows):
            ax.axvline(hi * 2.0, color="#8c959f", linestyle="--", linewidth=0.8)
            ticks = [10.0 ** k for k in range(math.floor(math.log10(xmin)), math.ceil(math.log10(hi * 2.0)) + 1)
                     if xmin <= 10.0 ** k <= hi * 2.0] or sorted({lo, hi})
            ax.minorticks_off()
            ax.set_xticks([*ticks, no_dp_x], [*(f"{t:g}" for t in ticks), "no DP"])
    if not any(r.fid is not None for r in rows):
        ax_fid.text(0.5, 0.5, "no FID recorded by these runs", transform=ax_fid.transAxes, ha="center",
                    va="center", color="#57606a")
    ax_acc.set_title("accuracy against ε")
    ax_fid.set_title("FID against ε")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
