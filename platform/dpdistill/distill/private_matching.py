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

Decoupled matching (``matching: decoupled``; the idea of Dosser, "Improving Noise Efficiency in
Privacy-preserving Dataset Distillation"). Instead of a fresh noisy statistic per step, a fixed bank of K
matching networks (public: random networks from the seed, or networks trained on DP outputs) and A fixed DSA
parameter sets (public, drawn from the seed) define one feature map per record: the concatenation over the
bank of its features averaged over the A augmentations (:class:`MatchingBank`). Each record's whole
concatenated vector is clipped to L2 norm C (one clip for all K networks, so a record moves its class's sum by
at most C however large K is), every class's clipped sum is released ONCE with N(0, (σC)² I) and divided by the
class size (public, as above), and the synthetic set is then optimised against those released means for any
number of steps: post-processing, no further charge. The charge is one Gaussian release, parallel over the
classes (:func:`decoupled_mechanism`, :func:`charge_decoupled`), σ from the same solver. The synthetic side goes
through the same map (same bank, same A augmentations, same clip), so target and synthetic statistic are one
function of the images. Real images are read only inside :func:`release_targets`, before the loop. Where
public or DP-generated images exist (DP-GenG), the bank features can first be projected onto a subspace learned
from them (:meth:`MatchingBank.fit_projection`): fewer noised coordinates, the same sensitivity C.

Randomness. The Poisson masks and the noise come from a :class:`~dpdistill.privacy.noise.PrivacyRandomness`
(secret: OS entropy), never from the seed: a public mask would void the subsampling amplification and public
noise could be subtracted. The DSA parameters shared by the real and synthetic sides come from the seeded
generator: they are drawn whatever the data, and the clipped sum's sensitivity is C for any fixed augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dpdistill.distill import embedding
from dpdistill.distill.augment import DSA, DSAParams, siamese_pair
from dpdistill.distill.dm import Matching, start_matching
from dpdistill.distill.loop import RunArgs
from dpdistill.distill.losses import feature_mean_distance
from dpdistill.distill.synthetic import Normalizer, SyntheticSet
from dpdistill.errors import DataError, SpecError
from dpdistill.models.registry import mixes_records
from dpdistill.privacy import Gaussian, Parallel, PoissonGaussian
from dpdistill.privacy.dp_ops import PoissonClassSampler, clip_rows, clipped_sum, noisy_mean, solve_free_sigma
from dpdistill.privacy.noise import PrivacyRandomness

PARALLEL_ARGUMENT = (
    "per-class partitions of the sensitive training split: each record has exactly one label and is only ever "
    "Poisson-sampled into its own class's batch, so adding or removing it changes one class's noisy sum; the "
    "charge uses the largest per-class sampling rate, which bounds every class"
)
CLASS_SIZES_NOTE = "class sizes of the sensitive split are treated as public (they set the per-class rates)"
DECOUPLED_ARGUMENT = (
    "per-class partitions of the sensitive training split: each record has exactly one label and enters only its "
    "own class's clipped sum, so adding or removing it changes one class's noisy sum, by at most C"
)
DECOUPLED_CLASS_SIZES_NOTE = ("class sizes of the sensitive split are treated as public (each class's noisy sum "
                              "is divided by its size)")
MatchingMode = Literal["per-iteration", "decoupled"]


def feature_matching_mechanism(q: float, sigma: float, steps: int, classes: int) -> Parallel:
    """A whole DP matching stage as one charge: ``steps`` Poisson-Gaussian steps, parallel over classes."""
    return Parallel(PoissonGaussian(q, sigma, steps), classes, PARALLEL_ARGUMENT)


# A per-iteration matching step whose noise is at least as large as the largest possible signal is noise
# dominated: its per-class target is mostly noise, and matching it step after step fits the noise. Read on
# validation splits (single draws): MNIST at ε=1 (ratio ≈ 0.35) per-iteration 92.00 % vs decoupled 91.88 %;
# `digits` at ε=1 (ratio ≈ 4.2) per-iteration 14.6 % vs decoupled 44.9 %. DP-GenG's matching 'auto' switches
# to the single decoupled release at this ratio.
NOISE_DOMINATED_RATIO = 1.0


def matching_noise_ratio(sigma: float, dim: int, batch: float) -> float:
    """σ·√d / B: the expected norm of one per-iteration step's noise on a class's released mean, in units of C.

    The noise on a class's sum is N(0, (σC)² I_d), divided by the expected batch B; its norm is about σC√d / B.
    The clipped mean itself has norm at most C, so a ratio ≥ 1 means each step's target is mostly noise.
    Plan quantities only (σ, the feature width d, B): nothing read from the records.
    """
    if batch <= 0:
        raise ValueError(f"expected batch must be positive, got {batch}")
    return float(sigma) * float(dim) ** 0.5 / float(batch)


def per_iteration_sigma(ledger: Any, sampler: PoissonClassSampler, steps: int, sigma: float | None) -> float | None:
    """The σ :func:`charge_matching` would charge for ``steps`` steps of ``sampler``, WITHOUT charging.

    ``sigma`` given: itself; None: the σ that fills what the ledger leaves; no steps: ``sigma`` as given.
    """
    if steps <= 0 or sigma is not None:
        return sigma

    def make(s: float) -> Parallel:
        return feature_matching_mechanism(sampler.max_rate, s, steps, sampler.num_classes)

    return solve_free_sigma(ledger, make)


def charge_matching(ledger: Any, component: str, sampler: PoissonClassSampler, steps: int, sigma: float | None,
                    clip: float, note: str = "") -> float | None:
    """Charge ``steps`` DP matching steps over every class of ``sampler`` to ``ledger``; returns the σ used.

    ``sigma`` None: the σ that fills what the ledger leaves (:func:`per_iteration_sigma`).
    No steps: nothing is charged and ``sigma`` comes back as given.
    """
    if steps <= 0:
        return sigma
    sigma = per_iteration_sigma(ledger, sampler, steps, sigma)
    assert sigma is not None
    ledger.charge(component, feature_matching_mechanism(sampler.max_rate, sigma, steps, sampler.num_classes),
                  note=f"clip C={clip:g}; {CLASS_SIZES_NOTE}{note}")
    return sigma


def check_per_record_network(net: nn.Module, what: str) -> None:
    """Refuse networks whose per-record outputs depend on the rest of the batch (batch norm using batch
    statistics: in training mode, or without running statistics; :func:`~dpdistill.models.registry.mixes_records`)."""
    if mixes_records(net):
        raise SpecError(
            f"{what}: batch norm on batch statistics (training mode, or no running statistics) mixes records, so "
            "per-record clipping would not bound the sensitivity; use net_norm 'instance', 'group', 'layer' or 'none'"
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


def check_classes_present(real: Any) -> None:
    """Refuse a sensitive set with an empty class (nothing to match it against) BEFORE anything is charged:
    the releases would otherwise be paid for and then fail. Reads the class sizes only (public, see above)."""
    for c, idx in enumerate(real.per_class_indices()):
        if len(idx) == 0:
            raise DataError(f"{getattr(real, 'name', 'dataset')}: class {c} has no records to match against")


def start_decoupled(method: str, component: str, real: Any, cfg: Any, seed: int | torch.Generator,
                    **options: Any) -> tuple[Matching, MatchingBank, torch.Tensor | None]:
    """Set up a decoupled private matcher (NDPDC): its :class:`~dpdistill.distill.dm.Matching`, a bank of
    ``cfg.bank_size`` fresh random networks from the seed, the release charged as ``component`` and made.

    Returns the matching, the bank and the released per-class targets (None, and nothing charged, when
    ``cfg.iterations`` is 0: nothing would use them). ``cfg.sigma`` None: σ solved from what the ledger leaves.
    """
    args = RunArgs.private(method, **options)
    m = start_matching(real, cfg, seed, args)
    bank = MatchingBank([m.fresh_net() for _ in range(cfg.bank_size)], m.normalize, m.dsa, cfg.augmentations, m.g,
                        method)
    sigma, targets = cfg.sigma, None
    if cfg.iterations > 0:
        check_classes_present(real)
        sigma = charge_decoupled(args.ledger, component, real.num_classes, cfg.sigma, cfg.clip, cfg.bank_size,
                                 len(bank.params))
        targets = release_targets(bank, real, cfg.clip, sigma, args.noise)
    m.syn.sigma = sigma  # type: ignore[attr-defined]  # what the run used, for reports
    return m, bank, targets


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
    chunk: int = embedding.CHUNK,
    precision: embedding.Precision = "float32",
) -> torch.Tensor:
    """One DP feature-matching step over every class: sum over classes of ||noisy real mean - mean clip(f(syn))||².

    Each class's real batch and synthetic images share one DSA parameter set (drawn from the seeded
    ``generator``: data-independent); the Poisson batch and the noise come from ``noise``. The real side is
    computed without gradients and released only as its noisy mean, so the returned loss is a function of
    the noisy (charged) targets and the synthetic images alone. It is differentiable w.r.t. ``syn.images``.
    The caller must have charged the ledger for this step (see :func:`charge_matching`). ``precision`` is the
    real-side forward's (:func:`dpdistill.distill.embedding.embed_chunks`): the features it returns are float32
    and are clipped in float32, so the sensitivity bound holds either way.
    """
    targets, syns, sizes = [], [], []
    # The real side's network: for bfloat16, one low-precision copy per step (not one per class).
    precision = embedding.resolve_precision(precision, next(net.parameters()).device)
    real_net = embedding.low_precision(net) if precision == "bfloat16" else net
    for c in range(syn.num_classes):
        xr = normalize(sampler.sample(c, noise))
        xs = normalize(syn.class_images(c))
        xr, xs = siamese_pair(dsa, xr, xs, generator)
        with torch.no_grad():
            total = torch.zeros(net_feature_dim(net, xs), device=xs.device)
            for features in embedding.embed_chunks(real_net, xr, chunk, precision):
                total += clipped_sum(features, clip)
            targets.append(noisy_mean(total, clip, sigma, sampler.expected_size(c), noise))
        syns.append(xs)
        sizes.append(len(xs))
    f_syn = clip_rows(embedding.embed(net, torch.cat(syns)), clip).split(sizes)
    return torch.stack([feature_mean_distance(t.unsqueeze(0), s) for t, s in zip(targets, f_syn, strict=True)]).sum()


def net_feature_dim(net: nn.Module, x: torch.Tensor) -> int:
    """The network's embedding size (its ``feature_dim``, else measured on one input)."""
    dim = getattr(net, "feature_dim", None)
    if dim is not None:
        return int(dim)
    with torch.no_grad():
        return int(net.embed(x[:1]).shape[1])


# ------------------------------------------------------------------------------------------ decoupled matching


class DecoupledMatchingOptions(BaseModel):
    """The choice between per-iteration and decoupled DP matching, and the augmentations a decoupled release
    averages per record (a mixin of the NDPDC and DP-GenG configs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    matching: MatchingMode = Field(
        "per-iteration", description="'per-iteration': a fresh noisy real statistic every step, each charged; "
        "'decoupled': per-class noisy means under a fixed network bank released once, then free iterations")
    augmentations: int = Field(4, ge=1, description="decoupled only: fixed DSA draws averaged per record (real "
                               "and synthetic alike); 1 without DSA")


def decoupled_mechanism(sigma: float, clip: float, classes: int) -> Parallel:
    """A decoupled matching release as one charge: one Gaussian release of a sum of sensitivity ``clip`` (noise
    std σ·C), parallel over ``classes``."""
    return Parallel(Gaussian(sigma * clip, clip), classes, DECOUPLED_ARGUMENT)


def charge_decoupled(ledger: Any, component: str, classes: int, sigma: float | None, clip: float,
                     bank_size: int, augmentations: int, note: str = "") -> float:
    """Charge the single decoupled release (every class, every bank network) to ``ledger``; returns the σ used.

    ``sigma`` None: the σ that fills what the ledger leaves (:func:`~dpdistill.privacy.dp_ops.solve_free_sigma`,
    the one solver). Charged before anything is computed from the sensitive records.
    """

    def make(s: float) -> Parallel:
        return decoupled_mechanism(s, clip, classes)

    sigma = sigma if sigma is not None else solve_free_sigma(ledger, make)
    ledger.charge(component, make(sigma),
                  note=f"decoupled: one release of the clipped concatenated features under a bank of "
                       f"{bank_size} networks, {augmentations} augmentations averaged per record; clip C={clip:g}; "
                       f"{DECOUPLED_CLASS_SIZES_NOTE}{note}")
    return sigma


class MatchingBank:
    """A fixed bank of matching networks and augmentations: the feature map of decoupled matching.

    ``features(x)`` is, for every image of ``x``, the concatenation over the bank's networks of its embedding
    averaged over the bank's fixed DSA parameter sets (normalised first, as the per-iteration path does). Every
    parameter set is shared by every image (Siamese, n = 1), so an image's vector depends on that image and the
    public bank only, never on which other images share its batch: the premise of the per-record clip.

    Optionally (:meth:`fit_projection`) the vector is projected onto a d-dimensional subspace learned from
    public or DP-generated images: the clip then applies to the projection (same sensitivity C) and the
    release noises d coordinates instead of ΣD.
    """

    def __init__(self, nets: list[nn.Module], normalize: Normalizer, dsa: DSA | None, augmentations: int,
                 generator: torch.Generator, what: str = "decoupled matching") -> None:
        if not nets:
            raise SpecError(f"{what}: the matching bank needs at least one network")
        for net in nets:
            check_per_record_network(net, what)
        self.nets = [embedding.prepare(net) for net in nets]
        self.normalize = normalize
        self.dsa = dsa
        # Drawn from the seeded generator: data-independent, so public (as the per-iteration DSA draws are).
        self.params: list[DSAParams | None] = ([dsa.sample(1, generator) for _ in range(augmentations)]
                                               if dsa is not None else [None])
        self.projection: torch.Tensor | None = None  # [ΣD, d], orthonormal columns; None: no projection

    @property
    def raw_dim(self) -> int:
        """ΣD: the size of the concatenated bank features before any projection."""
        return sum(int(net.feature_dim) for net in self.nets)

    def fit_projection(self, public_images: torch.Tensor, dim: int, chunk: int = 512) -> None:
        """Project the bank's features onto their top-``dim`` principal directions on ``public_images``.

        ``public_images`` must be public or DP output (DP-GenG: its generated set), never the sensitive split:
        the subspace is not charged. The directions are the leading eigenvectors of the UNcentred second
        moment, so the span keeps the mean directions that class means are made of. SpecError when ``dim``
        does not reduce anything.
        """
        if not 1 <= dim < self.raw_dim:
            raise SpecError(f"projection_dim: expected 1 <= d < {self.raw_dim} (the bank's feature size), got {dim}")
        self.projection = None
        device = self.normalize.mean.device
        with torch.no_grad():
            feats = torch.cat([self.features(public_images[s:s + chunk].to(device))
                               for s in range(0, len(public_images), chunk)]).double()
            _, vectors = torch.linalg.eigh(feats.T @ feats)  # ascending eigenvalues
        self.projection = vectors[:, -dim:].flip(1).to(torch.float32)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The bank's feature vectors [N, ΣD] (or [N, d], projected) of pixel-space images ``x``
        (differentiable w.r.t. ``x``)."""
        xn = self.normalize(x)
        views = [xn if p is None or self.dsa is None else self.dsa.apply(xn, p) for p in self.params]
        f = torch.cat([torch.stack([embedding.embed(net, v) for v in views]).mean(dim=0) for net in self.nets], dim=1)
        return f if self.projection is None else f @ self.projection

    def clipped_sum(self, images: torch.Tensor, clip: float, chunk: int = embedding.CHUNK) -> torch.Tensor:
        """Σ_i clip_C(features(x_i)) over pixel-space ``images``, no gradient: the query a release noises.

        Each record's WHOLE concatenated vector is clipped once, so one record moves the sum by at most C.
        """
        device = self.normalize.mean.device
        with torch.no_grad():
            parts = [clipped_sum(self.features(images[s:s + chunk].to(device)), clip)
                     for s in range(0, len(images), chunk)]
        return torch.stack(parts).sum(dim=0)


def release_targets(bank: MatchingBank, real: Any, clip: float, sigma: float, noise: PrivacyRandomness,
                    chunk: int = embedding.CHUNK) -> torch.Tensor:
    """The decoupled release [classes, ΣD or d]: per class, (Σ clip_C(features) + N(0, (σC)² I)) / n_c.

    The only place decoupled matching reads the sensitive records, and it returns their noisy means alone.
    The caller must have charged the release (:func:`charge_decoupled`). n_c, the class size, is public
    (see :data:`DECOUPLED_CLASS_SIZES_NOTE`).
    """
    targets = []
    for c, idx in enumerate(real.per_class_indices()):
        if len(idx) == 0:
            raise DataError(f"{getattr(real, 'name', 'dataset')}: class {c} has no records to match against")
        total = bank.clipped_sum(real.images[idx], clip, chunk)
        targets.append(noisy_mean(total, clip, sigma, float(len(idx)), noise))
    return torch.stack(targets)


def decoupled_matching_loss(bank: MatchingBank, syn: SyntheticSet, targets: torch.Tensor,
                            clip: float) -> torch.Tensor:
    """Sum over classes of ||released mean - mean clip_C(features(syn))||²: a function of the released targets
    and the synthetic images alone (post-processing), differentiable w.r.t. ``syn.images``."""
    per_class = [syn.class_images(c) for c in range(syn.num_classes)]
    f_syn = clip_rows(bank.features(torch.cat(per_class)), clip).split([len(x) for x in per_class])
    return torch.stack([feature_mean_distance(t.unsqueeze(0), s) for t, s in zip(targets, f_syn, strict=True)]).sum()
