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

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad, vmap

from dpdistill.distill.augment import siamese_pair
from dpdistill.distill.dc import (
    DCConfig,
    _train_inner,
    gradient_matching_iteration,
    synthetic_training_set,
)
from dpdistill.distill.loop import PrivateRunOptions
from dpdistill.distill.losses import gradient_distance, network_gradients, trainable_parameters
from dpdistill.distill.options import PrivateMatchingOptions
from dpdistill.distill.private_matching import check_per_record_network, start_private
from dpdistill.distill.registry import register
from dpdistill.distill.synthetic import SyntheticSet
from dpdistill.privacy.disclosure import CHARGED
from dpdistill.privacy.dp_ops import clipped_per_example_sum, noisy_mean

if TYPE_CHECKING:
    from typing import Unpack

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
    total = [torch.zeros(p.shape, device=x.device) for p in trainable_parameters(net)]
    for start in range(0, len(x), chunk):
        per = per_sample_gradients(net, x[start:start + chunk], y[start:start + chunk])
        for t, s in zip(total, clipped_per_example_sum(per, clip), strict=True):
            t += s
    return total


def run_psg(real: Any, cfg: PSGConfig | None = None, seed: int | torch.Generator = 0,
            **options: Unpack[PrivateRunOptions]) -> SyntheticSet:
    """Distil the sensitive ``real`` ImageSet with PSG under ``ledger``'s budget; returns the synthetic set.

    ``mean``/``std`` must be public statistics (default 0.5 / 0.5). The run is charged to ``ledger`` as
    ``psg/gradient_matching`` before the first release. ``noise`` is the privacy randomness (None: a fresh
    secret source). ``callback(iteration, loss)`` gets the gradient-matching distance to the noisy real
    gradients: post-processing of the charged release.
    """
    cfg = cfg if cfg is not None else PSGConfig()
    outer_loop, inner_loop = cfg.loops()
    m, dp = start_private("psg", COMPONENT, real, cfg, seed, cfg.iterations * outer_loop, **options)
    opt_img = m.image_optimizer()

    def step(_: int) -> float:
        net = m.fresh_net(frozen=False)
        check_per_record_network(net, "psg")
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)

        def class_loss(c: int) -> torch.Tensor:
            xr = m.normalize(dp.sampler.sample(c, dp.noise))
            xs = m.normalize(m.syn.class_images(c))
            xr, xs = siamese_pair(m.dsa, xr, xs, m.g)
            yr = torch.full((len(xr),), c, dtype=torch.int64, device=m.device)
            ys = torch.full((len(xs),), c, dtype=torch.int64, device=m.device)
            sums = clipped_gradient_sum(net, xr, yr, dp.clip, cfg.chunk)
            expected = dp.sampler.expected_size(c)
            # The only released view of the real batch: its clipped sum plus secret noise.
            gw_real = [noisy_mean(s, dp.clip, dp.sigma, expected, dp.noise) for s in sums]
            gw_syn = network_gradients(net, xs, ys, create_graph=True, params=trainable_parameters(net))
            return gradient_distance(gw_syn, gw_real, cfg.distance)

        def inner() -> None:
            # The network trains on the synthetic set only (post-processing), without DSA.
            x_train, y_train = synthetic_training_set(m)
            _train_inner(net, opt_net, x_train, y_train, inner_loop, cfg.batch_train, None, m.g)

        return gradient_matching_iteration(m, net, opt_img, class_loss, inner)

    return m.loop("PSG", step)


# What a distill job logs for PSG beyond its own keys. The step loss is the distance between the synthetic
# gradients and the NOISY real ones (the network trains on synthetic data only): post-processing of charged
# releases, never a loss on a real batch.
DISCLOSURE: dict[str, str] = {"distill_loss": CHARGED}

register("psg", run_psg, PSGConfig, private=True, disclosure=DISCLOSURE,
         description="private set generation (DP gradient matching with per-record clipping)")
