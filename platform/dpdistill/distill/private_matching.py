"""DP matching, shared by NDPDC, PSG and DP-GenG: the private real side of a matching distiller, set up once.

One step, for every class c: a Poisson batch of the class's sensitive records (each record of class c in the
batch independently with probability q_c = min(1, B / n_c), B the expected batch size), each record's
contribution (its feature vector for NDPDC and DP-GenG, its whole loss gradient for PSG) clipped to L2 norm C,
the clipped contributions summed, N(0, (σC)² I) added, and the sum divided by B. The synthetic side goes
through the same clipping where it is compared feature to feature. The tensor-level pieces (sampling,
clipping, noise, the σ solver) are :mod:`dpdistill.privacy.dp_ops`; this module adds what knows about
matching networks and synthetic sets, and :func:`start_private`, the whole setup of a private matcher.

Sensitivity. Under add-or-remove-one, a record changes only its own class's sum (it is never sampled into
another class's batch), and by at most its clipped contribution: norm ≤ C. Contributions must therefore be
computed record by record: a network whose output on one record depends on the other records of the batch
(batch norm in training mode) breaks the bound, and :func:`check_per_record_network` refuses it.

Accounting. Per class a step is a Poisson-subsampled Gaussian at rate q_c ≤ q_max; the classes are disjoint
partitions of the split, so one step over all classes costs one class's step (parallel composition, the
argument below), and the charge uses q_max so that it bounds every class (:func:`feature_matching_mechanism`).
Class sizes n_c set the rates and are treated as public, as the NDPDC, PSG and DP-GenG papers do (and as
DP-SGD treats the split size). The whole matching stage is charged once, before its first release
(:func:`charge_matching`); σ is solved from what the ledger leaves unless the config fixes it.

Randomness. The Poisson masks and the noise come from a :class:`~dpdistill.privacy.noise.PrivacyRandomness`
(secret: OS entropy), never from the seed: a public mask would void the subsampling amplification and public
noise could be subtracted. The DSA parameters shared by the real and synthetic sides come from the seeded
generator: they are drawn whatever the data, and the clipped sum's sensitivity is C for any fixed augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpdistill.distill.augment import DSA, siamese_pair
from dpdistill.distill.dm import Matching, start_matching
from dpdistill.distill.loop import RunArgs
from dpdistill.distill.losses import feature_mean_distance
from dpdistill.distill.synthetic import Normalizer, SyntheticSet
from dpdistill.errors import SpecError
from dpdistill.privacy import Parallel, PoissonGaussian
from dpdistill.privacy.dp_ops import PoissonClassSampler, clip_rows, clipped_sum, noisy_mean, solve_free_sigma
from dpdistill.privacy.noise import PrivacyRandomness

PARALLEL_ARGUMENT = (
    "per-class partitions of the sensitive training split: each record has exactly one label and is only ever "
    "Poisson-sampled into its own class's batch, so adding or removing it changes one class's noisy sum; the "
    "charge uses the largest per-class sampling rate, which bounds every class"
)
CLASS_SIZES_NOTE = "class sizes of the sensitive split are treated as public (they set the per-class rates)"


def feature_matching_mechanism(q: float, sigma: float, steps: int, classes: int) -> Parallel:
    """A whole DP matching stage as one charge: ``steps`` Poisson-Gaussian steps, parallel over classes."""
    return Parallel(PoissonGaussian(q, sigma, steps), classes, PARALLEL_ARGUMENT)


def charge_matching(ledger: Any, component: str, sampler: PoissonClassSampler, steps: int, sigma: float | None,
                    clip: float, note: str = "") -> float | None:
    """Charge ``steps`` DP matching steps over every class of ``sampler`` to ``ledger``; returns the σ used.

    ``sigma`` None: the σ that fills what the ledger leaves (:func:`~dpdistill.privacy.dp_ops.solve_free_sigma`).
    No steps: nothing is charged and ``sigma`` comes back as given.
    """
    if steps <= 0:
        return sigma

    def make(s: float) -> Parallel:
        return feature_matching_mechanism(sampler.max_rate, s, steps, sampler.num_classes)

    sigma = sigma if sigma is not None else solve_free_sigma(ledger, make)
    ledger.charge(component, make(sigma), note=f"clip C={clip:g}; {CLASS_SIZES_NOTE}{note}")
    return sigma


def check_per_record_network(net: nn.Module, what: str) -> None:
    """Refuse networks whose per-record outputs depend on the rest of the batch (training-mode batch norm)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise SpecError(
                f"{what}: batch norm in training mode mixes records, so per-record clipping would not bound the "
                "sensitivity; use net_norm 'instance', 'group', 'layer' or 'none'"
            )


@dataclass
class PrivateSide:
    """The private real side of a matcher: its Poisson sampler, privacy randomness, clip C and (charged) σ."""

    sampler: PoissonClassSampler
    noise: PrivacyRandomness
    clip: float
    sigma: float | None


def start_private(method: str, component: str, real: Any, cfg: Any, seed: int | torch.Generator, steps: int,
                  **options: Any) -> tuple[Matching, PrivateSide]:
    """Set up a private matcher (NDPDC, PSG): its :class:`~dpdistill.distill.dm.Matching` (from noise, with public
    statistics), a Poisson sampler per class, and its ``steps`` matching steps charged as ``component``.

    ``options`` are the run function's :class:`~dpdistill.distill.loop.PrivateRunOptions`. Nothing reads the
    sensitive records before the charge but the class sizes (public, see above).
    """
    args = RunArgs.private(method, **options)
    m = start_matching(real, cfg, seed, args)
    sampler = PoissonClassSampler(real, cfg.batch_real, m.device)
    sigma = charge_matching(args.ledger, component, sampler, steps, cfg.sigma, cfg.clip)
    m.syn.sigma = sigma  # type: ignore[attr-defined]  # what the run used, for reports
    return m, PrivateSide(sampler, args.noise, cfg.clip, sigma)


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
    The caller must have charged the ledger for this step (see :func:`charge_matching`).
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
