"""PSG: private set generation by DP gradient matching (Chen, Kerkouche & Fritz, NeurIPS'22), a DP-GenG baseline.

DC's loop with a private real side: per iteration a fresh ConvNet; ``outer_loop`` times, for every class a
Poisson batch of sensitive records gives per-record gradients of the network's cross-entropy (all
parameters), each clipped to total L2 norm C, summed, released with N(0, (σC)² I) noise and divided by the
expected batch size; the synthetic images (noise-initialised) move to match that gradient (DC's layer-wise
distance by default). Between matching steps the network trains on the synthetic set only (post-processing).

Sensitivity and accounting as in DP feature matching: a record enters only its own class's gradient sum, by
at most C, so one matching step over all classes is one class's Poisson-Gaussian step (parallel composition,
largest per-class rate); the run is charged as ``iterations * outer_loop`` steps before it starts.

Randomness: the Poisson batches and the noise come from ``noise`` (a secret
:class:`~dpdistill.privacy.noise.PrivacyRandomness` unless the caller passes a reproducible one, which is
NOT PRIVATE); ``seed`` drives only the data-independent draws (networks, noise init, DSA, the order of the
synthetic set in the network's training).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad, vmap

from dpdistill.distill.augment import siamese_pair
from dpdistill.distill.dc import DCConfig
from dpdistill.distill.dm import as_generator, build_net, check_real, dsa_for, progress_steps
from dpdistill.distill.dpgeng.allocation import require_ledger, solve_free_sigma
from dpdistill.distill.dpgeng.feature_matching import (
    CLASS_SIZES_NOTE,
    PoissonClassSampler,
    check_per_record_network,
    feature_matching_mechanism,
    private_normalizer,
)
from dpdistill.distill.loop import apply_image_gradient, partial_set_on_interrupt
from dpdistill.distill.losses import gradient_distance, network_gradients, trainable_parameters
from dpdistill.distill.options import PrivateMatchingOptions
from dpdistill.distill.registry import register
from dpdistill.distill.synthetic import SyntheticSet
from dpdistill.privacy import noise as privacy_noise
from dpdistill.privacy.disclosure import CHARGED
from dpdistill.privacy.noise import PrivacyRandomness

Callback = Callable[[int, float], None]
COMPONENT = "psg/gradient_matching"


class PSGConfig(PrivateMatchingOptions, DCConfig):
    """PSG options: DC's, plus the clip norm C of each record's gradient and (optionally) a fixed noise
    multiplier (:class:`PrivateMatchingOptions`)."""

    iterations: int = Field(200, ge=0, description="outer iterations (a fresh random network each)")
    batch_real: int = Field(128, ge=1, description="expected Poisson batch per class (rate = batch / class size)")
    outer_loop: int | None = Field(5, ge=1, description="DP matching steps per network")
    inner_loop: int | None = Field(1, ge=0, description="epochs on the synthetic set between matching steps")
    init: Literal["noise"] = Field("noise", description="noise only: initialising from real records would leak")
    inner_on: Literal["synthetic"] = Field("synthetic", description="the network trains on synthetic data only")
    chunk: int = Field(64, ge=1, description="records per vectorised per-sample-gradient call (memory)")


def per_sample_gradients(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-record gradients of the cross-entropy w.r.t. ``net``'s trainable parameters: one [N, *shape] each."""
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in net.named_parameters() if not p.requires_grad}
    buffers = dict(net.named_buffers())

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(net, ({**p, **frozen}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return [grads[n] for n in names]


def clipped_gradient_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float,
                         chunk: int = 64) -> list[torch.Tensor]:
    """Σ_i clip(∇ℓ(x_i, y_i)) with each record's whole gradient scaled to L2 norm ≤ ``clip`` (sensitivity C)."""
    shapes = [p.shape for p in trainable_parameters(net)]
    total = [torch.zeros(s, device=x.device) for s in shapes]
    for start in range(0, len(x), chunk):
        per = per_sample_gradients(net, x[start:start + chunk], y[start:start + chunk])
        norms = torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in per))
        scale = (clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        for t, g in zip(total, per, strict=True):
            t += torch.einsum("n,n...->...", scale, g)
    return total


def _train_on_synthetic(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
                        batch_size: int, generator: torch.Generator) -> None:
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def run_psg(
    real: Any,
    cfg: PSGConfig | None = None,
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
    """Distil the sensitive ``real`` ImageSet with PSG under ``ledger``'s budget; returns the synthetic set.

    ``mean``/``std`` must be public statistics (default 0.5 / 0.5). The run is charged to ``ledger`` as
    ``psg/gradient_matching`` before the first release. ``noise`` is the privacy randomness (None: a fresh
    secret source). ``callback(iteration, loss)`` gets the gradient-matching distance to the noisy real
    gradients: post-processing of the charged release.
    """
    cfg = cfg if cfg is not None else PSGConfig()
    ledger = require_ledger(ledger, "psg")
    noise = privacy_noise.resolve(noise)
    check_real(real, cfg)
    device = torch.device(device)
    g = as_generator(seed)
    shape = (real.channels, real.image_size, real.image_size)
    syn = SyntheticSet.from_noise(real.num_classes, cfg.stored_ipc, shape, g, cfg.factor, device=device)
    sampler = PoissonClassSampler(real, cfg.batch_real, device)
    normalize = private_normalizer(mean, std, real.channels, device)
    dsa = dsa_for(cfg)
    outer_loop, inner_loop = cfg.loops()
    steps = cfg.iterations * outer_loop
    sigma = cfg.sigma
    if steps > 0:
        def make(s: float) -> Any:
            return feature_matching_mechanism(sampler.max_rate, s, steps, real.num_classes)

        sigma = sigma if sigma is not None else solve_free_sigma(ledger, make)
        ledger.charge(COMPONENT, make(sigma), note=f"clip C={cfg.clip:g}; {CLASS_SIZES_NOTE}")
    syn.sigma = sigma  # type: ignore[attr-defined]
    opt_img = torch.optim.SGD([syn.images], lr=cfg.lr_img, momentum=cfg.momentum)
    with partial_set_on_interrupt(syn), progress_steps(cfg.iterations, "PSG", progress) as advance:
        for it in range(cfg.iterations):
            net = build_net(cfg, real, g, device)
            net.train()
            check_per_record_network(net, "psg")
            opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
            total = 0.0
            for ol in range(outer_loop):
                opt_img.zero_grad(set_to_none=True)
                weights = trainable_parameters(net)
                for c in range(syn.num_classes):
                    xr = normalize(sampler.sample(c, noise))
                    xs = normalize(syn.class_images(c))
                    xr, xs = siamese_pair(dsa, xr, xs, g)
                    yr = torch.full((len(xr),), c, dtype=torch.int64, device=device)
                    ys = torch.full((len(xs),), c, dtype=torch.int64, device=device)
                    sums = clipped_gradient_sum(net, xr, yr, cfg.clip, cfg.chunk)
                    expected = sampler.expected_size(c)
                    # The only released view of the real batch: its clipped sum plus secret noise.
                    gw_real = [noise.add_gaussian(s, sigma * cfg.clip) / expected for s in sums]
                    gw_syn = network_gradients(net, xs, ys, create_graph=True, params=weights)
                    loss = gradient_distance(gw_syn, gw_real, cfg.distance)
                    loss.backward()
                    total += float(loss.detach())
                apply_image_gradient(opt_img, syn, normalize, cfg.clamp)
                if ol == outer_loop - 1 or inner_loop == 0:
                    continue
                with torch.no_grad():
                    x_train, y_train = syn.decoded()
                    x_train = normalize(x_train)
                _train_on_synthetic(net, opt_net, x_train, y_train, inner_loop, cfg.batch_train, g)
            value = total / outer_loop
            advance(value)
            if callback is not None:
                callback(it, value)
    return syn


# What a distill job logs for PSG beyond its own keys. The step loss is the distance between the synthetic
# gradients and the NOISY real ones (the network trains on synthetic data only): post-processing of charged
# releases, never a loss on a real batch.
DISCLOSURE: dict[str, str] = {"distill_loss": CHARGED}

register("psg", run_psg, PSGConfig, private=True, disclosure=DISCLOSURE,
         description="private set generation (DP gradient matching with per-record clipping)")
