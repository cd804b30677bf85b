"""DP-GenG's utility-driven budget allocation as a Ray Tune sweep: every candidate share is a parallel trial.

The paper chooses the generator's and the expert's ε shares by utility: the smallest generator share whose
generated set's FID stays within ``utility_fid_ratio`` x the FID at the full budget, and the smallest expert share
whose DP-SGD fine-tuned expert keeps ``utility_acc_ratio`` x the accuracy at the full budget. A job with
``allocation: utility`` finds them by bisection inside the run, one fit after another. This sweep measures a grid
of candidate shares instead, as parallel Tune trials (two phases: generator FIDs, then expert accuracies on top
of the generator share chosen), picks the shares by the same criterion, and writes a job spec with those shares
fixed, ready for ``dpdistill run``.

Privacy: the trials fit and score on a *public* tuning set only (``method.utility_tuning``: e.g. ``glyphs``),
each fit charged to a throwaway ledger; the sensitive split is opened only by the job's own input checks (its size
sets the default δ the candidates are calibrated at). So the sweep costs nothing and the job it writes spends its
ε as usual. Tuning on the sensitive split (``utility_tuning: sensitive``) is refused here: it would be an
unaccounted choice made across many processes; inside one job it is possible and stamped NOT PRIVATE.

A sweep spec::

    kind: utility-allocation
    name: dpgeng-allocation-digits
    job: ../jobs/quickstart.yaml
    set: [method.utility_tuning=glyphs]
    grid: 6              # candidate shares evenly spaced in [0.05, utility_max_total - 0.05], plus 1.0
    max_concurrent: 2
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from dpdistill.errors import SpecError, TrialsFailed
from dpdistill.spec import StrictModel, apply_overrides, format_validation_error, read_yaml, validate_spec

log = logging.getLogger("dpdistill.sweeps")

KIND = "utility-allocation"


class AllocationSweepSpec(StrictModel):
    """A utility-driven allocation sweep over one DP-GenG job."""

    kind: Literal["utility-allocation"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    job: str = Field(description="the DP-GenG job spec, relative to the sweep file")
    set: list[str] = Field(default_factory=list, description="overrides for the job (e.g. method.utility_tuning)")
    grid: int = Field(default=6, ge=2, le=64, description="candidate shares per phase, plus the full budget")
    max_concurrent: int = Field(default=2, ge=1)
    cpus_per_trial: float = Field(default=1, gt=0)
    gpus_per_trial: float = Field(default=0, ge=0, description="GPUs (or a share) per trial; 0: trials use CPU")


def is_allocation_sweep(path: str | Path) -> bool:
    """Whether a sweep file is a utility-allocation sweep (``kind: utility-allocation``)."""
    doc = read_yaml(Path(path))
    return isinstance(doc, dict) and doc.get("kind") == KIND


def load_allocation_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[AllocationSweepSpec, Any]:
    """The sweep spec and its validated job spec; refused (one line) unless the job is DP-GenG tuned on public data."""
    from pydantic import ValidationError

    path = Path(path)
    doc = apply_overrides(read_yaml(path), overrides or [])
    try:
        sweep = AllocationSweepSpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, str(path), AllocationSweepSpec)) from None
    job_path = (path.parent / sweep.job).resolve()
    spec = validate_spec(apply_overrides(read_yaml(job_path), sweep.set), str(job_path))
    if spec.kind != "distill" or spec.method.name != "dpgeng":
        raise SpecError(f"{path}: field 'job': a utility-allocation sweep tunes DP-GenG's shares; {sweep.job} is "
                        f"a {spec.kind} job with method '{spec.method.name}'")
    tuning = spec.method.options().get("utility_tuning")
    if not tuning:
        raise SpecError(f"{path}: field 'set': name a public tuning set, e.g. method.utility_tuning=glyphs")
    if tuning == "sensitive":
        raise SpecError(f"{path}: field 'set': method.utility_tuning 'sensitive' is not allowed in a sweep (an "
                        "unaccounted choice on the sensitive split); tune on a public set such as glyphs")
    return sweep, spec


def _grid(cfg: Any, n: int) -> list[float]:
    from dpdistill.distill.dpgeng.allocation import share_bounds

    lo, hi = share_bounds(cfg)
    return [round(lo + (hi - lo) * i / (n - 1), 6) for i in range(n)]


def smallest_good(measured: dict[float, float], good: Any, hi: float) -> float:
    """The smallest candidate share (below the full budget) whose measurement is good; ``hi`` if none is."""
    ok = [s for s, v in sorted(measured.items()) if s < 1.0 and good(v)]
    return ok[0] if ok else hi


def _fid_trial(config: dict[str, Any], probe_args: dict[str, Any]) -> None:
    from ray import tune

    from dpdistill.distill.dpgeng.allocation import UtilityProbe

    probe = UtilityProbe(**probe_args)
    fid, _ = probe.generator_fid(float(config["share"]))
    tune.report({"fid": float(fid)})


def _accuracy_trial(config: dict[str, Any], probe_args: dict[str, Any], expert0: Any) -> None:
    from ray import tune

    from dpdistill.distill.dpgeng.allocation import UtilityProbe

    probe = UtilityProbe(**probe_args)
    tune.report({"accuracy": float(probe.expert_accuracy(expert0, float(config["share"])))})


def _expert_base(probe_args: dict[str, Any], share: float) -> Any:
    """The expert pretrained on what the generator makes at the chosen share (one task, shared by phase 2)."""
    from dpdistill.distill.dpgeng.allocation import UtilityProbe

    probe = UtilityProbe(**probe_args)
    _, generated = probe.generator_fid(share)
    return probe.pretrained_expert(generated)


def _grid_search(name: str, trainable: Any, shares: list[float], metric: str, sweep: AllocationSweepSpec,
                 storage: Path, **params: Any) -> dict[float, float]:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, **params),
                            {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}),
        param_space={"share": tune.grid_search(shares)},
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
    )
    results = tuner.fit()
    errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error is not None]
    if errors:
        raise TrialsFailed(f"{len(errors)} {name} trial(s) failed (Tune folder {storage / name}); first: {errors[0]}")
    return {float(r.config["share"]): float(r.metrics[metric]) for r in results}


def _measure_and_choose(sweep: AllocationSweepSpec, cfg: Any, shares: list[float], hi: float,
                        probe_args: dict[str, Any], sweep_dir: Path, address: str | None,
                        num_cpus: int | None) -> tuple[dict[float, float], dict[float, float], float, float, float,
                                                       float]:
    """Phase 1 (generator FIDs) and phase 2 (expert accuracies) as Tune grids, and the shares they choose."""
    from dpdistill.runtime.cluster import ray_session

    with ray_session(address, num_cpus):
        fids = _grid_search("generator", _fid_trial, shares, "fid", sweep, sweep_dir / "tune", probe_args=probe_args)
        fid_target = cfg.utility_fid_ratio * fids[1.0]
        share_g = smallest_good(fids, lambda v: v <= fid_target, hi)
        accs: dict[float, float] = {}
        acc_target = float("nan")
        share_e = cfg.share_expert
        if cfg.expert_guidance and cfg.expert_dp_epochs > 0:
            import ray

            base = ray.get(ray.remote(num_cpus=sweep.cpus_per_trial, num_gpus=sweep.gpus_per_trial)(_expert_base)
                           .remote(probe_args, share_g))
            accs = _grid_search("expert", _accuracy_trial, shares, "accuracy", sweep, sweep_dir / "tune",
                                probe_args=probe_args, expert0=base)
            acc_target = cfg.utility_acc_ratio * accs[1.0]
            share_e = smallest_good(accs, lambda v: v >= acc_target, hi)
    return fids, accs, fid_target, acc_target, share_g, share_e


def _fail_parent(tracking: Any) -> None:
    if tracking.parent_run_id:
        try:
            tracking._client().set_terminated(tracking.parent_run_id, "FAILED")
        except Exception as e:  # noqa: BLE001
            log.warning("tracking: the allocation sweep's run could not be closed: %s", e)


def probe_inputs(sweep: AllocationSweepSpec, spec: Any) -> tuple[dict[str, Any], Any]:
    """What every trial gets: the public tuning and scoring sets, the method config, ε, δ, the published
    normalisation, a data-independent seed and the device; and the config. Nothing else crosses to Ray.

    The job's own input checks run here (the tuning set is public and fits the data; the device exists). The
    sensitive split's records go no further than this function: only its size (δ) and shape leave it.
    """
    import torch

    from dpdistill.distill.dm import as_generator
    from dpdistill.distill.dpgeng.pipeline import tuning_sets
    from dpdistill.pipelines import get_pipeline
    from dpdistill.privacy.defaults import default_delta
    from dpdistill.runtime.device import resolve_device

    prepared = get_pipeline(spec.kind).prepare(spec)
    cfg = prepared.config
    real = prepared.train
    tune_set, held_out = tuning_sets(real, cfg.utility_tuning, 0)
    epsilon = float(spec.privacy.epsilon)
    delta = spec.privacy.delta if spec.privacy.delta is not None else default_delta(len(real))
    # The seed the job's own allocation would use (run_dpgeng derives it the same way): data-independent.
    seed = int(torch.randint(2**31, (1,), generator=as_generator(spec.seed)))
    # Trials compute where Ray placed them: on CUDA only when each reserves a GPU share (a worker that reserves
    # none still sees the node's GPUs in Ray 2.60, but nothing holds them for it).
    device = resolve_device(spec.device)
    trial_device = "cuda" if device.type == "cuda" and sweep.gpus_per_trial > 0 else "cpu"
    return {"tune": tune_set, "held_out": held_out, "cfg": cfg, "epsilon": epsilon, "delta": delta,
            "mean": list(prepared.info.mean), "std": list(prepared.info.std), "seed": seed,
            "device": trial_device}, cfg


def run_allocation_sweep(sweep: AllocationSweepSpec, spec: Any, runs_dir: Path, *, address: str | None = None,
                         tracking_uri: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Measure every candidate share as a parallel trial, choose the shares, write ``job.yaml`` with them fixed.

    Returns the summary (also ``summary.json`` in the sweep folder): the chosen shares, each candidate's FID and
    accuracy, the targets, and the command that runs the job.
    """
    import yaml

    from dpdistill.distill.dpgeng.allocation import cap_shares, share_bounds
    from dpdistill.runtime.runfolder import atomic_write_json, atomic_write_text, utc_stamp
    from dpdistill.runtime.sweeps import SweepTracking
    from dpdistill.runtime.tracking import resolve_tracking_uri

    # The job's own input checks (the tuning set is public and fits the data; the device exists). The sensitive
    # split's records go no further than this process: only its size (δ) and shape reach the trials.
    probe_args, cfg = probe_inputs(sweep, spec)

    runs_dir = Path(runs_dir).expanduser().resolve()
    sweep_dir = runs_dir / "sweeps" / sweep.name / utc_stamp()
    sweep_dir.mkdir(parents=True)
    uri = resolve_tracking_uri(tracking_uri, runs_dir)
    tracking = SweepTracking(uri, sweep.name, sweep_dir, None)
    tracking.open_parent({"dpdistill.sweep_kind": KIND, "dpdistill.tuned_on": cfg.utility_tuning})
    shares = [1.0, *_grid(cfg, sweep.grid)]
    lo, hi = share_bounds(cfg)
    try:
        fids, accs, fid_target, acc_target, share_g, share_e = _measure_and_choose(
            sweep, cfg, shares, hi, probe_args, sweep_dir, address, num_cpus)
    except BaseException as e:  # a failed trial, Ctrl-C: the folder and the MLflow run say so
        atomic_write_json(sweep_dir / "summary.json", {"sweep": sweep.name, "kind": KIND, "status": "failed",
                                                         "error": " ".join(str(e).split())[:2000] or type(e).__name__})
        _fail_parent(tracking)
        raise
    share_g, share_e = cap_shares(cfg, share_g, share_e)
    job = yaml.safe_load(spec.to_yaml())
    job["method"].update({"allocation": "fixed", "share_generator": share_g, "share_expert": share_e})
    job["description"] = (f"{job.get('description', '')} [shares from utility-allocation sweep {sweep.name}: "
                          f"tuned on {cfg.utility_tuning}]").strip()
    validate_spec(job, "<allocation sweep job>")  # what we hand the user must run
    atomic_write_text(sweep_dir / "job.yaml", yaml.safe_dump(job, sort_keys=False))
    summary = {
        "sweep": sweep.name, "kind": KIND, "status": "completed", "tuned_on": cfg.utility_tuning,
        "share_generator": share_g, "share_expert": share_e, "share_bounds": [lo, hi],
        "fid_ratio": cfg.utility_fid_ratio, "fid_full": fids[1.0], "fid_target": fid_target,
        "generator_fid": {str(k): v for k, v in sorted(fids.items())},
        "acc_ratio": cfg.utility_acc_ratio, "acc_full": accs.get(1.0), "acc_target": acc_target,
        "expert_accuracy": {str(k): v for k, v in sorted(accs.items())},
        "privacy": (f"free: every candidate was fitted and scored on the public set '{cfg.utility_tuning}' with "
                    "throwaway ledgers; the sensitive split was read only by the job's input checks (its size sets δ)"),
        "job": str(sweep_dir / "job.yaml"), "run": f"dpdistill run {sweep_dir / 'job.yaml'}",
        "sweep_dir": str(sweep_dir), "mlflow_uri": uri, "mlflow_parent_run_id": tracking.parent_run_id,
    }
    atomic_write_json(sweep_dir / "summary.json", summary)
    _log(tracking, summary, fids, accs)
    return summary


def _log(tracking: Any, summary: dict[str, Any], fids: dict[float, float], accs: dict[float, float]) -> None:
    """Parent run: the chosen shares and targets; one child per candidate measurement."""
    if not tracking.parent_run_id:
        return
    try:
        client = tracking._client()
        exp_id = tracking._experiment_id(client)
        for phase, values, metric in (("generator", fids, "fid"), ("expert", accs, "accuracy")):
            for share, value in sorted(values.items()):
                run = client.create_run(exp_id, run_name=f"{tracking.sweep_name}/{phase}/{share:g}", tags={
                    "mlflow.parentRunId": tracking.parent_run_id, "dpdistill.sweep": tracking.sweep_name,
                    "dpdistill.sweep_role": "trial", "dpdistill.phase": phase})
                client.log_param(run.info.run_id, "share", str(share))
                if math.isfinite(value):
                    client.log_metric(run.info.run_id, metric, value)
                client.set_terminated(run.info.run_id)
        rid = tracking.parent_run_id
        for key in ("share_generator", "share_expert", "fid_full", "fid_target", "acc_full", "acc_target"):
            v = summary.get(key)
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                client.log_metric(rid, key, float(v))
        client.set_tag(rid, "dpdistill.privacy", summary["privacy"])
        for f in ("summary.json", "job.yaml"):
            client.log_artifact(rid, str(Path(summary["sweep_dir"]) / f))
        client.set_terminated(rid)
    except Exception as e:  # noqa: BLE001 - the sweep folder holds everything; tracking must not fail the sweep
        log.warning("tracking: the allocation sweep could not be logged: %s", e)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What the CLI prints for an allocation sweep."""
    fid = ", ".join(f"{float(k):g}: {v:.2f}" for k, v in summary["generator_fid"].items())
    lines = [f"generator share {summary['share_generator']:.3f} (FID target {summary['fid_target']:.2f} = "
             f"{summary['fid_ratio']:g} x {summary['fid_full']:.2f} at the full budget; FID by share {fid})"]
    if summary["expert_accuracy"]:
        acc = ", ".join(f"{float(k):g}: {100 * v:.1f} %" for k, v in summary["expert_accuracy"].items())
        lines.append(f"expert share {summary['share_expert']:.3f} (accuracy target {100 * summary['acc_target']:.1f} "
                     f"% = {summary['acc_ratio']:g} x {100 * summary['acc_full']:.1f} %; accuracy by share {acc})")
    else:
        lines.append(f"expert share {summary['share_expert']:.3f} (the job's: no expert fine-tuning to tune)")
    lines += [f"privacy: {summary['privacy']}", f"job with these shares: {summary['job']}",
              f"run it: {summary['run']}", f"sweep folder: {summary['sweep_dir']}"]
    return lines
