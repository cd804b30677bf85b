"""`dpdistill evaluate` on a synthesize run: it re-scores the set the run drew from its released generator, or
draws a fresh set from that generator (`--set method.n_per_class=… method.guidance_scale=…`) and scores it. Either
is post-processing: no ledger, nothing charged. With the source's own options and seed the fresh draw IS the
source's set (same pixels, same figures); other options change it; options the generator does not have, a draw
from a release that is not a generator, and fields that would change the release are refused (exit 2, one line,
no run folder) before any split is read."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpdistill.cli import main
from dpdistill.pipelines.evaluate_job import evaluate_spec
from dpdistill.runner import run_job
from dpdistill.spec import validate_spec

EVALUATION = {"epochs": 3, "seeds": 1, "parallel": False, "model_options": {"width": 16}}
DIFFUSION = {
    "name": "src-pdp", "kind": "synthesize", "seed": 2, "threads": 1, "data": {"name": "digits"},
    "privacy": {"epsilon": 4.0},
    "method": {"name": "pdp-diffusion", "pretrain": "glyphs", "block_out_channels": [16, 16],
               "attention": [False, False], "norm_num_groups": 8, "iterations": 3, "batch_size": 64,
               "sample_steps": 3, "pretrain_iterations": 10, "pretrain_batch": 32, "n_per_class": 4,
               "fidelity": False},
    "evaluation": EVALUATION, "tracking": {"enabled": False},
}
MERF = {
    "name": "src-merf", "kind": "synthesize", "seed": 1, "threads": 1, "data": {"name": "digits"},
    "privacy": {"epsilon": 4.0},
    "method": {"name": "dp-merf", "num_features": 200, "iterations": 10, "batch_size": 100, "n_per_class": 5,
               "fidelity": False},
    "evaluation": EVALUATION, "tracking": {"enabled": False},
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A finished PDP-Diffusion run and a finished DP-MERF run on digits (tiny schedules), one cache for both."""
    import torch

    from dpdistill import models
    from dpdistill.evaluation.extractors import DomainSpec

    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("DPDISTILL_CACHE", str(cache))
    # A pre-cached (untrained) glyph extractor for 8x8 images: the fidelity stage finds it instead of training one.
    extractor = DomainSpec(public="glyphs", image_size=8)
    path = cache / "extractors" / f"{extractor.name}.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.get("convnet", channels=1, num_classes=10, image_size=8, width=extractor.width,
                          depth=extractor.depth).state_dict(), path)
    runs = tmp_path_factory.mktemp("sources")
    out = {}
    reproducible = {**MERF, "name": "src-merf-reproducible", "privacy": {"epsilon": 4.0, "reproducible_noise": True}}
    measured = {**MERF, "name": "src-merf-fidelity", "method": {**MERF["method"], "fidelity": True}}
    for key, doc in (("diffusion", DIFFUSION), ("merf", MERF), ("not-private", reproducible),
                     ("fidelity", measured)):
        result = run_job(validate_spec(doc), runs, progress=False)
        assert result.status == "completed"
        out[key] = result.run_dir
    yield out
    mp.undo()


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _cli(capsys, args: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def test_the_set_a_synthesize_run_drew_is_rescored_and_nothing_is_charged(sources, tmp_path) -> None:
    source = sources["diffusion"]
    result = run_job(evaluate_spec(source), tmp_path, progress=False)
    assert result.status == "completed"
    assert not (result.run_dir / "ledger.json").exists()
    assert not any(k.startswith("privacy_epsilon") for k in result.metrics)
    recorded = json.loads((result.run_dir / "artifacts" / "source.json").read_text())
    drawn = source / "artifacts" / "synthetic.npz"
    assert recorded["release"] == str(drawn.resolve())
    assert recorded["sha256"] == hashlib.sha256(drawn.read_bytes()).hexdigest()
    assert recorded["method"] == "pdp-diffusion" and recorded["epsilon"] == pytest.approx(4.0, rel=1e-2)
    assert recorded["generator"] == str((source / "artifacts" / "synthesizer.pt").resolve())
    assert result.metrics["n_released"] == 40
    # No fresh draw: the run scored the source's set and wrote no images of its own.
    assert not (result.run_dir / "artifacts" / "synthetic.npz").exists()


def test_a_run_measures_the_set_it_writes(sources) -> None:
    """The figures of a synthesize run are those of its saved 8-bit set (synthesize_job.as_released), so that
    `dpdistill evaluate RUN` reproduces them. FID is continuous in the pixels: the source's equals, to the bit, the
    FID of the saved set measured as the run measures (while runs scored the sampler's float output it did not)."""
    import torch
    import yaml

    from dpdistill.evaluation.extractors import get_extractor
    from dpdistill.evaluation.fidelity import evaluate_fidelity
    from dpdistill.pipelines.distill_job import load_splits

    source = sources["fidelity"]
    spec = validate_spec(yaml.safe_load((source / "spec.yaml").read_text()))
    saved = _npz(source / "artifacts" / "synthetic.npz")
    images = torch.from_numpy(saved["images"]).float() / float(saved["scale"])
    _, _, test, _ = load_splits(spec)
    m = spec.method
    extractor = get_extractor(m.fidelity_extractor, image_size=images.shape[-1], inception_weights=m.inception_weights,
                              public=m.fidelity_public, device="cpu")
    fid = evaluate_fidelity(test.images, images, extractor, max_samples=m.fidelity_samples, seed=spec.seed)
    assert fid.fid == json.loads((source / "metrics.json").read_text())["fid"]


def test_a_fresh_draw_with_the_sources_options_is_the_sources_set(sources, tmp_path) -> None:
    """Same generator, seed and sampling options: the same pixels and, trained the same way, the same figures.
    A draw from another generator, seed or option would differ."""
    source = sources["diffusion"]
    result = run_job(evaluate_spec(source, ["method.n_per_class=4"]), tmp_path, progress=False)
    assert result.status == "completed"
    mine, theirs = _npz(result.run_dir / "artifacts" / "synthetic.npz"), _npz(source / "artifacts" / "synthetic.npz")
    assert np.array_equal(mine["images"], theirs["images"]) and np.array_equal(mine["labels"], theirs["labels"])
    assert result.metrics["acc_mean"] == pytest.approx(json.loads((source / "metrics.json").read_text())["acc_mean"],
                                                       abs=1e-9)
    recorded = json.loads((result.run_dir / "artifacts" / "source.json").read_text())
    generator = source / "artifacts" / "synthesizer.pt"
    assert recorded["generator_sha256"] == hashlib.sha256(generator.read_bytes()).hexdigest()
    assert recorded["generated"] == {"n_per_class": 4, "guidance_scale": 2.0, "sample_steps": 3, "sample_eta": 0.0,
                                   "generate_chunks": 1}
    assert not (result.run_dir / "ledger.json").exists()


def test_a_fresh_draw_takes_other_sampling_options_and_declares_what_it_logs(sources, tmp_path, monkeypatch) -> None:
    import mlflow

    from dpdistill.pipelines.evaluate_job import DISCLOSURE
    from dpdistill.privacy.disclosure import undeclared

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = sources["diffusion"]
    spec = evaluate_spec(source, ["method.n_per_class=6", "method.guidance_scale=0", "method.sample_steps=2",
                                  "method.sample_eta=1", "tracking.enabled=true"])
    result = run_job(spec, tmp_path, progress=False)
    assert result.status == "completed"
    drawn = _npz(result.run_dir / "artifacts" / "synthetic.npz")
    assert len(drawn["labels"]) == 60 and np.bincount(drawn["labels"]).tolist() == [6] * 10
    assert result.metrics["n_released"] == 60 and result.metrics["ipc"] == 6
    theirs = _npz(source / "artifacts" / "synthetic.npz")
    first4 = np.concatenate([drawn["images"][drawn["labels"] == k][:4] for k in range(10)])
    assert not np.array_equal(first4, np.concatenate([theirs["images"][theirs["labels"] == k] for k in range(10)]))
    assert (result.run_dir / "artifacts" / "grid_class0.png").is_file()
    recorded = json.loads((result.run_dir / "artifacts" / "source.json").read_text())
    assert recorded["generated"] == {"n_per_class": 6, "guidance_scale": 0.0, "sample_steps": 2, "sample_eta": 1.0,
                                   "generate_chunks": 1}
    client = mlflow.MlflowClient(tracking_uri=result.mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["method.guidance_scale"] == "0.0"
    for place, keys in {"metrics.json": list(json.loads((result.run_dir / "metrics.json").read_text())),
                        "mlflow metrics": list(run.data.metrics), "mlflow params": list(run.data.params),
                        "source.json": list(recorded)}.items():
        assert undeclared(keys, DISCLOSURE) == [], place


def test_a_generator_without_guidance_draws_more_images_only(sources, tmp_path) -> None:
    result = run_job(evaluate_spec(sources["merf"], ["method.n_per_class=9"]), tmp_path, progress=False)
    assert result.status == "completed" and result.metrics["n_released"] == 90
    recorded = json.loads((result.run_dir / "artifacts" / "source.json").read_text())
    assert recorded["generated"] == {"n_per_class": 9, "generate_chunks": 1} and recorded["method"] == "dp-merf"


def _local_ray_starts(run_dir: Path) -> int:
    return (run_dir / "log.txt").read_text().count("started a local Ray")


def test_a_fresh_draw_runs_in_the_sources_chunks_on_ray_and_is_its_set(tmp_path) -> None:
    """A source that drew its set as 2 Ray tasks: the fresh draw runs as 2 Ray tasks too (its chunks fix the
    latents' seeds), so with the source's options it is the source's set; 1 chunk is another set. Generation
    chunks and evaluation models on Ray share ONE local Ray per run (not a start, a stop and a second start)."""
    doc = {**MERF, "name": "src-merf-chunks", "method": {**MERF["method"], "n_per_class": 6, "generate_chunks": 2},
           "ray": {"num_cpus": 2}, "evaluation": {**EVALUATION, "parallel": True, "seeds": 2}}
    source = run_job(validate_spec(doc), tmp_path / "src", progress=False)
    assert source.status == "completed" and dict(source.summary).get("generation on") is None  # on Ray
    assert dict(source.summary).get("evaluation on") is None and _local_ray_starts(source.run_dir) == 1
    theirs = _npz(source.run_dir / "artifacts" / "synthetic.npz")
    chunked = run_job(evaluate_spec(source.run_dir, ["method.n_per_class=6", "ray.num_cpus=2"]), tmp_path / "a",
                      progress=False)
    assert chunked.status == "completed" and dict(chunked.summary).get("generation on") is None
    assert _local_ray_starts(chunked.run_dir) == 1
    mine = _npz(chunked.run_dir / "artifacts" / "synthetic.npz")
    assert np.array_equal(mine["images"], theirs["images"]) and np.array_equal(mine["labels"], theirs["labels"])
    recorded = json.loads((chunked.run_dir / "artifacts" / "source.json").read_text())
    assert recorded["generated"] == {"n_per_class": 6, "generate_chunks": 2}
    one = run_job(evaluate_spec(source.run_dir, ["method.n_per_class=6", "method.generate_chunks=1"]),
                  tmp_path / "b", progress=False)
    assert not np.array_equal(_npz(one.run_dir / "artifacts" / "synthetic.npz")["images"], theirs["images"])


def test_a_fresh_draw_from_a_not_private_release_is_stamped_and_keeps_its_images_out_of_mlflow(sources, tmp_path,
                                                                                             monkeypatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = evaluate_spec(sources["not-private"], ["method.n_per_class=3", "tracking.enabled=true"])
    result = run_job(spec, tmp_path, progress=False)
    assert result.status == "completed" and result.metrics["not_private"] == 1.0
    assert (result.run_dir / "artifacts" / "RELEASE_NOT_PRIVATE.txt").is_file()
    assert (result.run_dir / "artifacts" / "synthetic_grid.png").is_file()  # in the folder, not in MLflow
    client = mlflow.MlflowClient(tracking_uri=result.mlflow_uri)
    logged = [a.path for a in client.list_artifacts(result.mlflow_run_id)]
    logged += [a.path for d in logged for a in client.list_artifacts(result.mlflow_run_id, d)]
    assert "artifacts/source.json" in logged or any(x.endswith("source.json") for x in logged), logged
    assert not [x for x in logged if x.endswith(".png")], logged


def test_a_fresh_draw_is_measured_as_its_source_measured_its_own_set(sources, tmp_path) -> None:
    """The source ran fidelity: the fresh draw gets the same metrics with the same extractor, so with the source's
    options (the same set) the same FID; a source without fidelity gives a draw without it."""
    source = sources["fidelity"]
    theirs = json.loads((source / "metrics.json").read_text())
    same = run_job(evaluate_spec(source, ["method.n_per_class=5"]), tmp_path / "same", progress=False)
    assert same.metrics["fid"] == pytest.approx(theirs["fid"], rel=1e-9)
    assert same.metrics["precision"] == pytest.approx(theirs["precision"])
    from dpdistill.pipelines.evaluate_job import DISCLOSURE
    from dpdistill.privacy.disclosure import undeclared

    fidelity = json.loads((same.run_dir / "artifacts" / "fidelity.json").read_text())
    assert undeclared(list(same.metrics), DISCLOSURE) == [] and undeclared(list(fidelity), DISCLOSURE) == []
    more = run_job(evaluate_spec(source, ["method.n_per_class=8"]), tmp_path / "more", progress=False)
    assert more.metrics["fid"] != pytest.approx(theirs["fid"], rel=1e-6)
    none = run_job(evaluate_spec(sources["merf"], ["method.n_per_class=5"]), tmp_path / "none", progress=False)
    assert "fid" not in none.metrics and not (none.run_dir / "artifacts" / "fidelity.json").exists()


@pytest.mark.parametrize("which, args, needle", [
    ("merf", ["method.guidance_scale=3"], "field 'method.guidance_scale': dp-merf's generator has no such option"),
    ("diffusion", ["method.sample_steps=5000"], "more than the generator's 1000 training timesteps"),
    ("diffusion", ["method.n_per_class=0"], "method.n_per_class"),
    ("diffusion", ["method.sample_eta=2"], "method.sample_eta"),
    ("diffusion", ["method.run=/elsewhere"], "field 'method.run' comes from the source run"),
    ("diffusion", ["method.iterations=10"], "field 'method.iterations' comes from the source run"),
    ("no-generator", ["method.n_per_class=3"], "synthetic.npz: missing"),
])
def test_what_a_fresh_draw_cannot_do_is_refused_before_any_split_is_read(sources, tmp_path, capsys, monkeypatch,
                                                                        which, args, needle) -> None:
    reads: list[str] = []
    monkeypatch.setattr("dpdistill.pipelines.evaluate_job.load_splits", lambda s: reads.append("read"))
    source = sources.get(which)
    if which == "no-generator":  # a synthesize run folder whose drawn set is gone
        source = Path(shutil.copytree(sources["diffusion"], tmp_path / "copy"))
        (source / "artifacts" / "synthetic.npz").unlink()
    runs = tmp_path / "runs"
    code, err = _cli(capsys, ["evaluate", str(source), "--runs-dir", str(runs),
                              *[x for a in args for x in ("--set", a)]])
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert reads == [] and not list(runs.rglob("status.json"))
