"""report.html of a run and of a sweep, and `dpdistill compare`: tiny real runs on `digits`.

One run per kind, shared by the module: DM (not private; its spec's description carries HTML),
NDPDC with secret noise (private), and NDPDC with reproducible noise (NOT PRIVATE per its ledger); plus one
two-trial private sweep whose trials' ε differ (the privacy–utility curve).
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from dpdistill.runner import run_job
from dpdistill.spec import load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[1]
EVAL = ["evaluation.seeds=2", "evaluation.epochs=2", "evaluation.parallel=false"]
HOSTILE_NAME = "dm-tiny"  # names are restricted to [A-Za-z0-9_.-] (they name the run folder)
HOSTILE_DESCRIPTION = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
NDPDC = {  # as tests/test_sweeps.py PRIVATE_JOB: NDPDC small enough for a test
    "name": "ndpdc-tiny", "kind": "distill", "data": {"name": "digits"}, "privacy": {"epsilon": 1.0},
    "method": {"name": "ndpdc", "ipc": 1, "iterations": 2, "net_width": 8, "batch_real": 16},
    "evaluation": {"seeds": 2, "epochs": 2, "model_options": {"width": 8}, "parallel": False},
}


class Page(HTMLParser):
    """The report's elements of interest: metric cells (with their table), ledger rows, images, ids."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.metrics: dict[str, tuple[float, str | None]] = {}
        self.by_id: dict[str, dict[str, str]] = {}
        self.text_by_id: dict[str, str] = {}
        self.ledger_rows: list[dict[str, str]] = []
        self.ledger_cells: list[list[dict[str, str]]] = []
        self.images: list[dict[str, str]] = []
        self.points: list[dict[str, str]] = []
        self.trials: list[dict[str, str]] = []
        self._tables: list[str | None] = []
        self._open: list[tuple[str, str]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._tables.append(a.get("id"))
        if "id" in a:
            self.by_id[a["id"]] = a
            self._open.append((tag, a["id"]))
            self.text_by_id[a["id"]] = ""
        if "data-metric" in a:
            assert a["data-metric"] not in self.metrics or self._tables[-1:] == ["trials"], a
            table = self._tables[-1] if self._tables else None
            self.metrics.setdefault(a["data-metric"], (float(a["data-value"]), table))
        if tag == "tr" and "ledger-entry" in a.get("class", ""):
            self.ledger_rows.append(a)
            self.ledger_cells.append([])
        if tag == "td" and self._tables[-1:] == ["ledger"] and self.ledger_cells:
            self.ledger_cells[-1].append(a)
        if tag == "tr" and "trial" in a.get("class", "").split():
            self.trials.append(a)
        if tag == "img":
            self.images.append(a)
        if tag == "circle":
            self.points.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._tables:
            self._tables.pop()
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for _, elem_id in self._open:
            self.text_by_id[elem_id] += data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished runs (tracking on, to a fresh MLflow store): dm (hostile description), private, not private."""
    root = tmp_path_factory.mktemp("runs")
    dm = load_spec(ROOT / "jobs" / "dm-digits.yaml", ["method.ipc=2", "method.iterations=3", *EVAL,
                                                      f"name={json.dumps(HOSTILE_NAME)}",
                                                      f"description={json.dumps(HOSTILE_DESCRIPTION)}"])
    private = validate_spec(NDPDC, "<test>")
    reproducible = validate_spec({**NDPDC, "name": "ndpdc-repro",
                                  "privacy": {"epsilon": 1.0, "reproducible_noise": True}}, "<test>")
    out = {}
    for key, spec in (("dm", dm), ("private", private), ("repro", reproducible)):
        result = run_job(spec, root, progress=False)
        assert result.status == "completed"
        out[key] = result
    out["root"] = root
    return out


def _files(run_dir: Path) -> tuple[str, Page, dict, dict, dict]:
    text = (run_dir / "report.html").read_text(encoding="utf-8")

    def read(name: str) -> dict:
        return json.loads((run_dir / name).read_text()) if (run_dir / name).is_file() else {}

    return text, Page(text), read("metrics.json"), read("ledger.json"), read("status.json")


@pytest.mark.parametrize("which", ["dm", "private", "repro"])
def test_the_reports_numbers_equal_metrics_json(runs, which):
    run_dir = runs[which].run_dir
    _, page, metrics, ledger, status = _files(run_dir)
    # Every metrics.json key is shown once, with its exact value.
    assert set(page.metrics) == set(metrics)
    for key, value in metrics.items():
        assert page.metrics[key][0] == value, key
    # Accuracy sits in the accuracy table, ε by stage in its own, the totals in the accounting table.
    for key in ("acc_mean", "acc_std", "val_acc_mean", "val_acc_std"):
        assert page.metrics[key][1] == "accuracy", key
    if which != "dm":
        assert page.metrics["privacy_epsilon_ndpdc_feature_matching"][1] == "epsilon-by-stage"
        assert page.metrics["privacy_epsilon"][1] == "accounting"
        line = page.by_id["privacy-line"]
        assert float(line["data-epsilon"]) == ledger["composed"]["epsilon"]
        assert float(line["data-delta"]) == ledger["delta"]
    # Rendered before status.json held the outcome: the runner passed it in.
    assert status["status"] == "completed"
    assert page.text_by_id["job-status"] == "completed"
    assert page.text_by_id["job-wall-time"] == f"{status['seconds']:.1f} s"


def test_the_ledger_table_has_one_row_per_charge(runs):
    _, page, _, ledger, _ = _files(runs["private"].run_dir)
    entries = ledger["entries"]
    assert len(entries) >= 1
    assert [int(r["data-index"]) for r in page.ledger_rows] == [e["index"] for e in entries]
    for cells, entry in zip(page.ledger_cells, entries, strict=True):
        values = [float(c["data-value"]) for c in cells if "data-value" in c]
        assert values == [entry["epsilon_alone"], entry["epsilon_total_after"]]
    assert "Parallel×10[PoissonGaussian(" in page.text_by_id["ledger"]
    # A non-private method has no ledger, and no ledger table.
    assert "ledger" not in _files(runs["dm"].run_dir)[1].by_id


def test_images_are_embedded_and_nothing_is_fetched(runs):
    text, page, _, _, _ = _files(runs["private"].run_dir)
    (img,) = page.images
    assert img["src"].startswith("data:image/png;base64,")
    grid = runs["private"].run_dir / "artifacts" / "distilled_grid.png"
    assert base64.b64decode(img["src"].removeprefix("data:image/png;base64,")) == grid.read_bytes()
    for which in ("dm", "private", "repro"):
        text = (runs[which].run_dir / "report.html").read_text()
        lowered = text.lower()
        for marker in ("http:", "https:", "<script", "<link", "url(", "href=", "<iframe"):
            assert marker not in lowered, (which, marker)


def test_a_non_private_methods_images_stay_out_of_the_report(runs):
    """DM's images are real training images without noise: MLflow never gets them, so neither does the report."""
    text, page, _, _, _ = _files(runs["dm"].run_dir)
    assert (runs["dm"].run_dir / "artifacts" / "distilled_grid.png").is_file()
    assert page.images == [] and "data:image" not in text
    assert 'class="muted withheld" data-image="distilled_grid.png"' in text
    # Rendered again from the folder alone (no runner to say what it kept out of MLflow): still withheld.
    from dpdistill.pipelines.not_private import RELEASE_NOT_PRIVATE
    from dpdistill.runtime import report_html

    assert report_html.RELEASE_NOT_PRIVATE == RELEASE_NOT_PRIVATE  # the marker the renderer looks for
    assert "data:image" not in report_html.render_run_report(runs["dm"].run_dir)


def test_a_not_private_run_shows_the_caveat(runs):
    _, dm, _, _, dm_status = _files(runs["dm"].run_dir)
    assert dm_status["not_private"].startswith("NOT PRIVATE")
    assert dm.text_by_id["not-private"] == dm_status["not_private"]
    assert dm.text_by_id["privacy-line"].startswith("none: not a private release")
    _, repro, _, ledger, _ = _files(runs["repro"].run_dir)
    assert ledger["guarantee"].startswith("NOT PRIVATE")
    assert ledger["guarantee"] in repro.text_by_id["not-private"]
    assert repro.text_by_id["privacy-line"].startswith("NOT PRIVATE: the ledger's figure does not describe")
    _, private, _, _, _ = _files(runs["private"].run_dir)
    assert "not-private" not in private.by_id
    assert private.text_by_id["privacy-line"].startswith("ε = ")


def test_html_in_the_spec_is_escaped(runs):
    text, page, _, _, _ = _files(runs["dm"].run_dir)
    assert "<script" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert page.text_by_id["job-description"] == HOSTILE_DESCRIPTION
    assert page.text_by_id["job-name"] == HOSTILE_NAME


def test_the_report_is_logged_to_mlflow(runs):
    import mlflow

    result = runs["private"]
    client = mlflow.MlflowClient(tracking_uri=result.mlflow_uri)
    assert "report.html" in {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    local = client.download_artifacts(result.mlflow_run_id, "report.html", str(runs["root"] / "dl"))
    assert Path(local).read_bytes() == (result.run_dir / "report.html").read_bytes()


def test_a_rendering_failure_never_fails_the_run(tmp_path, monkeypatch):
    from dpdistill.runtime import report_html

    def broken(*args, **kwargs):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(report_html, "write_run_report", broken)
    result = run_job(validate_spec({**NDPDC, "tracking": {"enabled": False}}, "<test>"), tmp_path, progress=False)
    assert result.status == "completed"
    assert json.loads((result.run_dir / "status.json").read_text())["status"] == "completed"
    assert not (result.run_dir / "report.html").exists()
    log = (result.run_dir / "log.txt").read_text()
    assert "WARNING dpdistill.runner: report.html: rendering failed: RuntimeError: renderer broke" in log
    assert log.rstrip().splitlines()[-1].endswith(f"completed after {result.seconds:.1f} s")


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    from dpdistill.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_prints_both_runs_and_plots_them(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")
    dm_job_folder = runs["dm"].run_dir.parent  # a job folder: its latest run, as `dpdistill report` takes
    private = runs["private"].run_dir
    for plot in (tmp_path / "cmp.png", tmp_path / "sub" / "cmp.svg"):
        code, out, err = _main(["compare", str(dm_job_folder), str(private), "--plot", str(plot)], capsys)
        assert code == 0, err
        rows = [ln for ln in out.splitlines() if "completed" in ln]
        assert len(rows) == 2
        dm_row = next(r for r in rows if runs["dm"].run_dir.name in r)
        private_row = next(r for r in rows if private.name in r)
        ledger = json.loads((private / "ledger.json").read_text())
        metrics = json.loads((private / "metrics.json").read_text())
        assert f"{ledger['composed']['epsilon']:.4g}" in private_row and "NOT PRIVATE" not in private_row
        assert f"{100 * metrics['acc_mean']:.2f} ± {100 * metrics['acc_std']:.2f}" in private_row
        assert "none NOT PRIVATE" in dm_row and " dm " in dm_row
        assert f"{HOSTILE_NAME}/{runs['dm'].run_dir.name}: NOT PRIVATE: method 'dm'" in out
        head = plot.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if plot.suffix == ".png" else b"<svg" in head


def test_compare_refuses_a_folder_that_is_not_a_run_in_one_line(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv in (["compare", str(tmp_path / "empty")],
                 ["compare", str(runs["private"].run_dir), "--plot", str(tmp_path / "cmp.pdf")]):
        code, out, err = _main(argv, capsys)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("dpdistill: error: "), err
    assert not (tmp_path / "cmp.pdf").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_sweep_report_shows_each_trial_its_epsilon_and_the_curve(tmp_path, ray_cluster):
    from dpdistill.runtime.sweeps import load_sweep, run_sweep

    job = tmp_path / "ndpdc-tiny.yaml"
    job.write_text(yaml.safe_dump(NDPDC))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "rep", "job": str(job), "metric": "val_acc_mean", "num_samples": 2, "max_concurrent": 2,
        "search": {"privacy.epsilon": {"uniform": [0.5, 2.0]}}}))
    sweep, base, _ = load_sweep(tmp_path / "sweep.yaml")
    summary = run_sweep(sweep, base, tmp_path / "runs")
    assert summary["trials"] == 2 and summary["failed_trials"] == 0, summary["errors"]
    sweep_dir = Path(summary["sweep_dir"])
    page = Page((sweep_dir / "report.html").read_text(encoding="utf-8"))
    assert float(page.by_id["privacy-line"]["data-epsilon"]) == summary["sweep_epsilon"]
    assert page.text_by_id["privacy-line"] == summary["privacy"]
    trial_dirs = sorted(p.parent for p in (sweep_dir / "trials").glob("*/*/*/status.json"))
    assert sorted(t["data-trial"] for t in page.trials) == sorted(p.parents[1].name for p in trial_dirs)
    points = {p["data-trial"]: p for p in page.points}
    assert len(points) == 2  # ε differs between the trials: the scatter is drawn
    for run_dir in trial_dirs:
        point = points[run_dir.parents[1].name]
        assert float(point["data-epsilon"]) == json.loads((run_dir / "ledger.json").read_text())["composed"]["epsilon"]
        assert float(point["data-value"]) == json.loads((run_dir / "metrics.json").read_text())["val_acc_mean"]
        assert (run_dir / "report.html").is_file()  # each trial is an ordinary run, with its own report
    assert sum("best" in t.get("class", "").split() for t in page.trials) == 1
