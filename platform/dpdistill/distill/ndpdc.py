"""NDPDC: non-linear differentially private dataset condensation (Zheng & Li, 2023), a DP-GenG baseline.

DM with a private real side: every iteration draws a fresh randomly initialised ConvNet (data-independent),
and for each class a Poisson batch of sensitive records is embedded record by record, each embedding clipped
to norm C, summed, and released with N(0, (σC)² I) noise divided by the expected batch size; the synthetic
images (initialised from noise: real images would leak) move to match it under the same clipping. The whole
run is charged once, before it starts: ``iterations`` Poisson-Gaussian steps, parallel over the classes (see
:mod:`dpdistill.distill.dpgeng.feature_matching` for the sensitivity and parallel-composition argument).
σ is solved so the run spends what is left of the ledger's budget, unless the config fixes it.

Randomness: the Poisson batches and the noise come from ``noise`` (a secret
:class:`~dpdistill.privacy.noise.PrivacyRandomness` unless the caller passes a reproducible one, which is
NOT PRIVATE); ``seed`` drives only the data-independent draws (the networks, the noise init, DSA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from dpdistill.distill.dm import MatchingConfig, as_generator, build_net, check_real, dsa_for, progress_steps
from dpdistill.distill.dpgeng.allocation import require_ledger, solve_free_sigma
from dpdistill.distill.dpgeng.feature_matching import (
    CLASS_SIZES_NOTE,
    PoissonClassSampler,
    check_per_record_network,
    dp_feature_matching_loss,
    feature_matching_mechanism,
    private_normalizer,
)
from dpdistill.distill.loop import image_step, partial_set_on_interrupt
from dpdistill.distill.options import PrivateMatchingOptions
from dpdistill.distill.registry import register
from dpdistill.distill.synthetic import SyntheticSet
from dpdistill.privacy import noise as privacy_noise
from dpdistill.privacy.disclosure import CHARGED
from dpdistill.privacy.noise import PrivacyRandomness

Callback = Callable[[int, float], None]
COMPONENT = "ndpdc/feature_matching"


class NDPDCConfig(PrivateMatchingOptions, MatchingConfig):
    """NDPDC options: DM's, plus the clip norm C of each record's embedding and (optionally) a fixed noise
    multiplier (:class:`PrivateMatchingOptions`); noise init only."""

    iterations: int = Field(2000, ge=0, description="DP matching steps (a fresh random network each)")
    batch_real: int = Field(256, ge=1, description="expected Poisson batch per class (rate = batch / class size)")
    # Clipped features (norm <= C) give far smaller image gradients than DM's raw ones, so DM's lr of 1 barely
    # moves the noise: on MNIST (200 steps, ε=1) lr 1 reached 27.5 % test accuracy, lr 100 79.4 %.
    lr_img: float = Field(100.0, gt=0, description="image learning rate, in normalised-image units")
    init: Literal["noise"] = Field("noise", description="noise only: initialising from real records would leak")


def run_ndpdc(
    real: Any,
    cfg: NDPDCConfig | None = None,
    seed: int | torch.Generator = 0,
    *,
    ledger: Any = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: Callback | None = None,
    noise: PrivacyRandomness | None = None,
) -> SyntheticSet:
    """Distil the sensitive ``real`` ImageSet with NDPDC under ``ledger``'s budget; returns the synthetic set.

    ``mean``/``std`` must be public statistics (default 0.5 / 0.5; never computed from ``real``). The whole
    run is charged to ``ledger`` as ``ndpdc/feature_matching`` before the first release. ``noise`` is the
    privacy randomness (None: a fresh secret source). ``callback(iteration, loss)`` gets the matching loss
    against the noisy targets: post-processing of the charged release.
    """
    cfg = cfg if cfg is not None else NDPDCConfig()
    ledger = require_ledger(ledger, "ndpdc")
    noise = privacy_noise.resolve(noise)
    check_real(real, cfg)
    device = torch.device(device)
    g = as_generator(seed)
    shape = (real.channels, real.image_size, real.image_size)
    syn = SyntheticSet.from_noise(real.num_classes, cfg.stored_ipc, shape, g, cfg.factor, device=device)
    sampler = PoissonClassSampler(real, cfg.batch_real, device)
    normalize = private_normalizer(mean, std, real.channels, device)
    dsa = dsa_for(cfg)
    sigma = cfg.sigma
    if cfg.iterations > 0:
        def make(s: float) -> Any:
            return feature_matching_mechanism(sampler.max_rate, s, cfg.iterations, real.num_classes)

        sigma = sigma if sigma is not None else solve_free_sigma(ledger, make)
        ledger.charge(COMPONENT, make(sigma), note=f"clip C={cfg.clip:g}; {CLASS_SIZES_NOTE}")
    syn.sigma = sigma  # type: ignore[attr-defined]  # what the run used, for reports
    opt = torch.optim.SGD([syn.images], lr=cfg.lr_img, momentum=cfg.momentum)
    with partial_set_on_interrupt(syn), progress_steps(cfg.iterations, "NDPDC", progress) as advance:
        for it in range(cfg.iterations):
            net = build_net(cfg, real, g, device)
            net.train()
            check_per_record_network(net, "ndpdc")
            for p in net.parameters():
                p.requires_grad_(False)
            loss = dp_feature_matching_loss(net, syn, sampler, normalize, dsa, cfg.clip, sigma, noise=noise,
                                            generator=g)
            value = image_step(opt, loss, syn, normalize, cfg.clamp)
            advance(value)
            if callback is not None:
                callback(it, value)
    return syn


# What a distill job logs for NDPDC beyond its own keys. The step loss is ||noisy real mean - mean clip(f(syn))||²
# summed over classes: a function of the charged noisy targets and the synthetic images only (post-processing).
DISCLOSURE: dict[str, str] = {"distill_loss": CHARGED}

register("ndpdc", run_ndpdc, NDPDCConfig, private=True, disclosure=DISCLOSURE,
         description="non-linear DP dataset condensation (DM with clipped, noised real embeddings)")
