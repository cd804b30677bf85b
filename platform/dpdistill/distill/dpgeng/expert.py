"""The expert (DP-GenG stage d): trained on DP-generated data (free), then fine-tuned on the sensitive data with DP-SGD.

DP-SGD is opacus' (per-record gradients clipped to C, Gaussian noise σC on the sum, Poisson sampling at rate
q = 1 / ceil(N / batch)), but the privacy is accounted by OUR ledger: the whole fine-tuning,
PoissonGaussian(q, σ, steps), is charged before the first step, and exactly ``steps`` steps run. Opacus'
own accountant is not consulted.

Randomness: opacus' Poisson sampler (the DPDataLoader inherits the loader's generator) and its noise
(``noise_generator``) both get generators from the job's :class:`~dpdistill.privacy.noise.PrivacyRandomness`
(secret: OS entropy), never from the seed. Opacus' ``secure_mode`` (torchcsprng) is unavailable for this
torch; see :mod:`dpdistill.privacy.noise` for what fresh entropy per generator does and does not cover.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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


def _no_inplace(net: nn.Module) -> nn.Module:
    # Opacus' backward hooks refuse in-place activations on hooked outputs.
    for m in net.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return net


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
    """Fine-tune ``net`` on the sensitive ImageSet with opacus DP-SGD, charging ``plan`` to ``ledger`` first.

    Returns a frozen copy of the fine-tuned network (no opacus hooks). The sensitive images are normalised in
    memory only; nothing of them leaves this function but the noisy model. The Poisson sampling and the
    gradient noise draw from ``noise`` (None: a fresh secret source); there is no seed to pass.
    """
    from opacus import PrivacyEngine

    from dpdistill.privacy.opacus_noise import draw_noise_from

    noise = privacy_noise.resolve(noise)
    if not plan.sigma > 0:  # opacus would add zeros for σ = 0: refuse before anything is charged or trained
        raise PrivacyError(f"expert DP-SGD needs a noise multiplier > 0, got {plan.sigma!r}")
    net = _no_inplace(copy.deepcopy(net)).to(device).train()
    check_per_record_network(net, "expert")
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    dataset = TensorDataset((sensitive.images - m) / s, sensitive.labels)
    # Opacus' DPDataLoader keeps this loader's generator for its Poisson masks (make_private without secure_mode).
    loader = DataLoader(dataset, batch_size=plan.batch_size, generator=noise.generator())
    q, _ = dpsgd_rate_and_steps(len(dataset), plan.batch_size, 1)
    if abs(q - plan.q) > 1e-12:
        raise RuntimeError(f"DP-SGD plan rate {plan.q} differs from the loader's {q}")
    ledger.charge(COMPONENT, plan.mechanism(), note=note or f"DP-SGD fine-tuning, clip C={plan.clip:g}")
    template = copy.deepcopy(net)  # a hook-free copy to load the result into
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG notice and full-backward-hook notices
        engine = PrivacyEngine(accountant="rdp")  # its accountant is ignored; the ledger above is authoritative
        private, optimizer, private_loader = engine.make_private(
            module=net, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.sigma,
            max_grad_norm=plan.clip, poisson_sampling=True,
            noise_generator=noise.generator(next(net.parameters()).device),
        )
        # Its noise through the privacy source's guarded gaussian(), not opacus' own draw (zeros at σ = 0).
        draw_noise_from(optimizer, noise)
        if abs(private_loader.sample_rate - plan.q) > 1e-12:
            raise RuntimeError(f"opacus samples at {private_loader.sample_rate}, the ledger was charged {plan.q}")
        if getattr(private_loader.batch_sampler, "generator", None) is not loader.generator:
            # Opacus changed how it builds the Poisson sampler: the masks might no longer be secret.
            raise RuntimeError("opacus' Poisson sampler does not use the privacy source's generator")
        done = 0
        while done < plan.steps:
            for x, y in private_loader:
                if done >= plan.steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(private(x.to(device)), y.to(device)).backward()
                optimizer.step()
                done += 1
    template.load_state_dict(private._module.state_dict())
    return freeze(template)
