"""The ``dpdistill`` command: run jobs, inspect datasets and privacy, submit to a Ray cluster.

Heavy libraries (torch, ray, mlflow) are imported inside the commands, never at module level, so that
``dpdistill --help`` answers in well under two seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dpdistill.errors import DpdistillError

app = typer.Typer(
    name="dpdistill",
    help="Differentially private image synthesis and dataset distillation on Ray.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="job spec (YAML), e.g. jobs/quickstart.yaml")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: --set method.ipc=10")] = None,
    runs_dir: Annotated[Path, typer.Option(help="where run folders (and the default MLflow store) go")] = Path(
        "runs"
    ),
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local cluster)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run a job spec to completion; prints a summary and where the run folder and MLflow run are."""
    from dpdistill.spec import load_spec

    _run_and_summarise(load_spec(spec, set_ or []), runs_dir, address, progress)


def _run_and_summarise(job, runs_dir: Path, address: str | None, progress: bool) -> None:
    """Run ``job`` (``run`` and ``evaluate``) and print its summary; SIGTERM exits 143."""
    from dpdistill.runner import is_sigterm, run_job

    try:
        result = run_job(job, runs_dir, address=address, progress=progress)
    except KeyboardInterrupt as e:
        if not is_sigterm(e):
            raise
        # 128 + SIGTERM, as a shell reports it; Ctrl-C stays 130 (main).
        print("dpdistill: terminated by SIGTERM (the run folder, if any, is marked interrupted)", file=sys.stderr)
        raise typer.Exit(143) from None
    _print_summary(job, result)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder (holding spec.yaml, status.json and "
                                            "artifacts/distilled.pt, or a synthesize run's artifacts/synthesizer.pt "
                                            "and synthetic.npz)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override how the release is scored: "
                                                   "--set 'evaluation.models=[convnet, resnet18]'; a synthesize "
                                                   "run's fresh draw: --set method.n_per_class=1000 --set "
                                                   "method.guidance_scale=3 (method.generate_chunks=N: as N "
                                                   "Ray tasks; unset, as the source drew)")] = None,
    runs_dir: Annotated[Path, typer.Option(help="where the evaluate run's folder (and the default MLflow store) "
                                           "go")] = Path("runs"),
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local cluster)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Re-score a finished run's released images under another evaluation protocol; charges nothing.

    Post-processing of a DP release: fresh models are trained on the released images and scored on the test
    split (and validation, as the protocol says), in a run folder of its own. Only evaluation.*, seed, device,
    threads, ray.*, resources.*, tracking.*, name, description, data.root and data.download can be overridden;
    noisy-senv is refused (it would charge a ledger this job does not have). A synthesize run's set is re-scored,
    or with method.n_per_class / guidance_scale / sample_steps / sample_eta a fresh set is drawn from its
    released generator and scored (post-processing as well), in method.generate_chunks Ray tasks (unset: as the
    source drew; the chunks fix the latents' seeds).
    """
    from dpdistill.pipelines.evaluate_job import evaluate_spec

    _run_and_summarise(evaluate_spec(run_dir, set_ or []), runs_dir, address, progress)


def _print_summary(job, result) -> None:
    from rich.table import Table

    from dpdistill.runner import not_private_reason

    console = _console()
    not_private = not_private_reason(job)
    if not_private:  # the first line a user reads, above the table
        console.print(f"[bold red]{not_private}[/bold red]", soft_wrap=True)
    table = Table(title=f"dpdistill · {job.name} ({job.kind}/{job.method.name})", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in result.summary:
        table.add_row(what, value)
    eps = result.metrics.get("privacy_epsilon")
    if job.kind == "evaluate":
        table.add_row("privacy", "nothing released or charged here: the release's ε is its own run's")
    elif job.privacy.epsilon is None:
        table.add_row("privacy", "none: not a private release")
    elif not_private:
        table.add_row("privacy", f"NOT PRIVATE: the ledger's ε = {eps if eps is None else round(eps, 3)} does "
                      "not describe this release (see the first line)")
    elif eps is not None:
        table.add_row("privacy", f"ε = {eps:.3f} (PLD) of budget {job.privacy.epsilon}, "
                      f"δ = {result.metrics.get('privacy_delta', float('nan')):.2e}, add-or-remove-one")
        # Each component's stand-alone ε (the total is composed tightly, so the parts need not add up).
        skip = {"privacy_epsilon", "privacy_epsilon_budget", "privacy_epsilon_remaining", "privacy_epsilon_rdp"}
        parts = {k.removeprefix("privacy_epsilon_"): v for k, v in result.metrics.items()
                 if k.startswith("privacy_epsilon_") and k not in skip}
        if parts:
            table.add_row("ε by component", ", ".join(f"{k} {v:.3f}" for k, v in sorted(parts.items()))
                          + " (each alone; composed tightly into the total)")
    table.add_row("wall time", f"{result.seconds:.1f} s")
    console.print(table)
    # Paths go below the table, unwrapped, so they can be copied.
    console.print(f"run folder: {result.run_dir}", soft_wrap=True)
    if result.mlflow_run_id:
        console.print(f"MLflow run: {result.mlflow_run_id} (open with: mlflow ui --backend-store-uri "
                      f"{result.mlflow_uri})", soft_wrap=True)


@app.command()
def datasets(
    root: Annotated[str | None, typer.Option(help="data root (default: $DPDISTILL_DATA)")] = None,
) -> None:
    """List the registered datasets and whether each is present under the data root."""
    from rich.table import Table

    from dpdistill import data

    base = Path(root).expanduser() if root else data.default_root()
    rows: list[tuple[str, str, str, str, str]] = []
    for name in data.names():
        src = data.get(name)
        info = src.info
        if info.num_classes == 0:
            # A user's own set (imagefolder, npz): its data.root IS the data, so nothing under the shared data
            # root says whether it is present, and its shape and classes come from the files.
            rows.append((name, "any", "any", "—",
                         f"data.root set to the data itself: {src.expected('train')[0]}"))
            continue
        present = src.is_present(base)
        needs = ""
        if not info.needs_root:
            needs = "embedded"
        elif not present:
            # Relative to the data root named in the title: the part a user has to provide.
            files = [f.removeprefix(f"{base}/") if base else f for f in src.expected_files(base)]
            needs = ", ".join(files[:2]) + (f" (+{len(files) - 2} more)" if len(files) > 2 else "")
        rows.append((name, f"{info.channels}×{info.image_size}×{info.image_size}", str(info.num_classes),
                     "yes" if present else "no", needs))
    console = _console()
    title = f"datasets under {base if base else '(no data root: set DPDISTILL_DATA)'}"
    if console.width < 100:
        # Too narrow for five columns: one wrapped line per dataset, never a word cut in half.
        console.print(title, overflow="fold")
        for name, shape, classes, present, needs in rows:
            state = "present" if present == "yes" else "missing" if present == "no" else "user data"
            if needs == "embedded":
                state, needs = "embedded", ""
            line = f"{name}: {shape}, {classes} classes, {state}" + (f"; needs {needs}" if needs else "")
            console.print(line.replace("any, any classes", "any shape and classes"), overflow="fold")
        return
    # Long paths fold inside their column instead of being cut mid-word.
    table = Table(title=title)
    for col in ("name", "shape", "classes", "present"):
        table.add_column(col, no_wrap=True)
    table.add_column("needs", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command()
def privacy(
    run_dir: Annotated[str | None, typer.Argument(help="a run folder: print its ledger")] = None,
    q: Annotated[float | None, typer.Option("--q", help="Poisson sampling rate")] = None,
    sigma: Annotated[float | None, typer.Option(help="noise multiplier")] = None,
    steps: Annotated[int | None, typer.Option(help="number of steps")] = None,
    delta: Annotated[float | None, typer.Option(help="target delta")] = None,
    target_epsilon: Annotated[float | None, typer.Option(help="calibrate sigma to this epsilon")] = None,
    budgets: Annotated[str | None, typer.Option(
        help="show a data owner budget store (a folder such as runs/budgets, or one account file)")] = None,
) -> None:
    """Account a subsampled Gaussian (PLD, RDP, PRV, GDP), calibrate sigma, print a run's or sweep's ledger, or
    show the owner budget store."""
    from dpdistill.privacy.cli import privacy_command

    code = privacy_command(run_dir, q, sigma, steps, delta, target_epsilon, console=_console(), budgets=budgets)
    raise typer.Exit(code)


def _latest_run(path: Path) -> Path:
    """``path`` if it is a run folder, else the latest run folder inside it (a job folder: runs/<job>/)."""
    from dpdistill.errors import SpecError

    if (path / "status.json").is_file():
        return path
    if path.is_dir():
        # Run folders are named by their UTC start, so the greatest name is the latest run.
        runs = sorted(p for p in path.iterdir() if (p / "status.json").is_file())
        if runs:
            return runs[-1]
    raise SpecError(f"{path}: not a run folder (status.json, spec.yaml, metrics.json) nor a job folder holding "
                    "run folders (runs/<job-name>/)")


def _is_fraction(key: str) -> bool:
    """Whether metric ``key`` is a fraction in [0, 1] that reads better as a percentage (accuracies, rates)."""
    import re

    return bool(re.search(r"(^|_)(acc|accuracy|precision|recall)(_|$)|_rate(_|$)", key))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(
        help="a run folder, or a job folder (runs/<job-name>/: its latest run)")]) -> None:
    """Print a run's status (and error), the summary `run` printed, and its metrics (accuracies in %)."""
    import json

    from rich.table import Table

    run_dir = _latest_run(run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    c = _console()
    c.print(f"run folder: {run_dir}", soft_wrap=True)
    from dpdistill.runtime.liveness import LOST, shown_status

    shown = shown_status(status)  # probes the owner process once: the line and the note agree
    line = f"status: {shown}"
    if shown == LOST:  # status.json says running; liveness.py says why it is shown otherwise
        process = status.get("process") or {}
        line += (f" (status.json says running, but its process {process.get('pid')} on {process.get('host')} is "
                 "gone: killed before it could record an outcome)")
    if status.get("seconds") is not None:
        line += f" after {status['seconds']:.1f} s"
    if status.get("interrupted_by"):
        line += f" (by {status['interrupted_by']})"
    c.print(line, soft_wrap=True)
    if status.get("error"):
        c.print(f"error: {status['error']}", soft_wrap=True)
    if status.get("not_private"):
        c.print(f"[bold red]{status['not_private']}[/bold red]", soft_wrap=True)
    if status.get("summary"):
        summary = Table(show_header=False)
        summary.add_column("what", style="bold")
        summary.add_column("value")
        for what, value in status["summary"]:
            summary.add_row(what, value)
        c.print(summary)
    table = Table(title="metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in sorted(metrics.items()):
        if isinstance(v, float) and _is_fraction(k):
            table.add_row(k, f"{100 * v:.2f} %")
        else:
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    c.print(table)


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="run folders, or job folders (runs/<job-name>/: their latest run)")],
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="also write accuracy and FID against epsilon to FILE.png or FILE.svg")] = None,
) -> None:
    """Print runs side by side (method, epsilon, delta, accuracy, FID, FLD, status; NOT PRIVATE flagged)."""
    from dpdistill.runtime.compare import check_plot_path, compare_table, load_rows, plot_rows

    if plot is not None:
        check_plot_path(plot)  # a wrong suffix is refused before anything is read
    rows = load_rows([_latest_run(p) for p in run_dirs])
    c = _console()
    c.print(compare_table(rows))
    for row in rows:
        # markup=False: names and caveats are the runs' own text, never rich markup.
        if row.not_private:
            c.print(f"{row.label}: {row.not_private}", soft_wrap=True, markup=False, style="bold red")
    if plot is not None:
        c.print(f"plot: {plot_rows(rows, plot)}", soft_wrap=True, markup=False)


@app.command()
def audit(
    mechanism: Annotated[str, typer.Option(
        help="dp-merf | dp-ntk | feature-matching | dp-sgd | localdp (each through the product's own code)")],
    epsilon: Annotated[float, typer.Option(help="calibrate the mechanism's noise to this epsilon (PLD)")] = 1.0,
    delta: Annotated[float, typer.Option(help="the mechanism's delta")] = 1e-5,
    trials: Annotated[int, typer.Option(min=2, help="runs per world (without and with the canary)")] = 2000,
    alpha: Annotated[float, typer.Option(help="Clopper-Pearson intervals at confidence 1 - alpha")] = 0.05,
    noise: Annotated[str, typer.Option(
        help="secret (the product) | public-seed (noise derived from a public seed: NOT PRIVATE)")] = "secret",
    noise_scale: Annotated[float, typer.Option(
        help="fraction of the calibrated noise actually added (below 1: a deliberately broken mechanism)")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed of the audit's public data (and of public-seed noise)")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Empirical privacy audit: a Clopper-Pearson lower bound on epsilon beside the claimed (PLD) epsilon."""
    import json

    from dpdistill.evaluation.audit import audit_mechanism

    result = audit_mechanism(mechanism, epsilon=epsilon, delta=delta, trials=trials, alpha=alpha, noise=noise,
                             noise_scale=noise_scale, seed=seed)
    if json_out:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        console = _console()
        console.print(f"audit of {result.mechanism}: {result.description}")
        console.print(f"  claimed epsilon (PLD, delta={result.delta:g}): {result.claimed_epsilon:.4f}")
        console.print(f"  epsilon lower bound (Clopper-Pearson, alpha={result.alpha:g}): "
                      f"{result.epsilon_lower_bound:.4f}")
        console.print(f"  attack at threshold {result.threshold:.4g} ({result.rule}): TPR {result.tpr:.4f}, "
                      f"FPR {result.fpr:.4f}")
        console.print(f"  trials {result.trials} per world (half choose the threshold, half bound epsilon), "
                      f"noise {result.noise}, noise scale {result.noise_scale:g}, {result.seconds:.1f} s")
        if result.violated:
            console.print("  VIOLATION: the lower bound exceeds the claimed epsilon")
    raise typer.Exit(3 if result.violated else 0)


@app.command()
def mia(
    spec: Annotated[Path | None, typer.Argument(
        help="job spec (YAML) whose release pipeline is attacked; omit with --resume")] = None,
    shadows: Annotated[int, typer.Option(min=4, help="shadow runs, each on a random half of the pool")] = 16,
    pool: Annotated[int, typer.Option(min=2, help="target pool: records drawn from the training split")] = 200,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: --set method.ipc=10")] = None,
    runs_dir: Annotated[Path, typer.Option(help="where the study's folder goes (<runs>/<name>-mia/<stamp>)")] = Path(
        "runs"
    ),
    resume: Annotated[Path | None, typer.Option(
        help="finish the interrupted study in this folder (runs/<name>-mia/<stamp>): its finished shadows are "
             "kept")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local cluster)")] = None,
) -> None:
    """LiRA membership inference on a job's release pipeline: TPR at 0.1 % and 1 % FPR, AUC, ROC plot.

    Reads the sensitive pool without noise by design: the study's folder is stamped NOT PRIVATE, and a spec with
    privacy.owner_budget is refused. Each shadow run is saved as it finishes; Ctrl-C or SIGTERM stops the study
    (exit 130 / 143) and prints the command that resumes it.
    """
    from dpdistill.errors import SpecError
    from dpdistill.runner import is_sigterm
    from dpdistill.runtime.lira_tasks import NOT_PRIVATE_REASON, check_mia_spec, resume_mia, run_mia
    from dpdistill.spec import load_run_spec, load_spec

    try:
        if resume is not None:
            if spec is not None or set_ or shadows != 16 or pool != 200:
                raise SpecError("mia --resume DIR takes no spec, --set, --shadows or --pool: the folder's spec.yaml "
                                "and study.json are the study")
            study, run_dir = resume_mia(resume, address=address)
            job = load_run_spec(run_dir / "spec.yaml")
        elif spec is None:
            raise SpecError("mia: give a job spec (e.g. jobs/ndpdc-mnist.yaml) or --resume STUDY_DIR")
        else:
            job = load_spec(spec, set_ or [])
            check_mia_spec(job)  # refused before Ray starts or any record is read
            study, run_dir = run_mia(job, shadows=shadows, pool=pool, runs_dir=runs_dir, address=address)
    except KeyboardInterrupt as e:
        how = [n for n in getattr(e, "__notes__", []) if n.startswith("dpdistill mia --resume")]
        print(f"dpdistill: study interrupted; its finished shadows are kept"
              f"{'; resume with: ' + how[0] if how else ''}", file=sys.stderr)
        if is_sigterm(e):
            print("dpdistill: terminated by SIGTERM (the study folder is marked interrupted)", file=sys.stderr)
            raise typer.Exit(143) from None
        raise
    res = study.result
    c = _console()
    c.print(NOT_PRIVATE_REASON, soft_wrap=True, markup=False, style="bold red")
    eps = "none" if job.privacy.epsilon is None else f"{job.privacy.epsilon:g}"
    c.print(f"LiRA on {job.kind}/{job.method.name} (ε {eps}): {res.shadows} shadow runs, pool {res.pool}, "
            f"{res.variance} variance, {res.members} member and {res.non_members} non-member trials",
            soft_wrap=True, markup=False)
    c.print(f"  TPR @ 0.1 % FPR: {100 * res.tpr_at[0.001]:.2f} %   TPR @ 1 % FPR: {100 * res.tpr_at[0.01]:.2f} %   "
            f"AUC: {res.auc:.3f}", markup=False)
    c.print(f"study folder: {run_dir} (mia.json, artifacts/roc.png)", soft_wrap=True, markup=False)


# The Ray dashboard (job server) URL, from --address or Ray's own variable for it.
_JobAddress = Annotated[str, typer.Option("--address", envvar="RAY_API_SERVER_ADDRESS",
                                          help="Ray dashboard address, e.g. http://head:8265")]


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="job spec (YAML)")],
    address: _JobAddress,
    runs_dir: Annotated[str, typer.Option(
        envvar="DPDISTILL_RUNS_DIR",
        help="absolute run folder root on storage every Ray node sees, e.g. /runs (never the job's working dir)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI for the job (default: the cluster's MLFLOW_TRACKING_URI, else "
             "sqlite:///RUNS_DIR/mlflow.db)")] = None,
    driver_cpus: Annotated[float | None, typer.Option(
        min=0, help="CPUs reserved for the job's driver (default: the spec's resources.cpus)")] = None,
    driver_gpus: Annotated[float | None, typer.Option(
        min=0, help="GPUs reserved for the job's driver (default: the spec's resources.gpus)")] = None,
) -> None:
    """Submit a job to a Ray cluster as a Ray Job (the resolved spec travels with it); prints how to follow it."""
    import os
    import shlex
    import tempfile

    from dpdistill.runtime.jobs import check_durable_path, check_tracking_uri, submit_job
    from dpdistill.spec import load_spec

    check_durable_path("--runs-dir", runs_dir)  # before the (slower) spec: these need no imports
    if tracking_uri:
        check_tracking_uri("--tracking-uri", tracking_uri)
    job = load_spec(spec, set_ or [])  # validate here: a bad spec never reaches the cluster
    with tempfile.TemporaryDirectory() as tmp:
        sub = submit_job(job, address, Path(tmp), runs_dir, tracking_uri=tracking_uri, driver_cpus=driver_cpus,
                         driver_gpus=driver_gpus)
    # The follow-up commands must work as printed: name the token file when only the spec knew it.
    prefix = ""
    if job.ray.auth_token_path and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        prefix = f"RAY_AUTH_TOKEN_PATH={shlex.quote(str(Path(job.ray.auth_token_path).expanduser()))} "
    c = _console()
    c.print(f"submitted {job.name} as Ray job {sub.job_id} to {sub.url}", soft_wrap=True)
    c.print(f"run folder: under {sub.runs_dir.rstrip('/')}/{job.name}/ on the cluster; MLflow: {sub.tracking_uri}",
            soft_wrap=True)
    follow = f"{sub.job_id} --address {shlex.quote(sub.url)}"
    c.print(f"follow it: {prefix}dpdistill jobs logs {follow} --follow", soft_wrap=True)
    c.print(f"wait for it: {prefix}dpdistill jobs wait {follow}", soft_wrap=True)


jobs_app = typer.Typer(help="Follow Ray Jobs submitted with `dpdistill submit`: status, logs, wait, stop.",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

_JobId = Annotated[str, typer.Argument(help="the Ray job id `dpdistill submit` printed")]


def _print_job(info, logs: str | None = None) -> None:
    from dpdistill.runtime.jobs import run_folder

    c = _console()
    status = str(getattr(info.status, "value", info.status))
    line = f"{info.submission_id or info.job_id}: {status}"
    if info.message:
        line += f" ({info.message.strip().splitlines()[0]})"
    c.print(line, soft_wrap=True)
    if info.start_time and info.end_time:
        c.print(f"ran for {(info.end_time - info.start_time) / 1000:.1f} s", soft_wrap=True)
    folder = run_folder(logs) if logs else None
    if folder:
        c.print(f"run folder: {folder}", soft_wrap=True)
    elif (info.metadata or {}).get("dpdistill.runs_dir"):
        c.print(f"run folders: {info.metadata['dpdistill.runs_dir'].rstrip('/')}/{info.metadata['dpdistill.job']}/",
                soft_wrap=True)


@jobs_app.command("status")
def jobs_status(job_id: _JobId, address: _JobAddress) -> None:
    """Print a job's status, how long it ran and its run folder."""
    from dpdistill.runtime.jobs import job_client, job_info, job_logs

    client = job_client(address)
    info = job_info(client, job_id)
    _print_job(info, job_logs(client, job_id))


@jobs_app.command("logs")
def jobs_logs(
    job_id: _JobId,
    address: _JobAddress,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends")] = False,
) -> None:
    """Print what a job's driver printed (the run's log lines and summary)."""
    from dpdistill.runtime.jobs import follow_logs, job_client, job_logs

    client = job_client(address)
    if follow:
        follow_logs(client, job_id, lambda chunk: print(chunk, end="", flush=True))
    else:
        print(job_logs(client, job_id), end="")


@jobs_app.command("wait")
def jobs_wait(
    job_id: _JobId,
    address: _JobAddress,
    timeout: Annotated[float | None, typer.Option(min=0, help="give up after this many seconds")] = None,
) -> None:
    """Wait until a job ends; exit 0 if it succeeded, 1 otherwise (printing the end of its log)."""
    from dpdistill.runtime.jobs import job_client, job_logs, wait_job

    client = job_client(address)
    info = wait_job(client, job_id, timeout=timeout,
                    on_status=lambda s: _console(stderr=True).print(f"{job_id}: {s}", soft_wrap=True))
    logs = job_logs(client, job_id)
    _print_job(info, logs)
    if str(getattr(info.status, "value", info.status)) != "SUCCEEDED":
        tail = "\n".join(logs.rstrip().splitlines()[-20:])
        print(f"--- last lines of the job's log ---\n{tail}", file=sys.stderr)
        raise typer.Exit(1)


@jobs_app.command("stop")
def jobs_stop(job_id: _JobId, address: _JobAddress) -> None:
    """Stop a job (Ray sends its driver SIGTERM)."""
    from dpdistill.runtime.jobs import job_client, stop_job

    stopped = stop_job(job_client(address), job_id)
    _console().print(f"{job_id}: {'stop requested' if stopped else 'had already ended'}", soft_wrap=True)


@app.command()
def sweep(
    sweep_spec: Annotated[Path | None, typer.Argument(
        help="sweep spec (YAML), e.g. sweeps/dm-digits.yaml; omit with --resume")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a sweep field")] = None,
    runs_dir: Annotated[Path, typer.Option(help="where the sweep folder goes")] = Path("runs"),
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local cluster)")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="resume the interrupted sweep in this folder (runs/sweeps/<name>/<stamp>)")] = None,
) -> None:
    """Search a job's fields with Ray Tune + Optuna; each trial is a job, logged to MLflow under one parent run.

    A sweep spec with ``kind: utility-allocation`` instead measures DP-GenG's candidate ε shares on public data as
    parallel trials and writes the job with the chosen shares (see sweeps/dpgeng-utility-allocation-digits.yaml).

    Ctrl-C or SIGTERM stops the sweep cleanly (exit 130) and prints the command that resumes it."""
    from dpdistill.errors import SpecError
    from dpdistill.runtime.allocation_sweep import is_allocation_sweep
    from dpdistill.runtime.sweeps import load_sweep, resume_sweep, run_sweep

    if resume is not None:
        if sweep_spec is not None or set_:
            raise SpecError("sweep --resume DIR takes no sweep spec or --set: the folder's sweep.json is the spec")
        summary = resume_sweep(resume, address=address)
    elif sweep_spec is None:
        raise SpecError("sweep: give a sweep spec (e.g. sweeps/dm-digits.yaml) or --resume SWEEP_DIR")
    elif is_allocation_sweep(sweep_spec):
        from dpdistill.runtime.allocation_sweep import (
            load_allocation_sweep,
            run_allocation_sweep,
            summary_lines,
        )

        alloc, job = load_allocation_sweep(sweep_spec, set_ or [])
        summary = run_allocation_sweep(alloc, job, runs_dir, address=address)
        for line in summary_lines(summary):
            _console().print(line, soft_wrap=True)
        return
    else:
        spec, base, _ = load_sweep(sweep_spec, set_ or [])
        summary = run_sweep(spec, base, runs_dir, address=address)
    c = _console()
    if summary["best_value"] is not None:
        c.print(f"best {summary['metric']} = {summary['best_value']:.4f} with {summary['best_config']}")
        c.print(f"best run folder: {summary['best_run_dir']}")
        c.print(f"selection: {summary['selection']}")
    c.print(f"privacy: {summary['privacy']}", soft_wrap=True)
    c.print(f"{summary['trials']} of {summary['num_samples']} trials ended ({summary['failed_trials']} failed); "
            f"sweep folder: {summary['sweep_dir']}", soft_wrap=True)
    if summary["status"] != "completed":
        how = summary["resume"]
        c.print(f"sweep interrupted; {'resume with: ' + how if how.startswith('dpdistill') else how}", soft_wrap=True)
        raise typer.Exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2; Ctrl-C exits 130."""
    import signal

    # A shell starts background jobs with SIGINT ignored, and Python keeps it ignored; a job must still stop
    # cleanly (status "interrupted") when sent SIGINT, so restore Python's KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Outside standalone mode typer *returns* exit codes (typer.Exit, and 130 for KeyboardInterrupt).
        code = app(args=argv, standalone_mode=False)
    except DpdistillError as e:
        print(f"dpdistill: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("dpdistill: interrupted (the run folder, if any, is marked interrupted)", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            print(f"dpdistill: error: {e.format_message()}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
    if isinstance(code, int) and code:
        if code == 130:
            print("dpdistill: interrupted (the run folder, if any, is marked interrupted)", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
