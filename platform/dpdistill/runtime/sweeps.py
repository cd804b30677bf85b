"""Hyper-parameter and budget sweeps: Ray Tune + Optuna over a job spec's fields, MLflow on the driver.

A sweep spec names a base job spec, fixed overrides, a search space over dotted spec fields, and the metric to
optimise. Each trial is an ordinary dpdistill job (its own run folder under the sweep's folder, its own ledger);
the driver logs one MLflow parent run for the sweep and one child run per trial (:class:`SweepTracking`: the
trial's full resolved spec, metrics, ledger figures and a link to its run folder).

Everything is checked before the first trial: every searched bound against the job's spec, that the metric is
one the job reports, and that no searched method option is one the method overrides (``overridden_options``).
Ctrl-C or SIGTERM stops a sweep cleanly: Tune saves its state, trial folders still running are marked
interrupted, the ledger and summary are written (status ``interrupted``) and ``dpdistill sweep --resume DIR``
(:func:`resume_sweep`, ``Tuner.restore``) reruns the unfinished trials and finishes the rest. An interrupted
attempt's charges stay in the sweep's ledger (it charged before its release).

Selection is a release too. Choosing the best trial by an accuracy measured on sensitive data leaks that data,
so the metric must be a validation metric: ``val_*`` (sensitive validation split: the selection is
*non-private*, and the sweep summary says so) or ``synv_*`` (validation on the released data itself: free). Test
metrics (``acc_*``) are refused: tuning on the test set makes every reported number optimistic.

Every trial of a private sweep is a private job on the same sensitive training split, and every trial's release
stays on disk: the sweep spends all of them. So the sweep composes every trial's charges (read from the trials'
ledger.json files, composed sequentially by PLD) into its own ``ledger.json`` in the sweep folder, and reports that
total as the sweep's ε beside the per-trial ε (summary.json, the CLI, and the sweep's MLflow parent run). A sweep spec may
cap it with ``budget: {epsilon: E, delta: D}``: each trial then runs at δ = D / num_samples, and the sweep is
refused before any trial when its worst case — num_samples trials, each an arbitrary (ε_trial, D / num_samples)-DP
mechanism, composed at D — exceeds E. Without ``budget`` the sweep's ε is reported, not limited. A job spec with
``privacy.owner_budget`` charges the data owner's store once per trial (see :mod:`dpdistill.privacy.owner_budget`);
the sweep checks up front that all its trials can fit there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
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
    gpus_per_trial: float = Field(default=0, ge=0, description="GPUs (or a share) each trial reserves; a CUDA job "
                                                               "needs some")
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
    if base_spec.device.startswith("cuda") and not sweep.gpus_per_trial:
        raise SpecError(f"{path}: field 'gpus_per_trial': the job runs on '{base_spec.device}'; reserve a GPU (or a "
                        "share, e.g. 0.5) per trial, or Ray places trials on nodes without one")
    if sweep.budget is not None:
        if base_spec.privacy.epsilon is None and "privacy.epsilon" not in sweep.search:
            raise SpecError(f"{path}: field 'budget': the job {sweep.job} is not private (no privacy.epsilon), so "
                            "there is no privacy to budget; remove budget")
        if "privacy.delta" in sweep.search:
            raise SpecError(f"{path}: field 'search.privacy.delta': with a sweep budget each trial runs at "
                            "budget.delta / num_samples; do not search it")
    probes = {key: _probe_values(dist) for key, dist in sweep.search.items()}
    for key, values in probes.items():
        for value in values:
            validate_spec(apply_overrides(base, [f"{key}={json.dumps(value)}"]), f"{path} (search.{key}={value})")
    _check_searched_fields_are_used(probes, base, path)
    _check_metric_is_reported(sweep.metric, base_spec, path)
    return sweep, base, job_path


def _probe_values(dist: Distribution) -> list[Any]:
    """The values that bound a dimension: a choice's values, or a range's two ends."""
    if dist.choice is not None:
        return list(dist.choice)
    return [v for v in (dist.uniform or dist.loguniform or dist.randint) if v is not None]


def _check_searched_fields_are_used(probes: dict[str, list[Any]], base: dict[str, Any], path: Path) -> None:
    """Refuse searching a method option the method then overrides (e.g. DP-GenG's shares under allocation
    'utility'): every trial would run the same thing while its spec.yaml records a value that was never used.

    Checked for each searched value alone and paired with each value of every other searched field (so a
    searched ``allocation`` is covered too); a method config opts in with ``overridden_options()``.
    """
    from dpdistill.pipelines import method_config_type

    combos: list[list[str]] = [[]]
    flat = [(k, v) for k, vs in probes.items() for v in vs]
    combos += [[f"{k}={json.dumps(v)}"] for k, v in flat]
    combos += [[f"{k}={json.dumps(v)}", f"{k2}={json.dumps(v2)}"] for k, v in flat for k2, v2 in flat if k2 != k]
    for overrides in combos:
        try:
            spec = validate_spec(apply_overrides(base, overrides), str(path))
        except SpecError:  # a corner pairing two bounds may be invalid; each bound alone was checked above
            continue
        config_type = method_config_type(spec.kind, spec.method.name, str(path))
        if config_type is None or not hasattr(config_type, "overridden_options"):
            continue
        try:
            cfg = (config_type.model_validate(spec.method.options()) if hasattr(config_type, "model_validate")
                   else config_type(**spec.method.options()))
        except Exception:  # noqa: BLE001 - an invalid combination is validate_spec's to report, at its trial
            continue
        ignored = cfg.overridden_options()
        for key in probes:
            field_name = key.removeprefix("method.")
            if key.startswith("method.") and field_name in ignored:
                given = f" with {', '.join(overrides)}" if overrides else ""
                raise SpecError(f"{path}: field 'search.{key}': method '{spec.method.name}' ignores {field_name}"
                                f"{given} ({ignored[field_name]}), so every trial would run the same; remove it "
                                "from search or change what overrides it")


def _check_metric_is_reported(metric: str, spec: Any, path: Path) -> None:
    """Refuse a selection metric the job never reports (a typo fails here, not after the first trial)."""
    import importlib

    from dpdistill.pipelines import get_pipeline
    from dpdistill.privacy.disclosure import COMMON, kind_of

    if metric.startswith("val_") and not (spec.evaluation.enabled and spec.evaluation.validation):
        raise SpecError(f"{path}: field 'metric': '{metric}' is measured by the evaluation on the validation split, "
                        "which this job turns off (evaluation.enabled / evaluation.validation); turn it on")
    if metric.startswith("synv_") and getattr(spec.evaluation, "selection", None) != "synv":
        raise SpecError(f"{path}: field 'metric': '{metric}' is reported only with evaluation.selection: synv")
    module = importlib.import_module(type(get_pipeline(spec.kind)).__module__)
    declared = {**COMMON, **getattr(module, "DISCLOSURE", {})}
    exact = metric in declared
    if exact or (metric.startswith("privacy_") and kind_of(metric, declared) is not None):
        return
    known = sorted(k for k in declared if k.startswith(("val_", "synv_")) and "*" not in k)
    raise SpecError(f"{path}: field 'metric': a {spec.kind} job does not report '{metric}'; validation metrics it "
                    f"reports: {', '.join(known) or 'none'}")


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


def plan_privacy(sweep: SweepSpec, base: dict[str, Any], runs_dir: Path, *, charged: tuple[Any, ...] = (),
                 remaining: int | None = None) -> SweepPrivacy:
    """Plan the sweep's accounting before any trial; refuses (BudgetExceeded) a sweep whose worst case cannot fit.

    Reads the sensitive split's size (for the default δ) and, with an owner budget, its fingerprint; writes nothing.
    A resumed sweep passes what its trials have ``charged`` so far (their mechanisms, interrupted trials'
    included) and how many trials are ``remaining``: the worst case is then those charges plus ``remaining``
    arbitrary trials, so a resume that could push the sweep over its budget is refused before it starts.
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
    todo = n if remaining is None else remaining
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
        plan.worst_case = composed_epsilon(list(charged), [(eps, trial_delta)] * todo, sweep_delta)
        plan.overrides.append(f"privacy.delta={json.dumps(trial_delta)}")
        if not plan.worst_case <= sweep.budget.epsilon * (1.0 + BUDGET_REL_TOL):
            if remaining is not None:
                raise BudgetExceeded(
                    f"sweep '{sweep.name}': what its {len(charged)} trial run(s) charged so far plus {todo} more "
                    f"trial(s) of ε ≤ {eps:g} at δ={trial_delta:.3g} compose to ε {plan.worst_case:.4g} at "
                    f"δ={sweep_delta:.3g} in the worst case, above the sweep budget {sweep.budget.epsilon:g} "
                    "(interrupted trials charged before their release and are rerun); nothing ran")
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
        if todo:
            owner.check(f"sweep '{sweep.name}'", eps, trial_delta, count=todo)
    return plan


def _sensitive_records(spec: Any) -> int:
    """The size of the sensitive training split a job spec reads (its pipeline's own check, no files written)."""
    from dpdistill.pipelines import get_pipeline

    prepared = get_pipeline(spec.kind).prepare(spec)
    return int(getattr(prepared, "n_sensitive", 0) or 0)


def trial_ledger_paths(sweep_dir: Path) -> list[Path]:
    """Every trial run's ledger.json under the sweep folder: ``trials/<trial>/<job>/<run>/`` (older sweeps:
    ``trials/<job>/<run>/``), interrupted attempts included."""
    trials = sweep_dir / "trials"
    return sorted({*trials.glob("*/*/ledger.json"), *trials.glob("*/*/*/ledger.json")})


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

    paths = trial_ledger_paths(sweep_dir)
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
        ledger.charge(f"trial {p.parent.relative_to(sweep_dir / 'trials')}", mechanism,
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


# ------------------------------------------------------------------------------------------- the sweep folder
#
#   runs/sweeps/<name>/<stamp>/
#     sweep.json     what the sweep is: its spec, the base job, the privacy plan, the MLflow store and parent run
#                    (written before the first trial; `dpdistill sweep --resume` reads only this)
#     tune/          Ray Tune's experiment state (Tuner.restore resumes from it)
#     trials/<trial id>/<job>/<stamp>/   one ordinary run folder per trial attempt
#     ledger.json    every trial attempt's charges composed (rebuilt from the trials' ledgers at each end)
#     summary.json   status (completed | interrupted), best trial, privacy line, errors

STATE_FILE = "sweep.json"


def _flat(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
    return out


def run_folders(trial_dir: Path) -> list[Path]:
    """A trial's run folders (one per attempt: a resumed trial that was interrupted has two), oldest first."""
    return sorted((p.parent for p in trial_dir.glob("*/*/status.json")), key=lambda p: p.name)


def mark_stale_trials_interrupted(sweep_dir: Path, why: str) -> list[Path]:
    """Mark trial run folders still saying ``running`` as interrupted (their Tune actor was stopped or killed).

    Call only when no trial of this sweep can still be running (after Tune returned, or before a resume).
    """
    from dpdistill.runtime.runfolder import RunFolder

    marked = []
    for status in sorted((sweep_dir / "trials").glob("**/status.json")):
        try:
            state = json.loads(status.read_text())
        except (OSError, ValueError):
            continue
        if state.get("status") == "running":
            RunFolder(path=status.parent).set_status("interrupted", interrupted_by=why)
            marked.append(status.parent)
    return marked


class SweepTracking:
    """MLflow for a sweep, from the driver only: one parent run for the sweep and one child run per trial.

    A child carries the trial's full resolved spec (params, from its run folder's spec.yaml), its metrics and
    ledger figures, a link to its run folder (tag ``dpdistill.run_dir``) and spec.yaml / ledger.json /
    metrics.json / status.json as artifacts; the released set stays in the run folder. Trials themselves run
    with tracking off, so the sweep's runs are logged by one writer, in trial order under one parent (SQLite
    takes writers side by side once its store is open, tracking.store_opening_lock). Pickled into Tune's experiment
    state, so a resumed sweep keeps logging under the same parent.
    """

    def __init__(self, uri: str, sweep_name: str, sweep_dir: Path, parent_run_id: str | None) -> None:
        self.uri, self.sweep_name, self.sweep_dir, self.parent_run_id = uri, sweep_name, sweep_dir, parent_run_id
        self.experiment = f"sweep-{sweep_name}"

    def _client(self) -> Any:
        import mlflow

        for noisy in ("alembic", "mlflow"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from dpdistill.runtime.tracking import store_opening_lock

        with store_opening_lock(self.uri):  # opening a fresh SQLite store migrates it: one process at a time
            return mlflow.MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self, client: Any) -> str:
        from dpdistill.runtime.tracking import ensure_experiment

        return ensure_experiment(client, self.experiment, self.uri)

    def open_parent(self, tags: dict[str, str]) -> str | None:
        """Create the sweep's parent run (before the first trial); None if the store cannot be reached."""
        try:
            client = self._client()
            run = client.create_run(self._experiment_id(client), run_name=f"{self.sweep_name}/{self.sweep_dir.name}",
                                    tags={"dpdistill.sweep": self.sweep_name, "dpdistill.sweep_role": "sweep",
                                          "dpdistill.sweep_dir": str(self.sweep_dir), **tags})
            self.parent_run_id = run.info.run_id
        except Exception as e:  # noqa: BLE001 - the sweep folder is the record; tracking must not stop the sweep
            log.warning("tracking: the sweep's MLflow run could not be created: %s", e)
        return self.parent_run_id

    def log_trial(self, trial_id: str, config: dict[str, Any], error: str | None) -> None:
        """One child run for a finished (or failed) trial, from its newest run folder."""
        try:
            self._log_trial(trial_id, config, error)
        except Exception as e:  # noqa: BLE001
            log.warning("tracking: trial %s could not be logged: %s", trial_id, e)

    def _log_trial(self, trial_id: str, config: dict[str, Any], error: str | None) -> None:
        import yaml

        client = self._client()
        folders = run_folders(self.sweep_dir / "trials" / trial_id)
        run_dir = folders[-1] if folders else None
        tags = {"dpdistill.sweep": self.sweep_name, "dpdistill.sweep_role": "trial", "dpdistill.trial_id": trial_id,
                "dpdistill.run_dir": str(run_dir) if run_dir else "none (the trial failed before its run began)"}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        if len(folders) > 1:
            tags["dpdistill.earlier_attempts"] = ", ".join(str(f) for f in folders[:-1])
        if error:
            tags["dpdistill.error"] = error[:5000]
        params: dict[str, str] = {}
        metrics: dict[str, float] = {}
        status = "FAILED" if error else "FINISHED"
        if run_dir is not None:
            params = _flat("", yaml.safe_load((run_dir / "spec.yaml").read_text()), {})
            state = json.loads((run_dir / "status.json").read_text())
            status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(state.get("status"), "FAILED")
            if (run_dir / "metrics.json").is_file():
                metrics = json.loads((run_dir / "metrics.json").read_text())
            if (run_dir / "ledger.json").is_file():
                from dpdistill.privacy.ledger import PrivacyLedger

                metrics.update(PrivacyLedger.load(run_dir / "ledger.json").to_mlflow_metrics())
            if state.get("not_private"):
                tags["dpdistill.privacy"] = "NOT PRIVATE"
        params.update({f"search.{k}": str(v) for k, v in config.items()})
        run = client.create_run(self._experiment_id(client), run_name=f"{self.sweep_name}/{trial_id}", tags=tags)
        rid = run.info.run_id
        items = [mlflow_param(k, v) for k, v in params.items()]
        from mlflow.entities import Metric, Param

        now = int(__import__("time").time() * 1000)
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            client.log_batch(rid, params=[Param(k, v) for k, v in items[i:i + 100]])
        finite = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(finite), 500):
            client.log_batch(rid, metrics=finite[i:i + 500])
        if run_dir is not None:
            for name in ("spec.yaml", "ledger.json", "metrics.json", "status.json"):
                if (run_dir / name).is_file():
                    client.log_artifact(rid, str(run_dir / name))
        client.set_terminated(rid, status)

    def close_parent(self, summary: dict[str, Any], status: str) -> None:
        """The sweep's totals (ε composed over every trial, best value) on the parent run, then its status."""
        if not self.parent_run_id:
            return
        try:
            client = self._client()
            rid = self.parent_run_id
            client.set_tag(rid, "dpdistill.privacy", summary["privacy"][:5000])
            client.set_tag(rid, "dpdistill.selection", summary["selection"])
            client.set_tag(rid, "dpdistill.status", summary["status"])
            if summary.get("best_run_dir"):
                client.set_tag(rid, "dpdistill.best_run_dir", str(summary["best_run_dir"]))
            values = {"trials": summary["trials"], "completed_trials": summary["completed_trials"],
                      "failed_trials": summary["failed_trials"], f"best_{summary['metric']}": summary["best_value"]}
            for key, metric in (("sweep_epsilon", "privacy_sweep_epsilon"), ("sweep_delta", "privacy_sweep_delta"),
                                ("trial_epsilon", "privacy_trial_epsilon"), ("sweep_budget", "privacy_sweep_budget")):
                values[metric] = summary.get(key)
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    client.log_metric(rid, k, float(v))
            for f in ("summary.json", "ledger.json", STATE_FILE, "report.html"):
                if (self.sweep_dir / f).is_file():
                    client.log_artifact(rid, str(self.sweep_dir / f))
            client.set_terminated(rid, status)
        except Exception as e:  # noqa: BLE001
            log.warning("tracking: the sweep's MLflow run could not be closed: %s", e)


def mlflow_param(key: str, value: str) -> tuple[str, str]:
    """MLflow caps a param value at 6000 characters."""
    return key, value if len(value) <= 6000 else value[:5990] + "…"


def _tune_callback(tracking: SweepTracking, num_samples: int) -> Any:
    """A Ray Tune callback that logs each trial's child run and prints one line per finished trial."""
    from ray import tune

    class _TrialEnd(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            tracking.log_trial(trial.trial_id, dict(trial.config), None)
            print(f"trial {trial.trial_id} completed: "
                  f"{tracking_metric_line(trial.last_result or {})}", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            error = _trial_error_line(trial)
            tracking.log_trial(trial.trial_id, dict(trial.config), error)
            print(f"trial {trial.trial_id} failed: {error}", flush=True)

    return _TrialEnd()


def tracking_metric_line(result: dict[str, Any]) -> str:
    keys = [k for k in ("val_acc_mean", "synv_acc_mean", "privacy_epsilon") if isinstance(result.get(k), float)]
    return ", ".join(f"{k} {result[k]:.4f}" for k in keys) + (f"; {result['run_dir']}" if result.get("run_dir") else "")


def _trial_error_line(trial: Any) -> str:
    err = getattr(trial, "error_file", None) or ""
    try:
        text = Path(err).read_text() if err else ""
    except OSError:
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # A Ray task error ends with the exception's own line; prefer a dpdistill error's message.
    for ln in reversed(lines):
        if "Error:" in ln or "Exceeded" in ln:
            return ln[:500]
    return lines[-1][:500] if lines else "failed"


def _trial(config: dict[str, Any], base: dict[str, Any], runs_dir: str, extra: list[str] | None = None) -> None:
    """One Tune trial: the base job with this trial's overrides, run as an ordinary job.

    Its run folder goes under ``trials/<trial id>/`` so the driver can find it even when the trial fails.
    """
    from ray import tune

    from dpdistill.runner import run_job

    overrides = [*(extra or []), *(f"{k}={json.dumps(v)}" for k, v in config.items())]
    # The driver logs this trial to MLflow (one writer); evaluation runs in-process (the trial holds the CPUs).
    overrides += ["tracking.enabled=false", "evaluation.parallel=false"]
    spec = validate_spec(apply_overrides(base, overrides), "<trial>")
    trial_id = tune.get_context().get_trial_id() or "trial"
    result = run_job(spec, Path(runs_dir) / trial_id, progress=False)
    tune.report({**result.metrics, "run_dir": str(result.run_dir)})


def run_sweep(sweep: SweepSpec, base: dict[str, Any], runs_dir: Path, *, address: str | None = None,
              tracking_uri: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Run the sweep; returns its summary: status (completed, or interrupted with how to resume), the best
    trial's config, metric and run folder, the selection caveat and the sweep's privacy (every trial's charges
    composed). A budget the trials could exceed is refused first, before the sweep folder exists."""
    from dpdistill.runtime.runfolder import atomic_write_json, utc_stamp
    from dpdistill.runtime.tracking import resolve_tracking_uri

    plan = plan_privacy(sweep, base, Path(runs_dir))  # before any trial and before the sweep folder exists
    runs_dir = Path(runs_dir).expanduser().resolve()
    sweep_dir = runs_dir / "sweeps" / sweep.name / utc_stamp()
    sweep_dir.mkdir(parents=True)
    uri = resolve_tracking_uri(tracking_uri, runs_dir)
    tracking = SweepTracking(uri, sweep.name, sweep_dir, None)
    tracking.open_parent({"dpdistill.metric": sweep.metric})
    state = {"sweep": sweep.model_dump(mode="json"), "base": base, "runs_dir": str(runs_dir), "tracking_uri": uri,
             "parent_run_id": tracking.parent_run_id, "plan": dataclasses.asdict(plan), "resumes": 0}
    atomic_write_json(sweep_dir / STATE_FILE, state)
    return _drive(sweep, base, sweep_dir, plan, tracking, address, num_cpus, restore=False)


def resume_sweep(sweep_dir: Path, *, address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Resume an interrupted sweep from its folder: unfinished trials rerun (an interrupted attempt's charges
    still count), Optuna continues where it stopped, until the sweep has all its trials.

    Refused (one line, nothing run) when the folder is not a sweep, when the sweep already completed, or when
    the charges made so far plus the remaining trials could exceed the sweep's budget.
    """
    from dpdistill.privacy.ledger import PrivacyLedger
    from dpdistill.privacy.mechanisms import Composed
    from dpdistill.runtime.runfolder import atomic_write_json

    sweep_dir = Path(sweep_dir).expanduser().resolve()
    state_path = sweep_dir / STATE_FILE
    if not state_path.is_file():
        raise SpecError(f"{sweep_dir}: not a sweep folder ({STATE_FILE} is missing); give the folder a sweep "
                        "printed, e.g. runs/sweeps/<name>/<stamp>")
    try:
        state = json.loads(state_path.read_text())
        sweep = SweepSpec.model_validate(state["sweep"])
        base = state["base"]
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{state_path}: unreadable sweep state ({str(e).splitlines()[0]})") from None
    summary_path = sweep_dir / "summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "completed":
        raise SpecError(f"{sweep_dir}: the sweep completed already; nothing to resume")
    tune_dir = sweep_dir / "tune" / sweep.name
    if not (tune_dir / "tuner.pkl").is_file():
        raise SpecError(f"{sweep_dir}: no Tune experiment state under tune/{sweep.name}; it cannot be resumed")
    with _driver_lock(sweep_dir, wait=False):  # refused while another driver runs this sweep; held to the end
        # No other driver holds the sweep: none of its trials is running any more.
        mark_stale_trials_interrupted(sweep_dir, "sweep driver ended")
        # What Tune will not rerun is what it recorded as ended; a trial whose folder completed just before the
        # signal but that Tune still lists as running is rerun (and charges again), so count from Tune's state.
        remaining = max(0, sweep.num_samples - _ended_in_tune(tune_dir))
        charged = tuple(Composed(tuple(t.mechanisms))
                        for t in map(PrivacyLedger.load, trial_ledger_paths(sweep_dir)) if t.mechanisms)
        plan = plan_privacy(sweep, base, Path(state["runs_dir"]), charged=charged, remaining=remaining)
        state["resumes"] = int(state.get("resumes", 0)) + 1
        atomic_write_json(state_path, state)
        tracking = SweepTracking(state["tracking_uri"], sweep.name, sweep_dir, state.get("parent_run_id"))
        return _drive_locked(sweep, base, sweep_dir, plan, tracking, address, num_cpus, restore=True)


def _ended_in_tune(tune_dir: Path) -> int:
    """How many trials Tune's newest saved experiment state records as ended (TERMINATED or ERROR)."""
    states = sorted(tune_dir.glob("experiment_state*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return 0
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
        return sum(json.loads(t[0] if isinstance(t[0], str) else json.dumps(t[0])).get("status")
                   in ("TERMINATED", "ERROR") for t in trials)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise SpecError(f"{states[-1]}: unreadable Tune state ({str(e).splitlines()[0]})") from None


def _driver_lock(sweep_dir: Path, *, wait: bool) -> contextlib.AbstractContextManager[None]:
    """Hold the sweep's lock while a driver runs it, so a second --resume cannot rerun live trials."""
    from dpdistill.runtime.runfolder import exclusive_lock

    return exclusive_lock(sweep_dir / "sweep.lock", f"{sweep_dir}: another dpdistill process is running this sweep; "
                          "wait for it or stop it (Ctrl-C / SIGTERM) before --resume", wait=wait)


def _drive(sweep: SweepSpec, base: dict[str, Any], sweep_dir: Path, plan: SweepPrivacy, tracking: SweepTracking,
           address: str | None, num_cpus: int | None, *, restore: bool) -> dict[str, Any]:
    """Run (or resume) the trials, then write the sweep's ledger and summary whatever happened."""
    with _driver_lock(sweep_dir, wait=False):
        return _drive_locked(sweep, base, sweep_dir, plan, tracking, address, num_cpus, restore=restore)


def _drive_locked(sweep: SweepSpec, base: dict[str, Any], sweep_dir: Path, plan: SweepPrivacy,
                  tracking: SweepTracking, address: str | None, num_cpus: int | None, *,
                  restore: bool) -> dict[str, Any]:
    from dpdistill.runtime.cluster import ray_session

    results = None
    try:
        with ray_session(address, num_cpus), _sigterm_as_sigint():
            results = _fit(sweep, base, sweep_dir, tracking, plan.overrides, restore=restore)
    finally:
        # Tune has stopped every trial actor by now (or the driver is going down): a trial folder still
        # 'running' will never finish. Even an interrupted sweep composes what its trials charged.
        mark_stale_trials_interrupted(sweep_dir, "sweep interrupted")
        accounting = compose_trial_ledgers(sweep_dir, plan) if plan.private else None
        if results is None:  # the driver itself failed: record what is known, then let the error through
            _write_summary(sweep, sweep_dir, plan, accounting, None, tracking, crashed=True)
    return _write_summary(sweep, sweep_dir, plan, accounting, results, tracking)


def _write_summary(sweep: SweepSpec, sweep_dir: Path, plan: SweepPrivacy, accounting: dict[str, Any] | None,
                   results: Any, tracking: SweepTracking, *, crashed: bool = False) -> dict[str, Any]:
    from dpdistill.runtime.runfolder import atomic_write_json

    completed, errors = 0, []
    best_value = best_config = best_run = None
    if results is not None:
        for r in results:
            if r.error is not None:
                errors.append(str(r.error).strip().splitlines()[-1][:500] if str(r.error).strip() else "failed")
            elif sweep.metric in (r.metrics or {}):
                completed += 1
        if completed:
            best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, filter_nan_and_inf=True)
            best_value, best_config, best_run = best.metrics[sweep.metric], best.config, best.metrics.get("run_dir")
    done = completed + len(errors)
    status = "completed" if not crashed and done >= sweep.num_samples else "interrupted"
    summary = {
        "sweep": sweep.name, "status": status, "metric": sweep.metric, "mode": sweep.mode,
        "best_value": best_value, "best_config": best_config, "best_run_dir": best_run,
        "trials": done, "completed_trials": completed, "num_samples": sweep.num_samples,
        "failed_trials": len(errors), "errors": errors, "selection": _selection(sweep.metric),
        "privacy": _privacy_line(plan, accounting), **(accounting or {}),
        "sweep_dir": str(sweep_dir), "mlflow_uri": tracking.uri, "mlflow_parent_run_id": tracking.parent_run_id,
    }
    if status == "interrupted":
        summary["resume"] = (f"dpdistill sweep --resume {sweep_dir}"
                             if (sweep_dir / "tune" / sweep.name / "tuner.pkl").is_file()
                             else "not resumable (stopped before Tune saved its state): start the sweep again")
    atomic_write_json(sweep_dir / "summary.json", summary)
    try:  # the privacy-utility view of the trials; a rendering failure must not change the sweep's outcome
        from dpdistill.runtime.report_html import write_sweep_report

        write_sweep_report(sweep_dir)
    except Exception as e:  # noqa: BLE001 - summary.json and the ledger are written; the report is a view of them
        log.warning("sweep report.html: rendering failed: %s", e)
    tracking.close_parent(summary, "FINISHED" if status == "completed" else "KILLED")
    return summary


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM (ray job stop, pod eviction) stops a sweep the way Ctrl-C does: Tune's own SIGINT handling
    stops the trials and saves the experiment state, so the sweep can be resumed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fit(sweep: SweepSpec, base: dict[str, Any], sweep_dir: Path, tracking: SweepTracking, extra: list[str], *,
         restore: bool) -> Any:
    """Run the trials under Tune + Optuna (each an ordinary job), or resume them, and return Tune's results."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, runs_dir=str(sweep_dir / "trials"), extra=extra),
        {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial},
    )
    if restore:
        # Unfinished trials restart from scratch (a trial is one job; its interrupted attempt keeps its folder
        # and its charges); failed trials stay failed. The callbacks come back from Tune's saved state.
        tuner = tune.Tuner.restore(str(sweep_dir / "tune" / sweep.name), trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space={k: d.to_tune() for k, d in sweep.search.items()},
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent,
            search_alg=OptunaSearch(seed=sweep.seed),
        ),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=str(sweep_dir / "tune"), verbose=0,
            callbacks=[_tune_callback(tracking, sweep.num_samples)],
        ),
    )
    return tuner.fit()
