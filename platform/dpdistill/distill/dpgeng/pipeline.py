"""DP-GenG (Shi et al., AAAI'26): DP dataset distillation guided by DP-generated data, as switchable stages.

    a. generate  — a registered Synthesizer is fitted on the sensitive split under its share (charged by it)
                   and generates a large labelled set: every later use of it is post-processing;
    b. init      — DP-Init: k-means on extractor features of each class's generated images, the images
                   nearest the centroids packed by the multi-formation factor (or: random generated / noise);
                   optionally only among the images the extractors classify most confidently (init_filter);
    c. extract   — K ConvNets trained on the generated set, one drawn per distillation iteration;
    d. expert    — a ConvNet trained on the generated set, fine-tuned on the sensitive split with DP-SGD;
    e. match     — DP feature matching against the sensitive split (per-class Poisson, clip C, noise σ_F·C),
                   or with ``matching: decoupled`` the per-class noisy means of the clipped concatenated
                   features under all K extractors released once, then matched for free; ``matching: auto``
                   (the default) picks per-iteration unless its per-step noise would dominate the signal
                   (:func:`~dpdistill.distill.private_matching.matching_noise_ratio` ≥ 1: small classes, small ε,
                   wide features). 'auto' works that ratio out before anything is charged (the generator's
                   plan and the expert's σ on a scratch ledger) and, when it reaches 1, runs no feature matching
                   and gives its ε share to the generator: on ~130 records a class neither mode beat the
                   generator's own output (README "DP-GenG defaults"). With a set generated earlier, a
                   generator whose charges cannot be planned before its fit, or a fixed sigma, it decides at (e)
                   and releases once (decoupled) instead;
    f. guide     — expert guidance: KL to the mean soft label of generated references + λ·CE;
    g. allocate  — fixed shares (generator, expert) with σ_F solved from what remains, or utility-driven
                   shares tuned first with scratch ledgers (:func:`~.allocation.utility_allocation`: the
                   generator's FID and the expert's accuracy against their full-budget values), σ_F again
                   solved from what remains.

Stages (e) and (f) are the distillation loop; with both off the result is the DP-Init set. Budget: the
ledger is charged by (a) inside ``Synthesizer.fit``, by (d) before its first DP-SGD step, and by (e) once for
all its steps before the loop (decoupled: once, for its single release, also before the loop); (b), (c) and
(f) read only DP outputs. Every charge of (a) is booked as ``dpgeng/generator`` (:class:`ComponentLedger`), so
the run's metrics give ε per stage. ``ipc`` counts STORED images per class (the papers' storage budget): with
factor f the released set decodes into ipc·f² training images per class; ``factor: auto`` (the default) is 2
for images of at least 16 pixels a side and 1 below (a 4x4 quarter of an 8x8 image carries little).

The two 'auto' rules were read on validation splits of two datasets (MNIST and ``digits``, README "DP-GenG
defaults"); both use plan quantities only, never the sensitive records (class sizes, public as every matching
charge treats them, set the expected batches).

Randomness: everything that touches the sensitive split with randomness draws from ``noise`` (a
:class:`~dpdistill.privacy.noise.PrivacyRandomness`, secret unless the caller passes a reproducible, NOT
PRIVATE one): the generator's noise and sampling (``noise.spawn("generator")`` handed to the synthesiser),
the expert's opacus sampling and noise, the feature matching's Poisson batches and noise. ``seed`` drives
only what is data-independent or reads DP outputs alone: weights, latents, k-means and the picks among
generated images, the matching network drawn per step, DSA, expert-guidance references, and the
utility tuning's split of the sensitive set into halves (a split that does not look at the records).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator

from dpdistill import models
from dpdistill.distill.augment import DEFAULT_STRATEGY, make_dsa
from dpdistill.distill.dm import as_generator
from dpdistill.distill.dpgeng.allocation import utility_allocation
from dpdistill.distill.dpgeng.expert import DPSGDPlan, dp_finetune, dpsgd_rate_and_steps, pretrain_expert
from dpdistill.distill.dpgeng.extractors import train_extractors
from dpdistill.distill.dpgeng.guidance import ExpertGuidance
from dpdistill.distill.dpgeng.init_kmeans import confident_subset, dp_init, random_init
from dpdistill.distill.loop import PrivateRunOptions, RunArgs, image_lr_schedule, image_step
from dpdistill.distill.options import CheckedNetworkOptions, PrivateMatchingOptions, RealPrecisionOptions
from dpdistill.distill.private_matching import (
    NOISE_DOMINATED_RATIO,
    DecoupledMatchingOptions,
    MatchingBank,
    MatchingMode,
    charge_decoupled,
    charge_matching,
    check_classes_present,
    decoupled_matching_loss,
    dp_feature_matching_loss,
    matching_noise_ratio,
    per_iteration_sigma,
    release_targets,
)
from dpdistill.distill.registry import register
from dpdistill.distill.synthetic import SyntheticSet, private_normalizer
from dpdistill.errors import DataError, SpecError
from dpdistill.privacy import PrivacyLedger
from dpdistill.privacy import noise as privacy_noise
from dpdistill.privacy.disclosure import ACCOUNTING, CHARGED, EVALUATION
from dpdistill.privacy.dp_ops import PoissonClassSampler, sigma_for_share
from dpdistill.privacy.noise import PrivacyRandomness

if TYPE_CHECKING:
    from typing import Unpack

log = logging.getLogger(__name__)

FM_COMPONENT = "dpgeng/feature_matching"
# factor 'auto': multi-formation (factor 2) for images at least this many pixels a side, none below.
AUTO_FACTOR_MIN_SIZE = 16
GEN_COMPONENT = "dpgeng/generator"


class ComponentLedger(PrivacyLedger):
    """The job's ledger as the generator sees it: its charges are booked under one DP-GenG component name.

    So the run's metrics carry ε per stage (``privacy_epsilon_dpgeng_generator`` beside ``..._expert`` and
    ``..._feature_matching``) whatever the synthesiser calls its releases (that name goes into the note).
    It shares the wrapped ledger's state (the same ``__dict__``): budget checks, ``would_cost`` and the
    entries are the job ledger's own, and every charge goes through the job ledger's ``charge``.
    """

    __slots__ = ("_component", "_inner")

    def __init__(self, ledger: PrivacyLedger, component: str) -> None:  # noqa: D107 - no super(): shared state
        self.__dict__ = ledger.__dict__
        self._inner = ledger
        self._component = component

    def charge(self, component: str, mechanism: Any, note: str = "") -> float:
        return self.charge_many([(component, mechanism, note)])

    def charge_many(self, charges: Any) -> float:
        return self._inner.charge_many([(self._component, mechanism, f"{component}: {note}" if note else component)
                                        for component, mechanism, note in charges])


class DPGenGConfig(PrivateMatchingOptions, DecoupledMatchingOptions, RealPrecisionOptions, CheckedNetworkOptions):
    """DP-GenG options, grouped by stage; defaults are sized for MNIST on a few CPU cores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ipc: int = Field(10, ge=1, description="STORED images per class (each decodes into factor^2 images)")
    factor: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description=f"multi-formation factor f; 'auto': 2 for images of at least {AUTO_FACTOR_MIN_SIZE} "
        "pixels a side (28x28 MNIST), 1 below (8x8 digits)")
    # (a) generation
    generator: str = Field("dp-merf", description="synthesis method (synthesis registry name)")
    generator_options: dict[str, Any] = Field(default_factory=dict)
    generated_per_class: int = Field(1000, ge=1, description="size of the generated set, per class")
    public: str | None = Field(None, description="public dataset to pretrain the generator on (e.g. glyphs)")
    # (b) init
    init: Literal["dp_init", "random_generated", "noise"] = "dp_init"
    kmeans_features: Literal["extractor", "pixels"] = "extractor"
    init_filter: float = Field(0.0, ge=0, lt=1, description="fraction of each class's generated images dropped "
                               "before the init picks: those the extractors classify least confidently as their "
                               "own class (failed samples; free, DP outputs only)")
    # (c) extractors / matching networks
    extractors: int = Field(5, ge=1, description="K feature extractors trained on the generated data")
    extractor_epochs: int = Field(4, ge=0, description="epochs of the longest-trained extractor (0: random nets)")
    net: str = "convnet"
    net_width: int = Field(64, ge=1)
    net_depth: int = Field(3, ge=1)
    net_norm: str = "instance"
    # (d) expert
    expert_pretrain_epochs: int = Field(5, ge=0)
    expert_dp_epochs: float = Field(1.0, ge=0, description="DP-SGD epochs on the sensitive split (0: none)")
    expert_batch: int = Field(512, ge=1)
    expert_clip: float = Field(1.0, gt=0)
    expert_lr: float = Field(0.02, gt=0)
    # (e) DP feature matching
    feature_matching: bool = True
    iterations: int = Field(1000, ge=0, description="distillation iterations (FM and/or EG steps)")
    batch_real: int = Field(256, ge=1, description="per-iteration matching: expected Poisson batch per class")
    # clip (C) and sigma (σ_F; None: solved from what the budget leaves) come from PrivateMatchingOptions;
    # augmentations from DecoupledMatchingOptions, whose matching field DP-GenG widens with 'auto'.
    matching: MatchingMode | Literal["auto"] = Field(
        "auto", description="'per-iteration': a fresh noisy real statistic every step, each charged; 'decoupled': "
        "per-class noisy means under the K extractors released once, then free iterations; 'auto': per-iteration "
        "unless its per-step noise ratio σ·√d/B reaches 1 (the targets would be mostly noise): then no feature "
        "matching, its ε share to the generator (decoupled when the generated set was made earlier, the "
        "generator cannot plan its charges, or sigma is fixed). "
        "A fixed sigma applies to whichever mode runs (and decides 'auto'); leave it unset to spend the budget")
    projection_dim: int | None = Field(None, ge=1, description="decoupled only: project the extractors' "
                                       "concatenated features onto their top d principal directions on the "
                                       "generated set before clipping and noising (None: no projection)")
    lr_img: float = Field(100.0, gt=0, description="image learning rate (normalised units)")
    momentum: float = Field(0.5, ge=0, lt=1)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="image learning rate over the iterations: constant, or cosine decay to 0 (the "
        "last steps then average the noisy targets; on MNIST at ε=10 it did not beat constant, benchmarks part18/19)")
    dsa_strategy: str = DEFAULT_STRATEGY
    dsa_mode: Literal["single", "all"] = "single"
    clamp: bool = True
    # (f) expert guidance
    expert_guidance: bool = True
    eg_weight: float = Field(0.1, ge=0, description="weight of the guidance loss against the FM loss")
    eg_refs: int = Field(10, ge=1, description="generated references per distilled image")
    eg_ce_weight: float = Field(0.1, ge=0, description="λ: weight of the CE term inside the guidance loss")
    eg_temperature: float = Field(1.0, gt=0)
    # (g) allocation
    allocation: Literal["fixed", "utility"] = "fixed"
    share_generator: float = Field(0.4, gt=0, lt=1, description="ε share of the generator (alone)")
    share_expert: float = Field(0.2, gt=0, lt=1, description="ε share of the expert's DP-SGD (alone)")
    utility_tuning: str | None = Field(None, description="allocation 'utility': a public dataset name to tune on, "
                                       "or 'sensitive' (reads the sensitive split, unaccounted)")
    utility_fid_ratio: float = Field(1.2, ge=1, description="generator: FID at most this x the full-budget FID")
    utility_acc_ratio: float = Field(0.9, gt=0, le=1, description="expert: this x the full-budget accuracy")
    utility_steps: int = Field(3, ge=0, description="bisection halvings per share")
    utility_max_total: float = Field(0.8, gt=0.1, lt=1, description="cap on generator + expert shares")

    def overridden_options(self) -> dict[str, str]:
        """Options this configuration ignores, with why: a sweep must not search them (its trials would be
        identical while their specs record different values)."""
        if not self.feature_matching:
            ignored = {k: "feature_matching is off" for k in ("matching", "batch_real", "real_precision", "clip",
                                                              "sigma", "augmentations", "projection_dim",
                                                              "dsa_strategy", "dsa_mode")}
        elif self.matching == "decoupled":
            ignored = {"batch_real": "matching 'decoupled' releases every record's features once, unsampled",
                       "real_precision": "matching 'decoupled' computes its one release in float32"}
            if self.dsa_strategy == "none":
                ignored["augmentations"] = "dsa_strategy is 'none': there is nothing to draw"
        elif self.matching == "per-iteration":
            why = "it only shapes matching 'decoupled' and matching is 'per-iteration'"
            ignored = {"augmentations": why, "projection_dim": why}
        else:  # 'auto' may run either mode, so both modes' options count
            ignored = ({"augmentations": "dsa_strategy is 'none': there is nothing to draw"}
                       if self.dsa_strategy == "none" else {})
        if self.allocation == "utility":
            why = "allocation 'utility' chooses the shares itself"
            return {**ignored, "share_generator": why, "share_expert": why}
        why = "they only tune allocation 'utility' and allocation is 'fixed'"
        return {**ignored, **{k: why for k in ("utility_tuning", "utility_fid_ratio", "utility_acc_ratio",
                                               "utility_steps", "utility_max_total")}}

    @model_validator(mode="after")
    def _shares(self) -> DPGenGConfig:
        if self.share_generator + self.share_expert >= 1:
            raise ValueError("share_generator + share_expert must stay below 1 (feature matching needs the rest)")
        # 'auto' is checked at the largest factor it can resolve to: the image size is not known here.
        factor = 2 if self.factor == "auto" else self.factor
        hint = "; factor 'auto' can resolve to 2: set factor 1 for small images" if self.factor == "auto" else ""
        need = self.ipc * factor * factor
        if self.init != "noise" and self.generated_per_class < need:
            # Checked here, before the generator spends any budget.
            raise ValueError(f"generated_per_class must be at least ipc x factor^2 = {need} for init "
                             f"'{self.init}'{hint}")
        if self.init != "noise" and math.ceil((1 - self.init_filter) * self.generated_per_class) < need:
            raise ValueError(f"init_filter {self.init_filter:g} leaves fewer than ipc x factor^2 = {need} of the "
                             f"{self.generated_per_class} generated images per class{hint}")
        return self

    def factor_for(self, image_size: int) -> int:
        """The multi-formation factor for images ``image_size`` pixels a side (resolves 'auto')."""
        if self.factor != "auto":
            return self.factor
        return 2 if image_size >= AUTO_FACTOR_MIN_SIZE else 1

    def net_spec(self) -> dict[str, Any]:
        """The matching / expert network as ``models.get`` arguments."""
        spec: dict[str, Any] = {"net": self.net}
        if self.net == "convnet":
            spec.update(width=self.net_width, depth=self.net_depth, norm=self.net_norm)
        return spec

    @property
    def uses_expert(self) -> bool:
        return self.expert_guidance and self.iterations > 0

    @property
    def uses_matching(self) -> bool:
        return self.feature_matching and self.iterations > 0

    @property
    def filters_init(self) -> bool:
        return self.init != "noise" and self.init_filter > 0


def generate_stage(real: Any, cfg: DPGenGConfig, ledger: Any, epsilon_total: float, seed: int,
                   device: torch.device, progress: bool,
                   noise: PrivacyRandomness | None = None) -> tuple[Any, dict[str, Any]]:
    """Stage (a): fit the synthesiser on the sensitive split up to a ledger total of ``epsilon_total``, generate.

    ``seed`` drives the synthesiser's weights, features and latents; ``noise`` its privacy noise and private
    sampling (None: a fresh secret source).
    """
    from dpdistill import data, synthesis

    synth = synthesis.create(cfg.generator, channels=real.channels, image_size=real.image_size,
                             num_classes=real.num_classes, seed=seed, device=str(device),
                             noise=privacy_noise.resolve(noise), **cfg.generator_options)
    if cfg.public:
        public = data.load(cfg.public, "train", image_size=real.image_size)
        # Public only: a rerun, another noise draw or a sweep's next trial restores it from the cache.
        if synth.pretrain(public, progress=progress, cache=True):
            log.info("dpgeng: the generator's public pre-training (%s) restored from the cache", cfg.public)
    report = synth.fit(real, ComponentLedger(ledger, GEN_COMPONENT), epsilon=epsilon_total, progress=progress)
    images, labels = synth.generate(n_per_class=cfg.generated_per_class, seed=seed)
    generated = data.ImageSet(images.float().contiguous(), labels.long(), real.num_classes,
                              f"{cfg.generator}-generated")
    return generated, {"generator": cfg.generator, "generator_noise": dict(report.noise),
                       "generator_seconds": report.seconds}


def tuning_sets(real: Any, source: str, seed: int) -> tuple[Any, Any]:
    """Fit and score sets for the utility allocation: halves of the sensitive split, or a public set's splits."""
    from dpdistill import data

    if source == "sensitive":
        # The seed may choose the halves: the split looks at no record (a permutation of positions), and the
        # tuning on the sensitive split is unaccounted anyway (the report and the ledger note say so).
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed + 9))
        half = len(real) // 2
        return real.subset(order[:half]), real.subset(order[half:])
    tune = data.load(source, "train", image_size=real.image_size)
    held_out = data.load(source, "test", image_size=real.image_size)
    if tune.channels != real.channels or tune.num_classes != real.num_classes:
        raise SpecError(f"method.utility_tuning: '{source}' has {tune.channels} channels and {tune.num_classes} "
                        f"classes, the sensitive set {real.channels} and {real.num_classes}")
    return tune, held_out


def _check_projection(cfg: DPGenGConfig, real: Any) -> None:
    """Refuse a decoupled ``projection_dim`` that would not reduce the extractors' concatenated features."""
    if cfg.projection_dim is None or cfg.matching == "per-iteration" or not cfg.uses_matching:
        return
    dim = cfg.extractors * _feature_dim(cfg, real)
    if cfg.projection_dim >= dim:
        raise SpecError(f"method.projection_dim: {cfg.projection_dim} does not reduce the {cfg.extractors} "
                        f"extractors' concatenated features ({dim} dimensions); choose fewer")


def _check_generated(generated: Any, real: Any) -> None:
    if tuple(generated.images.shape[1:]) != tuple(real.images.shape[1:]):
        raise DataError(f"generated images are {tuple(generated.images.shape[1:])}, the sensitive ones "
                        f"{tuple(real.images.shape[1:])}")
    if generated.num_classes != real.num_classes:
        raise DataError(f"generated set has {generated.num_classes} classes, the sensitive one {real.num_classes}")


def run_dpgeng(real: Any, cfg: DPGenGConfig | None = None, seed: int | torch.Generator = 0, *, generated: Any = None,
               **options: Unpack[PrivateRunOptions]) -> SyntheticSet:
    """Distil the sensitive ``real`` ImageSet with DP-GenG under ``ledger``'s whole budget.

    ``generated`` replaces stage (a) with a set made earlier (public data, or DP outputs whose cost is ALREADY
    on ``ledger``). The returned set carries ``.report`` (a dict: stages run, noise multipliers, ε by
    component, seconds per stage, ``baseline``: ``ipc`` random generated images per class, the
    DP-generated-at-IPC baseline as (images, labels), and ``init_set``: the set before distillation). All of
    it is DP output. ``noise`` is the privacy randomness of every sensitive stage (None: a fresh secret
    source); ``callback(iteration, loss)`` gets the loss against the noisy targets and the DP expert
    (post-processing of charged releases).
    """
    cfg = cfg if cfg is not None else DPGenGConfig()
    cfg = cfg.model_copy(update={"factor": cfg.factor_for(real.image_size)})
    args = RunArgs.private("dpgeng", **options)
    ledger, noise, device, progress = args.ledger, args.noise, args.device, args.progress
    if cfg.allocation == "utility" and not cfg.utility_tuning:
        raise SpecError("method.utility_tuning: allocation 'utility' needs tuning data: a public dataset name, "
                        "or 'sensitive' to tune on the sensitive split (unaccounted, as in the paper)")
    g = as_generator(seed)
    base_seed = int(torch.randint(2**31, (1,), generator=g))
    channels = real.channels
    # Public statistics only (the spec's, else 0.5 / 0.5): never computed from the sensitive split.
    stats_mean = list(args.mean) if args.mean is not None else [0.5] * channels
    stats_std = list(args.std) if args.std is not None else [0.5] * channels
    normalize = private_normalizer(stats_mean, stats_std, channels, device)
    eps = ledger.epsilon_budget
    report: dict[str, Any] = {"stages": [], "seconds": {}, "sigma": {}, "factor": cfg.factor, "warnings": []}
    _check_projection(cfg, real)  # before anything is charged
    if cfg.uses_matching:
        check_classes_present(real)  # before the generator's and the expert's charges, not at stage (e)
    clock = time.perf_counter()

    def done(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report["stages"].append(stage)
        report["seconds"][stage] = now - clock
        # Into the run's log.txt beside the runner's heartbeat, so an hours-long run says where it is (timings
        # and the ledger's spent ε only: nothing computed from the data).
        log.info("dpgeng: stage %s done in %.1f s (ledger ε spent %.4g)", stage, now - clock,
                 ledger.spent_epsilon())
        clock = now

    # (g) utility-driven allocation: shares measured with scratch ledgers, before anything is charged here
    tuned_note = ""
    if cfg.allocation == "utility":
        tune, held_out = tuning_sets(real, cfg.utility_tuning or "", base_seed)
        alloc = utility_allocation(tune, held_out, cfg.utility_tuning or "", cfg, eps, ledger.delta, stats_mean,
                                   stats_std, base_seed, device, noise=noise.spawn("utility"))
        cfg = cfg.model_copy(update={"share_generator": alloc.share_generator, "share_expert": alloc.share_expert})
        report["allocation"] = dataclasses.asdict(alloc)
        if cfg.utility_tuning == "sensitive":
            tuned_note = "; shares tuned on the sensitive split (utility allocation, not accounted)"
        done("allocate")

    # (e, decided first) matching 'auto' where no step could carry signal: no matching, its share to the generator
    # (A fixed sigma keeps the stage-(e) decision: the user chose the matching's noise, not its absence.)
    gen_target = min(eps, ledger.spent_epsilon() + cfg.share_generator * eps)
    if generated is None and cfg.matching == "auto" and cfg.uses_matching and cfg.sigma is None:
        ratio = planned_matching_ratio(real, cfg, eps, ledger, device, base_seed)
        if ratio is not None and ratio >= NOISE_DOMINATED_RATIO:
            cfg = cfg.model_copy(update={"feature_matching": False})
            target = generator_target_without_matching(real, cfg, eps, ledger, device, base_seed)
            share_generator = (target - ledger.spent_epsilon()) / eps
            gen_target = target
            report.update(matching="none", matching_noise_ratio=ratio, share_generator=share_generator)
            log.info("dpgeng: matching auto -> none (per-iteration noise ratio %.2f >= %g): the generator fits up "
                     "to ε %.4g, the expert's charge fills the rest", ratio, NOISE_DOMINATED_RATIO, target)

    # (a) generation
    if generated is None:
        generated, info = generate_stage(real, cfg, ledger, gen_target, base_seed, device, progress,
                                        noise.spawn("generator"))
        report.update(info)
        done("generate")
    _check_generated(generated, real)
    gen_counts = torch.bincount(generated.labels, minlength=real.num_classes)
    if int(gen_counts.min()) < 1:
        raise DataError(f"generated set has no image of class {int(gen_counts.argmin())}")

    # (c) extractors: also the k-means features of (b), so trained first
    needs_extractors = (cfg.uses_matching or cfg.filters_init
                        or (cfg.init == "dp_init" and cfg.kmeans_features == "extractor"))
    extractors = []
    if needs_extractors:
        extractors = train_extractors(generated, cfg.extractors, cfg.extractor_epochs, cfg.net_spec(), stats_mean,
                                      stats_std, base_seed + 1, device)
        done("extract")

    # (b) init, from the generated images the extractors find typical of their class when init_filter > 0
    candidates = generated
    if cfg.filters_init:
        def classify(x: torch.Tensor) -> torch.Tensor:
            xn = normalize(x.to(device))
            return torch.stack([F.softmax(net(xn), dim=1) for net in extractors]).mean(dim=0)

        candidates = confident_subset(generated, classify, cfg.init_filter)
    if cfg.init == "dp_init":
        feat_net = extractors[-1] if extractors and cfg.kmeans_features == "extractor" else None
        embed = (lambda x: feat_net.embed(normalize(x.to(device)))) if feat_net is not None else None
        syn = dp_init(candidates, cfg.ipc, cfg.factor, embed, base_seed + 2)
    elif cfg.init == "random_generated":
        syn = random_init(candidates, cfg.ipc, cfg.factor, torch.Generator().manual_seed(base_seed + 2))
    else:
        shape = (channels, real.image_size, real.image_size)
        syn = SyntheticSet.from_noise(real.num_classes, cfg.ipc, shape, torch.Generator().manual_seed(base_seed + 2),
                                      cfg.factor)
    syn.to(device)
    done("init")
    base = random_init(generated, cfg.ipc, 1, torch.Generator().manual_seed(base_seed + 3))
    report["baseline"] = base.export()
    report["init_set"] = syn.export()  # what the DP-Init-only ablation releases

    # (d) expert
    guidance = None
    if cfg.uses_expert:
        expert = pretrain_expert(generated, cfg.net_spec(), cfg.expert_pretrain_epochs, stats_mean, stats_std,
                                 base_seed + 4, device)
        plan = _expert_plan(real, cfg, eps, ledger)
        if plan is not None:
            report["sigma"]["expert"] = plan.sigma
            expert = dp_finetune(expert, real, plan, ledger, stats_mean, stats_std, cfg.expert_lr, device,
                                 noise=noise.spawn("expert"))
        else:
            expert.eval()
            for p in expert.parameters():
                p.requires_grad_(False)
        guidance = ExpertGuidance(expert, generated, normalize, cfg.eg_refs, cfg.eg_ce_weight, cfg.eg_temperature)
        done("expert")

    # (e) DP feature matching: charged once, for every step, before the loop. Decoupled: the K extractors
    # (DP outputs: public) are the bank, and its one release is charged and made here, before the loop.
    # 'auto' first works out the per-iteration plan's σ (nothing charged) and keeps it unless noise dominates.
    sampler, sigma_f, bank, targets = None, cfg.sigma, None, None
    dsa = make_dsa(cfg.dsa_strategy, cfg.dsa_mode)
    fm_noise = noise.spawn("feature_matching")
    mode = cfg.matching
    if cfg.uses_matching and mode != "decoupled":
        sampler = PoissonClassSampler(real, cfg.batch_real, device)
        planned = per_iteration_sigma(ledger, sampler, cfg.iterations, sigma_f)
        mode = _choose_matching(report, cfg, sampler, planned, int(extractors[0].feature_dim))
        if mode == "decoupled":
            sampler = None
            if planned is not None and cfg.sigma is None:
                # The σ the ratio was computed from (the decoupled release solves its own, below).
                report["sigma"]["feature_matching_plan"] = planned
    if cfg.uses_matching:
        report["matching"] = mode
    if cfg.uses_matching and mode == "decoupled":
        bank = MatchingBank(extractors, normalize, dsa, cfg.augmentations, g, "dpgeng")
        projected = ""
        if cfg.projection_dim is not None:
            bank.fit_projection(generated.images, cfg.projection_dim)  # DP output only: free
            projected = f"; projected onto {cfg.projection_dim} directions learned on the DP-generated set"
        sigma_f = charge_decoupled(ledger, FM_COMPONENT, real.num_classes, sigma_f, cfg.clip, len(extractors),
                                   len(bank.params), projected + tuned_note)
        targets = release_targets(bank, real, cfg.clip, sigma_f, fm_noise)
        report["sigma"]["feature_matching"] = sigma_f
    elif cfg.uses_matching and sampler is not None:
        sigma_f = charge_matching(ledger, FM_COMPONENT, sampler, cfg.iterations, sigma_f, cfg.clip, tuned_note)
        report["sigma"]["feature_matching"] = sigma_f

    # (e) + (f): the distillation loop
    if cfg.uses_matching or cfg.uses_expert:
        opt = torch.optim.SGD([syn.images], lr=cfg.lr_img, momentum=cfg.momentum)
        schedule = image_lr_schedule(opt, cfg.lr_schedule, cfg.iterations)

        def step(_: int) -> float:
            loss = syn.images.new_zeros(())
            if bank is not None and targets is not None:
                loss = loss + decoupled_matching_loss(bank, syn, targets, cfg.clip)
            if sampler is not None:
                net = extractors[int(torch.randint(len(extractors), (1,), generator=g))]
                loss = loss + dp_feature_matching_loss(net, syn, sampler, normalize, dsa, cfg.clip, sigma_f,
                                                       noise=fm_noise, generator=g,
                                                       precision=cfg.real_precision)
            if guidance is not None:
                loss = loss + cfg.eg_weight * guidance.loss(syn, g)
            value = image_step(opt, loss, syn, normalize, cfg.clamp)
            if schedule is not None:
                schedule.step()
            return value

        args.loop(syn, cfg.iterations, "DP-GenG", step)
        done("distill")
    report["epsilon_by_component"] = ledger.component_epsilons()
    report["epsilon_total"] = ledger.spent_epsilon()
    syn.report = report  # type: ignore[attr-defined]
    return syn


def _choose_matching(report: dict[str, Any], cfg: DPGenGConfig, sampler: PoissonClassSampler, sigma: float | None,
                     dim: int) -> MatchingMode:
    """The matching mode to run: cfg's, or for 'auto' per-iteration unless its noise ratio reaches
    :data:`NOISE_DOMINATED_RATIO`. Records the ratio in ``report`` (a plan quantity: σ, d and the smallest
    expected class batch) and warns when an explicit per-iteration runs noise-dominated."""
    if sigma is None:  # no steps planned: nothing to decide
        return "per-iteration" if cfg.matching == "auto" else cfg.matching
    batch = min(sampler.expected_size(c) for c in range(sampler.num_classes))
    ratio = matching_noise_ratio(sigma, dim, batch)
    report["matching_noise_ratio"] = ratio
    if ratio < NOISE_DOMINATED_RATIO:
        return "per-iteration"
    if cfg.matching == "auto":
        log.info("dpgeng: matching auto -> decoupled (per-iteration noise ratio %.2f >= %g)", ratio,
                 NOISE_DOMINATED_RATIO)
        return "decoupled"
    report["warnings"].append(
        f"matching 'per-iteration' is noise dominated (noise ratio σ·√d/B = {ratio:.2f} >= "
        f"{NOISE_DOMINATED_RATIO:g}: each step's targets are mostly noise); 'decoupled' or 'auto' would "
        "release the features once instead")
    return "per-iteration"


def _generator_planner(real: Any, cfg: DPGenGConfig, ledger: Any, device: torch.device,
                       seed: int) -> Callable[[float], PrivacyLedger | None]:
    """``plan(target)``: a scratch ledger holding ``ledger``'s earlier charges and the generator's PLAN up to
    the composed total ``target`` (what ``Synthesizer.fit`` will charge), or None when the generator cannot
    plan its charges before its fit. The real ledger is never touched."""
    from dpdistill import synthesis

    with torch.random.fork_rng(devices=[]):  # building the generator draws weights: keep the caller's RNG
        synth = synthesis.create(cfg.generator, channels=real.channels, image_size=real.image_size,
                                 num_classes=real.num_classes, seed=seed, device=str(device),
                                 **cfg.generator_options)

    def plan(target: float) -> PrivacyLedger | None:
        scratch = PrivacyLedger(None, ledger.epsilon_budget, ledger.delta, neighbouring=ledger.neighbouring)
        for mechanism in ledger.mechanisms:
            scratch.charge("earlier", mechanism)
        with torch.random.fork_rng(devices=[]):  # a plan should draw nothing; if one does, keep the caller's RNG
            planned = synth.plan(len(real.images), scratch, target)
        if planned is None:
            return None
        for mechanism in planned.mechanisms:
            scratch.charge("generator", mechanism)
        return scratch

    return plan


def _expert_plan(real: Any, cfg: DPGenGConfig, eps: float, ledger: Any) -> DPSGDPlan | None:
    """The expert's DP-SGD fine-tuning plan (σ for its share of ε alone), or None when the expert is not
    fine-tuned on sensitive data. Stage (d) runs and charges exactly this plan; the planners charge its
    mechanism on scratch ledgers, so the two cannot drift apart."""
    if not (cfg.uses_expert and cfg.expert_dp_epochs > 0):
        return None
    q, steps = dpsgd_rate_and_steps(len(real), cfg.expert_batch, cfg.expert_dp_epochs)

    def make_expert(s: float) -> Any:
        return DPSGDPlan(q, steps, s, cfg.expert_clip, cfg.expert_batch).mechanism()

    sigma = sigma_for_share(make_expert, cfg.share_expert * eps, ledger.delta, neighbouring=ledger.neighbouring)
    return DPSGDPlan(q, steps, sigma, cfg.expert_clip, cfg.expert_batch)


def _expert_mechanism(real: Any, cfg: DPGenGConfig, eps: float, ledger: Any) -> Any | None:
    """The mechanism stage (d) will charge for the expert, or None."""
    plan = _expert_plan(real, cfg, eps, ledger)
    return None if plan is None else plan.mechanism()


def planned_matching_ratio(real: Any, cfg: DPGenGConfig, eps: float, ledger: Any, device: torch.device,
                           seed: int) -> float | None:
    """The per-iteration noise ratio σ·√d/B the run would see at (e), worked out before anything is charged;
    None when the generator cannot plan its charges before its fit.

    A scratch ledger takes the ledger's earlier charges, the generator's plan up to its share, then the
    expert's DP-SGD at its σ; the matching's σ is then solved to fill what is left, as (e) does. Plan
    quantities only: σ, the matching networks' feature width (from their shapes) and the smallest expected
    class batch (class sizes, public as every matching charge treats them); no record is read.
    """
    scratch = _generator_planner(real, cfg, ledger, device, seed)(
        min(eps, ledger.spent_epsilon() + cfg.share_generator * eps))
    if scratch is None:
        return None
    expert = _expert_mechanism(real, cfg, eps, ledger)
    if expert is not None:
        scratch.charge("expert", expert)
    sampler = PoissonClassSampler(real, cfg.batch_real, device)
    sigma = per_iteration_sigma(scratch, sampler, cfg.iterations, cfg.sigma)
    if sigma is None:
        return None
    batch = min(sampler.expected_size(c) for c in range(sampler.num_classes))
    return matching_noise_ratio(sigma, _feature_dim(cfg, real), batch)


def _feature_dim(cfg: DPGenGConfig, real: Any) -> int:
    """The feature width of one matching network, from its shapes (meta device: no weights, no RNG)."""
    with torch.device("meta"):
        return int(models.get(cfg.net, channels=real.channels, num_classes=real.num_classes,
                              image_size=real.image_size,
                              **{k: v for k, v in cfg.net_spec().items() if k != "net"}).feature_dim)


def generator_target_without_matching(real: Any, cfg: DPGenGConfig, eps: float, ledger: Any,
                                      device: torch.device, seed: int) -> float:
    """The composed total the generator may fit up to when no matching runs: the largest one whose plan,
    followed by the expert's charge, keeps the ledger within ε (bisection on scratch ledgers), so the whole
    budget is spent by the two stages that remain. Without an expert charge: ε itself."""
    expert = _expert_mechanism(real, cfg, eps, ledger)
    if expert is None:
        return eps
    plan = _generator_planner(real, cfg, ledger, device, seed)
    # The generator's own share is feasible: planned_matching_ratio charged the expert after exactly that plan
    # on a scratch ledger within ε (and the real stages would charge the same).
    lo = min(eps, ledger.spent_epsilon() + cfg.share_generator * eps)
    hi = eps
    for _ in range(20):  # to ~1e-6 of ε: far below the solvers' tolerance
        mid = (lo + hi) / 2
        scratch = plan(mid)
        if scratch is not None and scratch.would_cost(expert) <= eps:
            lo = mid
        else:
            hi = mid
    return lo


# What a distill job logs for DP-GenG beyond its own keys (the report's σs and stage times go under the job's
# sigma_* / seconds_* patterns). The step loss is the feature-matching distance to the NOISY per-class means plus
# the guidance loss of the DP expert on generated references: post-processing of charged releases only.
DISCLOSURE: dict[str, str] = {
    "distill_loss": CHARGED,
    # The DP-generated-at-IPC baseline (ipc generated images per class: DP output of the charged generator)
    # trained and scored on the test split, like the release.
    "baseline_generated_acc_mean": EVALUATION,
    "baseline_generated_acc_std": EVALUATION,
    # ... and on the validation split (where the dataset has one), for choices between release and generator.
    "baseline_generated_val_acc_mean": EVALUATION,
    "baseline_generated_val_acc_std": EVALUATION,
    # report_to_job only: the generator / expert ε shares in force (the spec's, or tuned on a public set).
    "share_generator": ACCOUNTING,
    "share_expert": ACCOUNTING,
    # σ·√d/B of the per-iteration plan, which matching 'auto' decides on: plan quantities (σ, feature width,
    # expected batch from the public class sizes), nothing computed from the records.
    "matching_noise_ratio": ACCOUNTING,
    # The multi-formation factor 'auto' resolved to (from the image size).
    "multiformation_factor": ACCOUNTING,
}

def unaccounted_selection(cfg: DPGenGConfig) -> str | None:
    """Why a DP-GenG run is not covered by its ε: utility-driven shares tuned on the sensitive split (or None).

    The paper tunes its shares with scratch fits on the sensitive data; those fits are not charged, so the
    chosen shares (and everything downstream of them) depend on sensitive data outside the accounting.
    """
    if cfg.allocation == "utility" and cfg.utility_tuning == "sensitive":
        return ("NOT PRIVATE: method.utility_tuning 'sensitive' chooses the ε shares with uncharged fits on the "
                "sensitive split; tune on a public set to keep the guarantee")
    return None


register("dpgeng", run_dpgeng, DPGenGConfig, private=True, disclosure=DISCLOSURE, unaccounted=unaccounted_selection,
         description="DP-GenG: DP dataset distillation guided by DP-generated data (AAAI'26)")
