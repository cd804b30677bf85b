"""The ledger: composes by PLD, refuses an overflowing charge without touching ledger.json, persists every
charge durably, and reloads to the same total after the writing process is SIGKILLed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dpdistill.errors import BudgetExceeded, PrivacyError
from dpdistill.privacy import (
    Composed,
    Gaussian,
    Laplace,
    Parallel,
    PoissonGaussian,
    PrivacyLedger,
    RandomizedResponse,
    calibrate_sigma,
    epsilon,
)

DELTA = 1e-5
CLASSES = "per-class partitions of the training split: each record has exactly one label"
CHARGES = [
    ("generator", PoissonGaussian(0.01, 1.2, 300)),
    ("labels", RandomizedResponse(0.2)),
    ("select-init", Parallel(Gaussian(8.0, 1.0, 2), 10, CLASSES)),
    ("expert", PoissonGaussian(0.02, 1.5, 100)),
]


def test_total_is_pld_of_all_charges_and_breakdown_adds_up(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=10.0, delta=DELTA, n_records=60_000)
    totals = [ledger.charge(c, m, note=f"stage {i}") for i, (c, m) in enumerate(CHARGES)]
    composed = epsilon(Composed([m for _, m in CHARGES]), DELTA)
    assert ledger.spent_epsilon() == pytest.approx(composed, rel=1e-9)
    assert totals == sorted(totals) and totals[-1] == ledger.spent_epsilon()
    assert ledger.remaining_epsilon() == pytest.approx(10.0 - composed)
    rows = ledger.breakdown()
    assert [r["component"] for r in rows] == [c for c, _ in CHARGES]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    for row, (_, m) in zip(rows, CHARGES, strict=True):
        assert row["epsilon_alone"] == epsilon(m, DELTA)
        assert row["mechanism"] == m.describe()
    assert rows[2]["argument"] == CLASSES  # the disjointness argument is kept with the charge
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert data["composed"]["epsilon"] == ledger.spent_epsilon()
    assert data["neighbouring"] == "add-or-remove-one"
    assert data["entries"][2]["mechanism"]["argument"] == CLASSES


def test_overflowing_charge_is_refused_and_file_is_byte_identical(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, epsilon_budget=2.0, delta=DELTA)
    ledger.charge("generator", PoissonGaussian(0.01, 1.0, 500))
    before = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    spent = ledger.spent_epsilon()
    big = PoissonGaussian(0.05, 0.8, 1000)
    with pytest.raises(BudgetExceeded) as err:
        ledger.charge("expert", big)
    msg = str(err.value)
    assert "\n" not in msg
    assert "expert asked for PoissonGaussian(q=0.05, σ=0.8, T=1000)" in msg
    assert f"ε left: {ledger.remaining_epsilon():.4g}" in msg and "budget 2" in msg
    assert "nothing recorded" in msg
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert ledger.spent_epsilon() == spent and len(ledger.entries) == 1
    assert ledger.would_cost(big) > 2.0  # would_cost asks without recording
    assert len(ledger.entries) == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "ledger.json"]  # no temp files left behind


def test_charge_that_exactly_fills_the_budget_passes(tmp_path):
    sigma = calibrate_sigma(1.0, DELTA, 0.01, 1000)
    eps = epsilon(PoissonGaussian(0.01, sigma, 1000), DELTA)
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=eps, delta=DELTA)
    assert ledger.charge("dp-sgd", PoissonGaussian(0.01, sigma, 1000)) == eps
    with pytest.raises(BudgetExceeded):
        ledger.charge("one-more", Gaussian(20.0))


def test_reload_and_resume(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA, n_records=60_000)
    for c, m in CHARGES[:2]:
        ledger.charge(c, m)
    again = PrivacyLedger.load(path)
    assert again.spent_epsilon() == ledger.spent_epsilon()
    assert again.entries == ledger.entries and again.mechanisms == ledger.mechanisms
    # Reopening with the same budget resumes; the next charge composes with the reloaded ones.
    resumed = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA, n_records=60_000)
    for c, m in CHARGES[2:]:
        resumed.charge(c, m)
    assert resumed.spent_epsilon() == pytest.approx(
        epsilon(Composed([m for _, m in CHARGES]), DELTA), rel=1e-9
    )
    with pytest.raises(PrivacyError, match="resuming with epsilon_budget=5.0 but the ledger records"):
        PrivacyLedger(path, epsilon_budget=5.0, delta=DELTA, n_records=60_000)
    with pytest.raises(PrivacyError, match="no ledger here"):
        PrivacyLedger.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PrivacyError, match="not a readable ledger"):
        PrivacyLedger.load(tmp_path / "bad.json")


CHILD = textwrap.dedent(
    """
    import sys, time
    from dpdistill.privacy import PrivacyLedger, PoissonGaussian, Laplace
    path, mode = sys.argv[1], sys.argv[2]
    ledger = PrivacyLedger(path, epsilon_budget=1e6, delta=1e-5)
    i = 0
    while True:
        m = PoissonGaussian(0.01, 1.0 + 0.01 * (i % 7), 50) if i % 2 == 0 else Laplace(10.0 + i)
        total = ledger.charge(f"stage-{i}", m)
        print(f"charged {i} {total!r}", flush=True)
        i += 1
        if mode == "between" and i == 3:
            print("ready", flush=True)
            time.sleep(600)
    """
)


def _spawn(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ledger.json"), mode],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_sigkill_between_charges_reloads_to_the_same_total(tmp_path):
    proc = _spawn(tmp_path, "between")
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "ready":
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    reported = float(lines[2].split()[2])
    ledger = PrivacyLedger.load(tmp_path / "ledger.json")
    assert len(ledger.entries) == 3
    assert ledger.spent_epsilon() == reported  # the same figure the killed process had charged to


def test_sigkill_during_charges_never_tears_the_file(tmp_path):
    proc = _spawn(tmp_path, "burst")
    printed = []
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            printed.append(line.strip())
            if len(printed) >= 4 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)  # somewhere in the middle of the next charge
    finally:
        proc.kill()
        proc.wait(timeout=30)
    ledger = PrivacyLedger.load(tmp_path / "ledger.json")  # parses: whole old file or whole new one
    n = len(ledger.entries)
    assert n >= len(printed)  # everything reported as charged is on disk (maybe one more, not yet printed)
    recomputed = epsilon(Composed(ledger.mechanisms), 1e-5)
    assert ledger.spent_epsilon() == pytest.approx(recomputed, rel=1e-9)
    assert ledger.entries[-1]["epsilon_total_after"] == pytest.approx(ledger.spent_epsilon(), rel=1e-12)


def test_in_memory_ledger_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ledger = PrivacyLedger(None, epsilon_budget=1.0, delta=DELTA)
    ledger.charge("check", Laplace(5.0))
    assert list(tmp_path.iterdir()) == []
    assert ledger.to_dict()["entries"][0]["component"] == "check"


def test_mlflow_metrics_and_table(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=10.0, delta=DELTA)
    for c, m in CHARGES:
        ledger.charge(c, m)
    metrics = ledger.to_mlflow_metrics()
    assert metrics["privacy_epsilon"] == ledger.spent_epsilon()
    assert metrics["privacy_delta"] == DELTA
    assert metrics["privacy_epsilon_budget"] == 10.0 and metrics["privacy_charges"] == 4.0
    assert metrics["privacy_epsilon_rdp"] >= metrics["privacy_epsilon"]
    assert metrics["privacy_epsilon_select-init"] == pytest.approx(epsilon(Gaussian(8.0, 1.0, 2), DELTA))
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    json.dumps(ledger.to_dict(), allow_nan=False)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(ledger.table())
    text = console.export_text()
    assert (
        "generator" in text and "disjoint: per-class partitions" in text and "of 10 (PLD, composed)" in text
    )


def test_charge_refuses_bad_input(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=1.0, delta=DELTA)
    with pytest.raises(PrivacyError, match="component must be a non-empty name"):
        ledger.charge("", Laplace(5.0))
    with pytest.raises(PrivacyError, match="mechanism must be a dpdistill.privacy mechanism"):
        ledger.charge("x", {"type": "laplace"})
    assert not (tmp_path / "ledger.json").exists()


def test_two_ledger_objects_on_one_file_see_each_others_charges(tmp_path):
    path = tmp_path / "ledger.json"
    a = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    b = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    a.charge("a", CHARGES[0][1])
    b.charge("b", CHARGES[3][1])  # b adopts a's charge before composing its own
    a.charge("a", CHARGES[1][1])
    expected = epsilon(Composed([CHARGES[0][1], CHARGES[3][1], CHARGES[1][1]]), DELTA)
    reloaded = PrivacyLedger.load(path)
    assert [e["component"] for e in reloaded.entries] == ["a", "b", "a"]
    assert a.spent_epsilon() == pytest.approx(expected, rel=1e-9)
    assert reloaded.spent_epsilon() == pytest.approx(expected, rel=1e-9)


def test_a_charge_that_fits_alone_is_refused_after_another_writers_charge(tmp_path):
    path = tmp_path / "ledger.json"
    step = PoissonGaussian(0.01, 1.0, 1000)
    budget = epsilon(step, DELTA) * 1.05  # one fits, two do not
    a = PrivacyLedger(path, epsilon_budget=budget, delta=DELTA)
    b = PrivacyLedger(path, epsilon_budget=budget, delta=DELTA)
    a.charge("a", step)
    before = path.read_bytes()
    with pytest.raises(BudgetExceeded):
        b.charge("b", step)
    assert path.read_bytes() == before


def test_a_replaced_file_with_the_same_number_of_charges_is_not_overwritten(tmp_path):
    """The adopt check compares the charges themselves: a different file with as many entries is refused."""
    path = tmp_path / "ledger.json"
    a = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    a.charge("a", CHARGES[0][1])
    other = PrivacyLedger(tmp_path / "other.json", epsilon_budget=10.0, delta=DELTA)
    other.charge("other", CHARGES[3][1])
    path.write_bytes(other.path.read_bytes())  # another writer replaced the file: one charge, not a's
    before = path.read_bytes()
    with pytest.raises(PrivacyError, match="no longer holds this ledger's charges"):
        a.charge("a", CHARGES[1][1])
    assert path.read_bytes() == before  # other's charge survives
    # The same charges under a changed budget are a replaced file too.
    b = PrivacyLedger(tmp_path / "b.json", epsilon_budget=10.0, delta=DELTA)
    b.charge("b", CHARGES[0][1])
    doc = json.loads(b.path.read_text())
    doc["epsilon_budget"] = 100.0
    b.path.write_text(json.dumps(doc))
    with pytest.raises(PrivacyError, match="no longer holds this ledger's charges"):
        b.charge("b", CHARGES[1][1])
    # A file that holds exactly this ledger's charges (written by it) is adopted as before.
    a2 = PrivacyLedger(tmp_path / "c.json", epsilon_budget=10.0, delta=DELTA)
    a2.charge("c", CHARGES[0][1])
    a2.charge("c", CHARGES[1][1])
    assert len(PrivacyLedger.load(a2.path).entries) == 2


_WORKER = """
import sys
from dpdistill.privacy import PoissonGaussian, PrivacyLedger
ledger = PrivacyLedger(sys.argv[1], epsilon_budget=50.0, delta=1e-5)
for i in range(5):
    ledger.charge(sys.argv[2], PoissonGaussian(0.01, 2.0, 50 + i))
"""


def test_concurrent_processes_lose_no_charge(tmp_path):
    path = tmp_path / "ledger.json"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(path), f"w{k}"]) for k in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    ledger = PrivacyLedger.load(path)
    assert len(ledger.entries) == 15
    assert [e["index"] for e in ledger.entries] == list(range(15))
    assert ledger.spent_epsilon() == pytest.approx(epsilon(Composed(ledger.mechanisms), DELTA), rel=1e-9)


def test_charge_many_records_all_or_nothing(tmp_path):
    """A set whose first part fits but whose whole does not records nothing (charging part by part would have
    recorded the first); a set that fits lands in one file write."""
    path = tmp_path / "ledger.json"
    step = PoissonGaussian(0.01, 1.0, 1000)
    ledger = PrivacyLedger(path, epsilon_budget=epsilon(step, DELTA) * 1.05, delta=DELTA)  # one fits, two do not
    with pytest.raises(BudgetExceeded, match="nothing recorded"):
        ledger.charge_many([("plan/a", step, ""), ("plan/b", step, "")])
    assert not path.exists() and ledger.entries == [] and ledger.spent_epsilon() == 0.0
    roomy = PrivacyLedger(tmp_path / "roomy.json", epsilon_budget=10.0, delta=DELTA)
    writes = []
    original = roomy._write
    roomy._write = lambda: (writes.append(1), original())[1]
    total = roomy.charge_many([(c, m, "n") for c, m in CHARGES[:3]])
    assert len(writes) == 1 and [e["component"] for e in roomy.entries] == [c for c, _ in CHARGES[:3]]
    assert total == roomy.spent_epsilon() == pytest.approx(epsilon(Composed([m for _, m in CHARGES[:3]]), DELTA))
    with pytest.raises(PrivacyError, match="no charges"):
        roomy.charge_many([])


_PLAN_WORKER = """
import sys
from dpdistill.privacy import PoissonGaussian, PrivacyLedger
ledger = PrivacyLedger(sys.argv[1], epsilon_budget=50.0, delta=1e-5)
for i in range(6):
    ledger.charge_many([(sys.argv[2], PoissonGaussian(0.01, 2.0, 50 + i), "part 1"),
                        (sys.argv[2], PoissonGaussian(0.01, 2.0, 60 + i), "part 2")])
"""


def test_another_writers_charge_never_lands_between_a_sets_parts(tmp_path):
    """Three processes charge two-part sets at once: every set's parts are adjacent in the file (charged one
    part at a time, another writer's charge could land between them)."""
    path = tmp_path / "ledger.json"
    procs = [subprocess.Popen([sys.executable, "-c", _PLAN_WORKER, str(path), f"w{k}"]) for k in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    entries = PrivacyLedger.load(path).entries
    assert len(entries) == 36
    for first, second in zip(entries[::2], entries[1::2], strict=True):
        assert (first["note"], second["note"]) == ("part 1", "part 2")
        assert first["component"] == second["component"]
