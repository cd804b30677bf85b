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


class LeNet5(nn.Module):
    """The classic LeNet-5 the dataset-distillation papers (DC, DSA, DM) evaluate cross-architecture with:
    conv5x5 (6) - ReLU - maxpool - conv5x5 (16) - ReLU - maxpool - fc 120 - fc 84 - fc classes.

    As in DC's code, grey images get padding 2 on the first conv (28 -> 28, so MNIST follows the 32 -> 5x5
    path of CIFAR) and colour images none. Small images (the embedded 8x8 ``digits``) also get padding 2 on the
    second conv so the map never vanishes; a pooling layer is skipped once the map is 1 pixel.
    (:class:`LeNet` is a different network: DLG's sigmoid LeNet, a gradient-inversion target.)
    """

    def __init__(self, channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = image_size
        for in_c, out_c, pad in ((channels, 6, 2 if channels == 1 else 0), (6, 16, None)):
            if pad is None:  # second conv: unpadded as in DC unless the map is too small to survive it
                pad = 0 if size >= 9 else 2
            layers += [nn.Conv2d(in_c, out_c, kernel_size=5, padding=pad), nn.ReLU(inplace=True)]
            size = size + 2 * pad - 4
            if size < 1:
                raise ValueError(f"lenet5: {image_size}x{image_size} images are too small")
            if size >= 2:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.feature_dim = 16 * size * size
        self.classifier = nn.Sequential(nn.Linear(self.feature_dim, 120), nn.ReLU(inplace=True),
                                        nn.Linear(120, 84), nn.ReLU(inplace=True))
        self.fc = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 84 penultimate activations [N, 84]."""
        return self.classifier(self.features(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes]."""
        return self.fc(self.embed(x))


@register("lenet5")
def lenet5(channels: int, num_classes: int, image_size: int) -> LeNet5:
    """LeNet-5 as DC/DM evaluate cross-architecture (see :class:`LeNet5`)."""
    return LeNet5(channels, num_classes, image_size)
