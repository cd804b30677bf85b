"""A run folder killed without a chance to record its outcome (SIGKILL: an OOM kill, a Ray Job stopped past its
grace period) is shown as ``lost`` by `report` and `compare`, not ``running`` forever; a live run stays
``running``; readers never rewrite status.json."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from dpdistill.runtime.liveness import LOST, owner, owner_gone, shown_status
from run_processes import wait_for_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _finished_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: no process has this PID now (until the kernel reuses it)
    return proc.pid


def test_who_owns_a_folder_and_when_it_is_gone() -> None:
    me = owner()
    assert me["pid"] > 0 and me["host"] and me["start_ticks"] is not None
    assert not owner_gone(me)
    assert shown_status({"status": "running", "process": me}) == "running"
    gone = owner(_finished_pid())
    assert owner_gone({**gone, "start_ticks": 1})
    assert shown_status({"status": "running", "process": {**gone, "start_ticks": 1}}) == LOST
    # The same PID started at another time: the PID was reused, the owner is gone.
    assert owner_gone({**me, "start_ticks": me["start_ticks"] + 1})
    # What cannot be told for sure keeps 'running': another host, no record (an older runner), a bad record.
    assert not owner_gone({**gone, "host": "another-host"})
    assert shown_status({"status": "running"}) == "running"
    assert not owner_gone({"host": me["host"], "pid": "x"})
    # A finished folder is what it says, whoever wrote it.
    assert shown_status({"status": "completed", "process": gone}) == "completed"


def test_a_killed_run_is_shown_lost_by_report_and_compare(tmp_path, capsys) -> None:
    from dpdistill.cli import main
    from dpdistill.runtime.compare import load_row
    from dpdistill.runtime.report_html import read_run

    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpdistill.cli", "run", "jobs/dm-digits.yaml", "--runs-dir", str(runs),
         "--no-progress", "--set", "method.iterations=100000", "--set", "tracking.enabled=false"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        run_dir = wait_for_pipeline(runs, "dm-digits")
        status = json.loads((run_dir / "status.json").read_text())
        assert status["process"]["pid"] == proc.pid
        assert read_run(run_dir).state == "running" and load_row(run_dir).status == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert read_run(run_dir).state == LOST and load_row(run_dir).status == LOST
    main(["report", str(run_dir)])
    assert f"status: {LOST}" in " ".join(capsys.readouterr().out.split())
    # The folder itself is untouched: status.json still says what the killed process last wrote.
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
