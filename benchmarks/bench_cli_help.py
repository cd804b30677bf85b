"""Benchmark: `dpdistill --help` wall time (target < 2 s), cold subprocess each time.

    .venv/bin/python benchmarks/bench_cli_help.py
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

TARGET_S = 2.0


def main(repeats: int = 10) -> None:
    exe = shutil.which("dpdistill") or str(Path(sys.executable).with_name("dpdistill"))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    row = {"what": "dpdistill --help", "repeats": repeats, "median_s": statistics.median(times),
           "max_s": max(times), "target_s": TARGET_S, "meets_target": max(times) < TARGET_S}
    md = record("cli_help", "python benchmarks/bench_cli_help.py", [row],
                ["what", "repeats", "median_s", "max_s", "target_s", "meets_target"])
    print(md.read_text())


if __name__ == "__main__":
    main()
