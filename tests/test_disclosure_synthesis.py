"""Declared disclosure of the five DP synthesisers: every key a real ``synthesize`` run writes has a kind, the
RELEASED ones are recomputed from the saved artifact alone, and nothing computed from real records without
noise (DP-GAN's discriminator loss, GS-WGAN's critic-scored generator loss) is logged anywhere.

Each method runs once through :func:`dpdistill.runner.run_job` on ``digits`` with tiny settings, tracking on
(one temporary SQLite MLflow store for the module), fidelity (a pre-cached untrained extractor) and a 1-epoch
evaluation on, so that every kind of key the job can write is exercised.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dpdistill import models, synthesis
from dpdistill.pipelines.synthesize_job import DISCLOSURE, disclosure_for
from dpdistill.privacy.disclosure import RELEASED, kind_of, undeclared
from dpdistill.spec import validate_spec

METHODS = ("dp-merf", "dp-mepf", "dp-ntk", "dp-kernel", "dp-gan", "gs-wgan")
MEAN_EMBEDDINGS = ("dp-merf", "dp-mepf", "dp-ntk")

# Tiny configurations (seconds each on 2 cores, 8x8 digits); 60 steps so that stepped metrics log twice.
TINY: dict[str, dict[str, Any]] = {
    "dp-merf": {"num_features": 200, "iterations": 60, "batch_size": 100},
    # pretrain: the job's public set (DP-MEPF's extractor is trained on it)
    "dp-mepf": {"num_features": 200, "iterations": 60, "batch_size": 100, "pretrain": "glyphs",
                "pretrain_iterations": 2, "extractor_epochs": 1, "extractor_width": 8, "extractor_depth": 2},
    "dp-ntk": {"ntk_width": 16, "iterations": 60, "batch_size": 100, "embed_batch_size": 512},
    "dp-kernel": {"num_features": 200, "iterations": 60, "batch_size": 100, "gen_batch_size": 50},
    "dp-gan": {"iterations": 60, "batch_size": 32, "critic_width": 8, "gen_width": 8, "gen_hidden": 32},
    "gs-wgan": {"num_discriminators": 3, "iterations": 60, "batch_size": 8, "critic_iterations": 1,
                "pretrain_d_iterations": 2, "critic_width": 8, "gen_width": 8, "gen_hidden": 32},
}
N_PER_CLASS = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, Any]:
    """One run folder root, one MLflow store and one cached (untrained) fidelity extractor for the module."""
    from dpdistill.evaluation.extractors import DomainSpec

    root = tmp_path_factory.mktemp("disclosure")
    mp = pytest.MonkeyPatch()
    mp.setenv("DPDISTILL_CACHE", str(root / "cache"))
    spec = DomainSpec(public="glyphs", image_size=8)
    path = root / "cache" / "extractors" / f"{spec.name}.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=spec.width, depth=spec.depth)
    torch.save(net.state_dict(), path)
    yield {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}", "runs": {}}
    mp.undo()


def run_method(store: dict[str, Any], method: str) -> dict[str, Any]:
    """Run ``method``'s synthesize job once (cached per module) and collect every key it wrote."""
    if method in store["runs"]:
        return store["runs"][method]
    import mlflow

    from dpdistill.runner import run_job

    doc = {
        "name": f"disclosure-{method}", "kind": "synthesize", "seed": 3, "data": {"name": "digits"},
        "privacy": {"epsilon": 2.0},
        "method": {"name": method, **TINY[method], "n_per_class": N_PER_CLASS, "fidelity": True},
        "evaluation": {"epochs": 1, "seeds": 1, "parallel": False, "model_options": {"width": 8}},
        "tracking": {"enabled": True, "uri": store["uri"], "experiment": "disclosure"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus' backward-hook notice
        result = run_job(validate_spec(doc), store["root"] / "runs", progress=False)
    assert result.status == "completed"
    run_dir = result.run_dir
    client = mlflow.MlflowClient(tracking_uri=store["uri"])
    run = client.get_run(result.mlflow_run_id)
    # Every metric key of the run, at every step (the history holds the stepped values).
    history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
    json_keys: dict[str, set[str]] = {}
    for path in sorted((run_dir / "artifacts").rglob("*.json")):
        json_keys[path.name] = set(flatten(json.loads(path.read_text())))
    collected = {
        "run_dir": run_dir,
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "mlflow_metrics": set(history),
        "mlflow_steps": {k: sorted(m.step for m in v) for k, v in history.items()},
        "params": set(run.data.params),
        "tags": dict(run.data.tags),
        "json": json_keys,
        "log": (run_dir / "log.txt").read_text(),
    }
    store["runs"][method] = collected
    return collected


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists and scalars are leaves): how the disclosure lists name report keys."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def all_keys(c: dict[str, Any]) -> set[str]:
    keys = set(c["metrics"]) | c["mlflow_metrics"] | c["params"]
    for names in c["json"].values():
        keys |= names
    return keys


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- the checker itself ------------------------------------------------------------------------------------


def test_the_checker_flags_an_undeclared_key():
    """A negative control: the very keys the old code logged are undeclared, and so is any new one."""
    assert undeclared(["fit_g_loss", "final_g_loss", "fit_d_loss", "final_d_loss"], disclosure_for("dp-gan")) == [
        "final_d_loss", "fit_d_loss"]
    assert undeclared(["fit_g_loss", "final_g_loss"], disclosure_for("gs-wgan")) == ["final_g_loss", "fit_g_loss"]
    assert undeclared(["release_mmd", "extra.release_mmd", "final_mmd"], disclosure_for("dp-merf")) == ["final_mmd"]
    # The job's declaration alone does not cover a method's keys: the method must declare them.
    assert undeclared(["noise_sigma", "fit_mmd"], DISCLOSURE) == ["fit_mmd", "noise_sigma"]
    assert undeclared(["privacy_epsilon_dp-merf/embedding", "wall_seconds"]) == []


@pytest.mark.parametrize("method", METHODS)
def test_every_method_declares_only_known_kinds(method):
    cls = synthesis.get(method)
    assert cls.disclosure is not synthesis.Synthesizer.disclosure  # its own, with its noise parameters
    assert undeclared(list(cls.disclosure), cls.disclosure) == []  # raises on an unknown kind


# -- the real runs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_key_a_run_writes_is_declared(store, method):
    c = run_method(store, method)
    keys = all_keys(c)
    assert undeclared(keys, disclosure_for(method)) == []
    # The run did write what the declarations are about (the collection is not empty by accident).
    assert {"fit_seconds", "fid", "acc_mean", "privacy_epsilon", "noise_q" if method not in MEAN_EMBEDDINGS
            else "noise_sigma"} <= keys
    assert {"fit_report.json", "fidelity.json"} <= set(c["json"])
    assert "method.name" in c["params"]
    # The saved synthesiser's report is the fit report, and its extra state is the release only.
    state = torch.load(c["run_dir"] / "artifacts" / "synthesizer.pt", weights_only=True)
    assert undeclared(flatten(state["report"]), disclosure_for(method)) == []
    # DP-MEPF's extractor (weights and input scaling) was trained on the public set alone.
    released = {"dp-merf": {"released"}, "dp-ntk": {"released"},
                "dp-mepf": {"released", "extractor", "extractor_stats"}}.get(method, set())
    assert set(state["extra"]) == released


@pytest.mark.parametrize("method", METHODS)
def test_no_loss_computed_on_real_records_is_logged(store, method):
    c = run_method(store, method)
    keys = all_keys(c)
    # DP-GAN's discriminator loss is a function of the real Poisson batch without noise.
    assert not [k for k in keys if "d_loss" in k]
    if method == "gs-wgan":  # every GS-WGAN loss runs through critics trained on real data without noise
        assert not [k for k in keys if "loss" in k or "mmd" in k]
    else:  # the stepped metrics that remain are post-processing of charged releases, and they are stepped
        stepped = [k for k, steps in c["mlflow_steps"].items() if len(steps) > 1]
        assert stepped and all(kind_of(k, disclosure_for(method)) == "charged" for k in stepped)
    # log.txt holds no per-step numbers.
    assert not re.search(r"(loss|mmd)\b.*\d", c["log"], flags=re.IGNORECASE)
    assert not re.search(r"\b(step|iteration|it)\s*[=:]?\s*\d+", c["log"], flags=re.IGNORECASE)


def _recompute_release_mmd(synth: Any) -> float:
    """DP-MERF / DP-NTK's ``release_mmd`` from synthesizer.pt alone, written out independently of the method."""
    from dpdistill.synthesis.features import NTKFeatures, RandomFourierFeatures

    k = synth.num_classes
    per_class = max(1, synth.config.batch_size // k)
    images, labels = synth.generate(n_per_class=per_class, seed=synth.seed)  # the public latents
    d = images[0].numel()
    if synth.name in ("dp-merf", "dp-mepf"):
        bw = synth.config.bandwidth or 6.0 * (d / 784.0) ** 0.5
        phi = RandomFourierFeatures(d, synth.config.num_features, bw, seed=synth.seed + 101)(images)
        if synth.name == "dp-mepf":  # [r·rff, p·ψ], ψ the saved public extractor's pooled block outputs
            p = synth.config.perceptual_weight
            phi = torch.cat([(1 - p * p) ** 0.5 * phi, p * _perceptual(synth, images)], dim=1)
        sums = torch.zeros(k, phi.shape[1]).index_add(0, labels, phi)
    else:
        sums = NTKFeatures(d, synth.config.ntk_width, seed=synth.seed + 202).class_sums(images, labels, k)
    return float((sums / per_class - synth.released["means"]).pow(2).sum())


def _perceptual(synth: Any, images: torch.Tensor) -> torch.Tensor:
    """DP-MEPF's ψ from the saved extractor: after each conv block, the g x g average-pooled map (and its
    squares), concatenated, unit norm per image."""
    import torch.nn.functional as F

    c = synth.config
    net = models.get("convnet", channels=synth.channels, num_classes=synth.num_classes,
                     image_size=synth.image_size, width=c.extractor_width, depth=c.extractor_depth)
    net.load_state_dict(synth.extractor_state)
    mean, std = synth.extractor_stats
    h, parts, layers = (images - mean) / std, [], list(net.eval().features)
    for i, layer in enumerate(layers):
        h = layer(h)
        if i + 1 == len(layers) or isinstance(layers[i + 1], torch.nn.Conv2d):
            parts += [F.adaptive_avg_pool2d(h, c.grid).flatten(1)]
            parts += [F.adaptive_avg_pool2d(h * h, c.grid).flatten(1)] if c.second_moment else []
    psi = torch.cat(parts, dim=1)
    return psi / psi.norm(dim=1, keepdim=True)


RECOMPUTE = {"release_mmd": _recompute_release_mmd}


@pytest.mark.parametrize("method", METHODS)
def test_released_values_are_recomputed_from_the_artifact_alone(store, method):
    c = run_method(store, method)
    art = c["run_dir"] / "artifacts"
    synth = synthesis.load(art / "synthesizer.pt")
    # The synthetic set is the saved generator's output on the seed's latents.
    npz = np.load(art / "synthetic.npz")
    images, labels = synth.generate(n_per_class=N_PER_CLASS, seed=3)
    assert np.array_equal(npz["labels"], labels.numpy())
    assert np.array_equal(npz["images"], (images * 255).round().to(torch.uint8).numpy())
    assert c["metrics"]["n_released"] == len(labels)
    # Every key declared RELEASED that the run wrote is recomputed here (a new one without a recipe fails).
    declared = disclosure_for(method)
    report = json.loads((art / "fit_report.json").read_text())
    released = {k: v for k, v in {**c["metrics"], **flatten(report)}.items()
                if kind_of(k, declared) == RELEASED}
    if method in MEAN_EMBEDDINGS:
        assert set(released) == {"release_mmd", "extra.release_mmd"}
    for key, value in released.items():
        recipe = RECOMPUTE[key.removeprefix("extra.")]
        assert recipe(synth) == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_dp_gan_discriminator_loss_is_gone_from_every_output(store):
    c = run_method(store, "dp-gan")
    report = json.loads((Path(c["run_dir"]) / "artifacts" / "fit_report.json").read_text())
    assert set(report["extra"]) == {"final_g_loss"}
    assert "final_d_loss" not in c["metrics"] and "fit_d_loss" not in c["mlflow_metrics"]
    assert "fit_g_loss" in c["mlflow_metrics"]
    assert c["tags"]["dpdistill.privacy"] == "private"
