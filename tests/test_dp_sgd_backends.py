"""DP-SGD's per-record backends (training/per_record.py): ghost clipping and torch.func compute the same clipped
per-record sum as opacus' hooks, clip every record to C, and leave the engine's one noise draw per step alone."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dp_objectives import ZeroGradient
from dpdistill.errors import PrivacyError, SpecError
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.training.dp_sgd import (
    ClassifierObjective,
    DPSGDSchedule,
    clipped_gradient_sum,
    resolve_grad_sample_mode,
    train_dp_sgd,
)
from dpdistill.training.per_record import choose_backend, ghost_support, open_backend

CLIP = 1.0
# Class 0's rows are weighted 1e-3 (their records' gradients are far inside the ball), class 1's 1e3 (far
# outside), the others 1.
CLASS_WEIGHTS = (1e-3, 1e3, 1.0, 1.0)


@dataclass(frozen=True)
class JitteredConvNet:
    """The registry's ConvNet (instance norm, in-place ReLUs, avg pooling) on 12×12 images; each of a record's K
    rows gets its own Gaussian jitter from the generator (drawn in draw_rows, outside the loss), so the K rows'
    gradients differ, and a per-class weight on the cross-entropy (CLASS_WEIGHTS)."""

    width: int = 6
    jitter: float = 0.5

    def build(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            from dpdistill import models

            return models.get("convnet", channels=2, num_classes=4, image_size=12, width=self.width, depth=2,
                              norm="instance")

    def trainable(self, net: nn.Module) -> list[nn.Parameter]:
        return list(net.parameters())

    def draw_rows(self, images, labels, multiplicity, generator):
        x = images.repeat_interleave(multiplicity, 0)
        x = x + self.jitter * torch.randn(x.shape, generator=generator)
        return x, labels.long().repeat_interleave(multiplicity, 0)

    def row_losses(self, net, x, y):
        w = torch.tensor(CLASS_WEIGHTS)[y]
        return w * F.cross_entropy(net(x), y, reduction="none")

    def losses(self, net, images, labels, multiplicity, generator):
        return self.row_losses(net, *self.draw_rows(images, labels, multiplicity, generator))


def _batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4  # records 0, 4 of class 0 (tiny gradients), 1, 5 of class 1 (huge)
    return torch.randn(n, 2, 12, 12, generator=g), labels


def _clipped(objective, mode: str, images, labels, k: int, clip: float = CLIP, physical: int = 256) -> torch.Tensor:
    net = objective.build()
    params = list(objective.trainable(net))
    for p in net.parameters():
        p.requires_grad_(any(p is q for q in params))
    backend = open_backend(mode, net, params)
    try:
        sums = clipped_gradient_sum(objective, net, params, images, labels, k, clip,
                                    torch.Generator().manual_seed(7), physical, backend)
    finally:
        backend.close()
    return torch.cat([s.reshape(-1) for s in sums])


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    assert float((a - b).norm()) <= rel * float(b.norm()), float((a - b).norm() / b.norm())


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", ["ghost", "functorch"])
def test_backend_equals_hooks_on_a_convnet_with_instance_norm(mode, k):
    """The clipped per-record sum of ``mode`` equals opacus hooks' on the same batch, the same generator draws
    and a record's K rows averaged before clipping (the rows differ: jitter). The batch holds records far
    inside the ball and far outside it (checked: their unclipped norms); a physical batch of 5 rows makes
    several chunks. Shown to fail by mutating per_record.py: grouping a record's K rows without the permute
    (rows of different records mixed), a 1 % error in the conv weight norms, GroupNorm's bias left out of
    the norm (ghost), the K row losses summed instead of averaged (functorch, K = 3)."""
    obj = JitteredConvNet()
    x, y = _batch()
    norms = torch.stack([_clipped(obj, "hooks", x[i:i + 1], y[i:i + 1], k, clip=1e12).norm() for i in range(len(x))])
    assert float(norms[y == 0].max()) < CLIP / 10 and float(norms[y == 1].min()) > 10 * CLIP  # the controls
    reference = _clipped(obj, "hooks", x, y, k, physical=5 * k)
    _close(_clipped(obj, mode, x, y, k, physical=5 * k), reference)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch"])
def test_every_record_contributes_at_most_C(mode):
    """One record at a time: a huge-gradient record's contribution has norm C (clipped, not dropped: fails if
    clipping is skipped, its raw norm is > 10 C), a tiny one keeps its own gradient (norm < C/10, equal to the
    unclipped one), and adding a huge record to a batch moves the sum by at most C."""
    obj = JitteredConvNet()
    x, y = _batch()
    for i in (0, 1):  # class 0 (tiny), class 1 (huge)
        one = _clipped(obj, mode, x[i:i + 1], y[i:i + 1], 3)
        raw = _clipped(obj, mode, x[i:i + 1], y[i:i + 1], 3, clip=1e12)
        assert float(one.norm()) <= CLIP * (1 + 1e-5)
        if y[i] == 1:
            assert float(raw.norm()) > 10 * CLIP and float(one.norm()) >= CLIP * (1 - 1e-4)
        else:
            _close(one, raw, 1e-5)
    steady = JitteredConvNet(jitter=0.0)  # the other records' rows must not change with the batch's draws
    rest = _clipped(steady, mode, x[2:], y[2:], 3)
    with_huge = _clipped(steady, mode, x[1:], y[1:], 3)
    assert float((with_huge - rest).norm()) <= CLIP * (1 + 1e-4)


def _tiny_unet_objective(variant: str = "full"):
    from dpdistill.synthesis.diffusion.lora import LoraSpec
    from dpdistill.synthesis.diffusion.objective import DiffusionObjective
    from dpdistill.synthesis.diffusion.unet import UNetConfig

    cfg = UNetConfig(image_size=8, block_out_channels=(8, 8), attention=(False, True), mid_attention=True,
                     norm_num_groups=4, attention_head_dim=4)
    if variant == "full":
        return DiffusionObjective(unet=cfg, train_timesteps=50)
    base = DiffusionObjective(unet=cfg, train_timesteps=50).build().state_dict()
    if variant == "lora":  # dp-lora: peft adapters (their lora_B starts at zero; the others are frozen)
        return DiffusionObjective(unet=cfg, train_timesteps=50, init_state=base, lora=LoraSpec(rank=2, alpha=2.0))
    # dp-ldm: a latent UNet, only the attention blocks and the class embedding trained
    return DiffusionObjective(unet=cfg, train_timesteps=50, init_state=base, latent=True,
                              train_only=("attentions", "class_embedding"))


@pytest.mark.parametrize("variant", ["full", "lora", "train_only"])
@pytest.mark.parametrize("mode", ["ghost", "functorch"])
def test_backend_equals_hooks_on_the_diffusion_unet_with_multiplicity(mode, variant):
    """The diffusers UNet (Conv2d, GroupNorm, attention's Linear on [n, T, d], the time MLP, the class
    Embedding) with K = 3 rows per record, each with its own timestep and noise: the same clipped sum as hooks
    (the objective draws its rows outside the loss, so every backend sees the same draws); also with only peft's
    LoRA adapters trainable (dp-lora) and with only attention + class embedding trainable (dp-ldm)."""
    obj = _tiny_unet_objective(variant)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(4, 1, 8, 8, generator=g), torch.tensor([0, 3, 3, 9])
    clip = 0.02  # about the median record norm here: some records clipped, some not
    _close(_clipped(obj, mode, x, y, 3, clip=clip), _clipped(obj, "hooks", x, y, 3, clip=clip))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch"])
def test_one_gaussian_draw_per_step_whatever_the_backend(mode):
    """train_dp_sgd with each grad_sample_mode: one PrivacyRandomness.gaussian call of std σ·C over all
    trainable coordinates per step (the backends compute the clipped sum only; none adds noise)."""
    draws = []

    class Counting(PrivacyRandomness):
        def gaussian(self, shape, std, device="cpu", dtype=torch.float32):
            draws.append((tuple(shape), std))
            return super().gaussian(shape, std, device, dtype)

    obj = JitteredConvNet(width=4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 2, 12, 12, generator=g), torch.randint(0, 4, (30,), generator=g)
    sched = DPSGDSchedule(sigma=1.1, q=0.3, steps=3, clip=0.5, n_records=30, lr=0.1, optimizer="sgd",
                          multiplicity=2, grad_sample_mode=mode)
    train_dp_sgd(obj, None, x, y, sched, Counting("reproducible", 1))
    n = sum(p.numel() for p in obj.build().parameters())
    assert draws == [((n,), sched.sigma * sched.clip)] * sched.steps


def test_noise_std_of_the_update_under_ghost_clipping():
    """Zero per-record gradients through the ghost backend: the update is the noise alone, std √T·σ·C/(q·n) per
    coordinate within 5 % (noise twice would be √2 too large, none zero)."""
    obj = ZeroGradient()
    sched = DPSGDSchedule(sigma=1.3, q=0.2, steps=8, clip=0.7, n_records=60, lr=1.0, optimizer="sgd",
                          grad_sample_mode="ghost")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, obj.d, generator=g)
    final = train_dp_sgd(obj, None, x, torch.zeros(60, dtype=torch.long), sched, PrivacyRandomness.reproducible(11))
    start = obj.build().state_dict()
    moved = torch.cat([(final[k] - start[k]).reshape(-1) for k in start])
    expected = math.sqrt(sched.steps) * sched.sigma * sched.clip / (sched.q * sched.n_records)
    assert abs(float(moved.std()) / expected - 1) < 0.05


def test_backends_train_to_the_same_state():
    """The whole engine (Poisson sampling, chunks, noise, optimiser) under reproducible randomness: ghost and
    functorch end at hooks' state."""
    obj = JitteredConvNet(width=4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 2, 12, 12, generator=g), torch.randint(0, 4, (30,), generator=g)

    def fit(mode):
        sched = DPSGDSchedule(sigma=0.5, q=0.3, steps=3, clip=0.5, n_records=30, lr=0.05, optimizer="sgd",
                              multiplicity=2, max_physical_batch=8, grad_sample_mode=mode)
        return train_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.reproducible(4))

    ref = fit("hooks")
    for mode in ("ghost", "functorch"):
        state = fit(mode)
        for name in ref:
            torch.testing.assert_close(state[name], ref[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ choice / refusals


class Scaled(nn.Module):
    """A layer ghost clipping has no rule for: a trainable per-feature scale used directly."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale


@dataclass(frozen=True)
class Custom:
    tied: bool = False

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        if self.tied:
            a, b = nn.Linear(4, 4), nn.Linear(4, 4)
            b.weight = a.weight
            return nn.Sequential(a, nn.Tanh(), b)
        return nn.Sequential(nn.Linear(4, 4), Scaled(4), nn.Linear(4, 2))

    def trainable(self, net):
        return list(net.parameters())

    def losses(self, net, images, labels, multiplicity, generator):
        return net(images.repeat_interleave(multiplicity, 0)).pow(2).sum(1)


def test_auto_is_ghost_where_exact_and_hooks_elsewhere():
    """auto: ghost for the ConvNet (and the UNet), hooks for a model with a layer ghost has no rule for; an
    explicit ghost there, or for tied weights, is refused before any step (never a wrong clip)."""
    assert resolve_grad_sample_mode(ClassifierObjective(model="convnet", image_size=12, options=(("width", 4),)),
                                    "auto") == "ghost"
    assert resolve_grad_sample_mode(_tiny_unet_objective(), "auto") == "ghost"
    assert resolve_grad_sample_mode(Custom(), "auto") == "hooks"
    net = Custom().build()
    assert "Scaled" in ghost_support(net, list(net.parameters()))
    with pytest.raises(SpecError, match="ghost"):
        resolve_grad_sample_mode(Custom(), "ghost")
    with pytest.raises(SpecError, match="tied"):
        resolve_grad_sample_mode(Custom(tied=True), "ghost")
    assert resolve_grad_sample_mode(Custom(tied=True), "auto") == "hooks"
    # And the auto-chosen hooks still trains it (same engine, other backend).
    x = torch.randn(20, 4)
    sched = DPSGDSchedule(sigma=1.0, q=0.5, steps=2, clip=1.0, n_records=20, lr=0.1)
    train_dp_sgd(Custom(), None, x, torch.zeros(20, dtype=torch.long), sched, PrivacyRandomness.reproducible(0))


def test_functorch_needs_randomness_outside_the_loss():
    """An objective without draw_rows/row_losses cannot be vmapped (its losses may draw from the generator):
    functorch is refused for it; auto never picks functorch."""
    with pytest.raises(SpecError, match="draw_rows"):
        resolve_grad_sample_mode(ZeroGradient(), "functorch")
    assert resolve_grad_sample_mode(ZeroGradient(), "auto") == "ghost"


@dataclass(frozen=True)
class DrawsInside(JitteredConvNet):
    """Claims draw_rows/row_losses but still draws randomness inside the loss."""

    def row_losses(self, net, x, y):
        return F.cross_entropy(net(x + torch.randn(x.shape)), y, reduction="none")


def test_functorch_refuses_randomness_inside_the_vmapped_loss():
    """vmap's randomness='error': a row loss that draws from the global RNG is an error, not per-record
    gradients of one shared draw."""
    x, y = _batch(4)
    with pytest.raises(RuntimeError, match="random"):
        _clipped(DrawsInside(), "functorch", x, y, 1)


@dataclass(frozen=True)
class InPlaceAfterLayer:
    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(4, 3)

    def trainable(self, net):
        return list(net.parameters())

    def losses(self, net, images, labels, multiplicity, generator):
        out = net(images)
        out.mul_(2.0)  # changes the captured output after the layer ran
        return out.pow(2).sum(1)


def test_ghost_refuses_a_layer_output_changed_in_place():
    """The output gradients ghost reads would be those of the changed tensor: refused, not mis-clipped."""
    with pytest.raises(PrivacyError, match="in place"):
        _clipped(InPlaceAfterLayer(), "ghost", torch.randn(5, 4), torch.zeros(5), 1)


def test_the_mode_is_part_of_the_schedule():
    """The choice is a public schedule field (in to_dict, so in checkpoints and plans); unknown modes refused."""
    sched = DPSGDSchedule(sigma=1.0, q=0.5, steps=1, clip=1.0, n_records=4, grad_sample_mode="ghost")
    assert sched.to_dict()["grad_sample_mode"] == "ghost"
    assert DPSGDSchedule(sigma=1.0, q=0.5, steps=1, clip=1.0, n_records=4).grad_sample_mode == "auto"
    with pytest.raises(SpecError, match="grad_sample_mode"):
        DPSGDSchedule(sigma=1.0, q=0.5, steps=1, clip=1.0, n_records=4, grad_sample_mode="fast")
    with pytest.raises(SpecError, match="grad_sample_mode"):
        choose_backend("fast", ZeroGradient(), nn.Linear(2, 2), [])


class Tokens(nn.Module):
    """Embedding with a padding row, LayerNorm on [n, T, d], and one Linear called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, idx):
        h = self.ln(self.emb(idx))
        h = torch.tanh(self.lin(torch.tanh(self.lin(h))))
        return self.out(h).mean((1, 2))


@dataclass(frozen=True)
class TokenRegression:
    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return Tokens()

    def trainable(self, net):
        return list(net.parameters())

    def losses(self, net, images, labels, multiplicity, generator):
        idx = images.long().repeat_interleave(multiplicity, 0)
        idx = (idx + torch.arange(multiplicity).repeat(len(images))[:, None]) % 7  # the K rows differ
        return (net(idx) - labels.float().repeat_interleave(multiplicity)) ** 2


@pytest.mark.parametrize("k", [1, 3])
def test_ghost_equals_per_record_autograd_on_embedding_layernorm_and_a_reused_layer(k):
    """Σ_i clip_C(mean_k ∇loss_ik) computed record by record with plain autograd equals ghost's, for the layers
    the ConvNet and UNet do not have: Embedding with padding_idx (its row gets no gradient), LayerNorm on a
    sequence, a Linear called twice (its two calls' positions are one record's). (Opacus 1.6's hooks give a
    wrong clipped sum here: its Embedding rule gives the padding row a gradient.) Shown to fail: without the
    padding mask in GhostBackend._embedding the difference is 0.2 to 0.6 of the reference norm."""
    from dpdistill.privacy.dp_ops import clip_tensor

    obj, clip = TokenRegression(), 0.3
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 7, (9, 5), generator=g).float(), torch.randn(9, generator=g)
    net = obj.build()
    params = list(net.parameters())
    reference = 0
    for i in range(len(x)):
        loss = obj.losses(net, x[i:i + 1], y[i:i + 1], k, None).mean()
        reference = reference + clip_tensor(torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]),
                                            clip)
    _close(_clipped(obj, "ghost", x, y, k, clip=clip), reference, 1e-5)
