"""A toy synthesiser and a toy private distiller: what a new method looks like, for the conformance suite.

Each is one class or function plus one registration (:func:`register_toys`); nothing else in the code base
names them. Both release noisy per-class means of the sensitive images, with noise from the method's
:class:`~dpdistill.privacy.noise.PrivacyRandomness` and the charge made before the release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dpdistill import distill, synthesis
from dpdistill.distill.synthetic import SyntheticSet
from dpdistill.privacy import Gaussian, Parallel, PrivacyLedger
from dpdistill.privacy.calibration import solve_sigma
from dpdistill.privacy.disclosure import ACCOUNTING
from dpdistill.privacy.noise import PrivacyRandomness, resolve
from dpdistill.synthesis.base import FitReport, Synthesizer, calibrate_for_ledger, fit_disclosure

SYNTH_NAME = "toy-mean-synth"
DISTILL_NAME = "toy-mean-distill"


def _class_sums(images: torch.Tensor, labels: torch.Tensor, num_classes: int, clip: float) -> torch.Tensor:
    """Σ over each class's records of the flattened image scaled to L2 norm ≤ 1 after dividing by ``clip``."""
    rows = images.flatten(1) / clip
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1.0)
    return torch.zeros(num_classes, rows.shape[1]).index_add(0, labels, rows)


# ---------------------------------------------------------------------------------------------- synthesiser


@dataclass
class ToySynthConfig:
    """Toy synthesiser options."""

    z_dim: int = 4
    clip: float = 6.0  # images are divided by this before the unit-norm clip (digits' norms are ~3-6)
    count_weight: float = 0.1
    spread: float = 0.05  # how far the latents move a generated image from its class mean


class ToyGenerator(nn.Module):
    """G(z, y) = released mean of class y + spread · W z, as images in [0, 1]."""

    def __init__(self, z_dim: int, num_classes: int, shape: tuple[int, int, int], spread: float,
                 persistent: bool = True) -> None:
        super().__init__()
        self.z_dim, self.shape, self.spread = z_dim, shape, spread
        self.register_buffer("means", torch.zeros(num_classes, math.prod(shape)), persistent=persistent)
        self.proj = nn.Linear(z_dim, math.prod(shape), bias=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.means[y] + self.spread * self.proj(z)).view(-1, *self.shape).clamp(0, 1)


class ToyMeanSynth(Synthesizer):
    """Releases noisy per-class sums and counts (one Gaussian release, add-or-remove sensitivity 1)."""

    name = SYNTH_NAME
    config_type = ToySynthConfig
    privacy_note = "per-class sums of clipped images and counts, sensitivity 1, one Gaussian release"
    disclosure = fit_disclosure(noise={"sigma": ACCOUNTING})
    saves_means: ClassVar[bool] = True  # the released means are part of the saved generator (a test turns it off)

    def build(self) -> nn.Module:
        c = self.config
        return ToyGenerator(c.z_dim, self.num_classes, (self.channels, self.image_size, self.image_size), c.spread,
                            persistent=self.saves_means)

    def _fit(self, sensitive: Any, ledger: PrivacyLedger, target_epsilon: float, progress: bool,
             callback: Any) -> FitReport:
        c = self.config
        b = c.count_weight
        a = math.sqrt(1 - b * b)  # (a·row, b·count) has norm ≤ 1 per record
        sigma = calibrate_for_ledger(ledger, lambda s: Gaussian(s, 1.0), target_epsilon)
        sums = _class_sums(sensitive.images, sensitive.labels, self.num_classes, c.clip)
        counts = torch.bincount(sensitive.labels, minlength=self.num_classes).float()
        ledger.charge(f"{self.name}/means", Gaussian(sigma, 1.0), note="toy: per-class sums and counts")
        noisy_sums = self.noise.add_gaussian(a * sums, sigma)
        noisy_counts = (self.noise.add_gaussian(b * counts, sigma) / b).clamp_min(1.0)
        with torch.no_grad():
            self.generator_net.means.copy_(noisy_sums * c.clip / (a * noisy_counts[:, None]))
        return FitReport(self.name, 0.0, ledger.delta, {"sigma": sigma}, [], steps=1)


# ---------------------------------------------------------------------------------------------- distiller


class ToyDistillConfig(BaseModel):
    """Toy distiller options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ipc: int = Field(1, ge=1)
    iterations: int = Field(3, ge=0, description="steps from the noise init towards the noisy class means")
    lr: float = Field(0.5, gt=0, le=1)
    clip: float = Field(6.0, gt=0)


def run_toy_distill(real: Any, cfg: ToyDistillConfig | None = None, seed: int | torch.Generator = 0, *,
                    ledger: Any = None, mean: Any = None, std: Any = None, device: Any = "cpu",
                    progress: bool = True, callback: Any = None,
                    noise: PrivacyRandomness | None = None) -> SyntheticSet:
    """Noise images (from the seed) moved ``iterations`` times towards noisy per-class means.

    One release per class of the clipped sum plus N(0, (σC)²), divided by the class size (public, as NDPDC and
    PSG treat it); the classes are disjoint, so the charge is one Parallel Gaussian, made before the release.
    """
    cfg = cfg if cfg is not None else ToyDistillConfig()
    noise = resolve(noise)
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    shape = (real.channels, real.image_size, real.image_size)
    syn = SyntheticSet.from_noise(real.num_classes, cfg.ipc, shape, g)
    if cfg.iterations == 0:
        return syn  # nothing read from the sensitive set, nothing charged

    def make(s: float) -> Parallel:
        return Parallel(Gaussian(s * cfg.clip, cfg.clip), real.num_classes,
                        "per-class partitions of the training split: each record has one label")

    sigma = solve_sigma(lambda s: ledger.would_cost(make(s)), ledger.epsilon_budget, 1.0, rel_tol=0.005).sigma
    sums = cfg.clip * _class_sums(real.images, real.labels, real.num_classes, cfg.clip)  # Σ rows clipped to C
    ledger.charge("toy/means", make(sigma), note="toy: per-class clipped sums")
    counts = torch.bincount(real.labels, minlength=real.num_classes).float()
    means = torch.stack([noise.add_gaussian(sums[c], sigma * cfg.clip) / counts[c]
                         for c in range(real.num_classes)]).view(-1, *shape)
    with torch.no_grad():
        for it in range(cfg.iterations):
            syn.images += cfg.lr * (means[syn.labels] - syn.images)
            syn.clamp_()
            if callback is not None:
                callback(it, 0.0)
    return syn


def register_toys() -> None:
    """Register both toys (one call each): afterwards every registry lists them and the suite runs on them."""
    synthesis.register(SYNTH_NAME, ToyMeanSynth)
    distill.register(DISTILL_NAME, run_toy_distill, ToyDistillConfig, private=True, disclosure={},
                     description="toy: noisy per-class means")
