"""DP-MEPF (Harder, Jalali Asadabadi, Sutherland, Park, TMLR 2023): DP-MERF's single release, with PERCEPTUAL
features of a network trained on public data beside (or instead of) the random Fourier features.

DP-MERF's Gaussian kernel on raw pixels sees little of what makes a digit a digit; a feature extractor trained
on public images of the same kind does. The paper embeds each record with the first (and second) moments of a
public-pretrained network's activations and shows large gains over DP-MERF at equal ε. Here the extractor is DC's
ConvNet trained on the public set named as the synthesiser's pretraining set (on grey 28×28 data: the rendered
`glyphs`), so it costs no privacy; with ImageNet-scale weights one would point it at a pretrained ResNet/VGG.

Release. Every record (x, y) contributes ``[a·(r·rff(x) ⊕ p·ψ(x)) ⊗ e_y, b·e_y]``: rff(x) are DP-MERF's unit-norm
random Fourier features, ψ(x) the extractor's activations after each block, average-pooled to a ``grid``×``grid``
map per channel (grid 1: the paper's per-channel first moments), with their second moments when
``second_moment`` is on, normalised to unit norm per record; r² + p² = 1 (``perceptual_weight`` = p) and
a² + b² = 1 (b = ``count_weight``). So each record's vector has norm exactly 1, and the per-class sums and counts
are released together by ONE Gaussian mechanism of L2 sensitivity 1 under add-or-remove-one, as in DP-MERF
(:class:`~dpdistill.synthesis.dp_merf.MeanEmbeddingSynthesizer`); the generator is then fitted to the noisy means
at no further cost. The extractor's weights come from public data and a public seed only.

Public data is required: :meth:`pretrain` trains the extractor (``extractor_epochs`` over the public set, seeded
from the synthesiser's seed) and then pretrains the generator on the public set's own embedding, as DP-MERF's
pretraining does. A fit without it is refused before anything is charged. The extractor's weights are saved with
the release (public: they never saw a sensitive record), so ``release_mmd`` can be recomputed from the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dpdistill.errors import SpecError
from dpdistill.privacy.plan import Plan
from dpdistill.synthesis.dp_merf import DPMERF, MEAN_EMBEDDING_DISCLOSURE, DPMERFConfig


@dataclass
class DPMEPFConfig(DPMERFConfig):
    """DP-MEPF options: DP-MERF's, plus the perceptual features' (defaults suit MNIST-scale grey data)."""

    # p: the perceptual part's share of each record's unit norm (the rest: RFF); 0 is DP-MERF, 1 perceptual only
    perceptual_weight: float = field(default=0.8, metadata={"zero_ok": True})
    grid: int = 2  # each block's activations average-pooled to grid x grid per channel (1: channel means)
    second_moment: bool = True  # also the pooled squares (the paper's second moments)
    extractor_width: int = 32  # DC ConvNet trained on the public set
    extractor_depth: int = 3
    extractor_epochs: int = 3
    extractor_batch: int = 128
    extractor_lr: float = 0.01


class PerceptualFeatures(nn.Module):
    """ψ(x): a frozen ConvNet's pooled block activations (and their squares), unit norm per image."""

    def __init__(self, net: nn.Module, mean: float, std: float, grid: int, second_moment: bool) -> None:
        super().__init__()
        self.net = net.eval()
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.mean, self.std = mean, std
        self.grid, self.second_moment = grid, second_moment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.mean) / self.std
        parts = []
        layers = list(self.net.features)
        for i, layer in enumerate(layers):
            h = layer(h)
            if i + 1 == len(layers) or isinstance(layers[i + 1], nn.Conv2d):  # the end of a block
                parts.append(F.adaptive_avg_pool2d(h, self.grid).flatten(1))
                if self.second_moment:
                    parts.append(F.adaptive_avg_pool2d(h * h, self.grid).flatten(1))
        psi = torch.cat(parts, dim=1)
        return psi / psi.norm(dim=1, keepdim=True).clamp_min(1e-12)


class DPMEPF(DPMERF):
    """DP-MEPF: random-Fourier plus public-perceptual mean embedding, one Gaussian release, generator matched."""

    name = "dp-mepf"
    config_type = DPMEPFConfig
    paper_neighbouring = "replace-one"
    privacy_note = ("paper: mean embedding of public-pretrained perceptual features, replace-one sensitivity 2/n; "
                    "here: per-class sums and counts of unit-norm [RFF, perceptual] vectors, add-or-remove "
                    "sensitivity 1, one Gaussian release; the extractor is trained on public data only")
    disclosure = MEAN_EMBEDDING_DISCLOSURE
    needs_public: ClassVar[bool] = True  # the extractor is trained on a public set (pretrain)

    extractor_state: dict[str, torch.Tensor] | None = None
    extractor_stats: tuple[float, float] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        if not 0 <= c.perceptual_weight <= 1:
            raise SpecError(f"{self.name}: perceptual_weight must lie in [0, 1], got {c.perceptual_weight}")
        self._perceptual: PerceptualFeatures | None = None

    # -- the public extractor ---------------------------------------------------------------------------------

    def _build_extractor(self) -> nn.Module:
        from dpdistill import models

        c = self.config
        return models.get("convnet", channels=self.channels, num_classes=self.num_classes,
                          image_size=self.image_size, width=c.extractor_width, depth=c.extractor_depth)

    def _train_extractor(self, public: Any) -> None:
        from dpdistill.evaluation.training import train_classifier

        c = self.config
        mean = float(public.images.mean())
        std = float(public.images.std().clamp_min(1e-6))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 303)
            net = self._build_extractor()
        train_classifier(net, public.images, public.labels, epochs=c.extractor_epochs, batch_size=c.extractor_batch,
                         lr=c.extractor_lr, mean=mean, std=std, device=self.device,
                         generator=torch.Generator().manual_seed(self.seed + 303))
        self.extractor_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        self.extractor_stats = (mean, std)
        self._perceptual = None

    def perceptual(self) -> PerceptualFeatures:
        if self.extractor_state is None or self.extractor_stats is None:
            raise SpecError(f"{self.name}: needs its feature extractor, trained on a public set: pretrain first "
                            "(a synthesize job's method.pretrain, DP-GenG's method.public; e.g. glyphs)")
        if self._perceptual is None:
            with torch.random.fork_rng(devices=[]):  # the weights are overwritten: keep the caller's RNG
                net = self._build_extractor()
            net.load_state_dict(self.extractor_state)
            self._perceptual = PerceptualFeatures(net.to(self.device), *self.extractor_stats, self.config.grid,
                                                  self.config.second_moment)
        return self._perceptual

    # -- features -----------------------------------------------------------------------------------------------

    def class_sums(self, fmap: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.config.perceptual_weight
        parts = [p * self.perceptual()(x)]
        if p < 1:
            parts.insert(0, math.sqrt(1.0 - p * p) * fmap(x))
        phi = torch.cat(parts, dim=1)
        return torch.zeros(self.num_classes, phi.shape[1], dtype=phi.dtype, device=phi.device).index_add(0, y, phi)

    # -- the contract ---------------------------------------------------------------------------------------------

    def check_plan(self, plan: Plan) -> None:
        """DP-MERF's check, and the public extractor must exist: refused here, before the charge. (The plan
        itself reads no features, so planners such as DP-GenG's may plan before pretraining.)"""
        super().check_plan(plan)
        self.perceptual()

    def _pretrain(self, public: Any, progress: bool) -> None:
        self._train_extractor(public)
        super()._pretrain(public, progress)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "extractor": self.extractor_state,
                "extractor_stats": list(self.extractor_stats) if self.extractor_stats else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.extractor_state = state.get("extractor")
        stats = state.get("extractor_stats")
        self.extractor_stats = (float(stats[0]), float(stats[1])) if stats else None
        self._perceptual = None
