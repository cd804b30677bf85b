"""DP-NTK (Yang et al., AISTATS 2023): DP-MERF with neural-tangent-kernel features instead of Fourier ones.

The features are the unit-normalised parameter gradient of a random one-hidden-layer ReLU network
(:class:`~dpdistill.synthesis.features.NTKFeatures`); the release and the generator training are DP-MERF's
(:class:`~dpdistill.synthesis.dp_merf.MeanEmbeddingSynthesizer`): one Gaussian release of the per-class
feature sums and counts, sensitivity 1 under add-or-remove-one.

The sums run over every batch of the sensitive set (``labelled_feature_sum``); a release computed from the
first batch only would describe a few hundred records while being divided by the noisy count of all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpdistill.synthesis.dp_merf import MEAN_EMBEDDING_DISCLOSURE, MeanEmbeddingSynthesizer
from dpdistill.synthesis.features import NTKFeatures


@dataclass
class DPNTKConfig:
    """DP-NTK options; defaults suit MNIST-scale data."""

    ntk_width: int = 800  # hidden units of the random network (features: width × (d + 2))
    count_weight: float = 0.1
    z_dim: int = 10
    gen_width: int = 16
    gen_hidden: int = 256
    iterations: int = 1000
    batch_size: int = 200
    lr: float = 1e-3
    pretrain_iterations: int = 1000
    embed_batch_size: int = 1000


class DPNTK(MeanEmbeddingSynthesizer):
    """DP-NTK: empirical-NTK mean embedding, one Gaussian release, generator matched to it."""

    name = "dp-ntk"
    config_type = DPNTKConfig
    paper_neighbouring = "replace-one"
    privacy_note = ("paper: mean embedding, replace-one sensitivity 2/n; here: per-class sums and counts of "
                    "unit-norm NTK features, add-or-remove sensitivity 1, one Gaussian release")
    disclosure = MEAN_EMBEDDING_DISCLOSURE

    def feature_map(self) -> NTKFeatures:
        d = self.channels * self.image_size * self.image_size
        return NTKFeatures(d, self.config.ntk_width, seed=self.seed + 202).to(self.device)

    def class_sums(self, fmap: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fmap.class_sums(x, y, self.num_classes)
