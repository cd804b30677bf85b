"""Benchmark: PLD accounting of 10,000 Poisson-Gaussian steps and σ calibration for them (target < 1 s each).

    .venv/bin/python benchmarks/bench_privacy.py

Every timing is cold: the PLD caches are cleared first, so nothing is reused between repeats. opacus' PRV
accountant and its get_noise_multiplier are timed once on the same cases for context (no target).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

from dpdistill.privacy import (  # noqa: E402
    PoissonGaussian,
    calibrate_sigma_details,
    calibrate_sigma_opacus,
    epsilon,
    pld_interval,
)
from dpdistill.privacy.analysis import pld  # noqa: E402
from dpdistill.privacy.analysis.prv import prv_epsilon  # noqa: E402

TARGET_S = 1.0
DELTA = 1e-5
STEPS = 10_000


def _cold() -> None:
    pld.leaf_pld.cache_clear()
    pld.mechanism_pld.cache_clear()


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        _cold()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main(repeats: int = 5) -> None:
    epsilon(PoissonGaussian(0.01, 1.0, 10), DELTA)  # imports and first-call set-up, not timed
    rows = []
    for q, sigma in [(0.01, 1.0), (0.004, 0.8), (0.02, 2.0)]:
        m = PoissonGaussian(q, sigma, STEPS)
        times, eps = _timed(lambda m=m: epsilon(m, DELTA), repeats)
        rows.append(
            {
                "what": f"compose {STEPS} steps, q={q}, σ={sigma}",
                "result": f"ε={eps:.4f}",
                "interval": f"{pld_interval(m):g}",
                "median_s": statistics.median(times),
                "max_s": max(times),
                "target_s": TARGET_S,
                "meets_target": max(times) < TARGET_S,
            }
        )
    for q, target in [(0.01, 1.0), (0.01, 3.0), (0.01, 8.0), (0.004, 1.0)]:
        times, cal = _timed(lambda q=q, t=target: calibrate_sigma_details(t, DELTA, q, STEPS), repeats)
        rows.append(
            {
                "what": f"calibrate σ for ε={target}, q={q}, {STEPS} steps",
                "result": f"σ={cal.sigma:.4f} (ε={cal.epsilon:.4f}, {cal.evaluations} PLD evals)",
                "interval": f"{pld_interval(PoissonGaussian(q, cal.sigma, STEPS)):g}",
                "median_s": statistics.median(times),
                "max_s": max(times),
                "target_s": TARGET_S,
                "meets_target": max(times) < TARGET_S,
            }
        )
    # Context, no target: opacus on the same cases.
    t0 = time.perf_counter()
    eps_prv = prv_epsilon(PoissonGaussian(0.01, 1.0, STEPS), DELTA)
    t_prv = time.perf_counter() - t0
    rows.append(
        {
            "what": f"context: opacus PRV ε, {STEPS} steps, q=0.01, σ=1",
            "result": f"ε={eps_prv:.4f}",
            "interval": "",
            "median_s": t_prv,
            "max_s": t_prv,
            "target_s": "",
            "meets_target": "",
        }
    )
    t0 = time.perf_counter()
    s_prv = calibrate_sigma_opacus(1.0, DELTA, 0.01, STEPS, accountant="prv")
    t_cal = time.perf_counter() - t0
    rows.append(
        {
            "what": f"context: opacus get_noise_multiplier (prv), ε=1, q=0.01, {STEPS} steps",
            "result": f"σ={s_prv:.4f}",
            "interval": "",
            "median_s": t_cal,
            "max_s": t_cal,
            "target_s": "",
            "meets_target": "",
        }
    )
    notes = (
        f"δ={DELTA}, add-or-remove-one; PLD from dp-accounting with the interval dpdistill chooses "
        f"(analysis/pld.py); {repeats} cold repeats per row (caches cleared); wall-clock on a shared machine."
    )
    md = record(
        "privacy",
        "python benchmarks/bench_privacy.py",
        rows,
        ["what", "result", "interval", "median_s", "max_s", "target_s", "meets_target"],
        notes,
    )
    print(md.read_text())


if __name__ == "__main__":
    main()
