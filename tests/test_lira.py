"""LiRA membership inference: its statistics on constructed score distributions, and the whole study on digits,
where it must catch a release of real records and must not "catch" a DP release at small ε."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import norm

from dpdistill import data
from dpdistill.evaluation.lira import (
    ShadowModel,
    evaluate_lira,
    lira_scores,
    logit_confidence,
    membership_matrix,
    roc_curve,
    run_study,
    tpr_at_fpr,
)

ray = pytest.importorskip("ray")
from ray_head import joined_head  # noqa: E402  (after the importorskip)

# ---------------------------------------------------------------------------------------------- statistics


def _synthetic(m: int, n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """φ with a per-record offset (some records are just easy) plus ``shift`` for the shadows that trained on it."""
    rng = np.random.default_rng(seed)
    keep = membership_matrix(m, n, seed)
    offset = rng.normal(0, 5, size=n)  # far larger than the shift: only a per-record test can separate
    return offset[None, :] + shift * keep + rng.normal(size=(m, n)), keep


def test_membership_is_random_halves() -> None:
    keep = membership_matrix(16, 3000, seed=3)
    assert keep.shape == (16, 3000) and abs(keep.mean() - 0.5) < 0.02
    assert (np.abs(keep.mean(1) - 0.5) < 0.05).all()  # each shadow trains on about half the pool
    with pytest.raises(ValueError, match="at least 4"):
        membership_matrix(3, 10, 0)


def test_leave_one_out_is_unbiased_on_null_confidences() -> None:
    # Confidences that ignore membership (heavy-tailed, with per-record offsets): the attack must sit at chance
    # on average. A per-record balanced membership (every record IN exactly half the runs) fails this: the
    # target's membership then shifts the other runs' IN/OUT counts, and the mean AUC drops to about 0.490.
    aucs = []
    for s in range(40):
        rng = np.random.default_rng(s)
        conf = rng.normal(0, 3, size=300)[None, :] + rng.standard_t(3, size=(16, 300))
        aucs.append(evaluate_lira(conf, membership_matrix(16, 300, seed=1000 + s)).auc)
    assert abs(float(np.mean(aucs)) - 0.5) < 0.005


def test_logit_confidence_is_the_log_odds_of_the_true_label() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [100.0, -100.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    p = torch.softmax(logits.double(), 1)[torch.arange(3), labels]
    phi = logit_confidence(logits, labels)
    assert torch.allclose(phi[:2], torch.log(p[:2] / (1 - p[:2])))
    # p rounds to 1 in float64 here; the stable form stays finite: log-odds = 100 - logsumexp(-100, 0) ≈ 100.
    assert math.isfinite(float(phi[2])) and float(phi[2]) == pytest.approx(100.0, abs=1e-6)


@pytest.mark.parametrize("variance", ["global", "per-record"])
def test_scores_equal_a_brute_force_leave_one_out_fit(variance: str) -> None:
    conf, keep = _synthetic(32, 30, 1.0, seed=1)
    scores, valid = lira_scores(conf, keep, variance=variance)
    assert valid.all()  # every record has 2+ IN and OUT runs besides any target, for this seed
    for t in range(32):
        others = np.arange(32) != t
        c, k = conf[others], keep[others]
        mu_in = np.array([c[k[:, j], j].mean() for j in range(30)])
        mu_out = np.array([c[~k[:, j], j].mean() for j in range(30)])
        if variance == "global":
            sd_in = np.sqrt(sum(((c[k[:, j], j] - mu_in[j]) ** 2).sum() for j in range(30)) / (k.sum() - 30))
            sd_out = np.sqrt(sum(((c[~k[:, j], j] - mu_out[j]) ** 2).sum() for j in range(30)) / ((~k).sum() - 30))
        else:
            sd_in = np.array([c[k[:, j], j].std(ddof=1) for j in range(30)])
            sd_out = np.array([c[~k[:, j], j].std(ddof=1) for j in range(30)])
        expected = norm.logpdf(conf[t], mu_in, sd_in) - norm.logpdf(conf[t], mu_out, sd_out)
        np.testing.assert_allclose(scores[t], expected, rtol=1e-9, atol=1e-9)


def test_roc_moves_ties_together_and_reads_tpr_at_fpr() -> None:
    scores = np.array([5.0, 4.0, 4.0, 3.0, 2.0, 1.0])
    labels = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    fpr, tpr, _ = roc_curve(scores, labels)
    # The tie at 4 (one member, one not) is a single step: no threshold takes one without the other.
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1, 1])
    assert tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(1 / 3)
    assert tpr_at_fpr(fpr, tpr, 0.5) == pytest.approx(1.0)


def test_separated_in_and_out_give_high_tpr_at_low_fpr() -> None:
    conf, keep = _synthetic(16, 500, 4.0, seed=2)
    result = evaluate_lira(conf, keep)
    assert result.variance == "global" and result.excluded == 0
    assert result.members + result.non_members == 16 * 500
    assert result.tpr_at[0.001] > 0.5 and result.tpr_at[0.01] > 0.8 and result.auc > 0.97
    # The same shift is invisible without the per-record calibration LiRA does: a global threshold on φ itself
    # (the offsets vary with sd 5) is far weaker at low FPR.
    fpr, tpr, _ = roc_curve(conf, keep)
    assert tpr_at_fpr(fpr, tpr, 0.01) < result.tpr_at[0.01] / 2


def test_identical_in_and_out_give_tpr_near_fpr() -> None:
    conf, keep = _synthetic(16, 500, 0.0, seed=4)
    result = evaluate_lira(conf, keep)
    assert abs(result.auc - 0.5) < 0.03
    assert result.tpr_at[0.01] < 0.025 and result.tpr_at[0.001] < 0.005
    for alpha in (0.05, 0.1, 0.3):
        assert abs(tpr_at_fpr(result.fpr, result.tpr, alpha) - alpha) < 0.04
    # The offline variant (OUT fit only) is blind here too.
    offline = evaluate_lira(conf, keep, online=False)
    assert abs(offline.auc - 0.5) < 0.03


# --------------------------------------------------------------------------------------- the whole study

POOL, SHADOWS = 200, 16
# A tiny ConvNet fitted hard to its release (batch 16: the ~100 released images take ~7 steps per epoch).
MODEL_OPTIONS = {"width": 16, "depth": 2}


@pytest.fixture(scope="module")
def ray_cluster():
    """One real head for the module (loopback, token auth), joined here; the in-process CLI's ray_session
    reuses the connection and a CLI subprocess joins it by --address."""
    with joined_head() as head:
        yield head


@pytest.fixture(scope="module")
def pool() -> data.ImageSet:
    train = data.load("digits", "train")
    return train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:POOL])


def _study(method: str, options: dict, epsilon: float | None, pool: data.ImageSet, seed: int):
    from dpdistill.runtime.lira_tasks import DistillRelease, ray_map

    info = data.get("digits").info
    mean, std = list(info.mean), list(info.std)
    release = DistillRelease(method, options, info.num_classes, epsilon, None, mean, std)
    model = ShadowModel(name="convnet", options=MODEL_OPTIONS, epochs=50, batch_size=16, lr=0.01, mean=mean, std=std)
    return run_study(release, pool.images, pool.labels, info.num_classes, shadows=SHADOWS, model=model, seed=seed,
                     map_fn=ray_map).result


# TPR @ 1 % FPR seen over study seeds 0, 1, 2 (pool 200, 16 shadows, ~3200 trials, Ray on 2 busy cores, ~30 s
# each): real records (DM, iterations 0, init real) 12.7-16.7 %, AUC 0.80-0.83; NDPDC at ε = 0.5 0.9-1.3 %, AUC
# 0.48-0.49. The asserted bounds (>= 5 %, <= 3 %) sit well outside both ranges, and each assertion fails if the
# other release is put in its place.
@pytest.mark.slow
def test_lira_catches_released_records_and_not_a_small_epsilon_release(ray_cluster, pool) -> None:
    leaky = _study("dm", {"ipc": 10, "iterations": 0, "init": "real"}, None, pool, seed=0)
    assert leaky.tpr_at[0.01] >= 0.05, leaky.tpr_at
    assert leaky.auc > 0.7
    private = _study("ndpdc", {"ipc": 10, "iterations": 20, "net_width": 16, "batch_real": 16}, 0.5, pool, seed=0)
    assert private.tpr_at[0.01] <= 0.03, private.tpr_at
    assert abs(private.auc - 0.5) < 0.1


def _keep_released(images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return images, labels  # the leakiest release: the members themselves


def test_a_study_in_parts_equals_one_study(pool) -> None:
    """`done` rows are not run again, each new row is reported once as it finishes, and a study finished in
    parts gives the same confidences and figures as one run straight through (shadow seeds and halves depend
    on the study seed and the shadow's index only)."""
    small = pool.subset(torch.arange(40))
    model = ShadowModel(name="convnet", options={"width": 8, "depth": 1}, epochs=2, batch_size=16)
    whole = run_study(_keep_released, small.images, small.labels, 10, shadows=6, model=model, seed=3)
    seen: list[int] = []
    parts = run_study(_keep_released, small.images, small.labels, 10, shadows=6, model=model, seed=3,
                      done={0: whole.confidences[0], 4: whole.confidences[4]},
                      on_shadow=lambda m, row: seen.append(m))
    assert sorted(seen) == [1, 2, 3, 5]
    np.testing.assert_array_equal(parts.confidences, whole.confidences)
    assert parts.result.tpr_at == whole.result.tpr_at and parts.result.auc == whole.result.auc
    with pytest.raises(ValueError, match="pool has 40 records"):
        run_study(_keep_released, small.images, small.labels, 10, shadows=6, model=model, seed=3,
                  done={1: whole.confidences[1][:-1]})


# ---------------------------------------------------------------------------------------------- the CLI


def _spec(tmp: Path, **privacy) -> Path:
    doc = {"name": "mia-dm", "kind": "distill", "seed": 0, "data": {"name": "digits"}, "privacy": privacy,
           "method": {"name": "dm", "ipc": 2, "iterations": 0, "init": "real"},
           "evaluation": {"epochs": 3, "batch_size": 16, "model_options": {"width": 8, "depth": 1}}}
    path = tmp / "mia.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_writes_a_not_private_study_folder(ray_cluster, tmp_path, capsys) -> None:
    from dpdistill.cli import main
    from dpdistill.pipelines.not_private import RELEASE_NOT_PRIVATE

    runs = tmp_path / "runs"
    # Pool 120: every shadow's half holds each class (DM's real init needs one record per class).
    main(["mia", str(_spec(tmp_path)), "--shadows", "4", "--pool", "120", "--runs-dir", str(runs)])
    out = capsys.readouterr().out
    assert "NOT PRIVATE" in out and "TPR @ 1 % FPR" in out
    (folder,) = (runs / "mia-dm-mia").iterdir()
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "completed" and "NOT PRIVATE" in status["not_private"]
    assert (folder / "artifacts" / RELEASE_NOT_PRIVATE).is_file()
    assert (folder / "artifacts" / "roc.png").stat().st_size > 0
    report = json.loads((folder / "mia.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert report["shadows"] == 4 and report["pool"] == 120
    assert report["members"] + report["non_members"] + report["excluded"] == 4 * 120
    assert metrics["mia_tpr_at_1%fpr"] == report["tpr_at_1%fpr"] and metrics["not_private"] == 1.0
    assert report["roc"]["fpr"][0] == 0.0 and report["roc"]["tpr"][-1] == 1.0


def test_cli_refuses_a_spec_with_an_owner_budget(tmp_path, capsys) -> None:
    from dpdistill.cli import main

    spec = _spec(tmp_path)
    doc = yaml.safe_load(spec.read_text())
    doc["method"] = {"name": "ndpdc", "iterations": 2}
    doc["privacy"] = {"epsilon": 1.0, "owner_budget": 5.0}
    spec.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(["mia", str(spec), "--shadows", "4", "--pool", "40", "--runs-dir", str(runs)])
    assert exit_info.value.code == 2
    assert "owner_budget" in capsys.readouterr().err
    assert not runs.exists()  # refused before anything was read or written


def _shadow_files(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "shadows").glob("*.json")}


def test_resume_runs_only_the_missing_shadows_and_equals_the_whole_study(ray_cluster, tmp_path, capsys) -> None:
    from dpdistill.cli import main

    runs = tmp_path / "runs"
    main(["mia", str(_spec(tmp_path)), "--shadows", "4", "--pool", "120", "--runs-dir", str(runs)])
    (whole,) = (runs / "mia-dm-mia").iterdir()
    assert sorted(_shadow_files(whole)) == ["0000.json", "0001.json", "0002.json", "0003.json"]
    # The same study killed outright (SIGKILL: no handler ran) after two shadows: status and attempt still say
    # "running", no figures yet.
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("0001.json", "0003.json", "mia.json", "metrics.json"):
        (cut / ("shadows" if name[0] == "0" else ".") / name).unlink()
    status = json.loads((cut / "status.json").read_text())
    (cut / "status.json").write_text(json.dumps({**status, "status": "running"}))
    state = json.loads((cut / "study.json").read_text())
    state["attempts"][0].update(outcome="running", shadows_run=2)
    (cut / "study.json").write_text(json.dumps(state))
    kept = _shadow_files(cut)
    capsys.readouterr()
    main(["mia", "--resume", str(cut)])
    assert f"study folder: {cut}" in capsys.readouterr().out
    assert {k: v for k, v in _shadow_files(cut).items() if k in kept} == kept  # not run (nor written) again
    for name in ("0001.json", "0003.json"):  # the DM release and the model are deterministic: same figures
        assert json.loads((cut / "shadows" / name).read_text()) == json.loads((whole / "shadows" / name).read_text())
    a, b = (json.loads((f / "mia.json").read_text()) for f in (whole, cut))
    assert (a["tpr_at_1%fpr"], a["auc"], a["members"]) == (b["tpr_at_1%fpr"], b["auc"], b["members"])
    assert b["attempts"] == 2 and json.loads((cut / "status.json").read_text())["status"] == "completed"
    attempts = json.loads((cut / "study.json").read_text())["attempts"]
    assert [(t["shadows_before"], t["shadows_run"], t["outcome"]) for t in attempts] == [(0, 2, "killed"),
                                                                                        (2, 2, "completed")]
    # Refused, one line and exit 2: a completed study, a folder that is not a study, a spec beside --resume.
    for argv, says in ((["mia", "--resume", str(cut)], "completed already"),
                       (["mia", "--resume", str(tmp_path)], "not a membership-inference study folder"),
                       (["mia", str(_spec(tmp_path)), "--resume", str(whole)], "takes no spec")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


def test_sigterm_keeps_the_finished_shadows_and_resume_finishes_the_study(ray_cluster, tmp_path, capsys) -> None:
    """SIGTERM (what `ray job stop` or a pod eviction sends) to a `dpdistill mia` process mid-study: exit 143,
    the folder interrupted (not failed: ray.init replaces the SIGTERM handler, and the study must keep its own)
    with every finished shadow kept; --resume then runs only what is missing."""
    from dpdistill.cli import main

    spec = _spec(tmp_path)
    doc = yaml.safe_load(spec.read_text())
    doc["evaluation"]["epochs"] = 60  # ~1-2 s per shadow: the signal lands while most are still to run
    spec.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dpdistill"), "mia", str(spec), "--shadows", "8", "--pool", "120",
         "--runs-dir", str(runs), "--address", ray_cluster.gcs],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(runs.glob("mia-dm-mia/*/shadows/*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    (folder,) = (runs / "mia-dm-mia").iterdir()
    assert f"resume with: dpdistill mia --resume {folder}" in err and "Traceback" not in err, err[-3000:]
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "interrupted" and status["interrupted_by"] == "SIGTERM", status
    finished = len(_shadow_files(folder))
    assert 1 <= finished < 8 and not (folder / "mia.json").exists(), (finished, err[-3000:])
    assert not list(folder.rglob("*.tmp"))
    # The unfinished shadows did not outlive the driver (nothing cancels them: Ray ends a job's tasks with it).
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"], ray.available_resources()
    main(["mia", "--resume", str(folder)])
    attempts = json.loads((folder / "study.json").read_text())["attempts"]
    assert [t["outcome"] for t in attempts] == ["interrupted", "completed"]
    assert attempts[1]["shadows_before"] == finished and attempts[1]["shadows_run"] == 8 - finished
    assert len(_shadow_files(folder)) == 8 and json.loads((folder / "mia.json").read_text())["shadows"] == 8


def test_the_cluster_connection_keeps_a_callers_sigterm_handler(ray_cluster) -> None:
    """ray.init installs its own SIGTERM handler (sys.exit); ray_session puts the caller's back, so a run's
    'SIGTERM = interrupted' survives joining Ray (a fresh process, joining this module's head)."""
    code = ("import signal, sys\n"
            "from dpdistill.runtime.cluster import ray_session\n"
            "mine = lambda *a: None\n"
            "signal.signal(signal.SIGTERM, mine)\n"
            f"with ray_session({ray_cluster.gcs!r}):\n"
            "    sys.exit(0 if signal.getsignal(signal.SIGTERM) is mine else 3)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
