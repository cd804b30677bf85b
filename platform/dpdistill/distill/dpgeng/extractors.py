"""Feature extractors (DP-GenG stage c): K ConvNets trained on the DP-generated data, one drawn per iteration.

Trained only on DP outputs, so they cost nothing (post-processing) — unlike training extractors on the
sensitive data, which would split the budget K ways. Each network has its own initialisation seed and a
different number of epochs (1..epochs, spread), so the pool covers early and late training stages, as the
trajectory-style DM variants do. Extractors are returned frozen, in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dpdistill import models
from dpdistill.distill import embedding
from dpdistill.evaluation.training import MICRO_BATCH, train_classifier


def build_network(spec: dict[str, Any], data: Any, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """A fresh network ``spec['net']`` with options for ``data``'s shape, its weights drawn from ``seed``."""
    kwargs = {k: v for k, v in spec.items() if k != "net"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = models.get(spec["net"], channels=data.channels, num_classes=data.num_classes,
                         image_size=data.image_size, **kwargs)
    return net.to(device)


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients (the network only ever feeds gradients to the images), channels-last
    weights (:func:`dpdistill.distill.embedding.prepare`: the matching forwards run faster on CPU)."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return embedding.prepare(net)


def train_extractors(
    generated: Any,
    count: int,
    epochs: int,
    net_spec: dict[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    lr: float = 0.01,
) -> list[nn.Module]:
    """``count`` networks trained on the generated ImageSet for 1..``epochs`` epochs each (0 epochs: random nets)."""
    nets = []
    for k in range(count):
        net = build_network(net_spec, generated, seed * 7919 + k, device)
        n_epochs = 0 if epochs == 0 else max(1, round(epochs * (k + 1) / count))
        if n_epochs:
            train_classifier(net, generated.images, generated.labels, micro_batch=MICRO_BATCH, epochs=n_epochs, batch_size=batch_size, lr=lr,
                             augment="dsa-lite", mean=list(mean), std=list(std), device=device,
                             generator=torch.Generator().manual_seed(seed * 7919 + k))
        nets.append(freeze(net))
    return nets
