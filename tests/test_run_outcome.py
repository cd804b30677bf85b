"""A run explains itself: a failed run's log.txt and status.json carry the error and each stage's outcome, its
MLflow run is FAILED with wall_seconds; run_job's SIGTERM handler lives only as long as the call."""

from __future__ import annotations

import json
import re
import signal
import threading

import pytest

from benchmark_scripts import load_benchmark
from dpdistill.errors import SpecError
from dpdistill.runner import run_job, sigterm_interrupts
from dpdistill.spec import validate_spec

TINY = {
    "name": "outcome",
    "kind": "distill",
    "data": {"name": "digits"},
    "method": {"name": "dm", "ipc": 1, "iterations": 2},
    "evaluation": {"seeds": 1, "epochs": 1, "parallel": False},
}


def test_failed_run_records_its_error_stages_and_outcome(tmp_path, monkeypatch, capsys):
    import mlflow

    import dpdistill.runtime.parallel as parallel
    from dpdistill.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke\nsecond line that status.json must not carry")

    monkeypatch.setattr(parallel, "evaluate_seeds", broken)
    runs = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run_job(validate_spec(dict(TINY)), runs, progress=False)
    (run_dir,) = (runs / "outcome").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed"
    assert status["error"] == "RuntimeError: evaluation broke"  # type and one line
    log = (run_dir / "log.txt").read_text()
    assert re.search(r"stage distil \(dm\) completed in [0-9.]+ s", log)
    assert re.search(r"stage evaluate failed after [0-9.]+ s: RuntimeError: evaluation broke", log)
    assert re.search(r"run .* failed after [0-9.]+ s \(RuntimeError: evaluation broke\)", log)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(status["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.metrics["wall_seconds"] > 0
    capsys.readouterr()
    main(["report", str(runs / "outcome")])  # the job folder: its latest run, with the error
    out = " ".join(capsys.readouterr().out.split())
    assert "status: failed" in out and "error: RuntimeError: evaluation broke" in out


def test_sigterm_handler_is_installed_only_during_the_run(tmp_path):
    seen: list[int] = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with sigterm_interrupts():
            assert signal.getsignal(signal.SIGTERM) is not previous
        assert signal.getsignal(signal.SIGTERM) is previous
        # run_job restores it on every way out, a refused spec included (nothing written).
        spec = validate_spec(dict(TINY))
        spec.evaluation.model_options = {"bogus": 1}
        with pytest.raises(SpecError):
            run_job(spec, tmp_path / "runs", progress=False)
        assert signal.getsignal(signal.SIGTERM) is previous
        assert not (tmp_path / "runs").exists()
        # Outside the main thread Python delivers no signals: nothing is installed (and nothing raises).
        errors: list[BaseException] = []

        def in_thread() -> None:
            try:
                with sigterm_interrupts():
                    pass
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
        assert not errors and signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_run_without_a_terminal_says_every_interval_it_is_alive_and_where(tmp_path, monkeypatch, capfd):
    """Ray Jobs and pods have no terminal and so no progress bars: they used to print nothing until the end."""
    import logging

    import dpdistill.runtime.parallel as parallel

    monkeypatch.setenv("DPDISTILL_HEARTBEAT_SECONDS", "0.2")
    beat = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "still running" in record.getMessage() and "stage evaluate" in record.getMessage():
                beat.set()

    seen = Seen()
    logging.getLogger("dpdistill").addHandler(seen)

    def slow_evaluation(*args, **kwargs):
        assert beat.wait(60), "no heartbeat while a stage ran"  # the stage ends once a heartbeat was seen
        return {"test": {"mean": 0.5, "std": 0.0}}

    monkeypatch.setattr(parallel, "evaluate_seeds", slow_evaluation)
    try:
        result = run_job(validate_spec({**TINY, "tracking": {"enabled": False}}), tmp_path / "runs", progress=False)
    finally:
        logging.getLogger("dpdistill").removeHandler(seen)
    line = r"still running after [0-9]+ s: stage evaluate for [0-9]+ s"
    assert result.status == "completed" and re.search(line, (result.run_dir / "log.txt").read_text())
    err = capfd.readouterr().err
    assert re.search(line, err) and "stage distil (dm) completed" in err  # the console sees the stages too
    # ... and where the run folder is, from the start (a run stopped before its summary is still found):
    # benchmarks/bench_runs.py reads it from such output when draws of one configuration run side by side.
    assert f"run {result.run_dir} started (kind=distill" in err
    assert load_benchmark("bench_runs")._run_folder_in(err) == result.run_dir


def test_a_sigterm_that_reaches_the_caller_as_a_plain_keyboardinterrupt_is_still_a_sigterm():
    """Ray's C++ waits (ray.get / ray.wait) check signals themselves and turn the handler's Terminated into a
    plain KeyboardInterrupt; the run must still say SIGTERM (status, exit 143), not SIGINT. Simulated here: a
    wait that swallows the Terminated and raises its own KeyboardInterrupt, as Ray's signal check does."""
    import os

    from dpdistill.runner import is_sigterm

    def ray_like_wait() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000_000):  # the handler runs between bytecodes, well before this ends
                pass
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None  # what Ray raises: the Terminated's type is gone

    from dpdistill.runner import Terminated

    inside: list[bool] = []
    with pytest.raises(KeyboardInterrupt) as caught, sigterm_interrupts():
        try:
            ray_like_wait()
        except KeyboardInterrupt as e:
            e.add_note("dpdistill mia --resume DIR")
            inside.append(type(e) is KeyboardInterrupt and is_sigterm(e))  # what run_job / lira label by
            raise
    assert inside == [True]
    # Leaving the block hands the caller a Terminated (the CLI's exit 143), the notes kept.
    assert isinstance(caught.value, Terminated) and caught.value.__notes__ == ["dpdistill mia --resume DIR"]
    # A real Ctrl-C in a later block is not mistaken for the earlier SIGTERM.
    with pytest.raises(KeyboardInterrupt) as ctrl_c, sigterm_interrupts():
        raise KeyboardInterrupt
    assert not is_sigterm(ctrl_c.value) and not isinstance(ctrl_c.value, Terminated)


def test_a_run_that_fails_before_its_pipeline_still_says_where_its_folder_is(tmp_path, capfd):
    """A quiet run whose tracking cannot open its store fails before its pipeline (before the "started" line):
    its console output still names its folder in the outcome line, so bench_runs records the failure against
    that folder and not against another draw's (draws run side by side)."""
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    spec = validate_spec({**TINY, "tracking": {"uri": f"sqlite:///{not_a_folder / 'mlflow.db'}"}})
    with pytest.raises(OSError):
        run_job(spec, tmp_path / "runs", progress=False)
    (run_dir,) = (tmp_path / "runs" / "outcome").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    err = capfd.readouterr().err
    assert f"run {run_dir} failed after" in err
    assert load_benchmark("bench_runs")._run_folder_in(err) == run_dir
