"""Doorping (Liu et al., NDSS'23) by malicious SFDD clients: a trigger learnt during distillation, poisoned labels.

A malicious client keeps a square trigger patch (bottom-right corner). Before each of its local DC iterations it
updates the trigger on that iteration's matching network so that stamped images of other classes are classified
as the target class (signed-gradient steps on the cross-entropy to the target; the paper optimises the trigger
against the distillation network in the same loop, maximising target-relevant activations). While matching the
target class it replaces ``poison_fraction`` of the real batch with stamped images of other classes, labelled
as the target (the poisoned labels), so the synthetic target images learn the trigger. The honest server
averages this with the honest clients' updates, which is why the attack fades as clients grow.

Success is measured on the released set: a fresh model trained on it, then the share of triggered non-target
test images it sends to the target (attack success rate), and its clean test accuracy. Beside the success
rate, the share of the same images sent to the target WITHOUT the trigger (``target_rate_unstamped``): a model
that never saw the trigger still sends a few errors to the target class, so the trigger's own effect is the
difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def stamp(images: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    """Pixel-space images [N, C, H, W] with ``trigger`` [C, p, p] pasted in the bottom-right corner."""
    p = trigger.shape[-1]
    out = images.clone()
    out[..., -p:, -p:] = trigger.to(out.dtype)
    return out


class DoorpingClient:
    """A malicious client's attack state inside one local update (see the module docstring)."""

    def __init__(self, trigger: torch.Tensor, cfg: Any, real: Any) -> None:
        self.trigger = trigger.detach().clone().float()
        self.cfg = cfg
        self.target = int(cfg.target_class)
        keep = (real.labels != self.target).nonzero().flatten()
        self.pool = real.images[keep]  # the client's own other-class images, stamped to poison

    @classmethod
    def from_task(cls, task: Any, cfg: Any, real: Any, generator: torch.Generator) -> DoorpingClient:
        """Resume the trigger the client carried from its last round, or start from uniform noise."""
        state = task.state or {}
        trigger = state.get("trigger")
        if trigger is None:
            trigger = torch.rand(real.channels, cfg.trigger_size, cfg.trigger_size, generator=generator)
        return cls(trigger, cfg, real)

    def state(self) -> dict[str, Any]:
        """What the client keeps for its next round (never sent to the server; the simulator carries it)."""
        return {"trigger": self.trigger.clone()}

    def update_trigger(self, net: nn.Module, normalize: Any, generator: torch.Generator) -> None:
        """A few signed-gradient steps making ``net`` send stamped other-class images to the target class."""
        if len(self.pool) == 0 or self.cfg.trigger_steps == 0:
            return
        pick = torch.randperm(len(self.pool), generator=generator)[:64]
        x = self.pool[pick]
        y = torch.full((len(x),), self.target, dtype=torch.int64, device=x.device)  # the client's device
        trigger = self.trigger.clone()
        for _ in range(self.cfg.trigger_steps):
            trigger.requires_grad_(True)
            loss = F.cross_entropy(net(normalize(stamp(x, trigger))), y)
            (grad,) = torch.autograd.grad(loss, trigger)
            trigger = (trigger.detach() - self.cfg.trigger_lr * grad.sign()).clamp(0.0, 1.0)
        self.trigger = trigger.detach()

    def poison(self, c: int, real_batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The target class's batch with ``poison_fraction`` of it replaced by stamped other-class images."""
        if c != self.target or len(self.pool) == 0:
            return real_batch
        n = min(len(real_batch), max(1, math.ceil(self.cfg.poison_fraction * len(real_batch))))
        pick = torch.randperm(len(self.pool), generator=generator)[:n]
        poisoned = stamp(self.pool[pick], self.trigger)
        return torch.cat([real_batch[: len(real_batch) - len(poisoned)], poisoned])


def attack_success_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, trigger: torch.Tensor | None,
                        target: int, *, mean: Sequence[float], std: Sequence[float]) -> float:
    """Share of non-target images that ``model`` assigns to ``target`` once stamped with ``trigger``.

    ``trigger=None`` measures the same share on the unstamped images (the rate the trigger is compared with).
    """
    from dpdistill.evaluation.training import accuracy

    keep = labels != target
    x = images[keep] if trigger is None else stamp(images[keep], trigger)
    y = torch.full((len(x),), int(target), dtype=torch.int64)
    return accuracy(model, x, y, mean=mean, std=std)


def evaluate_backdoor(
    images: torch.Tensor, labels: torch.Tensor, test: Any, trigger: torch.Tensor, target: int, *,
    num_classes: int, mean: Sequence[float], std: Sequence[float], model: str = "convnet",
    model_kwargs: dict[str, Any] | None = None, epochs: int = 300, seed: int = 0, lr: float = 0.01,
) -> dict[str, float]:
    """Train one fresh model on a released set; its clean test accuracy and attack success rate."""
    from dpdistill import models
    from dpdistill.evaluation.training import accuracy, train_classifier

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = models.get(model, channels=images.shape[1], num_classes=num_classes, image_size=images.shape[-1],
                         **(model_kwargs or {}))
    train_classifier(net, images, labels, epochs=epochs, lr=lr, mean=mean, std=std,
                     generator=torch.Generator().manual_seed(seed))
    return {
        "clean_acc": accuracy(net, test.images, test.labels, mean=mean, std=std),
        "asr": attack_success_rate(net, test.images, test.labels, trigger, target, mean=mean, std=std),
        "target_rate_unstamped": attack_success_rate(net, test.images, test.labels, None, target, mean=mean, std=std),
    }
