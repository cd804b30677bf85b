"""The diffusion model parts (synthesis/diffusion): UNet, DP-SGD objective, DDIM sampler, pre-training, LoRA.

Tiny networks throughout; the per-sample-gradient test is the one that guards DP-SGD's correctness on the UNet
(attention and class embedding included), the glyph test the one that shows training + sampling actually work.
"""

from __future__ import annotations

import pickle
import warnings
from types import SimpleNamespace

import pytest
import torch

from dpdistill.data.glyphs import render
from dpdistill.errors import DataError, SpecError
from dpdistill.synthesis.diffusion import pretrain as pretrain_mod
from dpdistill.synthesis.diffusion.lora import LoraSpec, adapter_state, load_adapter_state
from dpdistill.synthesis.diffusion.objective import DiffusionObjective, NoiseSchedule
from dpdistill.synthesis.diffusion.pretrain import PretrainConfig, load_checkpoint, pretrain
from dpdistill.synthesis.diffusion.sampler import sample
from dpdistill.synthesis.diffusion.unet import UNetConfig, build_unet, from_model, to_model, unet_config_of

# Two resolutions, attention in the low-resolution down/up blocks and in the middle block.
TINY = UNetConfig(block_out_channels=(8, 16), attention=(False, True), mid_attention=True, norm_num_groups=4,
                  num_classes=10)
# Four blocks: 28 is not divisible by 8, so the network runs at 32 and images are padded / cropped.
PADDED = UNetConfig(block_out_channels=(8, 8, 16, 16), attention=(False, False, False, True), norm_num_groups=4,
                    num_classes=10)

# No attention: the CPU attention backward dominates a tiny net's step; the training test needs speed only.
FAST = UNetConfig(block_out_channels=(8, 16), attention=(False, False), mid_attention=False, norm_num_groups=4,
                  num_classes=10)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10


# ---------------------------------------------------------------------------------------------- the UNet


def test_unet_config_sizes_and_round_trip():
    assert TINY.model_size == 28 and PADDED.model_size == 32
    net = build_unet(PADDED, seed=0)
    assert net.config.num_class_embeds == 11  # 10 classes + the null label
    assert unet_config_of(net, image_size=28) == PADDED
    x, _ = _batch()
    padded = to_model(x, PADDED)
    assert padded.shape[-1] == 32 and padded.min() >= -1 and padded.max() <= 1
    assert torch.allclose(from_model(padded, PADDED), x, atol=1e-6)
    with pytest.raises(SpecError):
        UNetConfig(block_out_channels=(8, 16), attention=(True,))
    with pytest.raises(SpecError):
        UNetConfig(sample_size=30)  # not divisible by 4


# ----------------------------------------------------------------------------------------- the objective


def test_objective_one_loss_per_row_and_deterministic_under_its_generator():
    obj = DiffusionObjective(unet=TINY, label_dropout=0.5)
    net = obj.build()
    x, y = _batch(3)
    rows = obj.losses(net, x, y, 4, torch.Generator().manual_seed(7))
    assert rows.shape == (12,) and torch.isfinite(rows).all()
    again = obj.losses(net, x, y, 4, torch.Generator().manual_seed(7))
    assert torch.equal(rows, again)
    other = obj.losses(net, x, y, 4, torch.Generator().manual_seed(8))
    assert not torch.equal(rows, other)
    # A record's K rows carry independent timesteps / noise (not one draw repeated), and the dropout coin
    # sends some rows to the null label.
    xt, t, y_rows, _ = obj.noising(x, y, 4, torch.Generator().manual_seed(7))
    assert xt.shape == (12, 1, 28, 28) and len(set(t[:4].tolist())) > 1
    assert (y_rows == TINY.null_label).any() and torch.equal(y_rows[y_rows != 10], y.repeat_interleave(4)[y_rows != 10])
    # The network's init comes from the public seed, not the global RNG, and survives pickling (Ray workers).
    torch.manual_seed(123)
    a = obj.build().state_dict()
    torch.manual_seed(456)
    b = pickle.loads(pickle.dumps(obj)).build().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Partial fine-tuning (DP-LDM style): only the named parts are trainable, the rest is frozen.
    partial = DiffusionObjective(unet=TINY, train_only=("attentions", "class_embedding"))
    pnet = partial.build()
    names = {n for n, p in pnet.named_parameters() if p.requires_grad}
    assert names and all("attentions" in n or "class_embedding" in n for n in names)
    assert len(partial.trainable(pnet)) == len(names)


def _per_row_grads_match(obj: DiffusionObjective) -> None:
    from opacus import GradSampleModule

    net = obj.build().double()
    params = obj.trainable(net)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert len(names) == len(params)
    x, y = _batch(3)
    xt, t, yr, noise = obj.noising(x.double(), y, 2, torch.Generator().manual_seed(1))
    # The engine's setting: hooks on the submodules, loss reduction "sum", strict module validation.
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conv_in's input needs no grad: torch warns about its full hook
        ((net(xt, t, class_labels=yr).sample - noise).pow(2).flatten(1).mean(1)).sum().backward()
    per_row = [p.grad_sample.detach().clone() for p in params]
    gsm.remove_hooks()
    for i in range(len(xt)):
        net.zero_grad(set_to_none=True)
        (net(xt[i:i + 1], t[i:i + 1], class_labels=yr[i:i + 1]).sample - noise[i:i + 1]).pow(2).mean().backward()
        for name, p, g in zip(names, params, per_row, strict=True):
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            assert torch.allclose(g[i], ref, rtol=1e-7, atol=1e-10), f"row {i}: {name}"
    touched = " ".join(names)
    assert "class_embedding" in touched or obj.lora is not None
    assert "attentions" in touched and "mid_block" in touched


def test_gradsample_per_row_grads_equal_row_at_a_time_on_the_unet():
    # Failed before contiguous_conv_inputs: the convs after an attention block got wrong per-sample grads.
    _per_row_grads_match(DiffusionObjective(unet=TINY, label_dropout=0.5))


def test_gradsample_per_row_grads_equal_row_at_a_time_on_lora_adapters():
    _per_row_grads_match(DiffusionObjective(unet=TINY, label_dropout=0.5, lora=LoraSpec(rank=2, alpha=2)))


# ------------------------------------------------------------------------------------------- the sampler


def test_sampler_shape_range_and_seed_determinism():
    obj = DiffusionObjective(unet=PADDED)
    net = obj.build()
    labels = torch.tensor([0, 3, 9, 9, 1])
    a = sample(net, obj.schedule, labels, steps=4, guidance_scale=2.0, seed=5, batch_size=2, image_size=28)
    assert a.shape == (5, 1, 28, 28) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    b = sample(net, obj.schedule, labels, steps=4, guidance_scale=2.0, seed=5, batch_size=2, image_size=28)
    assert torch.equal(a, b)
    c = sample(net, obj.schedule, labels, steps=4, guidance_scale=2.0, seed=6, batch_size=2, image_size=28)
    assert not torch.equal(a, c)
    stochastic = sample(net, obj.schedule, labels, steps=4, eta=1.0, seed=5, batch_size=2, image_size=28)
    assert not torch.equal(a, stochastic)
    with pytest.raises(SpecError):
        sample(net, obj.schedule, [10], steps=2)  # the null label is not a class


class _OracleDenoiser(torch.nn.Module):
    """Predicts the exact ε for a known clean image per class: DDIM must then return those images."""

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__()
        self.targets = targets * 2 - 1
        self.config = SimpleNamespace(num_class_embeds=len(targets) + 1, sample_size=28, in_channels=1)
        self.abar = NoiseSchedule().alphas_cumprod()

    def forward(self, x, t, class_labels=None):
        a = self.abar[t]
        clean = self.targets[class_labels.clamp(max=len(self.targets) - 1)]
        return SimpleNamespace(sample=(x - a.sqrt() * clean) / (1 - a).sqrt())


def test_ddim_with_an_exact_denoiser_recovers_the_clean_images():
    # Checks the sampler's schedule, timesteps and update against the objective's forward process: a sign,
    # a scale or a timestep off by a stride would leave noise in the output.
    targets = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = sample(_OracleDenoiser(targets), NoiseSchedule(), [3, 1, 4, 1, 5], steps=10, guidance_scale=1.0, seed=2)
    assert torch.allclose(out, targets[[3, 1, 4, 1, 5]], atol=1e-4)


# ------------------------------------------------------------------------------------------ pre-training


def _nn_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the L2 distance to the nearest reference image."""
    return float(torch.cdist(samples.flatten(1), reference.flatten(1)).min(1).values.mean())


def test_pretraining_on_glyphs_lowers_the_loss_and_samples_look_like_glyphs(tmp_path):
    glyphs = render(num_per_class=40, seed=0)  # 400 public images (a small slice, as the registry renders them)
    cfg = PretrainConfig(steps=300, lr=2e-3, batch_size=32, seed=0)
    done = pretrain(FAST, NoiseSchedule(), cfg, cache_root=tmp_path, public=glyphs)
    assert done.trained and done.conditional and len(done.losses) == 300
    first, last = sum(done.losses[:30]) / 30, sum(done.losses[-30:]) / 30
    assert last < 0.7 * first, (first, last)
    labels = torch.arange(20) % 10
    trained = sample(done.load(), NoiseSchedule(), labels, steps=20, guidance_scale=1.0, seed=0)
    untrained = sample(build_unet(FAST, seed=0), NoiseSchedule(), labels, steps=20, guidance_scale=1.0, seed=0)
    noise = torch.rand(trained.shape, generator=torch.Generator().manual_seed(0))
    d_trained = _nn_distance(trained, glyphs.images)
    # Measured: about 12 after 200 steps, 9.7 after 800; untrained nets and uniform noise give 14-15.
    assert d_trained < 0.9 * _nn_distance(untrained, glyphs.images)
    assert d_trained < 0.9 * _nn_distance(noise, glyphs.images)


def test_pretrain_cache_hits_on_the_same_key_and_misses_when_the_config_changes(tmp_path, monkeypatch):
    glyphs = render(num_per_class=4, seed=1)
    calls = []
    real_train = pretrain_mod._train

    def counting(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pretrain_mod, "_train", counting)
    cfg = PretrainConfig(steps=3, batch_size=8)
    first = pretrain(TINY, None, cfg, cache_root=tmp_path, public=glyphs)
    second = pretrain(TINY, None, cfg, cache_root=tmp_path, public=glyphs)
    assert (first.trained, second.trained, len(calls)) == (True, False, 1)
    assert second.path == first.path == pretrain_mod.entry_dir(first.key, tmp_path)
    assert second.losses == first.losses
    assert (first.path / "config.json").is_file()
    pretrain(TINY, None, PretrainConfig(steps=4, batch_size=8), cache_root=tmp_path, public=glyphs)
    assert len(calls) == 2
    pretrain(TINY, NoiseSchedule(beta_schedule="linear"), cfg, cache_root=tmp_path, public=glyphs)
    assert len(calls) == 3
    other_data = render(num_per_class=4, seed=2)
    pretrain(TINY, None, cfg, cache_root=tmp_path, public=other_data)
    assert len(calls) == 4
    # The cached weights are what fine-tuning starts from.
    state = second.state_dict()
    obj = DiffusionObjective(unet=TINY, init_state=state)
    built = obj.build().state_dict()
    assert all(torch.equal(built[k], state[k]) for k in state)


def test_concurrent_callers_of_one_key_train_it_once(tmp_path, monkeypatch):
    """Two callers of the same key at once (Ray tasks on one node, parallel test workers): one trains, the other
    waits for it and loads its entry; without the key's lock both would train and replace the directory."""
    import threading
    import time

    glyphs = render(num_per_class=4, seed=1)
    calls = []
    real_train = pretrain_mod._train

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(1.0)  # the other caller arrives while this one trains
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pretrain_mod, "_train", slow)
    cfg = PretrainConfig(steps=3, batch_size=8)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pretrain(TINY, None, cfg, cache_root=tmp_path,
                                                                       public=glyphs))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r.trained for r in results) == [False, True]
    assert results[0].path == results[1].path and results[0].losses == results[1].losses
    assert results[0].state_dict().keys() == results[1].state_dict().keys()


def test_load_checkpoint_refuses_missing_dirs_hub_ids_and_mismatches(tmp_path):
    with pytest.raises(DataError, match="not an existing local directory"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(DataError, match="hub ids are refused"):
        load_checkpoint("google/ddpm-cifar10-32")
    with pytest.raises(DataError, match="config.json"):
        load_checkpoint(tmp_path)
    build_unet(TINY, seed=0).save_pretrained(tmp_path / "ckpt")
    net = load_checkpoint(tmp_path / "ckpt", expect=TINY)
    assert unet_config_of(net, image_size=28) == TINY
    with pytest.raises(DataError, match="channels"):
        load_checkpoint(tmp_path / "ckpt", expect=UNetConfig(**{**TINY.to_dict(), "channels": 3}))
    with pytest.raises(DataError, match="class embeddings"):
        load_checkpoint(tmp_path / "ckpt", expect=UNetConfig(**{**TINY.to_dict(), "num_classes": 5}))


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapters_and_the_adapter_state_round_trips():
    spec = LoraSpec(rank=2, alpha=4)
    base_state = build_unet(TINY, seed=3).state_dict()
    obj = DiffusionObjective(unet=TINY, init_state=base_state, lora=spec)
    net = obj.build()
    params = obj.trainable(net)
    adapters = {n for n, p in net.named_parameters() if "lora_" in n}
    assert adapters and {n for n, p in net.named_parameters() if p.requires_grad} == adapters
    assert len(params) == len(adapters)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(params, lr=0.5)
    x, y = _batch(4)
    for step in range(2):  # two steps: B starts at zero, so A only moves from the second
        opt.zero_grad()
        obj.losses(net, x, y, 1, torch.Generator().manual_seed(step)).mean().backward()
        opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    release = adapter_state(net)
    assert set(release) == {k for k in after if "lora_" in k}
    fresh = obj.build()  # same base, freshly initialised adapters
    xt, t, yr, _ = obj.noising(x, y, 1, torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = net(xt, t, class_labels=yr).sample
        assert not torch.allclose(fresh(xt, t, class_labels=yr).sample, want)
        load_adapter_state(fresh, release)
        assert torch.equal(fresh(xt, t, class_labels=yr).sample, want)
    with pytest.raises(SpecError, match="non-adapter"):
        load_adapter_state(fresh, {**release, "conv_in.weight": before["conv_in.weight"]})
    with pytest.raises(SpecError, match="no adapters"):
        load_adapter_state(build_unet(TINY), release)


def test_pretrain_seed_shares_one_public_base_between_synthesisers_of_different_seeds(tmp_path, monkeypatch):
    """DP-GenG builds its generator with a seed derived from the job's: ``pretrain_seed`` lets it reuse the synth
    job's cached base instead of pre-training its own; without it the seed stays part of the key."""
    from dpdistill import synthesis

    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path))
    glyphs = render(num_per_class=4, seed=1)
    opts = {"block_out_channels": [8, 16], "attention": [False, False], "mid_attention": False,
            "norm_num_groups": 4, "pretrain_iterations": 3, "pretrain_batch": 8}

    def base(seed: int, **extra) -> dict:
        synth = synthesis.create("pdp-diffusion", channels=1, image_size=28, num_classes=10, seed=seed,
                                 **opts, **extra)
        synth.pretrain(glyphs)
        return synth.base_ref

    first = base(0)
    shared = base(398764591, pretrain_seed=0)
    own = base(398764591)
    assert first["trained_now"] and not shared["trained_now"] and own["trained_now"]
    assert shared["key"] == first["key"] != own["key"]
    with pytest.raises(SpecError, match="pretrain_seed"):
        synthesis.create("pdp-diffusion", channels=1, image_size=28, num_classes=10, seed=0, pretrain_seed=-1)
