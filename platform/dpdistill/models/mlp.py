"""A small multilayer perceptron: the non-convolutional architecture of the cross-architecture evaluation."""

from __future__ import annotations

import torch
from torch import nn

from dpdistill.models.registry import positive_int, register


class MLP(nn.Module):
    """Flattened pixels -> ``depth`` hidden layers of ``width`` ReLU units -> linear logits.

    No spatial inductive bias at all, so a release that only suits ConvNets (e.g. images distilled through a
    ConvNet's features) shows it here.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 256, depth: int = 2) -> None:
        super().__init__()
        width = positive_int("mlp", "width", width)
        depth = positive_int("mlp", "depth", depth)
        layers: list[nn.Module] = []
        size = channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU(inplace=True)]
            size = width
        self.body = nn.Sequential(nn.Flatten(), *layers)
        self.feature_dim = size
        self.fc = nn.Linear(size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's activations [N, feature_dim]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes]."""
        return self.fc(self.embed(x))


@register("mlp")
def mlp(channels: int, num_classes: int, image_size: int, width: int = 256, depth: int = 2) -> MLP:
    """A ``depth``-hidden-layer MLP of ``width`` units (see :class:`MLP`)."""
    return MLP(channels, num_classes, image_size, width=width, depth=depth)
