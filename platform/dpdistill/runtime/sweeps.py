"""Hyper-parameter and budget sweeps: Ray Tune + Optuna over a job spec's fields, MLflow on the driver.

A sweep spec names a base job spec, fixed overrides, a search space over dotted spec fields, and the metric to
optimise. Each trial is an ordinary dpdistill job (its own run folder under the sweep's folder, its own ledger);
the driver-side MLflow callback logs one MLflow run per trial.

Selection is a release too. Choosing the best trial by an accuracy measured on sensitive data leaks that data,
so the metric must be a validation metric: ``val_*`` (sensitive validation split: the selection is
*non-private*, and the sweep summary says so) or ``synv_*`` (validation on the released data itself: free). Test
metrics (``acc_*``) are refused: tuning on the test set makes every reported number optimistic.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from dpdistill.errors import SpecError
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
    validate_spec(base, str(job_path))
    for key, dist in sweep.search.items():
        probe = dist.choice if dist.choice is not None else [
            v for v in (dist.uniform or dist.loguniform or dist.randint) if v is not None]
        for value in probe:
            validate_spec(apply_overrides(base, [f"{key}={json.dumps(value)}"]), f"{path} (search.{key}={value})")
    return sweep, base, job_path


def _trial(config: dict[str, Any], base: dict[str, Any], runs_dir: str) -> None:
    """One Tune trial: the base job with this trial's overrides, run as an ordinary job."""
    from ray import tune

    from dpdistill.runner import run_job

    overrides = [f"{k}={json.dumps(v)}" for k, v in config.items()]
    # The driver's MLflow callback logs this trial; evaluation runs in-process (the trial holds the CPUs).
    overrides += ["tracking.enabled=false", "evaluation.parallel=false"]
    spec = validate_spec(apply_overrides(base, overrides), "<trial>")
    result = run_job(spec, runs_dir, progress=False)
    tune.report({**result.metrics, "run_dir": str(result.run_dir)})


def run_sweep(sweep: SweepSpec, base: dict[str, Any], runs_dir: Path, *, address: str | None = None,
              tracking_uri: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Run the sweep; returns the best trial's config, metric and run folder plus the selection caveat."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    from dpdistill.runtime.cluster import ray_session
    from dpdistill.runtime.runfolder import atomic_write_json, utc_stamp
    from dpdistill.runtime.tracking import resolve_tracking_uri

    sweep_dir = (Path(runs_dir).expanduser().resolve() / "sweeps" / sweep.name / utc_stamp())
    sweep_dir.mkdir(parents=True)
    space = {k: d.to_tune() for k, d in sweep.search.items()}
    uri = resolve_tracking_uri(tracking_uri, Path(runs_dir))
    with ray_session(address, num_cpus):
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(_trial, base=base, runs_dir=str(sweep_dir / "trials")),
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
                                                tags={"dpdistill.sweep": sweep.name})],
            ),
        )
        results = tuner.fit()
    errors = [str(r.error).splitlines()[0] for r in results if r.error is not None]
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, filter_nan_and_inf=True)
    selection = ("non-private: the best trial was chosen on the sensitive validation split"
                 if sweep.metric.startswith("val_") else "free: chosen on released data only")
    summary = {
        "sweep": sweep.name, "metric": sweep.metric, "mode": sweep.mode, "best_value": best.metrics[sweep.metric],
        "best_config": best.config, "best_run_dir": best.metrics.get("run_dir"), "trials": len(results),
        "failed_trials": len(errors), "errors": errors, "selection": selection, "sweep_dir": str(sweep_dir),
        "mlflow_uri": uri,
    }
    atomic_write_json(sweep_dir / "summary.json", summary)
    return summary
