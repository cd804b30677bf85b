"""DP-LDM (``dp-ldm``): a public autoencoder and latent UNet, DP-SGD on the latent UNet's conditioning and attention.

On ``digits`` (8×8) with ``glyphs`` as the public set and tiny networks: DP fine-tuning changes only the class
embedding and attention parameters (every other UNet parameter and every autoencoder parameter bit-identical);
the autoencoder and latent-UNet pre-trainings are cached by key (hit on the same key, miss when the autoencoder
changes, the UNet's key includes the autoencoder's); the latent scaling factor is the public set's (the latents
DP-SGD sees are scaled by it even when the sensitive set has a very different scale); the saved release holds the
fine-tuned subset and cache keys only, and a transport state carries the rest inline; generation is
deterministic in the latent seed; a real synthesize job writes only declared keys.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch

from dpdistill import data, synthesis
from dpdistill.privacy import PrivacyLedger
from dpdistill.privacy.noise import PrivacyRandomness

TINY: dict[str, Any] = {
    "block_out_channels": [16, 16], "attention": [False, True], "norm_num_groups": 8,
    "ae_block_out_channels": [16, 16], "ae_latent_channels": 2, "ae_norm_num_groups": 8,
    "ae_pretrain_iterations": 30, "ae_batch": 32, "pretrain_iterations": 20, "pretrain_batch": 32,
    "iterations": 3, "batch_size": 64, "sample_steps": 3, "sample_batch": 64,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One pre-training cache for the module (the tests that need a cold one use their own)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("ldm-cache")
    mp.setenv("DPDISTILL_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus' backward-hook notice
        yield


def make(**options: Any) -> Any:
    return synthesis.create("dp-ldm", channels=1, image_size=8, num_classes=10, seed=0,
                            noise=PrivacyRandomness.reproducible(7), **{**TINY, **options})


def glyphs() -> Any:
    return data.load("glyphs", "train", image_size=8)


def digits() -> Any:
    return data.get("digits").load_splits()["train"]


@pytest.fixture(scope="module")
def fitted(cache) -> dict[str, Any]:
    synth = make()
    synth.pretrain(glyphs())
    unet_before = {k: v.clone() for k, v in synth.generator_net.state_dict().items()}
    ae_before = {k: v.clone() for k, v in synth.autoencoder.state_dict().items()}
    report = synth.fit(digits(), PrivacyLedger(None, 4.0, 1e-5))
    return {"synth": synth, "unet_before": unet_before, "ae_before": ae_before, "report": report}


def test_only_the_conditioning_and_attention_parameters_change(fitted):
    synth = fitted["synth"]
    names = synth.trainable_names()
    # DP-LDM's subset: the class embedding and the attention blocks' norms and q/k/v/out, nothing else.
    assert "class_embedding.weight" in names
    assert all(n == "class_embedding.weight" or ".attentions." in n for n in names)
    for part in ("group_norm", "to_q", "to_k", "to_v", "to_out"):
        assert any(part in n for n in names if n.startswith("down_blocks.")), part
        assert any(part in n for n in names if n.startswith("mid_block.")), part
    after = synth.generator_net.state_dict()
    changed = {k for k, v in fitted["unet_before"].items() if not torch.equal(v, after[k])}
    assert changed and changed <= set(names)
    assert "class_embedding.weight" in changed
    assert all(torch.equal(v, synth.autoencoder.state_dict()[k]) for k, v in fitted["ae_before"].items())
    total = sum(p.numel() for p in synth.generator_net.parameters())
    trainable = sum(p.numel() for n, p in synth.generator_net.named_parameters() if n in set(names))
    assert fitted["report"].extra["trainable_parameters"] == trainable < total


def test_a_latent_unet_without_attention_or_from_a_unet_checkpoint_is_refused(tmp_path):
    """DP-LDM fine-tunes attention: a UNet without any is refused at construction (before a job reads data), and
    so is a pixel-space UNet checkpoint (the latent UNet must come with the autoencoder its latents are from)."""
    from dpdistill.errors import SpecError

    with pytest.raises(SpecError, match="attention"):
        make(attention=[False, False], mid_attention=False)
    with pytest.raises(SpecError, match="base_checkpoint"):
        make(base_checkpoint=str(tmp_path))
    assert make(attention=[False, False], mid_attention=True).trainable_names()


def test_the_pretrainings_are_cached_by_key(tmp_path, monkeypatch):
    from dpdistill.synthesis.diffusion import pretrain as unet_pretrain
    from dpdistill.synthesis.diffusion.objective import NoiseSchedule
    from dpdistill.synthesis.diffusion.unet import UNetConfig

    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path))
    first = make()
    first.pretrain(glyphs())
    assert first.ae_ref["trained_now"] and first.base_ref["trained_now"]
    again = make()
    again.pretrain(glyphs())
    assert not again.ae_ref["trained_now"] and not again.base_ref["trained_now"]  # both hit
    assert (again.ae_ref["key"], again.base_ref["key"]) == (first.ae_ref["key"], first.base_ref["key"])
    assert again.latent_scale == first.latent_scale
    assert all(torch.equal(v, first.generator_net.state_dict()[k]) for k, v in again.generator_net.state_dict().items())
    # Another autoencoder (training only: the same architecture and latent shape): both stages miss.
    other = make(ae_kl_weight=0.01)
    other.pretrain(glyphs())
    assert other.ae_ref["trained_now"] and other.ae_ref["key"] != first.ae_ref["key"]
    assert other.base_ref["trained_now"] and other.base_ref["key"] != first.base_ref["key"]
    # The latent UNet's key names the autoencoder's even where the latents' content hash could not tell them apart.
    unet = UNetConfig(image_size=4, channels=2, block_out_channels=(16, 16), attention=(False, False), norm_num_groups=8)
    schedule = NoiseSchedule()
    keys = {unet_pretrain.cache_key(unet, schedule, unet_pretrain.PretrainConfig(autoencoder_key=ae), "same")[0]
            for ae in ("a" * 64, "b" * 64)}
    assert len(keys) == 2
    # A pixel-space key is what it was before the latent option existed (its cache entries still hit).
    assert "autoencoder_key" not in unet_pretrain.cache_key(unet, schedule, unet_pretrain.PretrainConfig(), "x")[1]


def test_the_latent_scale_comes_from_the_public_set_only(fitted):
    from dpdistill.data.base import ImageSet
    from dpdistill.synthesis.diffusion.autoencoder import encode, latent_scaling_factor
    from dpdistill.training.dp_sgd import train_dp_sgd

    public_scale = latent_scaling_factor(fitted["synth"].autoencoder, glyphs(), fitted["synth"].ae_config())
    assert fitted["synth"].latent_scale == pytest.approx(public_scale, rel=1e-5)
    # The sampler's x̂_0 clip is the public latents' range too (their 99.9th percentile of |z|).
    public = encode(fitted["synth"].autoencoder, glyphs().images, fitted["synth"].ae_config(), public_scale).abs()
    assert fitted["synth"].latent_clip == pytest.approx(float(public.flatten().quantile(0.999)), rel=1e-3)
    # A sensitive set at a tenth of the contrast: its own factor would be far from the public one.
    train = digits()
    dim = ImageSet(train.images * 0.1, train.labels, train.num_classes, "dim-digits")
    synth = make()
    synth.pretrain(glyphs())  # a cache hit: the same public autoencoder and scale
    own_scale = latent_scaling_factor(synth.autoencoder, dim, synth.ae_config())
    assert abs(own_scale / public_scale - 1) > 0.2
    seen: dict[str, torch.Tensor] = {}

    def executor(objective, state, images, labels, schedule, noise):
        seen["inputs"] = images
        return train_dp_sgd(objective, state, images, labels, schedule, noise)

    report = synth.fit(dim, PrivacyLedger(None, 4.0, 1e-5), executor=executor)
    assert synth.latent_scale == report.extra["latent_scaling_factor"] == fitted["synth"].latent_scale
    assert synth.latent_clip == fitted["synth"].latent_clip
    # DP-SGD trained on the frozen public encoder's latents of the sensitive images, scaled by the PUBLIC factor.
    expected = encode(synth.autoencoder, dim.images, synth.ae_config(), fitted["synth"].latent_scale)
    assert torch.equal(seen["inputs"], expected)


def test_the_release_is_the_fine_tuned_subset_and_cache_keys(fitted, tmp_path, monkeypatch):
    from dpdistill.synthesis.base import Synthesizer

    synth = fitted["synth"]
    state = synth.state()
    assert set(state["generator"]) == set(synth.trainable_names())
    assert not _tensors(state["extra"])  # no autoencoder or base weights beside the subset
    assert state["extra"]["ae_ref"]["kind"] == state["extra"]["base_ref"]["kind"] == "pretrain"
    here, _ = synth.generate(n_per_class=2, seed=9)
    loaded = Synthesizer.load(synth.save(tmp_path / "synth.pt"))  # the base and autoencoder from the cache
    assert torch.equal(loaded.generate(n_per_class=2, seed=9)[0], here)
    # On another node (no cache): the saved release needs its public parts; a transport state carries them.
    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path / "another-node"))
    with pytest.raises(Exception, match="checkpoint"):
        Synthesizer.from_state(synth.state())
    there = Synthesizer.from_state(synth.transport_state())
    assert torch.equal(there.generate(n_per_class=2, seed=9)[0], here)


def test_generation_is_images_in_range_and_deterministic_in_the_seed(fitted, monkeypatch):
    from dpdistill.synthesis.diffusion import autoencoder

    synth = fitted["synth"]
    decoded: list[torch.Tensor] = []
    real_decode = autoencoder.decode
    monkeypatch.setattr(autoencoder, "decode", lambda ae, z, *a, **k: decoded.append(z) or real_decode(ae, z, *a, **k))
    images, labels = synth.generate(n_per_class=3, seed=5)
    # DDIM's last step returns its x̂_0, clipped to the public latents' range (unclipped, the cosine schedule's
    # final ᾱ ≈ 2e-9 blows latents up by orders of magnitude).
    assert len(decoded) == 1 and float(decoded[0].abs().max()) <= synth.latent_clip + 1e-5
    assert images.shape == (30, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(labels, torch.arange(10).repeat_interleave(3))
    assert torch.equal(synth.generate(n_per_class=3, seed=5)[0], images)
    assert not torch.equal(synth.generate(n_per_class=3, seed=6)[0], images)


def test_the_latent_objective_and_latents_travel_to_ray_train_workers(fitted):
    """What a sharded fit ships to each Ray Train worker: the latent objective (with the fine-tuned start state)
    and the pre-encoded latents. Through Ray's own pickler, the copy builds the same network, trains the same
    parameters and gives the same losses (the 2-worker Ray Train path itself: tests/test_diffusion_jobs.py)."""
    import ray.cloudpickle as cloudpickle

    synth = fitted["synth"]
    objective = synth.objective(synth.generator_net.state_dict())
    copy = cloudpickle.loads(cloudpickle.dumps(objective))
    latents = synth.training_inputs(digits().images[:6])
    labels = torch.arange(6)
    assert copy.latent and latents.shape[1] == TINY["ae_latent_channels"]
    nets = [o.build() for o in (objective, copy)]
    assert [n for n, _ in nets[0].named_parameters()] == [n for n, _ in nets[1].named_parameters()]
    assert [p.shape for p in objective.trainable(nets[0])] == [p.shape for p in copy.trainable(nets[1])]
    rows = [o.losses(net, latents, labels, 2, torch.Generator().manual_seed(3)) for o, net in zip((objective, copy),
                                                                                               nets, strict=True)]
    assert torch.equal(rows[0], rows[1])
    latents_copy = cloudpickle.loads(cloudpickle.dumps(latents))
    assert torch.equal(latents_copy, latents)


def test_a_synthesize_job_charges_its_plan_and_writes_only_declared_keys(tmp_path, cache):
    import mlflow

    from dpdistill.pipelines.synthesize_job import disclosure_for
    from dpdistill.privacy.disclosure import undeclared
    from dpdistill.runner import run_job
    from dpdistill.spec import validate_spec

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    doc = {
        "name": "dp-ldm-job", "kind": "synthesize", "seed": 0, "data": {"name": "digits"},
        "privacy": {"epsilon": 4.0},
        "method": {"name": "dp-ldm", "pretrain": "glyphs", **TINY, "n_per_class": 5, "fidelity": False},
        "evaluation": {"epochs": 1, "seeds": 1, "parallel": False, "model_options": {"width": 8}},
        "tracking": {"enabled": True, "uri": uri, "experiment": "dp-ldm"},
    }
    result = run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    art = result.run_dir / "artifacts"
    plan = json.loads((art / "plan.json").read_text())
    ledger = json.loads((result.run_dir / "ledger.json").read_text())
    assert [e["mechanism"] for e in ledger["entries"]] == [c["mechanism"] for c in plan["charges"]]
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(result.mlflow_run_id)
    keys = set(run.data.metrics) | set(run.data.params) | set(json.loads((result.run_dir / "metrics.json").read_text()))
    keys |= set(_flatten(json.loads((art / "fit_report.json").read_text())))
    assert {"trainable_parameters", "latent_scaling_factor", "noise_sigma"} <= keys
    assert undeclared(keys, disclosure_for("dp-ldm")) == []


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []
