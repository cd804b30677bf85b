"""The expert (DP-GenG stage d): trained on DP-generated data (free), then fine-tuned on the sensitive data with DP-SGD.

DP-SGD is the project's engine (:func:`dpdistill.training.dp_sgd.train_dp_sgd`): Poisson sampling at rate
q = 1 / ceil(N / batch), per-record gradients clipped to C (ghost clipping where the network allows it, else
opacus' hooks; the same clipped sum either way), one Gaussian draw of std σC on the sum per step, divided by the
expected batch q·N, then SGD with momentum. The privacy is accounted by OUR ledger: the whole fine-tuning,
PoissonGaussian(q, σ, steps), is charged before the first step, and exactly ``steps`` steps run.

Randomness: the Poisson masks and the noise come from the job's :class:`~dpdistill.privacy.noise.PrivacyRandomness`
(secret: OS entropy), never from the seed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpdistill.distill.dpgeng.extractors import build_network, freeze
from dpdistill.distill.private_matching import check_per_record_network
from dpdistill.errors import PrivacyError
from dpdistill.evaluation.training import MICRO_BATCH, train_classifier
from dpdistill.privacy import PoissonGaussian
from dpdistill.privacy import noise as privacy_noise
from dpdistill.privacy.noise import PrivacyRandomness

COMPONENT = "dpgeng/expert"


@dataclass(frozen=True)
class DPSGDPlan:
    """The fine-tuning's sampling rate, steps and noise multiplier: what is charged before it runs."""

    q: float
    steps: int
    sigma: float
    clip: float
    batch_size: int

    def mechanism(self) -> PoissonGaussian:
        return PoissonGaussian(self.q, self.sigma, self.steps)


def dpsgd_rate_and_steps(n: int, batch_size: int, epochs: float) -> tuple[float, int]:
    """Opacus' Poisson rate for a loader of ``n`` records and ``batch_size`` (1 / len(loader)) and the step count."""
    batches = max(1, math.ceil(n / batch_size))
    return 1.0 / batches, max(1, round(epochs * batches))


def pretrain_expert(generated: Any, net_spec: dict[str, Any], epochs: int, mean: Sequence[float],
                    std: Sequence[float], seed: int, device: str | torch.device = "cpu", lr: float = 0.01,
                    batch_size: int = 256) -> nn.Module:
    """The expert trained on the generated ImageSet only (post-processing of DP outputs: free)."""
    net = build_network(net_spec, generated, seed, device)
    if epochs > 0:
        train_classifier(net, generated.images, generated.labels, micro_batch=MICRO_BATCH, epochs=epochs, batch_size=batch_size, lr=lr,
                         augment="dsa-lite", mean=list(mean), std=list(std), device=device,
                         generator=torch.Generator().manual_seed(seed))
    return net


def dp_finetune(net: nn.Module, sensitive: Any, plan: DPSGDPlan, ledger: Any, mean: Sequence[float],
                std: Sequence[float], lr: float = 0.01, device: str | torch.device = "cpu",
                note: str = "", *, noise: PrivacyRandomness | None = None) -> nn.Module:
    """Fine-tune ``net`` on the sensitive ImageSet with DP-SGD (SGD, momentum 0.9), charging ``plan`` first.

    Returns a frozen fine-tuned copy (``net`` itself is unchanged). The sensitive images are normalised in
    memory only; nothing of them leaves this function but the noisy model. The Poisson sampling and the
    gradient noise draw from ``noise`` (None: a fresh secret source); there is no seed to pass.
    """
    from dpdistill.training.dp_sgd import DPSGDSchedule, FineTuneObjective, train_dp_sgd

    noise = privacy_noise.resolve(noise)
    if not plan.sigma > 0:  # a noiseless step would be a non-private release: refuse before anything is charged
        raise PrivacyError(f"expert DP-SGD needs a noise multiplier > 0, got {plan.sigma!r}")
    q, _ = dpsgd_rate_and_steps(len(sensitive), plan.batch_size, 1)
    if abs(q - plan.q) > 1e-12:
        raise PrivacyError(f"DP-SGD plan rate {plan.q} is not the rate of {len(sensitive)} records in batches of "
                           f"{plan.batch_size} ({q})")
    start = copy.deepcopy(net).to(device).train()
    check_per_record_network(start, "expert")
    for p in start.parameters():
        p.requires_grad_(True)
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    images = (sensitive.images - m) / s
    schedule = DPSGDSchedule(sigma=plan.sigma, q=plan.q, steps=plan.steps, clip=plan.clip,
                             n_records=len(sensitive), lr=lr, optimizer="sgd", momentum=0.9)
    ledger.charge(COMPONENT, plan.mechanism(), note=note or f"DP-SGD fine-tuning, clip C={plan.clip:g}")
    state = train_dp_sgd(FineTuneObjective(start, str(device)), None, images, sensitive.labels, schedule, noise,
                         device=device)
    start.load_state_dict(state)
    return freeze(start)
