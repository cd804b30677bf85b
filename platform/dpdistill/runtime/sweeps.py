"""Hyper-parameter and budget sweeps: Ray Tune + Optuna over a job spec's fields, MLflow on the driver.

A sweep spec names a base job spec, fixed overrides, a search space over dotted spec fields, and the metric to
optimise. Each trial is an ordinary dpdistill job (its own run folder under the sweep's folder, its own ledger);
the driver-side MLflow callback logs one MLflow run per trial.

Selection is a release too. Choosing the best trial by an accuracy measured on sensitive data leaks that data,
so the metric must be a validation metric: ``val_*`` (sensitive validation split: the selection is
*non-private*, and the sweep summary says so) or ``synv_*`` (validation on the released data itself: free). Test
metrics (``acc_*``) are refused: tuning on the test set makes every reported number optimistic.

Every trial of a private sweep is a private job on the same sensitive training split, and every trial's release
stays on disk: the sweep spends all of them. So the sweep composes every trial's charges (read from the trials'
ledger.json files, composed sequentially by PLD) into its own ``ledger.json`` in the sweep folder, and reports that
total as the sweep's ε beside the per-trial ε (summary.json, the CLI, and an MLflow summary run). A sweep spec may
cap it with ``budget: {epsilon: E, delta: D}``: each trial then runs at δ = D / num_samples, and the sweep is
refused before any trial when its worst case — num_samples trials, each an arbitrary (ε_trial, D / num_samples)-DP
mechanism, composed at D — exceeds E. Without ``budget`` the sweep's ε is reported, not limited. A job spec with
``privacy.owner_budget`` charges the data owner's store once per trial (see :mod:`dpdistill.privacy.owner_budget`);
the sweep checks up front that all its trials can fit there.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from dpdistill.errors import BudgetExceeded, SpecError
from dpdistill.spec import StrictModel, apply_overrides, format_validation_error, read_yaml, validate_spec

log = logging.getLogger("dpdistill.sweeps")


class Distribution(StrictModel):
    """One search dimension; exactly one of the fields is set."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None

    def to_tune(self) -> Any:
        from ray import tune

        set_ = [k for k in ("uniform", "loguniform", "randint", "choice") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("give exactly one of uniform, loguniform, randint, choice")
        kind = set_[0]
        value = getattr(self, kind)
        if kind == "choice":
            if not value:
                raise ValueError("choice needs at least one value")
            return tune.choice(value)
        low, high = value
        if not low < high:
            raise ValueError(f"{kind}: expected low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ValueError("loguniform: expected low > 0")
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](low, high)


class SweepBudget(StrictModel):
    """The sweep's total privacy budget over all its trials, which read the same sensitive split."""

    epsilon: float = Field(gt=0, description="the sweep's total ε; refused before any trial if the trials could "
                                             "exceed it")
    delta: float | None = Field(default=None, gt=0, lt=1,
                                description="the sweep's δ (default: the job's); each trial runs at δ / num_samples")


class SweepSpec(StrictModel):
    """A sweep over one job spec."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    job: str = Field(description="the base job spec, relative to the sweep file")
    set: list[str] = Field(default_factory=list, description="fixed overrides for every trial")
    search: dict[str, Distribution] = Field(min_length=1)
    metric: str
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(default=8, ge=1, le=10_000)
    max_concurrent: int = Field(default=2, ge=1)
    cpus_per_trial: float = Field(default=1, gt=0)
    seed: int = 0
    budget: SweepBudget | None = Field(
        default=None, description="cap on the sweep's composed ε over every trial; null: the total is reported only")

    @field_validator("metric")
    @classmethod
    def _not_the_test_set(cls, v: str) -> str:
        if not (v.startswith("val_") or v.startswith("synv_") or v.startswith("privacy_") or v == "wall_seconds"):
            raise ValueError(
                "expected a validation metric (val_* or synv_*): tuning on test metrics such as acc_mean "
                "would leak the test set into every reported number"
            )
        return v


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, dict[str, Any], Path]:
    """Load a sweep spec and its base job document; every trial configuration is validated up front."""
    from pydantic import ValidationError

    path = Path(path)
    doc = apply_overrides(read_yaml(path), overrides or [])
    try:
        sweep = SweepSpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, str(path), SweepSpec)) from None
    for key, dist in sweep.search.items():
        try:
            dist.to_tune()
        except ValueError as e:
            raise SpecError(f"{path}: field 'search.{key}': {e}") from None
    job_path = (path.parent / sweep.job).resolve()
    base = apply_overrides(read_yaml(job_path), sweep.set)
    # Validate the base and one sample of every dimension's bounds now, not in trial 17 an hour later.
    base_spec = validate_spec(base, str(job_path))
    if sweep.budget is not None:
        if base_spec.privacy.epsilon is None and "privacy.epsilon" not in sweep.search:
            raise SpecError(f"{path}: field 'budget': the job {sweep.job} is not private (no privacy.epsilon), so "
                            "there is no privacy to budget; remove budget")
        if "privacy.delta" in sweep.search:
            raise SpecError(f"{path}: field 'search.privacy.delta': with a sweep budget each trial runs at "
                            "budget.delta / num_samples; do not search it")
    for key, dist in sweep.search.items():
        probe = dist.choice if dist.choice is not None else [
            v for v in (dist.uniform or dist.loguniform or dist.randint) if v is not None]
        for value in probe:
            validate_spec(apply_overrides(base, [f"{key}={json.dumps(value)}"]), f"{path} (search.{key}={value})")
    return sweep, base, job_path


@dataclass
class SweepPrivacy:
    """What a sweep's trials spend, planned before any runs: their ε and δ, the sweep's δ and worst case."""

    private: bool
    trial_epsilon: float | None = None  # the largest privacy.epsilon a trial can have
    trial_delta: float | None = None  # the δ every trial runs at, when the sweep sets it (budget)
    sweep_delta: float | None = None  # the δ the sweep's ε is stated at, when known up front
    budget: float | None = None
    worst_case: float | None = None  # the sweep's composed ε if every trial were a worst-case (ε, δ)-DP mechanism
    overrides: list[str] = field(default_factory=list)  # applied to every trial (δ, owner budget store)


def _largest(sweep: SweepSpec, key: str, base_value: float | None) -> float | None:
    """The largest value ``key`` takes in any trial (the search bound, or the base spec's value)."""
    dist = sweep.search.get(key)
    if dist is None:
        return base_value
    if dist.choice is not None:
        values = [v for v in dist.choice if v is not None]
        return max(float(v) for v in values) if values else base_value
    return float((dist.uniform or dist.loguniform or dist.randint)[1])


def plan_privacy(sweep: SweepSpec, base: dict[str, Any], runs_dir: Path) -> SweepPrivacy:
    """Plan the sweep's accounting before any trial; refuses (BudgetExceeded) a sweep whose worst case cannot fit.

    Reads the sensitive split's size (for the default δ) and, with an owner budget, its fingerprint; writes nothing.
    """
    from dpdistill.privacy.defaults import check_delta, default_delta
    from dpdistill.privacy.ledger import BUDGET_REL_TOL
    from dpdistill.privacy.owner_budget import composed_epsilon

    spec = validate_spec(base, "<sweep base>")
    eps = _largest(sweep, "privacy.epsilon", spec.privacy.epsilon)
    if eps is None:
        return SweepPrivacy(private=False)
    plan = SweepPrivacy(private=True, trial_epsilon=eps)
    n = sweep.num_samples
    probe = validate_spec(apply_overrides(base, [f"privacy.epsilon={json.dumps(eps)}"]), "<sweep base>")
    need_n = probe.privacy.delta is None and (sweep.budget is not None or probe.privacy.owner_budget is not None)
    n_records = _sensitive_records(probe) if need_n or sweep.budget is not None else None
    trial_delta = probe.privacy.delta if probe.privacy.delta is not None else (
        default_delta(n_records) if n_records else None)
    if sweep.budget is not None:
        sweep_delta = sweep.budget.delta if sweep.budget.delta is not None else trial_delta
        check_delta(sweep_delta, n_records)
        trial_delta = sweep_delta / n
        plan.trial_delta, plan.sweep_delta, plan.budget = trial_delta, sweep_delta, sweep.budget.epsilon
        plan.worst_case = composed_epsilon([], [(eps, trial_delta)] * n, sweep_delta)
        plan.overrides.append(f"privacy.delta={json.dumps(trial_delta)}")
        if not plan.worst_case <= sweep.budget.epsilon * (1.0 + BUDGET_REL_TOL):
            raise BudgetExceeded(
                f"sweep '{sweep.name}': {n} trials of ε ≤ {eps:g} at δ={trial_delta:.3g} each (budget.delta / "
                f"num_samples) compose to ε {plan.worst_case:.4g} at δ={sweep_delta:.3g} in the worst case, above the "
                f"sweep budget {sweep.budget.epsilon:g}; lower num_samples or the trials' privacy.epsilon, or raise "
                "budget.epsilon; nothing ran"
            )
    if probe.privacy.owner_budget is not None:
        from dpdistill.privacy.owner_budget import open_for_spec, resolve_store

        # Trials run under the sweep's folder: point them at the store a plain run would use.
        store = resolve_store(probe.privacy.budget_store, runs_dir)
        plan.overrides.append(f"privacy.budget_store={json.dumps(str(store))}")
        owner = open_for_spec(validate_spec(apply_overrides(base, [
            f"privacy.epsilon={json.dumps(eps)}", f"privacy.budget_store={json.dumps(str(store))}"])), runs_dir)
        owner.check(f"sweep '{sweep.name}'", eps, trial_delta, count=n)
    return plan


def _sensitive_records(spec: Any) -> int:
    """The size of the sensitive training split a job spec reads (its pipeline's own check, no files written)."""
    from dpdistill.pipelines import get_pipeline

    prepared = get_pipeline(spec.kind).prepare(spec)
    return int(getattr(prepared, "n_sensitive", 0) or 0)


def compose_trial_ledgers(sweep_dir: Path, plan: SweepPrivacy) -> dict[str, Any] | None:
    """Write the sweep's ledger: every trial's charges (from its ledger.json) composed sequentially, by PLD.

    Every trial read the same sensitive training split, so nothing composes in parallel across trials. Trials
    that failed after charging count too: a charge is made before its release. Returns the figures for the
    summary, or None when no trial has a ledger. The ledger's budget is the sweep budget; without one it is the
    sum of the trials' budgets, a bookkeeping bound and not a limit.
    """
    from dpdistill.privacy.analysis.pld import pld_epsilon
    from dpdistill.privacy.ledger import BUDGET_REL_TOL, PrivacyLedger, ledger_digest
    from dpdistill.privacy.mechanisms import Composed

    paths = sorted((sweep_dir / "trials").glob("*/*/ledger.json"))
    if not paths:
        return None
    trials = [(p, PrivacyLedger.load(p)) for p in paths]
    delta = plan.sweep_delta if plan.sweep_delta is not None else max(t.delta for _, t in trials)
    sizes = {t.n_records for _, t in trials}
    charged = [(p, t, Composed(tuple(t.mechanisms))) for p, t in trials if t.mechanisms]
    total = pld_epsilon(Composed(tuple(m for _, _, m in charged)), delta) if charged else 0.0
    over = plan.budget is not None and not total <= plan.budget * (1.0 + BUDGET_REL_TOL)
    if plan.budget is not None and not over:
        budget = plan.budget
    else:
        budget = max(math.fsum(t.epsilon_budget for _, t in trials), total * (1.0 + BUDGET_REL_TOL), 1e-12)
    path = sweep_dir / "ledger.json"
    path.unlink(missing_ok=True)  # derived from the trials' ledgers: rebuilt whole, never appended to
    # A trial the runner stamped NOT PRIVATE (reproducible noise, or a choice made on sensitive data uncharged:
    # its ledger's caveat) makes the whole sweep's figure not a guarantee; carry the first reason over.
    caveat = next((t.caveat for _, t in trials if t.caveat), None)
    ledger = PrivacyLedger(path, budget, delta, n_records=sizes.pop() if len(sizes) == 1 else None,
                           noise="reproducible" if any(t.noise != "secret" for _, t in trials) else "secret",
                           caveat=caveat)
    for p, t, mechanism in charged:
        run = p.parent
        ledger.charge(f"trial {run.parent.name}/{run.name}", mechanism,
                      note=(f"the trial's ledger: ε {t.spent_epsilon():.4g} of {t.epsilon_budget:g} at "
                            f"δ={t.delta:.3g}, {len(t.entries)} charge(s), sha256 {ledger_digest(p)[:16]}"))
    trial_eps = [t.spent_epsilon() for _, t in trials]
    return {
        "sweep_epsilon": ledger.spent_epsilon(),
        "sweep_delta": delta,
        "trial_epsilon": max(trial_eps),
        "trial_epsilons": trial_eps,
        "trial_deltas": sorted({t.delta for _, t in trials}),
        "trials_charged": len(charged),
        "sweep_budget": plan.budget,
        "worst_case_epsilon": plan.worst_case,
        "over_budget": over,
        "not_private": ledger.noise != "secret" or caveat is not None,
        "sweep_ledger": str(path),
    }


def _privacy_line(plan: SweepPrivacy, acc: dict[str, Any] | None) -> str:
    """The summary's one line on what the sweep spent."""
    if not plan.private:
        return "none: the trials are not private"
    if acc is None:
        return "no trial charged anything"
    line = (f"sweep ε = {acc['sweep_epsilon']:.3f} (PLD: {acc['trials_charged']} trials' charges composed, every "
            f"trial's release counts) at δ = {acc['sweep_delta']:.2e}; per trial ε ≤ {acc['trial_epsilon']:.3f}; ")
    if plan.budget is None:
        line += "no sweep budget (reported, not limited)"
    elif acc["over_budget"]:
        line += f"ABOVE the sweep budget {plan.budget:g} (worst case planned {plan.worst_case:.3f})"
    else:
        line += f"within the sweep budget {plan.budget:g} (worst case {plan.worst_case:.3f})"
    if acc["not_private"]:
        line = "NOT PRIVATE (a trial's release is not covered by its ε: see the sweep ledger's guarantee): " + line
    return line + f"; ledger {acc['sweep_ledger']}"


def _selection(metric: str) -> str:
    if metric.startswith("val_"):
        return (f"non-private: the best trial was chosen by {metric}, measured on the sensitive validation split; "
                "that choice is not in the sweep's ε")
    if metric.startswith("synv_"):
        return "free: chosen on released data only"
    return f"free: chosen by {metric}, an accounting figure or wall time, not by sensitive data"


def _log_summary_run(uri: str, sweep: SweepSpec, summary: dict[str, Any], sweep_dir: Path) -> None:
    """One MLflow run beside the trials' with the sweep's totals (ε composed over every trial, best value)."""
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        name = f"sweep-{sweep.name}"
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run = client.create_run(exp_id, run_name=f"{sweep.name}/summary", tags={
            "dpdistill.sweep": sweep.name, "dpdistill.sweep_role": "summary", "dpdistill.sweep_dir": str(sweep_dir),
            "dpdistill.privacy": summary["privacy"][:5000], "dpdistill.selection": summary["selection"]})
        rid = run.info.run_id
        metrics = {"trials": summary["trials"], "failed_trials": summary["failed_trials"],
                   f"best_{sweep.metric}": summary["best_value"]}
        for key, metric in (("sweep_epsilon", "privacy_sweep_epsilon"), ("sweep_delta", "privacy_sweep_delta"),
                            ("trial_epsilon", "privacy_trial_epsilon"), ("sweep_budget", "privacy_sweep_budget")):
            if summary.get(key) is not None:
                metrics[metric] = summary[key]
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                client.log_metric(rid, k, float(v))
        for f in ("summary.json", "ledger.json"):
            if (sweep_dir / f).is_file():
                client.log_artifact(rid, str(sweep_dir / f))
        client.set_terminated(rid)
    except Exception as e:  # noqa: BLE001 - the sweep folder holds everything; tracking must not fail the sweep
        log.warning("tracking: the sweep's summary run could not be logged: %s", e)


def _trial(config: dict[str, Any], base: dict[str, Any], runs_dir: str, extra: list[str] | None = None) -> None:
    """One Tune trial: the base job with this trial's overrides, run as an ordinary job."""
    from ray import tune

    from dpdistill.runner import run_job

    overrides = [*(extra or []), *(f"{k}={json.dumps(v)}" for k, v in config.items())]
    # The driver's MLflow callback logs this trial; evaluation runs in-process (the trial holds the CPUs).
    overrides += ["tracking.enabled=false", "evaluation.parallel=false"]
    spec = validate_spec(apply_overrides(base, overrides), "<trial>")
    result = run_job(spec, runs_dir, progress=False)
    tune.report({**result.metrics, "run_dir": str(result.run_dir)})


def run_sweep(sweep: SweepSpec, base: dict[str, Any], runs_dir: Path, *, address: str | None = None,
              tracking_uri: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Run the sweep; returns the best trial's config, metric and run folder, the selection caveat and the
    sweep's privacy (every trial's charges composed). A budget the trials could exceed is refused first."""
    from dpdistill.runtime.cluster import ray_session
    from dpdistill.runtime.runfolder import atomic_write_json, utc_stamp
    from dpdistill.runtime.tracking import resolve_tracking_uri

    plan = plan_privacy(sweep, base, Path(runs_dir))  # before any trial and before the sweep folder exists
    sweep_dir = (Path(runs_dir).expanduser().resolve() / "sweeps" / sweep.name / utc_stamp())
    sweep_dir.mkdir(parents=True)
    space = {k: d.to_tune() for k, d in sweep.search.items()}
    uri = resolve_tracking_uri(tracking_uri, Path(runs_dir))
    # The MLflow callback's mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which outranks the runs-dir
    # default: a second sweep in this process would log into this one's store. Put the environment back.
    prior_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with ray_session(address, num_cpus):
            results = _fit(sweep, base, space, sweep_dir, uri, plan.overrides)
    finally:
        if prior_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prior_uri
        # Even an interrupted sweep composes what its trials charged.
        accounting = compose_trial_ledgers(sweep_dir, plan) if plan.private else None
    errors = [str(r.error).splitlines()[0] for r in results if r.error is not None]
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, filter_nan_and_inf=True)
    summary = {
        "sweep": sweep.name, "metric": sweep.metric, "mode": sweep.mode, "best_value": best.metrics[sweep.metric],
        "best_config": best.config, "best_run_dir": best.metrics.get("run_dir"), "trials": len(results),
        "failed_trials": len(errors), "errors": errors, "selection": _selection(sweep.metric),
        "privacy": _privacy_line(plan, accounting), **(accounting or {}),
        "sweep_dir": str(sweep_dir), "mlflow_uri": uri,
    }
    atomic_write_json(sweep_dir / "summary.json", summary)
    _log_summary_run(uri, sweep, summary, sweep_dir)
    return summary


def _fit(sweep: SweepSpec, base: dict[str, Any], space: dict[str, Any], sweep_dir: Path, uri: str,
         extra: list[str]) -> Any:
    """Run the trials under Tune + Optuna (each an ordinary job) and return Tune's results."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(_trial, base=base, runs_dir=str(sweep_dir / "trials"), extra=extra),
            {"cpu": sweep.cpus_per_trial},
        ),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent,
            search_alg=OptunaSearch(seed=sweep.seed),
        ),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=str(sweep_dir / "tune"), verbose=0,
            callbacks=[MLflowLoggerCallback(tracking_uri=uri, experiment_name=f"sweep-{sweep.name}",
                                            tags={"dpdistill.sweep": sweep.name, "dpdistill.sweep_role": "trial"})],
        ),
    )
    return tuner.fit()
