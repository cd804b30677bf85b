"""ResNet-18 adapted to small images (3x3 stem, no max-pool), with DC's choice of batch / instance / group norm."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dpdistill.models.convnet import norm_layer
from dpdistill.models.registry import choice, register

NORMS = ("batch", "instance", "group")


def _norm(kind: str, width: int) -> nn.Module:
    # ResNet's group norm uses 32 groups (Wu & He), not ConvNet's 4.
    if kind == "group32":
        return nn.GroupNorm(min(32, width), width, affine=True)
    return norm_layer(kind, width)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a (projected when shapes change) identity shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                _norm(norm, planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (widths 64-512, strides 1,2,2,2) for 8x8..64x64 inputs; global average pool -> 512 features.

    ``norm="group"`` uses 32 groups; ``"instance"`` is one group per channel, as in the DC code.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "batch") -> None:
        super().__init__()
        norm = choice("resnet18", "norm", norm, NORMS)
        if norm == "group":
            norm = "group32"
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(norm, 64)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(in_planes, planes, stride, norm), BasicBlock(planes, planes, 1, norm)
                )
            )
            in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.feature_dim = 512
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features [N, 512]."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes]."""
        return self.classifier(self.embed(x))


@register("resnet18")
def resnet18(channels: int, num_classes: int, image_size: int, norm: str = "batch") -> ResNet18:
    """ResNet-18 for small images (see :class:`ResNet18`)."""
    return ResNet18(channels, num_classes, image_size, norm=norm)
