"""`dpdistill evaluate RUN_DIR`: re-scoring a finished run's release charges nothing, reproduces the source's
figures under the source's protocol, scores other models on request, and refuses (exit 2, one line, no run
folder) anything that is not a finished image release or that would change what was released or charge it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from dpdistill.cli import main
from dpdistill.pipelines.evaluate_job import evaluate_spec
from dpdistill.runner import run_job
from dpdistill.spec import validate_spec
from tiny_jobs import tiny_dpgeng

SOURCE = {
    "name": "src",
    "kind": "distill",
    "seed": 3,
    "threads": 1,
    "data": {"name": "digits"},
    "method": {"name": "dm", "ipc": 2, "iterations": 5},
    "evaluation": {"seeds": 2, "epochs": 5, "parallel": False, "model_options": {"width": 16}},
    "tracking": {"enabled": False},
}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("source")
    result = run_job(validate_spec(SOURCE), runs, progress=False)
    assert result.status == "completed"
    return result.run_dir


def _run_cli(capsys, args: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def _folders(runs: Path) -> list[Path]:
    return [p for p in runs.rglob("status.json")] if runs.exists() else []


def test_same_protocol_reproduces_the_source_figures_and_charges_nothing(source_run: Path, tmp_path: Path) -> None:
    result = run_job(evaluate_spec(source_run), tmp_path, progress=False)
    assert result.status == "completed"
    source = json.loads((source_run / "metrics.json").read_text())
    # Same release, seeds, epochs and model: the same models, so the same accuracies (one thread both times).
    assert result.metrics["acc_mean"] == pytest.approx(source["acc_mean"], abs=1e-9)
    assert result.metrics["n_released"] == source["n_released"]
    assert not (result.run_dir / "ledger.json").exists()
    assert not any(k.startswith("privacy_epsilon") for k in result.metrics)
    recorded = json.loads((result.run_dir / "artifacts" / "source.json").read_text())
    release = source_run / "artifacts" / "distilled.pt"
    assert recorded["sha256"] == hashlib.sha256(release.read_bytes()).hexdigest()
    assert recorded["run"] == str(source_run.resolve())
    # DM is not private: the re-score says so (its figures describe a release without a guarantee).
    assert "NOT PRIVATE" in recorded["not_private"] and recorded["epsilon"] is None
    assert any(k == "NOT PRIVATE" and "re-score of a release that is NOT PRIVATE" in v for k, v in result.summary)
    assert (result.run_dir / "artifacts" / "RELEASE_NOT_PRIVATE.txt").is_file()
    assert result.metrics["not_private"] == 1.0
    # The release is referenced, not copied: no image leaves the source folder.
    assert not list((result.run_dir / "artifacts").glob("*.pt"))
    spec = yaml.safe_load((result.run_dir / "spec.yaml").read_text())
    # The resolved method block: the source and (unset: no fresh draw) the sampling options of a synthesize source.
    assert spec["kind"] == "evaluate" and spec["method"] == {"name": "release", "run": str(source_run.resolve()),
                                                             "n_per_class": None, "guidance_scale": None,
                                                             "sample_steps": None, "sample_eta": None,
                                                             "generate_chunks": None}
    assert spec["data"]["name"] == "digits" and (spec.get("privacy") or {}).get("epsilon") is None


def test_another_protocol_scores_each_model_on_the_same_release(source_run: Path, tmp_path: Path, capsys) -> None:
    code = None
    try:
        main(["evaluate", str(source_run), "--runs-dir", str(tmp_path), "--no-progress",
              "--set", "evaluation.models=[convnet, mlp]", "--set", "evaluation.epochs=3"])
    except SystemExit as e:
        code = e.code
    assert code in (None, 0)
    out = capsys.readouterr().out
    assert "nothing charged" in out and "nothing released or charged here" in out
    (folder,) = [p.parent for p in tmp_path.rglob("status.json")]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"acc_mean", "acc_mean_mlp", "acc_mean_convnet"} <= set(metrics), sorted(metrics)
    source = json.loads((source_run / "metrics.json").read_text())
    assert metrics["acc_mean"] != source["acc_mean"]  # 3 epochs, not the source's 5: another protocol


@pytest.mark.parametrize("args, needle", [
    (["--set", "data.name=mnist"], "field 'data.name' comes from the source run"),
    (["--set", "data.val_seed=7"], "field 'data.val_seed' comes from the source run"),
    (["--set", "method.ipc=10"], "field 'method.ipc' comes from the source run"),
    (["--set", "privacy.epsilon=1"], "field 'privacy.epsilon' comes from the source run"),
    (["--set", "evaluation.selection=noisy-senv", "--set", "evaluation.selection_epsilon=0.1"], "noisy-senv"),
    (["--set", "evaluation.model=nosuchnet"], "evaluation.model"),
    (["--set", "method.n_per_class=5"], "released an image set, not a generator"),
])
def test_overrides_that_change_the_release_or_charge_it_are_refused(source_run, tmp_path, capsys, args, needle):
    code, err = _run_cli(capsys, ["evaluate", str(source_run), "--runs-dir", str(tmp_path), *args])
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert _folders(tmp_path) == []


def _copy_run(source_run: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source_run, dest / "copy"))


@pytest.mark.parametrize("damage, needle", [
    ("unfinished", "not completed"),
    ("no-release", "distilled.pt: missing"),
    ("bad-release", "not a readable release"),
    ("wrong-labels", "labels outside"),
    ("no-spec", "spec.yaml: missing"),
])
def test_a_source_that_is_not_a_finished_image_release_is_refused(source_run, tmp_path, capsys, damage, needle):
    run = _copy_run(source_run, tmp_path)
    release = run / "artifacts" / "distilled.pt"
    if damage == "unfinished":
        status = json.loads((run / "status.json").read_text())
        (run / "status.json").write_text(json.dumps({**status, "status": "interrupted"}))
    elif damage == "no-release":
        release.unlink()
    elif damage == "bad-release":
        release.write_bytes(b"not a torch file")
    elif damage == "wrong-labels":
        saved = torch.load(release, weights_only=True)
        torch.save({**saved, "labels": saved["labels"] + 100}, release)
    elif damage == "no-spec":
        (run / "spec.yaml").unlink()
    runs = tmp_path / "runs"
    code, err = _run_cli(capsys, ["evaluate", str(run), "--runs-dir", str(runs)])
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert _folders(runs) == []


PRIVATE_SOURCE = {
    "name": "private-src",
    "kind": "distill",
    "seed": 1,
    "threads": 1,
    "data": {"name": "digits"},
    "privacy": {"epsilon": 5.0},
    "method": {"name": "ndpdc", "ipc": 1, "iterations": 2},
    "evaluation": {"seeds": 1, "epochs": 2, "parallel": False, "model_options": {"width": 16}},
    "tracking": {"enabled": False},
}


def test_compare_and_the_report_read_a_rescore_as_its_release(source_run: Path, tmp_path: Path) -> None:
    """`compare` and report.html show a re-score with its release's method, ε and δ (the source ledger's) and
    NOT PRIVATE when the release is not private; the re-score itself charged nothing."""
    from dpdistill.runtime.compare import load_row
    from dpdistill.runtime.report_html import read_run

    private = run_job(validate_spec(PRIVATE_SOURCE), tmp_path / "src", progress=False)
    assert private.status == "completed"
    ledger = json.loads((private.run_dir / "ledger.json").read_text())["composed"]
    rescored = run_job(evaluate_spec(private.run_dir), tmp_path / "eval", progress=False).run_dir
    row = load_row(rescored)
    assert row.method == "ndpdc (re-scored)" and row.not_private is None
    assert row.epsilon == pytest.approx(ledger["epsilon"]) and row.delta == pytest.approx(ledger["delta"])
    html = (rescored / "report.html").read_text()
    assert "re-score of the release of" in html and "this run charged nothing" in html
    assert read_run(rescored).ledger == {}

    dm = load_row(run_job(evaluate_spec(source_run), tmp_path / "eval-dm", progress=False).run_dir)
    assert dm.method == "dm (re-scored)" and dm.epsilon is None and "NOT PRIVATE" in dm.not_private


def test_an_evaluate_spec_must_score_on_the_source_runs_splits(source_run: Path, tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    """An evaluate spec run directly (`dpdistill run`) with another data.val_seed would carve the validation
    (and, for digits, test) split out of records the release was made from: refused before any split is read.
    Where the files are (data.root) may differ."""
    from dpdistill.pipelines import distill_job

    spec = yaml.safe_load(evaluate_spec(source_run).to_yaml())
    spec["data"]["val_seed"] = 7
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    reads: list[str] = []
    real = distill_job.load_splits
    monkeypatch.setattr("dpdistill.pipelines.evaluate_job.load_splits",
                        lambda s: (reads.append(s.data.name), real(s))[1])  # a spy: counts the reads
    code, err = _run_cli(capsys, ["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert code == 2 and "field 'data.val_seed': 7, but the release of" in err, err
    assert reads == [] and _folders(tmp_path / "runs") == []
    # data.root names where the files are: allowed, and the job then reads its splits once.
    result = run_job(evaluate_spec(source_run, ["data.root=" + str(tmp_path / "elsewhere")]), tmp_path / "ok",
                     progress=False)
    assert result.status == "completed" and reads == ["digits"]


def test_refusals_come_before_any_split_is_read(source_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A release that does not fit the spec's data is refused from the release file and the dataset's
    published shape alone: the spy on the split loader sees no read."""
    reads: list[str] = []
    monkeypatch.setattr("dpdistill.pipelines.evaluate_job.load_splits", lambda s: reads.append("read"))
    run = _copy_run(source_run, tmp_path)
    release = run / "artifacts" / "distilled.pt"
    saved = torch.load(release, weights_only=True)
    torch.save({**saved, "images": saved["images"][:, :, :, :4]}, release)  # not square: not the data's shape
    code, err = _run_cli(capsys, ["evaluate", str(run), "--runs-dir", str(tmp_path / "runs")])
    assert code == 2 and "images are 1x8x4, the spec's data 1x8x8" in err, err
    assert reads == [] and _folders(tmp_path / "runs") == []


def test_every_key_an_evaluate_run_logs_is_declared(source_run: Path, tmp_path: Path, monkeypatch) -> None:
    """metrics.json, MLflow metrics and params and artifacts/source.json: each key is declared in the evaluate
    kind's DISCLOSURE (or the runner's COMMON), so nothing computed from sensitive data slips out unnamed."""
    import mlflow

    from dpdistill.pipelines.evaluate_job import DISCLOSURE
    from dpdistill.privacy.disclosure import undeclared

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_job(evaluate_spec(source_run, ["tracking.enabled=true"]), tmp_path, progress=False)
    client = mlflow.MlflowClient(tracking_uri=result.mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    places = {
        "metrics.json": list(json.loads((result.run_dir / "metrics.json").read_text())),
        "mlflow metrics": list(run.data.metrics),
        "mlflow params": list(run.data.params),
        "source.json": list(json.loads((result.run_dir / "artifacts" / "source.json").read_text())),
    }
    assert places["mlflow metrics"] and places["mlflow params"]
    for place, keys in places.items():
        assert undeclared(keys, DISCLOSURE) == [], place


DPGENG_SOURCE = {
    "name": "src-dpgeng",
    "kind": "distill",
    "seed": 4,
    "threads": 1,
    "data": {"name": "digits"},
    "privacy": {"epsilon": 5.0, "delta": 1e-5},
    "method": tiny_dpgeng(extractors=2, iterations=4,
                          generator_options={"iterations": 20, "num_features": 400, "batch_size": 100}),
    "evaluation": {"seeds": 2, "epochs": 5, "parallel": False, "model_options": {"width": 16}},
    "tracking": {"enabled": False},
}


def test_dpgeng_keeps_its_dp_generated_baseline_and_evaluate_rescores_it(tmp_path: Path) -> None:
    source = run_job(validate_spec(DPGENG_SOURCE), tmp_path / "src", progress=False)
    assert source.status == "completed"
    kept = source.run_dir / "artifacts" / "baseline_generated.pt"
    saved = torch.load(kept, weights_only=True)
    assert saved["images"].shape == (10, 1, 8, 8) and saved["labels"].tolist() == list(range(10))
    want = json.loads((source.run_dir / "metrics.json").read_text())
    result = run_job(evaluate_spec(source.run_dir), tmp_path / "eval", progress=False)
    assert result.status == "completed"
    got = json.loads((result.run_dir / "metrics.json").read_text())
    # The same protocol re-scores the release AND its baseline to the same figures the source reported.
    for key in ("acc_mean", "baseline_generated_acc_mean", "baseline_generated_val_acc_mean"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    src = json.loads((result.run_dir / "artifacts" / "source.json").read_text())
    assert src["baseline_sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()
    assert not (result.run_dir / "ledger.json").exists()
    # A baseline that does not fit the data is refused like a bad release, before any split is read.
    torch.save({**saved, "labels": saved["labels"] + 10}, kept)
    with pytest.raises(Exception, match="baseline_generated.pt: labels outside"):
        run_job(evaluate_spec(source.run_dir), tmp_path / "eval2", progress=False)
