"""DP feature matching (DP-GenG stage e, and the core of NDPDC): noisy per-class feature means of sensitive data.

One step, for every class c: a Poisson batch of the class's sensitive records (each record of class c in the
batch independently with probability q_c = min(1, B / n_c), B the expected batch size), each record's feature
vector clipped to L2 norm C, the clipped vectors summed, N(0, (σC)² I) added, and the sum divided by B. The
synthetic images' features go through the same clipping, so both means live in the same ball.

Sensitivity. Under add-or-remove-one, a record changes only its own class's sum (it is never sampled into
another class's batch), and by at most its clipped vector: norm ≤ C. Features must therefore be computed
record by record: a network whose output on one record depends on the other records of the batch (batch
norm in training mode) breaks the bound, and :func:`check_per_record_network` refuses it.

Accounting. Per class a step is a Poisson-subsampled Gaussian at rate q_c ≤ q_max; the classes are disjoint
partitions of the split, so one step over all classes costs one class's step (parallel composition, the
argument below), and the charge uses q_max so that it bounds every class. Class sizes n_c set the rates and
are treated as public, as the NDPDC, PSG and DP-GenG papers do (and as DP-SGD treats the split size).

Randomness. The Poisson masks and the noise come from a :class:`~dpdistill.privacy.noise.PrivacyRandomness`
(secret: OS entropy), never from the seed: a public mask would void the subsampling amplification and public
noise could be subtracted. The DSA parameters shared by the real and synthetic sides come from the seeded
generator: they are drawn whatever the data, and the clipped sum's sensitivity is C for any fixed augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dpdistill.distill.augment import DSA, siamese_pair
from dpdistill.distill.losses import feature_mean_distance
from dpdistill.distill.synthetic import Normalizer, SyntheticSet
from dpdistill.errors import DataError, SpecError
from dpdistill.privacy import Parallel, PoissonGaussian
from dpdistill.privacy.noise import PrivacyRandomness

PARALLEL_ARGUMENT = (
    "per-class partitions of the sensitive training split: each record has exactly one label and is only ever "
    "Poisson-sampled into its own class's batch, so adding or removing it changes one class's noisy sum; the "
    "charge uses the largest per-class sampling rate, which bounds every class"
)
CLASS_SIZES_NOTE = "class sizes of the sensitive split are treated as public (they set the per-class rates)"


def clip_rows(features: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale every row of ``features`` [N, D] to L2 norm at most ``clip`` (differentiable)."""
    norms = features.norm(dim=1, keepdim=True)
    return features * (clip / norms.clamp_min(1e-12)).clamp(max=1.0)


def clipped_sum(features: torch.Tensor, clip: float) -> torch.Tensor:
    """The sum of the clipped rows [D]: the query whose add-or-remove-one sensitivity is ``clip``."""
    return clip_rows(features, clip).sum(dim=0)


def noisy_mean(total: torch.Tensor, clip: float, sigma: float, expected: float,
               noise: PrivacyRandomness) -> torch.Tensor:
    """``(total + N(0, (sigma * clip)^2 I)) / expected``: the released, noisy mean of one class's features.

    The noise is drawn from ``noise`` (which refuses a non-positive std rather than release no noise).
    """
    return noise.add_gaussian(total, sigma * clip) / expected


def feature_matching_mechanism(q: float, sigma: float, steps: int, classes: int) -> Parallel:
    """The whole DP feature-matching stage as one charge: ``steps`` Poisson-Gaussian steps, parallel over classes."""
    return Parallel(PoissonGaussian(q, sigma, steps), classes, PARALLEL_ARGUMENT)


def check_per_record_network(net: nn.Module, what: str) -> None:
    """Refuse networks whose per-record outputs depend on the rest of the batch (training-mode batch norm)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise SpecError(
                f"{what}: batch norm in training mode mixes records, so per-record clipping would not bound the "
                "sensitivity; use net_norm 'instance', 'group', 'layer' or 'none'"
            )


def private_normalizer(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int,
                       device: str | torch.device) -> Normalizer:
    """A normaliser from given (public) statistics, else the data-independent 0.5 / 0.5: never from the data."""
    mean = list(mean) if mean is not None else [0.5] * channels
    std = list(std) if std is not None else [0.5] * channels
    return Normalizer(mean, std, device)


class PoissonClassSampler:
    """Poisson sampling within each class of a sensitive ImageSet, at rate q_c = min(1, B / n_c) per class."""

    def __init__(self, real: Any, expected_batch: int, device: str | torch.device = "cpu") -> None:
        if expected_batch < 1:
            raise SpecError(f"batch_real: expected a positive expected batch size, got {expected_batch}")
        self.images = real.images.to(device)
        self.indices = [idx.to(device) for idx in real.per_class_indices()]
        empty = [c for c, idx in enumerate(self.indices) if len(idx) == 0]
        if empty:
            raise DataError(f"{getattr(real, 'name', 'dataset')}: class {empty[0]} has no records to match against")
        self.expected = float(expected_batch)
        self.rates = [min(1.0, expected_batch / len(idx)) for idx in self.indices]

    @property
    def num_classes(self) -> int:
        return len(self.indices)

    @property
    def max_rate(self) -> float:
        """The largest per-class rate: the q every charge uses, so it bounds every class."""
        return max(self.rates)

    def expected_size(self, c: int) -> float:
        """The expected batch size of class ``c`` (q_c * n_c): what its noisy sum is divided by."""
        return self.rates[c] * len(self.indices[c])

    def sample(self, c: int, noise: PrivacyRandomness) -> torch.Tensor:
        """A Poisson batch of class ``c``'s images (possibly empty): each record kept with probability q_c.

        The mask comes from ``noise`` (the privacy source): which records were used must stay secret.
        """
        idx = self.indices[c]
        keep = noise.poisson_mask(len(idx), self.rates[c])
        return self.images[idx[keep.to(idx.device)]]


def dp_feature_matching_loss(
    net: nn.Module,
    syn: SyntheticSet,
    sampler: PoissonClassSampler,
    normalize: Normalizer,
    dsa: DSA | None,
    clip: float,
    sigma: float,
    *,
    noise: PrivacyRandomness,
    generator: torch.Generator,
    chunk: int = 512,
) -> torch.Tensor:
    """One DP feature-matching step over every class: sum over classes of ||noisy real mean - mean clip(f(syn))||².

    Each class's real batch and synthetic images share one DSA parameter set (drawn from the seeded
    ``generator``: data-independent); the Poisson batch and the noise come from ``noise``. The real side is
    computed without gradients and released only as its noisy mean, so the returned loss is a function of
    the noisy (charged) targets and the synthetic images alone. It is differentiable w.r.t. ``syn.images``.
    The caller must have charged the ledger for this step (see :func:`feature_matching_mechanism`).
    """
    targets, syns, sizes = [], [], []
    for c in range(syn.num_classes):
        xr = normalize(sampler.sample(c, noise))
        xs = normalize(syn.class_images(c))
        xr, xs = siamese_pair(dsa, xr, xs, generator)
        with torch.no_grad():
            total = torch.zeros(net_feature_dim(net, xs), device=xs.device)
            for start in range(0, len(xr), chunk):
                total += clipped_sum(net.embed(xr[start:start + chunk]), clip)
            targets.append(noisy_mean(total, clip, sigma, sampler.expected_size(c), noise))
        syns.append(xs)
        sizes.append(len(xs))
    f_syn = clip_rows(net.embed(torch.cat(syns)), clip).split(sizes)
    return torch.stack([feature_mean_distance(t.unsqueeze(0), s) for t, s in zip(targets, f_syn, strict=True)]).sum()


def net_feature_dim(net: nn.Module, x: torch.Tensor) -> int:
    """The network's embedding size (its ``feature_dim``, else measured on one input)."""
    dim = getattr(net, "feature_dim", None)
    if dim is not None:
        return int(dim)
    with torch.no_grad():
        return int(net.embed(x[:1]).shape[1])
