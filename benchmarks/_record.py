"""Record a benchmark's results: JSON for machines, a markdown table (machine, date, command) for people."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    mem_gib = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        mem_gib = f"{kib / 2**20:.0f} GiB"
    except OSError:
        pass
    cpu, model, isa = platform.processor() or platform.machine(), "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:  # the first CPU's (all are alike here)
                    cpu = model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    # The vector / matrix units that decide CPU speed here: one "Intel Xeon" VM had AMX (bfloat16
                    # convolutions 6x float32) and another did not, under the same model name.
                    flags = set(line.split(":", 1)[1].split())
                    isa = " ".join(f for f in ISA_FLAGS if f in flags)
                    break
    except OSError:
        pass
    return {"cpu": cpu, "isa": isa, "cores": str(os.cpu_count()), "memory": mem_gib,
            "python": sys.version.split()[0], "os": platform.platform()}


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def record(name: str, command: str, rows: list[dict], columns: list[str], notes: str = "",
           history: list[dict] | None = None, history_columns: list[str] | None = None,
           meta: dict | None = None) -> Path:
    """Write results/<name>.json and results/<name>.md; returns the markdown path.

    ``history``: earlier rows a rerun replaced (kept in the JSON and listed after the table under "Earlier
    runs", newest first, with ``history_columns``), so a rerun never erases a recorded figure. ``meta``: the
    date and machine of a re-render (default: now, this machine)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = meta or {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                    "machine": machine()}
    doc = {**meta, "rows": rows, "notes": notes, **({"history": history} if history is not None else {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    m = meta["machine"]
    lines = [f"# {name}", "", f"- date: {meta['date']}", f"- command: `{command}`",
             f"- machine: {m['cpu']}{' (' + m['isa'] + ')' if m.get('isa') else ''}, {m['cores']} cores, "
             f"{m['memory']}, Python {m['python']}", ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    if history:
        cols = history_columns or columns
        lines += ["", "## Earlier runs", "", "Rows a later run of the same part replaced (newest first); compare a "
                  "timing with another only on the same CPU and at similar machine probes.", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in reversed(history):
            lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
