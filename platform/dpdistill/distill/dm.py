"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV'23). Not private.

Every iteration draws a fresh randomly initialised ConvNet and, for each class, a real batch and that class's
synthetic images; both go through DSA with one shared parameter set, and the loss is the sum over classes of
``||mean embed(real) - mean embed(syn)||^2``. SGD (momentum 0.5) updates the synthetic images.

Faithful to the reference (VICO-UoE/DatasetCondensation ``main_DM.py``) except: the set lives in pixel space
with lr in normalised units (see :mod:`dpdistill.distill.synthetic`), optionally clamped to [0, 1] after each
step (``clamp``, default on, so what is matched is what is released), and all classes are embedded in one
forward pass per side (identical for instance/group/layer norm; the reference's own path for batch norm), the
real side in cache-sized chunks on channels-last networks (:mod:`dpdistill.distill.embedding`: same result).
Also shared by DC, NDPDC and PSG: :class:`MatchingConfig`, :func:`build_net`, :class:`ClassSampler`, and
:func:`start_matching`, the setup of a matching run (:class:`Matching`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from dpdistill import models
from dpdistill.data.base import check_finite_pixels
from dpdistill.distill import embedding
from dpdistill.distill.augment import DEFAULT_STRATEGY, DSA, make_dsa, siamese_pair
from dpdistill.distill.loop import RunArgs, RunOptions, image_step
from dpdistill.distill.loop import (
    progress_steps as progress_steps,  # re-exported: SFDD's job uses it from here
)
from dpdistill.distill.losses import feature_mean_distance
from dpdistill.distill.options import CheckedNetworkOptions, RealPrecisionOptions
from dpdistill.distill.registry import register
from dpdistill.distill.synthetic import Normalizer, SyntheticSet, private_normalizer
from dpdistill.errors import DataError

if TYPE_CHECKING:
    from typing import Unpack


class MatchingConfig(CheckedNetworkOptions):
    """Options shared by the matching distillers (DM, DC): set size, init, augmentation, matching network."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ipc: int = Field(10, ge=1, description="images per class released (stored images per class x factor^2)")
    iterations: int = Field(1000, ge=0, description="outer iterations (a fresh network each)")
    batch_real: int = Field(256, ge=1, description="real images per class per matching step")
    lr_img: float = Field(1.0, gt=0, description="image learning rate, in normalised-image units")
    momentum: float = Field(0.5, ge=0, lt=1, description="SGD momentum of the image optimiser")
    init: Literal["real", "noise"] = "real"
    dsa_strategy: str = Field(DEFAULT_STRATEGY, description="'_'-joined DSA ops, or 'none'")
    dsa_mode: Literal["single", "all"] = "single"
    net: str = Field("convnet", description="matching network (models registry name)")
    net_width: int = Field(128, ge=1)
    net_depth: int = Field(3, ge=1)
    net_norm: str = "instance"
    net_act: str = "relu"
    net_pool: str = "avg"
    factor: int = Field(1, ge=1, description="multi-formation factor (IDC): each stored image holds factor^2")
    clamp: bool = Field(True, description="project the images onto [0, 1] after every step")

    @model_validator(mode="after")
    def _ipc_fits_factor(self) -> MatchingConfig:
        # Checked when the spec is validated, so a bad pair fails before any run folder exists.
        per = self.factor * self.factor
        if self.ipc % per:
            raise ValueError(f"ipc {self.ipc} is not a multiple of factor^2 = {per}")
        return self

    @property
    def stored_ipc(self) -> int:
        """Stored images per class: ``ipc / factor^2`` (a whole number: the validator checks ipc against factor)."""
        return self.ipc // (self.factor * self.factor)


class DMConfig(RealPrecisionOptions, MatchingConfig):
    """DM options (defaults: the paper's, 20,000 iterations; the quick-start uses a few hundred)."""

    iterations: int = Field(20000, ge=0, description="outer iterations (a fresh random network each)")
    lr_img: float = Field(1.0, gt=0, description="image learning rate, in normalised-image units")


# ------------------------------------------------------------------------------------------ shared helpers


def as_generator(seed: int | torch.Generator) -> torch.Generator:
    """A CPU generator from a seed (or the generator itself)."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def build_net(cfg: MatchingConfig, real: Any, generator: torch.Generator, device: torch.device) -> nn.Module:
    """A freshly initialised matching network, its weights drawn from ``generator`` (global RNG untouched).

    Its weights are in channels-last format (:func:`dpdistill.distill.embedding.prepare`: faster on CPU).
    """
    kwargs: dict[str, Any] = {}
    if cfg.net == "convnet":
        kwargs = dict(width=cfg.net_width, depth=cfg.net_depth, norm=cfg.net_norm, act=cfg.net_act, pool=cfg.net_pool)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = models.get(cfg.net, channels=real.channels, num_classes=real.num_classes,
                         image_size=real.image_size, **kwargs)
    return embedding.prepare(net.to(device))


class ClassSampler:
    """Random real batches of one class, drawn without replacement, from images kept on the matching device."""

    def __init__(self, real: Any, device: torch.device) -> None:
        self.images = real.images.to(device)
        self.labels = real.labels.to(device)
        self.indices = [idx.to(device) for idx in real.per_class_indices()]
        empty = [c for c, idx in enumerate(self.indices) if len(idx) == 0]
        if empty:
            raise DataError(f"{getattr(real, 'name', 'dataset')}: class {empty[0]} has no records to match against")

    def batch(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Up to ``n`` random pixel-space images of class ``c``."""
        idx = self.indices[c]
        pick = torch.randperm(len(idx), generator=generator)[:n].to(idx.device)
        return self.images[idx[pick]]


def init_set(cfg: MatchingConfig, real: Any, generator: torch.Generator, device: torch.device) -> SyntheticSet:
    """The initial synthetic set the config asks for (real images of each class, or uniform noise)."""
    if cfg.init == "real":
        return SyntheticSet.from_real(real, cfg.stored_ipc, generator, cfg.factor, device)
    shape = (real.channels, real.image_size, real.image_size)
    return SyntheticSet.from_noise(real.num_classes, cfg.stored_ipc, shape, generator, cfg.factor, device=device)


def dsa_for(cfg: MatchingConfig) -> DSA | None:
    return make_dsa(cfg.dsa_strategy, cfg.dsa_mode)


def check_real(real: Any, cfg: MatchingConfig) -> None:
    """Refuse data the distillers cannot use (non-square images, non-finite pixels; ipc against factor is the
    config's own check)."""
    if real.images.shape[-1] != real.images.shape[-2]:
        raise DataError(f"{getattr(real, 'name', 'dataset')}: expected square images, got {tuple(real.images.shape)}")
    check_finite_pixels(real.images, getattr(real, "name", "dataset"))  # before anything is charged


@dataclass
class Matching:
    """A matching run as every matcher sets it up: config, data, device, seeded generator, set, normaliser, DSA."""

    cfg: Any
    real: Any
    device: torch.device
    g: torch.Generator  # the seeded, data-independent randomness: networks, init, DSA
    syn: SyntheticSet
    normalize: Normalizer
    dsa: DSA | None
    args: RunArgs

    def fresh_net(self, *, frozen: bool = True) -> nn.Module:
        """A freshly initialised matching network in training mode (its parameters frozen when ``frozen``)."""
        net = build_net(self.cfg, self.real, self.g, self.device)
        net.train()
        if frozen:
            for p in net.parameters():
                p.requires_grad_(False)
        return net

    def image_optimizer(self) -> torch.optim.Optimizer:
        """SGD with momentum on the synthetic images (learning rate in normalised-image units)."""
        return torch.optim.SGD([self.syn.images], lr=self.cfg.lr_img, momentum=self.cfg.momentum)

    def loop(self, label: str, step: Callable[[int], float]) -> SyntheticSet:
        """``cfg.iterations`` calls of ``step(iteration) -> loss`` (:func:`~dpdistill.distill.loop.run_iterations`)."""
        return self.args.loop(self.syn, self.cfg.iterations, label, step)


def start_matching(real: Any, cfg: MatchingConfig, seed: int | torch.Generator, args: RunArgs, *,
                   init: SyntheticSet | None = None) -> Matching:
    """The setup every matcher shares: checks, seeded generator, the initial set, normaliser and DSA.

    ``init`` continues from a given set instead of ``cfg.init``. A private run (``args.ledger`` set) normalises
    with the given (public) statistics or 0.5 / 0.5, never statistics of ``real``; a non-private one computes
    missing ones from ``real``.
    """
    check_real(real, cfg)
    g = as_generator(seed)
    syn = init if init is not None else init_set(cfg, real, g, args.device)
    syn.to(args.device)
    if args.ledger is not None:
        normalize = private_normalizer(args.mean, args.std, real.channels, args.device)
    else:
        normalize = Normalizer.for_data(real, args.mean, args.std, args.device)
    return Matching(cfg, real, args.device, g, syn, normalize, dsa_for(cfg), args)


# ----------------------------------------------------------------------------------------------------- DM


def dm_step(
    net: nn.Module,
    syn: SyntheticSet,
    sampler: ClassSampler,
    normalize: Normalizer,
    dsa: DSA | None,
    batch_real: int,
    generator: torch.Generator,
    precision: embedding.Precision = "float32",
) -> torch.Tensor:
    """DM's loss for one network: sum over classes of the feature-mean distance (differentiable w.r.t. syn).
    ``precision``: the real side's (:func:`dpdistill.distill.embedding.embed_chunks`)."""
    reals, syns, sizes_r, sizes_s = [], [], [], []
    for c in range(syn.num_classes):
        xr = normalize(sampler.batch(c, batch_real, generator))
        xs = normalize(syn.class_images(c))
        xr, xs = siamese_pair(dsa, xr, xs, generator)
        reals.append(xr)
        syns.append(xs)
        sizes_r.append(len(xr))
        sizes_s.append(len(xs))
    f_real = embedding.embed_no_grad(net, torch.cat(reals), precision=precision).split(sizes_r)
    f_syn = embedding.embed(net, torch.cat(syns)).split(sizes_s)
    return torch.stack([feature_mean_distance(r, s) for r, s in zip(f_real, f_syn, strict=True)]).sum()


def run_dm(real: Any, cfg: DMConfig | None = None, seed: int | torch.Generator = 0, *,
           init: SyntheticSet | None = None, **options: Unpack[RunOptions]) -> SyntheticSet:
    """Distil ``real`` (an ImageSet) with DM; returns the synthetic set (pixel space).

    ``mean``/``std`` normalise images for the matching network (default: statistics of ``real``).
    ``callback(iteration, loss)`` is called after every step; ``init`` continues from a given set instead of
    ``cfg.init``. Ctrl-C propagates as KeyboardInterrupt with the (consistent) set in ``exc.synthetic_set``.
    """
    cfg = cfg if cfg is not None else DMConfig()
    m = start_matching(real, cfg, seed, RunArgs.of(**options), init=init)
    sampler = ClassSampler(real, m.device)
    opt = m.image_optimizer()

    def step(_: int) -> float:
        loss = dm_step(m.fresh_net(), m.syn, sampler, m.normalize, m.dsa, cfg.batch_real, m.g, cfg.real_precision)
        return image_step(opt, loss, m.syn, m.normalize, cfg.clamp)

    return m.loop("DM", step)


register("dm", run_dm, DMConfig, private=False,
         description="distribution matching (Zhao & Bilen, WACV'23), not private")
