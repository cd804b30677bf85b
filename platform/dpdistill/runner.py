"""Run a job: preflight checks, then the run folder, the ledger, the MLflow run and the pipeline's stages.

Order matters for two promises. Bad input leaves nothing behind: everything a user can get wrong (spec, data
folder, privacy parameters) is checked by the pipeline's ``prepare`` before the run folder exists, and so is a data
owner's budget (``privacy.owner_budget``): the run's whole ε is reserved in the owner's store, or the run refused,
before the folder exists; when the run ends the reservation settles to what its ledger charged. Ctrl-C and SIGTERM
(``ray job stop``, a pod's eviction or deadline) leave a consistent folder: every file is written atomically, the
status becomes ``interrupted``, the partial metrics stay and the MLflow run is KILLED.

A run explains itself: ``log.txt`` holds its start, each pipeline stage (:meth:`RunContext.stage`) with its
seconds, warnings, the error on failure and the outcome; ``status.json`` carries ``error`` (type and one line)
when it failed. Only timings, outcomes and error messages are logged, nothing computed from sensitive data.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpdistill.errors import SpecError
from dpdistill.privacy.noise import NOT_PRIVATE_BANNER, PrivacyRandomness
from dpdistill.runtime.provenance import mlflow_tags
from dpdistill.runtime.runfolder import RunFolder
from dpdistill.runtime.tracking import Tracker, resolve_tracking_uri
from dpdistill.spec import JobSpec

log = logging.getLogger("dpdistill.runner")


@dataclass
class RunContext:
    """What a pipeline's stages get: the spec, the run folder, the ledger (private jobs) and logging."""

    spec: JobSpec
    run: RunFolder
    tracker: Tracker
    ledger: Any | None
    progress: bool = True
    # The job's privacy randomness: secret (OS entropy) unless privacy.reproducible_noise (NOT PRIVATE).
    noise: PrivacyRandomness = field(default_factory=PrivacyRandomness.secret)
    summary: list[tuple[str, str]] = field(default_factory=list)
    # Artifact file names the runner must not copy to MLflow (e.g. a non-private method's images).
    untracked: set[str] = field(default_factory=set)
    # The stage running now (name, start time), for the heartbeat of a run without a terminal.
    current_stage: tuple[str, float] | None = None
    # Why a local Ray failed to start earlier in this run (later work then runs in-process without retrying).
    local_ray_failed: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Final metrics (step None) go to metrics.json and MLflow; stepped ones to MLflow only."""
        if step is None:
            self.run.log_metrics(metrics)
        self.tracker.log_metrics(metrics, step=step)

    def add_summary(self, what: str, value: str) -> None:
        """A row of the table printed at the end of the run."""
        self.summary.append((what, value))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Log a pipeline stage's start and its end (completed / interrupted / failed) with its seconds."""
        log.info("stage %s started", name)
        started = time.perf_counter()
        outer, self.current_stage = self.current_stage, (name, started)
        try:
            yield
        except KeyboardInterrupt:
            log.warning("stage %s interrupted after %.1f s", name, time.perf_counter() - started)
            raise
        except BaseException as e:
            log.error("stage %s failed after %.1f s: %s", name, time.perf_counter() - started, error_line(e))
            raise
        finally:
            self.current_stage = outer
        log.info("stage %s completed in %.1f s", name, time.perf_counter() - started)


HEARTBEAT_ENV = "DPDISTILL_HEARTBEAT_SECONDS"


@contextlib.contextmanager
def console_log(enabled: bool) -> Iterator[None]:
    """While the block runs, the package's log lines (stages, heartbeat, the outcome) also go to stderr.

    For runs without a terminal (Ray Jobs, Kubernetes, CI, bench_runs), which show no progress bars. Entered by
    :func:`run_job` around the whole run, so the last line (how it ended, and where its folder is) reaches the
    console even when the run fails before its pipeline starts.
    """
    if not enabled:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.getLogger("dpdistill").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("dpdistill").removeHandler(handler)


@contextlib.contextmanager
def heartbeat(ctx_holder: list[RunContext], started: float) -> Iterator[None]:
    """A line every 30 s (``$DPDISTILL_HEARTBEAT_SECONDS``) saying the run is alive and which stage it is in.

    For runs without a terminal: the lines go to log.txt and (with :func:`console_log`) to stderr. Only
    timings: nothing computed from the data.
    """
    every = float(os.environ.get(HEARTBEAT_ENV, "") or 30.0)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            now = time.perf_counter()
            stage = ctx_holder[0].current_stage if ctx_holder else None
            if stage is None:
                log.info("still running after %.0f s", now - started)
            else:
                log.info("still running after %.0f s: stage %s for %.0f s", now - started, stage[0], now - stage[1])

    thread = threading.Thread(target=beat, name="dpdistill-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """With the spec's ``threads``: that many torch threads for the job, and $DPDISTILL_THREADS set so every
    thread_limit and evaluation path (Ray tasks included) uses the same count; unset: nothing changes."""
    import torch

    from dpdistill.evaluation.training import THREADS_ENV

    if threads is None:
        yield
        return
    prior_env, prior_threads = os.environ.get(THREADS_ENV), torch.get_num_threads()
    os.environ[THREADS_ENV] = str(threads)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prior_threads)
        if prior_env is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = prior_env


@contextlib.contextmanager
def compiled_loops(enabled: bool) -> Iterator[None]:
    """With the spec's ``compile``: $DPDISTILL_COMPILE set for the job, so every training step and embedding
    that can (dpdistill.models.compiled) runs through torch.compile, Ray evaluation tasks included; off: the
    variable is cleared for the job (an outer shell's setting does not leak into a run whose spec says no)."""
    from dpdistill.models.compiled import COMPILE_ENV

    prior = os.environ.get(COMPILE_ENV)
    os.environ[COMPILE_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if prior is None:
            os.environ.pop(COMPILE_ENV, None)
        else:
            os.environ[COMPILE_ENV] = prior


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, pod eviction, ``activeDeadlineSeconds``) seen during a run: handled as Ctrl-C."""

    signum = int(signal.SIGTERM)


# Set by sigterm_interrupts' handler. A SIGTERM that lands while the main thread waits inside Ray's C++ code
# (ray.get / ray.wait) reaches the caller as a PLAIN KeyboardInterrupt: Ray's signal check catches the
# handler's Terminated (a KeyboardInterrupt) and raises its own. The flag keeps what the signal was.
_SIGTERM_SEEN = threading.Event()


def is_sigterm(err: BaseException) -> bool:
    """Whether an interrupt came from SIGTERM (Terminated, or inside a :func:`sigterm_interrupts` block any
    KeyboardInterrupt after its handler ran; leaving the block turns the latter into Terminated)."""
    return isinstance(err, Terminated) or (isinstance(err, KeyboardInterrupt) and _SIGTERM_SEEN.is_set())


def error_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (at most 300 characters)."""
    lines = str(err).strip().splitlines()
    message = lines[0] if lines else ""
    return f"{type(err).__name__}: {message[:300]}" if message else type(err).__name__


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While a run is in progress, turn SIGTERM into :class:`Terminated` (like Ctrl-C's KeyboardInterrupt).

    Only in the main thread (the only one Python delivers signals to); the previous handler comes back after.
    The first SIGTERM interrupts; later ones are ignored so the run's files are finished before the process
    ends (the sender's SIGKILL after its grace period still ends it).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = False
    _SIGTERM_SEEN.clear()  # a new block: an earlier run's SIGTERM says nothing about this one

    def handler(signum: int, frame: Any) -> None:
        nonlocal seen
        if seen:
            log.warning("SIGTERM again: still writing the run's files")
            return
        seen = True
        _SIGTERM_SEEN.set()
        log.warning("SIGTERM received: stopping the run")
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated) or not _SIGTERM_SEEN.is_set():
            raise
        # Ray turned our Terminated into a plain KeyboardInterrupt: give the caller back the SIGTERM (its notes,
        # e.g. how to resume a study, kept), so code outside the block needs no flag.
        terminated = Terminated()
        for note in getattr(e, "__notes__", []):
            terminated.add_note(note)
        raise terminated from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        _SIGTERM_SEEN.clear()


@dataclass
class RunResult:
    """What a finished job produced."""

    run_dir: Path
    status: str
    metrics: dict[str, float]
    summary: list[tuple[str, str]]
    mlflow_run_id: str | None
    mlflow_uri: str | None
    seconds: float


def make_ledger(spec: JobSpec, path: Path | None, n_records: int) -> Any | None:
    """The job's ledger when it is private (``privacy.epsilon`` set); delta defaults to 1/(n ln n)."""
    if spec.privacy.epsilon is None:
        return None
    from dpdistill.privacy import PrivacyLedger, check_delta, default_delta

    delta = spec.privacy.delta if spec.privacy.delta is not None else default_delta(n_records)
    check_delta(delta, n_records)
    return PrivacyLedger(path, epsilon_budget=spec.privacy.epsilon, delta=delta, n_records=n_records,
                         noise="reproducible" if spec.privacy.reproducible_noise else "secret",
                         caveat=not_private_reason(spec))


def not_private_reason(spec: JobSpec) -> str | None:
    """Why a run of ``spec`` is NOT PRIVATE although it asks for a budget (None when it is private).

    A spec without ``privacy.epsilon`` is simply a non-private method; this is about a private method whose
    guarantee does not hold: the debugging mode that derives the noise from the public seed, or a method
    option that makes a choice on sensitive data without charging it (the pipeline's ``unaccounted_reason``).
    """
    if spec.privacy.epsilon is None:
        return None
    if spec.privacy.reproducible_noise:
        return NOT_PRIVATE_BANNER
    from dpdistill.pipelines import get_pipeline

    check = getattr(get_pipeline(spec.kind), "unaccounted_reason", None)
    return check(spec) if check is not None else None


def run_job(
    spec: JobSpec,
    runs_dir: str | Path = "runs",
    *,
    address: str | None = None,
    progress: bool = True,
) -> RunResult:
    """Run ``spec`` to completion and return its result; raises DpdistillError on bad input.

    SIGTERM during the call is handled like Ctrl-C: the run is marked interrupted and :class:`Terminated` (a
    KeyboardInterrupt) propagates.
    """
    quiet = _quiet(progress)
    with sigterm_interrupts(), console_log(quiet):
        return _run_job(spec, runs_dir, address=address, progress=progress, quiet=quiet)


def _quiet(progress: bool) -> bool:
    """No progress bars (asked for none, or no terminal): the run says what it does in log lines instead."""
    return not (progress and sys.stderr.isatty())


def _run_job(spec: JobSpec, runs_dir: str | Path, *, address: str | None, progress: bool,
             quiet: bool) -> RunResult:
    from dpdistill.pipelines import get_pipeline
    from dpdistill.spec import check_nested_options, validate_method_options

    if address:
        spec.ray.address = address
    pipeline = get_pipeline(spec.kind)
    # The whole spec again, nested option blocks included (a spec built in code skipped load_spec's checks):
    # an option first read after the release would fail with the budget spent.
    validate_method_options(spec, "<spec>")
    check_nested_options(spec, "<spec>")
    # Reach and authenticate the cluster (one RPC; a no-op for a local cluster) before any data is read, so a
    # wrong address or token is one line now, not a failure after the budget was spent.
    from dpdistill.distill.embedding import checkpoint_policy
    from dpdistill.runtime.cluster import connect_cluster

    checkpoint_policy()  # a bad $DPDISTILL_CHUNK_CHECKPOINT is one line now, not at the first step after a charge
    connect_cluster(spec.ray.address, spec.ray.auth_token_path)
    prepared = pipeline.prepare(spec)  # every input check happens here: no folder yet
    n_records = int(getattr(prepared, "n_sensitive", 0) or 0)
    if spec.privacy.epsilon is not None:
        if n_records <= 1:
            raise SpecError(f"privacy: job kind '{spec.kind}' reported no sensitive records to account for")
        planned = make_ledger(spec, None, n_records)  # validates delta before anything is written

    runs_dir = Path(runs_dir)
    # A data owner's budget across runs: reserve this run's whole (ε, δ) in the store before the run folder
    # exists and before any release; refused (one line, nothing written) when it would exceed the owner's total.
    owner, reservation = None, None
    if spec.privacy.owner_budget is not None:
        from dpdistill.privacy.owner_budget import open_for_spec

        if not_private_reason(spec):  # its charges would describe a release they do not bound
            raise SpecError(f"privacy.owner_budget: this run cannot be charged to an owner's budget: "
                            f"{not_private_reason(spec)}")

        owner = open_for_spec(spec, runs_dir)
        reservation = owner.reserve(spec.name, spec.privacy.epsilon, planned.delta)
    try:
        run = RunFolder.create(runs_dir, spec.name, spec.to_yaml())
    except BaseException:
        if owner is not None:  # nothing ran: the reservation settles to no charge
            owner.settle(reservation, None, None, "not started")
        raise
    tracker = Tracker(
        spec.tracking.enabled, resolve_tracking_uri(spec.tracking.uri, runs_dir), spec.tracking.experiment
    )
    started = time.perf_counter()
    status = "failed"
    error: str | None = None  # type and one line, when the run failed
    interrupted_by: str | None = None  # SIGINT (Ctrl-C) or SIGTERM, when it was interrupted
    ctx: RunContext | None = None
    not_private = not_private_reason(spec)
    privacy_tag = ("none" if spec.privacy.epsilon is None else "NOT PRIVATE" if not_private else "private")
    try:
        tracker.start(
            run_name=f"{spec.name}/{run.path.name}",
            params=spec.flat_params(),
            tags={"dpdistill.kind": spec.kind, "dpdistill.method": spec.method.name,
                  "dpdistill.run_dir": str(run.path), "dpdistill.privacy": privacy_tag,
                  "dpdistill.budget": ("none" if spec.privacy.epsilon is None else "per run" if owner is None
                                       else f"owner {owner.identity.fingerprint[:16]}"),  # keyed: see owner_budget
                  **mlflow_tags(run.provenance)},  # read once, by RunFolder.create
        )
        ledger = make_ledger(spec, run.ledger_path, n_records)
        noise = PrivacyRandomness.for_spec(spec.privacy.reproducible_noise, spec.seed)
        ctx = RunContext(spec=spec, run=run, tracker=tracker, ledger=ledger, progress=progress, noise=noise)
        if ledger is not None and owner is None:
            ctx.add_summary("budget", "per run: earlier runs on this data are not counted (no privacy.owner_budget)")
        if not_private:
            log.warning(not_private)
            ctx.add_summary("NOT PRIVATE", not_private)
            run.log_metrics({"not_private": 1.0})
            run.set_status("running", not_private=not_private)
        # Without a terminal there are no progress bars: say every 30 s that the run is alive, and where.
        with (heartbeat([ctx], started) if quiet else contextlib.nullcontext(),
              pinned_threads(spec.threads), compiled_loops(spec.compile)):
            # A run without a terminal prints where its folder is as its pipeline starts (console_log), so a
            # caller finds it even when the run is stopped before the summary (bench_runs, a Ray Job's log); a run
            # that fails before this line names its folder in its outcome line ("run <folder> failed after").
            log.info("run %s started (kind=%s, method=%s)", run.path, spec.kind, spec.method.name)
            pipeline.execute(ctx, prepared)
        status = "completed"
    except KeyboardInterrupt as e:
        status = "interrupted"
        interrupted_by = "SIGTERM" if is_sigterm(e) else "SIGINT"
        raise
    except BaseException as e:
        error = error_line(e)
        log.error("run failed: %s", error)
        raise
    finally:
        seconds = time.perf_counter() - started
        # How it ended, for status.json: the error (failed) or the signal (interrupted), when there is one.
        extra: dict[str, Any] = {k: v for k, v in (("error", error), ("interrupted_by", interrupted_by)) if v}
        if status != "completed":
            # The outcome first, in the local folder: what follows (MLflow, the report) can take seconds, and a
            # stopped process may be SIGKILLed within them (`ray job stop`'s grace period, a pod's). run.finish
            # below rewrites status.json with everything once the rest is done.
            _safe(functools.partial(run.set_status, status, seconds=round(seconds, 3), **extra))
        if ctx is not None and ctx.ledger is not None:
            _safe(ctx.log_metrics, ctx.ledger.to_mlflow_metrics())
        if owner is not None:
            _settle_owner(owner, reservation, ctx, run, status)
        run.log_metrics({"wall_seconds": seconds})
        _safe(tracker.log_metrics, {"wall_seconds": seconds})
        for name in ("spec.yaml", "ledger.json", "metrics.json"):
            _safe(tracker.log_artifact, run.path / name)
        if run.artifacts.exists():
            for p in sorted(run.artifacts.iterdir()):
                if p.suffix in {".png", ".json", ".md"} and not (ctx is not None and p.name in ctx.untracked):
                    _safe(tracker.log_artifact, p, "artifacts")
        report = _write_report(run, ctx, status=status, seconds=round(seconds, 3), error=error,
                               interrupted_by=interrupted_by)
        if report is not None:
            _safe(tracker.log_artifact, report)
        _safe(tracker.end, {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
        # The outcome goes to log.txt before finish() detaches it; the error (if any) to status.json too.
        why = error or (interrupted_by and f"by {interrupted_by}")
        (log.info if status == "completed" else log.error)(
            "run %s %s after %.1f s%s", run.path, status, seconds, f" ({why})" if why else "")
        if ctx is not None and ctx.summary:  # what `run` printed, for `dpdistill report`
            extra["summary"] = [list(row) for row in ctx.summary]
        run.finish(status, seconds=round(seconds, 3), mlflow_run_id=tracker.run_id, **extra)
    return RunResult(
        run_dir=run.path,
        status=status,
        metrics=dict(run.metrics),
        summary=list(ctx.summary) if ctx else [],
        mlflow_run_id=tracker.run_id,
        mlflow_uri=tracker.uri if tracker.enabled else None,
        seconds=seconds,
    )


def _settle_owner(owner: Any, reservation: str, ctx: RunContext | None, run: RunFolder, status: str) -> None:
    """Replace the run's reservation in the owner's store by what its ledger charged, and say so in the summary.

    The charges are read from ledger.json: what is on disk was charged before its release, so it is what may
    have been released. If this fails the reservation stays, and the owner's account keeps counting the run's
    whole planned ε, never less.
    """
    from dpdistill.privacy import PrivacyLedger

    try:
        ledger = PrivacyLedger.load(run.ledger_path) if run.ledger_path.exists() else None
        owner.settle(reservation, ledger, run.path, status)
        line = owner.summary()
    except Exception as e:  # noqa: BLE001 - the run's own folder and ledger are complete; say what stays reserved
        log.error("owner budget %s: could not settle this run's reservation (%s); it stays reserved at the run's "
                  "whole ε", owner.path, e)
        line = f"could not settle: this run's whole planned ε stays reserved in {owner.path} ({e})"
    if ctx is not None:
        ctx.add_summary("owner budget", line)


def _write_report(run: RunFolder, ctx: RunContext | None, **status: Any) -> Path | None:
    """Write the run's report.html from its folder (None, with a warning, if rendering fails: never the run).

    Rendered before status.json holds the outcome, so the outcome is passed in; the images the run keeps out of
    MLflow (``ctx.untracked``) stay out of the report, which goes to MLflow too.
    """
    try:
        from dpdistill.runtime.report_html import write_run_report

        if ctx is not None and ctx.summary:
            status["summary"] = [list(row) for row in ctx.summary]
        return write_run_report(run.path, status=status, withhold=set(ctx.untracked) if ctx is not None else ())
    except Exception as e:  # noqa: BLE001 - the report is a view of the folder; the run's files are complete
        log.warning("report.html: rendering failed: %s", error_line(e))
        return None


def _safe(fn: Any, *args: Any) -> None:
    """Tracking must never turn a finished job into a failed one (or hide the real error)."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - logged, and the run folder still holds everything
        log.warning("tracking: %s failed: %s", getattr(fn, "__name__", fn), e)
