"""ConvNet of the dataset-condensation papers (DC / DSA / DM): [conv3x3 - norm - act - pool] x depth + linear."""

from __future__ import annotations

import math

import torch
from torch import nn

from dpdistill.models.instance_norm import InstanceNorm
from dpdistill.models.registry import choice, positive_int, register

NORMS = ("instance", "group", "batch", "layer", "none")
ACTS = ("relu", "sigmoid", "leakyrelu")
POOLS = ("avg", "max", "none")


def norm_layer(kind: str, width: int) -> nn.Module:
    """A 2-d normalisation layer over ``width`` channels, named as in the DC code (``instance`` is GroupNorm)."""
    if kind == "instance":
        # DC implements instance norm as one group per channel so it has affine parameters and no running stats
        # (an nn.GroupNorm with a faster channels-last CPU path: models/instance_norm.py).
        return InstanceNorm(width)
    if kind == "group":
        return nn.GroupNorm(math.gcd(4, width), width, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(width, affine=True)
    if kind == "layer":
        # GroupNorm(1, C) normalises over C,H,W like DC's LayerNorm but does not tie the model to one image size.
        return nn.GroupNorm(1, width, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


def activation(kind: str) -> nn.Module:
    """The activation named ``kind`` (relu | sigmoid | leakyrelu, slope 0.01 as in DC)."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    raise ValueError(f"unknown activation {kind!r}")


class ConvNet(nn.Module):
    """DC's ConvNet for square images of any size from 1 px up.

    28x28 inputs get ``padding=3`` on the first conv (28 -> 32), as DC does for MNIST, so the feature map
    follows the 32 -> 16 -> 8 -> 4 path. Each block halves the map with its pooling layer only while the map is
    at least 2x2: deeper blocks on small images keep their conv/norm/act but skip the pooling, so the feature
    map never shrinks below 1x1 and ``depth`` is honoured (8x8 with depth 4: 8 -> 4 -> 2 -> 1 -> 1).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
        act: str = "relu",
        pool: str = "avg",
    ) -> None:
        super().__init__()
        width = positive_int("convnet", "width", width)
        depth = positive_int("convnet", "depth", depth)
        norm = choice("convnet", "norm", norm, NORMS)
        act = choice("convnet", "act", act, ACTS)
        pool = choice("convnet", "pool", pool, POOLS)
        layers: list[nn.Module] = []
        in_channels, size = channels, image_size
        for d in range(depth):
            padding = 3 if (d == 0 and image_size == 28) else 1
            layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=padding))
            size = size + 2 * padding - 2
            layers.append(norm_layer(norm, width))
            layers.append(activation(act))
            if pool != "none" and size >= 2:
                layers.append(nn.AvgPool2d(2, 2) if pool == "avg" else nn.MaxPool2d(2, 2))
                size //= 2
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.feature_shape = (width, size, size)
        self.feature_dim = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, feature_dim] (the flattened last feature map, as DM matches)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes]."""
        return self.classifier(self.embed(x))


@register("convnet")
def convnet(
    channels: int,
    num_classes: int,
    image_size: int,
    width: int = 128,
    depth: int = 3,
    norm: str = "instance",
    act: str = "relu",
    pool: str = "avg",
) -> ConvNet:
    """DC's ConvNet (see :class:`ConvNet`)."""
    return ConvNet(channels, num_classes, image_size, width=width, depth=depth, norm=norm, act=act, pool=pool)
