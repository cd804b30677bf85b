"""NDPDC: non-linear differentially private dataset condensation (Zheng & Li, 2023), a DP-GenG baseline.

DM with a private real side: every iteration draws a fresh randomly initialised ConvNet (data-independent),
and for each class a Poisson batch of sensitive records is embedded record by record, each embedding clipped
to norm C, summed, and released with N(0, (σC)² I) noise divided by the expected batch size; the synthetic
images (initialised from noise: real images would leak) move to match it under the same clipping. The whole
run is charged once, before it starts: ``iterations`` Poisson-Gaussian steps, parallel over the classes (see
:mod:`dpdistill.distill.private_matching` for the sensitivity and parallel-composition argument).
σ is solved so the run spends what is left of the ledger's budget, unless the config fixes it.

``matching: decoupled`` instead draws ``bank_size`` random networks once, releases every class's noisy mean of
the clipped concatenated bank features once (one Gaussian release, parallel over classes), and runs all
``iterations`` against those targets at no further cost (:mod:`~dpdistill.distill.private_matching`).

Randomness: the Poisson batches and the noise come from ``noise`` (a secret
:class:`~dpdistill.privacy.noise.PrivacyRandomness` unless the caller passes a reproducible one, which is
NOT PRIVATE); ``seed`` drives only the data-independent draws (the networks, the noise init, DSA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from dpdistill.distill.dm import MatchingConfig
from dpdistill.distill.loop import PrivateRunOptions, image_step
from dpdistill.distill.options import PrivateMatchingOptions, RealPrecisionOptions
from dpdistill.distill.private_matching import (
    DecoupledMatchingOptions,
    check_per_record_network,
    decoupled_matching_loss,
    dp_feature_matching_loss,
    start_decoupled,
    start_private,
)
from dpdistill.distill.registry import register
from dpdistill.distill.synthetic import SyntheticSet
from dpdistill.privacy.disclosure import CHARGED

if TYPE_CHECKING:
    from typing import Unpack

COMPONENT = "ndpdc/feature_matching"


class NDPDCConfig(PrivateMatchingOptions, DecoupledMatchingOptions, RealPrecisionOptions, MatchingConfig):
    """NDPDC options: DM's, plus the clip norm C of each record's embedding and (optionally) a fixed noise
    multiplier (:class:`PrivateMatchingOptions`), per-iteration or decoupled matching
    (:class:`DecoupledMatchingOptions`, ``bank_size``); noise init only."""

    iterations: int = Field(2000, ge=0, description="matching steps (per-iteration: a fresh random network and a "
                            "charged release each; decoupled: free steps against the one release)")
    batch_real: int = Field(256, ge=1, description="per-iteration only: expected Poisson batch per class "
                            "(rate = batch / class size)")
    bank_size: int = Field(10, ge=1, description="decoupled only: K random networks whose concatenated "
                           "features are released once")
    # Clipped features (norm <= C) give far smaller image gradients than DM's raw ones. The reference code
    # (main_dpdc.py) steps lr 1 on the squared distance between SUMS over a Poisson group of 50, i.e. B² = 2,500
    # times our loss over MEANS: lr 2,500 is its step. On MNIST (200 steps, ε=1, batch 128, 3 noise draws each,
    # benchmarks/results/runs.md) lr 100 gave 81.49 ± 0.68 % test accuracy and lr 2,500 91.55 ± 1.04 %.
    lr_img: float = Field(2500.0, gt=0, description="image learning rate, in normalised-image units (the "
                          "reference's lr 1 on sums over 50 records)")
    init: Literal["noise"] = Field("noise", description="noise only: initialising from real records would leak")

    def overridden_options(self) -> dict[str, str]:
        """Options this configuration ignores, with why (a sweep must not search them)."""
        if self.matching == "decoupled":
            ignored = {"batch_real": "matching 'decoupled' releases every record's features once, unsampled",
                       "real_precision": "matching 'decoupled' computes its one release in float32"}
            if self.dsa_strategy == "none":
                ignored["augmentations"] = "dsa_strategy is 'none': there is nothing to draw"
            return ignored
        why = "they only shape matching 'decoupled' and matching is 'per-iteration'"
        return {"bank_size": why, "augmentations": why}


def run_ndpdc(real: Any, cfg: NDPDCConfig | None = None, seed: int | torch.Generator = 0,
              **options: Unpack[PrivateRunOptions]) -> SyntheticSet:
    """Distil the sensitive ``real`` ImageSet with NDPDC under ``ledger``'s budget; returns the synthetic set.

    ``mean``/``std`` must be public statistics (default 0.5 / 0.5; never computed from ``real``). The whole
    run is charged to ``ledger`` as ``ndpdc/feature_matching`` before the first release (per-iteration: all
    ``iterations`` steps; decoupled: the one release). ``noise`` is the
    privacy randomness (None: a fresh secret source). ``callback(iteration, loss)`` gets the matching loss
    against the noisy targets: post-processing of the charged release.
    """
    cfg = cfg if cfg is not None else NDPDCConfig()
    if cfg.matching == "decoupled":
        return _run_decoupled(real, cfg, seed, **options)
    m, dp = start_private("ndpdc", COMPONENT, real, cfg, seed, cfg.iterations, **options)
    opt = m.image_optimizer()

    def step(_: int) -> float:
        net = m.fresh_net()
        check_per_record_network(net, "ndpdc")
        loss = dp_feature_matching_loss(net, m.syn, dp.sampler, m.normalize, m.dsa, dp.clip, dp.sigma,
                                        noise=dp.noise, generator=m.g, precision=cfg.real_precision)
        return image_step(opt, loss, m.syn, m.normalize, cfg.clamp)

    return m.loop("NDPDC", step)


def _run_decoupled(real: Any, cfg: NDPDCConfig, seed: int | torch.Generator, **options: Any) -> SyntheticSet:
    """NDPDC with decoupled matching: one charged release before the loop, then free steps against it."""
    m, bank, targets = start_decoupled("ndpdc", COMPONENT, real, cfg, seed, **options)
    opt = m.image_optimizer()

    def step(_: int) -> float:
        loss = decoupled_matching_loss(bank, m.syn, targets, cfg.clip)
        return image_step(opt, loss, m.syn, m.normalize, cfg.clamp)

    return m.loop("NDPDC (decoupled)", step)


# What a distill job logs for NDPDC beyond its own keys. The step loss is ||noisy real mean - mean clip(f(syn))||²
# summed over classes: a function of the charged noisy targets and the synthetic images only (post-processing).
DISCLOSURE: dict[str, str] = {"distill_loss": CHARGED}

register("ndpdc", run_ndpdc, NDPDCConfig, private=True, disclosure=DISCLOSURE,
         description="non-linear DP dataset condensation (DM with clipped, noised real embeddings)")
