"""The ``sfdd`` job kind end to end through the CLI on `digits` (subprocess), and its input checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpdistill import pipelines
from dpdistill.errors import PrivacyError, SpecError
from dpdistill.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2
TINY = [f"method.rounds={ROUNDS}", "data.name=digits", "method.ipc=1", "method.outer_loop=2", "method.inner_loop=1",
        "method.net_width=8", "method.net_depth=2", "method.batch_real=16", "method.batch_train=16",
        "method.eval_every=1", "method.eval_epochs=5", "method.pool_size=2", "evaluation.seeds=1",
        "evaluation.epochs=3", "evaluation.parallel=false", "ray.num_cpus=2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = [sys.executable, "-m", "dpdistill.cli", "run", "jobs/sfdd-mnist.yaml", "--runs-dir", str(runs), "--no-progress"]
    for override in TINY:
        args += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((runs / "sfdd-mnist").iterdir())
    return runs, run_dir


def test_run_folder_holds_the_set_the_rounds_and_the_accuracy_plot(finished_run):
    _, run_dir = finished_run
    art = run_dir / "artifacts"
    for name in ("distilled.pt", "distilled_grid.png", "rounds.json", "accuracy_by_round.png",
                 "accuracy_by_round.json"):
        assert (art / name).is_file(), name
    assert (art / "accuracy_by_round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rounds = json.loads((art / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert all(r["answered"] == [0, 1, 2, 3, 4] and not r["dropped"] for r in rounds)
    curve = json.loads((art / "accuracy_by_round.json").read_text())
    assert [c["round"] for c in curve] == [1, 2] and all(0 <= c["acc"] <= 1 for c in curve)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_released"] == 10 and 0 <= metrics["acc_mean"] <= 1
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert not (run_dir / "ledger.json").exists() or json.loads((run_dir / "ledger.json").read_text())


def test_per_round_metrics_reach_mlflow(finished_run):
    import mlflow

    runs, run_dir = finished_run
    status = json.loads((run_dir / "status.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    for key in ("round_seconds", "clients_answered", "acc", "local_loss"):
        history = client.get_metric_history(status["mlflow_run_id"], key)
        assert sorted(m.step for m in history) == list(range(ROUNDS)), key
    answered = client.get_metric_history(status["mlflow_run_id"], "clients_answered")
    assert {m.value for m in answered} == {5.0}
    assert client.get_run(status["mlflow_run_id"]).data.params["method.name"] == "sfdd"


def test_a_release_without_localdp_is_marked_not_private_and_its_images_stay_out_of_mlflow(finished_run):
    import mlflow

    runs, run_dir = finished_run
    status = json.loads((run_dir / "status.json").read_text())
    assert status["not_private"].startswith("NOT PRIVATE: SFDD with defence 'none'")
    assert (run_dir / "artifacts" / "RELEASE_NOT_PRIVATE.txt").read_text().startswith(status["not_private"])
    assert json.loads((run_dir / "metrics.json").read_text())["not_private"] == 1.0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(status["mlflow_run_id"])
    assert run.data.tags["dpdistill.release"] == "NOT PRIVATE"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "artifacts")}
    assert logged and "artifacts/distilled_grid.png" not in logged  # the run folder keeps it
    assert (run_dir / "artifacts" / "distilled_grid.png").is_file()


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact ε at ``delta`` of a Gaussian mechanism with sensitivity / std = ``mu`` (bisection on ε)."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def _spec(*overrides: str):
    return load_spec(ROOT / "jobs" / "sfdd-mnist.yaml", ["data.name=digits", *overrides])


@pytest.mark.parametrize("overrides,error,message", [
    (["method.defence=localdp", "method.weighting=uniform"], SpecError, "privacy.epsilon"),
    (["privacy.epsilon=1"], SpecError, "no DP guarantee"),
    (["method.attack=doorping", "method.target_class=12"], SpecError, "target_class"),
    (["method.attack=doorping", "method.trigger_size=8"], SpecError, "trigger_size"),
    (["method.defence=localdp", "privacy.epsilon=0.5", "method.localdp_sigma=0.5", "method.rounds=50"],
     PrivacyError, "localdp_sigma"),
    (["method.n_clients=3", "method.min_clients=4"], SpecError, "min_clients"),
    (["method.defence=localdp", "privacy.epsilon=50", "method.attack=dlg"], SpecError, "attack study"),
    (["method.defence=localdp", "privacy.epsilon=50", "method.attack=doorping"], SpecError, "real records"),
])
def test_prepare_refuses_bad_input_before_any_work(overrides, error, message):
    with pytest.raises(error, match=message):
        pipelines.get_pipeline("sfdd").prepare(_spec(*overrides))


def test_jobs_load_and_prepare_on_digits():
    for name in ("sfdd-mnist", "sfdd-dlg", "sfdd-doorping"):
        spec = load_spec(ROOT / "jobs" / f"{name}.yaml", ["data.name=digits", "method.trigger_size=3"])
        prepared = pipelines.get_pipeline("sfdd").prepare(spec)
        assert prepared.partition.n_clients == prepared.config.n_clients == 5
        assert sum(len(i) for i in prepared.partition.indices) == len(prepared.train)


def test_localdp_job_reports_every_clients_epsilon_beside_the_ledger(tmp_path):
    from types import SimpleNamespace

    from dpdistill.federated import LocalDP, SFDDConfig
    from dpdistill.pipelines.sfdd_job import report_client_privacy
    from dpdistill.privacy.ledger import PrivacyLedger

    cfg = SFDDConfig(defence="localdp", localdp_sigma=2.0, localdp_clip=1.0, rounds=3)
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=100.0, delta=1e-5)
    for _ in range(3):
        ledger.charge("localdp", LocalDP(2.0, 1.0).round_mechanism(2), note="round")
    logged, summary = {}, []
    ctx = SimpleNamespace(run=SimpleNamespace(artifacts=tmp_path), ledger=ledger,
                          log_metrics=lambda m, step=None: logged.update(m),
                          add_summary=lambda what, value: summary.append((what, value)))
    result = SimpleNamespace(dispatches={0: 3, 1: 1, 2: 2})
    report_client_privacy(ctx, result, cfg)
    doc = json.loads((tmp_path / "client_privacy.json").read_text())
    assert doc["delta"] == 1e-5 and [c["client"] for c in doc["clients"]] == [0, 1, 2]
    assert "exactly one client" in doc["neighbouring"] and "secret" in doc["noise"]
    eps = {c["client"]: c["epsilon"] for c in doc["clients"]}
    # Independently of the accountant: a client dispatched n times released n Gaussians of std σC = 2 on a
    # query of sensitivity 2C = 2, i.e. one Gaussian with μ = √n, whose exact ε(δ) is known (Balle & Wang 2018).
    # The PLD accountant is a tight upper bound on it.
    for client, n in {0: 3, 1: 1, 2: 2}.items():
        exact = _gaussian_epsilon(math.sqrt(n), 1e-5)
        assert exact <= eps[client] <= exact * (1 + 1e-3), (client, eps[client], exact)
    assert eps[1] < eps[2] < eps[0] <= ledger.spent_epsilon() * (1 + 1e-6)  # more dispatches, more ε
    assert logged["epsilon_client_max"] == eps[0] and [w for w, _ in summary] == ["LocalDP", "neighbouring"]
