"""What a distill job logs: every key of a private run is declared, RELEASED keys are recomputed from the release,
no per-step loss reaches log.txt, a private method's undeclared loss is not logged, and a non-private (DM / DC)
run is marked NOT PRIVATE everywhere and keeps its images out of MLflow unless the spec opts in.

Each run is the real job through ``dpdistill.runner.run_job`` on ``digits``, tracked in a temporary sqlite store.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dpdistill import data, distill
from dpdistill.pipelines.distill_job import DISCLOSURE
from dpdistill.pipelines.not_private import RELEASE_NOT_PRIVATE
from dpdistill.privacy.disclosure import COMMON, RELEASED, kind_of, undeclared
from dpdistill.runner import run_job
from dpdistill.spec import validate_spec
from tiny_jobs import tiny_dpgeng

EVAL = {"seeds": 1, "epochs": 2, "parallel": False, "model_options": {"width": 8}}
TINY: dict[str, dict[str, Any]] = {
    "ndpdc": {"ipc": 1, "iterations": 12, "batch_real": 16, "net_width": 8, "net_depth": 2},
    "psg": {"ipc": 1, "iterations": 12, "batch_real": 8, "net_width": 8, "net_depth": 2, "outer_loop": 1,
            "inner_loop": 1},
    "dpgeng": tiny_dpgeng(extractors=2, iterations=12,
                          generator_options={"iterations": 20, "num_features": 400, "batch_size": 100}),
}


def _spec(method: str, options: dict[str, Any], **extra: Any) -> Any:
    doc: dict[str, Any] = {"name": f"disclosure-{method}", "kind": "distill", "data": {"name": "digits"},
                           "method": {"name": method, **options}, "evaluation": EVAL, **extra}
    return validate_spec(doc, "<test>")


def _run(spec: Any, runs: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the temporary sqlite store under runs/
    result = run_job(spec, runs, progress=False)
    assert result.status == "completed"
    return result


def _flatten(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        keys = []
        for k, v in obj.items():
            keys += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return keys
    return [prefix] if prefix else []


def _logged(result: Any) -> dict[str, Any]:
    """Every key the run wrote (by place), and the MLflow run's data."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=result.mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    # Every metric key with its whole history (stepped metrics included).
    history = {k: client.get_metric_history(run.info.run_id, k) for k in run.data.metrics}
    json_keys = []
    for path in sorted((result.run_dir / "artifacts").rglob("*.json")):
        json_keys += _flatten(json.loads(path.read_text()))
    return {
        "metrics.json": sorted(json.loads((result.run_dir / "metrics.json").read_text())),
        "mlflow metrics": sorted(history),
        "mlflow params": sorted(run.data.params),
        "artifact json": sorted(json_keys),
        "history": history,
        "run": run,
        "client": client,
    }


# Recomputations of every key a distill job may declare RELEASED, from the released artifact alone.
RECOMPUTE: dict[str, Callable[[dict[str, Any]], float]] = {
    "n_released": lambda art: float(len(art["labels"])),
    "ipc": lambda art: float(len(art["labels"]) // art["num_classes"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runs folder (and so one sqlite MLflow store) for the module: the store is set up once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def private_runs(runs: Path) -> dict[str, Any]:
    mp = pytest.MonkeyPatch()
    try:
        return {m: _run(_spec(m, TINY[m], privacy={"epsilon": 1.0}), runs, mp) for m in TINY}
    finally:
        mp.undo()


@pytest.mark.parametrize("method", sorted(TINY))
def test_every_logged_key_is_declared(private_runs: dict[str, Any], method: str) -> None:
    result = private_runs[method]
    logged = _logged(result)
    declared = (DISCLOSURE, distill.get(method).disclosure)
    for place in ("metrics.json", "mlflow metrics", "mlflow params", "artifact json"):
        assert logged[place] or place == "artifact json", f"{place}: nothing collected"
        assert undeclared(logged[place], *declared) == [], f"{method}: undeclared keys in {place}"
    # The stepped metric is the method's charged loss, and it really is stepped (the test saw its history).
    stepped = {k for k, h in logged["history"].items() if any(m.step for m in h)}
    assert stepped == {"distill_loss"}
    assert len(logged["history"]["distill_loss"]) == 2  # iterations 0 and 10
    assert kind_of("distill_loss", distill.get(method).disclosure) == "charged"


@pytest.mark.parametrize("method", sorted(TINY))
def test_released_keys_are_recomputed_from_the_release_alone(private_runs: dict[str, Any], method: str) -> None:
    result = private_runs[method]
    logged = _logged(result)
    merged = {**COMMON, **DISCLOSURE, **distill.get(method).disclosure}
    released = {k for k in set(logged["metrics.json"]) | set(logged["mlflow metrics"])
                if kind_of(k, merged) == RELEASED}
    assert released == {"ipc", "n_released"}
    art = torch.load(result.run_dir / "artifacts" / "distilled.pt", weights_only=True)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    for key in sorted(released):
        assert key in RECOMPUTE, f"{key} is declared RELEASED but nothing recomputes it"
        value = RECOMPUTE[key](art)
        assert metrics[key] == pytest.approx(value) and logged["run"].data.metrics[key] == pytest.approx(value)


@pytest.mark.parametrize("method", sorted(TINY))
def test_log_txt_holds_no_per_step_loss(private_runs: dict[str, Any], method: str) -> None:
    text = (private_runs[method].run_dir / "log.txt").read_text()
    assert "started" in text  # the log is there and written to
    assert "distill_loss" not in text
    assert not re.search(r"loss\W{0,3}[-+]?\d", text, flags=re.IGNORECASE), text


def test_a_private_method_that_does_not_declare_its_loss_charged_logs_none(
    runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job asks the method: an undeclared step loss (e.g. one on a real batch) is never logged."""
    record = distill.get("ndpdc")
    monkeypatch.setitem(distill.registry._REGISTRY, "ndpdc", dataclasses.replace(record, disclosure={}))
    spec = _spec("ndpdc", {**TINY["ndpdc"], "iterations": 11}, privacy={"epsilon": 1.0},
                 evaluation={**EVAL, "enabled": False})
    result = _run(spec, runs, monkeypatch)
    logged = _logged(result)
    assert "distill_loss" not in logged["mlflow metrics"] and "ipc" in logged["mlflow metrics"]


# ------------------------------------------------------------------------------ non-private DM / DC


def _byte_rows(images: torch.Tensor) -> set[bytes]:
    return {x.contiguous().numpy().tobytes() for x in images.float()}


@pytest.mark.parametrize("method", ["dm", "dc"])
def test_a_non_private_release_is_marked_and_its_images_stay_out_of_mlflow(
    runs: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    spec = _spec(method, {"ipc": 1, "iterations": 0, "init": "real"}, evaluation={**EVAL, "enabled": False})
    result = _run(spec, runs, monkeypatch)
    run_dir = result.run_dir
    # Why the marking matters: with iterations 0 the release IS training records, byte for byte.
    released = torch.load(run_dir / "artifacts" / "distilled.pt", weights_only=True)["images"]
    assert _byte_rows(released) <= _byte_rows(data.load("digits", "train").images)
    # Run folder: a marker file, the status and the metrics.
    marker = (run_dir / "artifacts" / RELEASE_NOT_PRIVATE).read_text()
    assert marker.startswith("NOT PRIVATE") and "real training" in marker
    assert json.loads((run_dir / "status.json").read_text())["not_private"].startswith("NOT PRIVATE")
    assert json.loads((run_dir / "metrics.json").read_text())["not_private"] == 1.0
    assert dict(result.summary)["NOT PRIVATE"].startswith("NOT PRIVATE")
    # MLflow: tagged, and no image of the release (the grid stays in the run folder only).
    logged = _logged(result)
    run, client = logged["run"], logged["client"]
    assert run.data.tags["dpdistill.release"] == "NOT PRIVATE" and run.data.metrics["not_private"] == 1.0
    assert (run_dir / "artifacts" / "distilled_grid.png").is_file()
    paths = [a.path for a in client.list_artifacts(run.info.run_id)]
    paths += [a.path for a in client.list_artifacts(run.info.run_id, "artifacts")]
    assert {"spec.yaml", "metrics.json"} <= set(paths)
    assert not [p for p in paths if p.endswith((".png", ".pt", ".npz"))], paths


def test_a_spec_may_opt_in_to_log_non_private_images(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec("dm", {"ipc": 1, "iterations": 0}, evaluation={**EVAL, "enabled": False},
                 tracking={"log_nonprivate_images": True})
    result = _run(spec, runs, monkeypatch)
    logged = _logged(result)
    paths = [a.path for a in logged["client"].list_artifacts(logged["run"].info.run_id, "artifacts")]
    assert "artifacts/distilled_grid.png" in paths
    assert logged["run"].data.tags["dpdistill.release"] == "NOT PRIVATE"  # still marked


def test_a_private_run_is_not_marked_non_private(private_runs: dict[str, Any]) -> None:
    for result in private_runs.values():
        assert not (result.run_dir / "artifacts" / RELEASE_NOT_PRIVATE).exists()
        assert "not_private" not in json.loads((result.run_dir / "metrics.json").read_text())
        assert "dpdistill.release" not in _logged(result)["run"].data.tags
        assert (result.run_dir / "artifacts" / "distilled_grid.png").is_file()
