"""The DDPM ε-prediction loss as a DP-SGD objective (``training.dp_sgd.DPObjective``), and its noise schedule.

One loss per ROW: each record is repeated K times (DPDM's noise multiplicity) and every row gets its own
timestep t ~ U{0, …, T-1}, its own Gaussian noise ε and its own label-dropout coin, so the engine can average a
record's K row gradients before clipping. Row loss = mean over pixels of (ε_θ(x_t, t, y) − ε)² with
x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε and x_0 the image scaled to [-1, 1] (and padded, see ``unet``), or, for a latent
UNet (``latent``, DP-LDM), the record's autoencoder latent as given (padded only). Every random draw comes from
the ``generator`` argument (the privacy source's on DP-SGD steps); the network's initialisation comes from the
public ``seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from dpdistill.errors import SpecError
from dpdistill.synthesis.diffusion.lora import LoraSpec, apply_lora
from dpdistill.synthesis.diffusion.unet import (
    UNetConfig,
    build_unet,
    contiguous_conv_inputs,
    pad_to_model,
    to_model,
)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process (public): T training timesteps and the β schedule; DDPM and DDIM share it.

    Default: the cosine schedule (``squaredcos_cap_v2``; beta_start / beta_end only shape ``linear`` and
    ``scaled_linear``). On 28×28 glyphs a small UNet trained for 800 steps gave recognisable glyphs with it and
    still noise with DDPM's linear schedule (this package's measurement; the linear one spends most
    timesteps at near-pure noise on small images).
    """

    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise SpecError(f"unknown beta_schedule '{self.beta_schedule}'; expected one of: "
                            f"{', '.join(BETA_SCHEDULES)}")
        if self.train_timesteps < 2 or not 0 < self.beta_start < self.beta_end < 1:
            raise SpecError("noise schedule: train_timesteps >= 2 and 0 < beta_start < beta_end < 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by diffusers' DDPMScheduler and DDIMScheduler."""
        return dict(num_train_timesteps=self.train_timesteps, beta_schedule=self.beta_schedule,
                    beta_start=self.beta_start, beta_end=self.beta_end, prediction_type="epsilon",
                    clip_sample=True)

    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t for t = 0 … T-1 (float32, cpu), exactly as diffusers' schedulers compute it."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.scheduler_kwargs()).alphas_cumprod.clone()


@dataclass(frozen=True, eq=False)  # identity equality: init_state holds tensors
class DiffusionObjective:
    """DP-SGD objective for the class-conditional UNet (picklable: it ships to Ray Train workers).

    ``init_state`` (e.g. pre-trained weights, a CPU state dict of the base UNet) is loaded before LoRA is
    applied; ``lora`` then trains only the adapters; otherwise ``train_only`` (substrings of parameter names,
    e.g. ``("attentions", "class_embedding")`` for DP-LDM-style partial fine-tuning) or, when empty, every
    parameter is trained. ``label_dropout`` is the probability a row's label is replaced by the null label.
    ``latent``: the "images" are autoencoder latents (DP-LDM, encoded before DP-SGD by a fixed public encoder),
    used as x_0 without the [0, 1] → [-1, 1] map.
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    label_dropout: float = 0.1
    init_state: dict[str, Tensor] | None = None
    lora: LoraSpec | None = None
    train_only: tuple[str, ...] = ()
    device: str = "cpu"
    seed: int = 0
    latent: bool = False

    def __post_init__(self) -> None:
        _ = self.schedule  # constructing it validates the schedule fields
        if not 0.0 <= self.label_dropout <= 1.0:
            raise SpecError(f"label_dropout must be in [0, 1], got {self.label_dropout}")
        if self.lora is not None and self.train_only:
            raise SpecError("diffusion objective: give lora or train_only, not both")
        object.__setattr__(self, "train_only", tuple(self.train_only))

    @property
    def schedule(self) -> NoiseSchedule:
        """The forward process this objective trains (hand it to the sampler)."""
        return NoiseSchedule(self.train_timesteps, self.beta_schedule, self.beta_start, self.beta_end)

    # ------------------------------------------------------------------------------------- DPObjective

    def build(self) -> nn.Module:
        """The UNet on ``device``: seeded init, then ``init_state``, then LoRA; frozen parameters marked so."""
        # The LoRA adapters draw their init too: keep both draws inside one seeded, forked RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = build_unet(self.unet)
            if self.init_state is not None:
                missing, unexpected = net.load_state_dict(self.init_state, strict=False)
                if missing or unexpected:
                    raise SpecError(f"diffusion objective: init_state does not fit the UNet config "
                                    f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
            if self.lora is not None:
                contiguous_conv_inputs(apply_lora(net, self.lora))  # the adapters' convs need it too
        wanted = {id(p) for p in self.trainable(net)}
        for p in net.parameters():
            p.requires_grad_(id(p) in wanted)
        return net.to(torch.device(self.device))

    def trainable(self, net: nn.Module) -> list[nn.Parameter]:
        """What DP-SGD trains: the LoRA adapters, the ``train_only`` matches, or everything (in module order)."""
        named = list(net.named_parameters())
        if self.lora is not None:
            chosen = [p for n, p in named if "lora_" in n]
        elif self.train_only:
            chosen = [p for n, p in named if any(s in n for s in self.train_only)]
        else:
            chosen = [p for _, p in named]
        if not chosen:
            raise SpecError("diffusion objective: no parameter is trainable (check lora.target_modules / "
                            "train_only against the UNet's parameter names)")
        return chosen

    def losses(self, net: nn.Module, images: Tensor, labels: Tensor, multiplicity: int,
               generator: torch.Generator) -> Tensor:
        """ε-prediction MSE per row, shape [B*K]; record i's rows are i*K … i*K+K-1."""
        device = next(net.parameters()).device
        return self.row_losses(net, *self.draw_rows(images.to(device), labels.to(device), multiplicity, generator))

    def draw_rows(self, images: Tensor, labels: Tensor, multiplicity: int,
                  generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every random draw of the rows (:meth:`noising`) outside the loss, so DP-SGD's functorch backend can
        vmap :meth:`row_losses` over records (``losses`` is exactly row_losses of draw_rows)."""
        return self.noising(images, labels.to(images.device), multiplicity, generator)

    def row_losses(self, net: nn.Module, xt: Tensor, t: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """ε-prediction MSE of each row (deterministic given the drawn rows)."""
        pred = net(xt, t, class_labels=y).sample
        return (pred - noise).pow(2).flatten(1).mean(1)

    def noising(self, images: Tensor, labels: Tensor, multiplicity: int,
                generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The rows' network inputs and target: (x_t, t, label or null, ε), each with B*K rows.

        Draws, in this order, from ``generator``: t, ε, then the label-dropout coins (when label_dropout > 0).
        """
        k = int(multiplicity)
        device = images.device
        x0 = pad_to_model(images, self.unet) if self.latent else to_model(images, self.unet)
        y = labels.to(dtype=torch.long)
        if k > 1:
            x0 = x0.repeat_interleave(k, 0)
            y = y.repeat_interleave(k, 0)
        rows = x0.shape[0]
        gdev = generator.device  # draws happen where the generator lives, then move to the data
        t = torch.randint(0, self.train_timesteps, (rows,), generator=generator, device=gdev).to(device)
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(device)
        if self.label_dropout > 0:
            drop = torch.rand(rows, generator=generator, device=gdev).to(device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.unet.null_label), y)
        abar = _alphas_cumprod(self.schedule).to(device=device, dtype=x0.dtype)[t].view(rows, 1, 1, 1)
        xt = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
        return xt, t, y, noise

@lru_cache(maxsize=8)
def _alphas_cumprod(schedule: NoiseSchedule) -> Tensor:
    # One diffusers scheduler per schedule and process, not one per DP-SGD step (callers never modify it).
    return schedule.alphas_cumprod()
