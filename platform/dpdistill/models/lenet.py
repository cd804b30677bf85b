"""The LeNet of "Deep Leakage from Gradients" (Zhu et al., 2019): three 5x5 convs, sigmoid, no pooling."""

from __future__ import annotations

import math

import torch
from torch import nn

from dpdistill.models.convnet import activation
from dpdistill.models.registry import choice, register

ACTS = ("sigmoid", "relu", "leakyrelu")


class LeNet(nn.Module):
    """DLG's LeNet: conv5x5/2 -> conv5x5/2 -> conv5x5/1 (12 channels, padding 2), then one linear layer.

    Twice-differentiable everywhere with the default sigmoid, which gradient-inversion attacks need. Each
    stride-2 conv maps size s to ceil(s/2), so 32 -> 768 features (as in the paper), 28 -> 588, 8 -> 48.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, act: str = "sigmoid") -> None:
        super().__init__()
        act = choice("lenet", "act", act, ACTS)
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2),
            _act(act),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            _act(act),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            _act(act),
        )
        size = math.ceil(math.ceil(image_size / 2) / 2)
        self.feature_dim = 12 * size * size
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened conv features [N, feature_dim]."""
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes]."""
        return self.fc(self.embed(x))


def _act(kind: str) -> nn.Module:
    # Not in-place: attacks take second-order gradients through the activations.
    return nn.ReLU() if kind == "relu" else activation(kind)


@register("lenet")
def lenet(channels: int, num_classes: int, image_size: int, act: str = "sigmoid") -> LeNet:
    """DLG's LeNet (see :class:`LeNet`)."""
    return LeNet(channels, num_classes, image_size, act=act)
