"""Shared networks of the synthesisers: a conditional convolutional generator and a conditional critic.

The generator follows DP-MERF's ConvCondGen (latent + one-hot label → two dense layers → two upsample-conv
blocks → sigmoid), sized for any square image: it starts from a ceil(size/4) map and resizes at the end
when 4·ceil(size/4) ≠ size. The critic uses only layers opacus computes per-sample gradients for
(Conv2d, GroupNorm, Linear), so DP-GAN can train it with DP-SGD.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ConvCondGenerator(nn.Module):
    """G(z, y): latent [N, z_dim] and labels [N] → images [N, C, S, S] in [0, 1]."""

    def __init__(self, z_dim: int, num_classes: int, channels: int, image_size: int, width: int = 32,
                 hidden: int = 256) -> None:
        super().__init__()
        self.z_dim, self.num_classes, self.channels, self.image_size = z_dim, num_classes, channels, image_size
        self.start = max(1, math.ceil(image_size / 4))
        self.width = width
        self.dense = nn.Sequential(
            nn.Linear(z_dim + num_classes, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 2 * width * self.start * self.start),
            nn.BatchNorm1d(2 * width * self.start * self.start), nn.ReLU(inplace=True),
        )
        self.conv1 = nn.Conv2d(2 * width, width, 5, padding=2)
        self.norm1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, channels, 5, padding=2)
        # Channels-last conv weights: oneDNN then runs the convolutions (and their backward) in NHWC, ~1.5x
        # faster per DP-MERF generator step on CPU (benchmarks/results/speed.md); the values are the same.
        self.to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.dense(torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], dim=1))
        h = h.view(-1, 2 * self.width, self.start, self.start)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.relu(self.norm1(self.conv1(h)))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        x = torch.sigmoid(self.conv2(h))
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x


class ConvCondCritic(nn.Module):
    """D(x, y): images and labels → one score per image; labels enter as one-hot constant channels."""

    def __init__(self, num_classes: int, channels: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(channels + num_classes, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.GroupNorm(min(8, 2 * width), 2 * width),
            nn.LeakyReLU(0.2),
        )
        with torch.no_grad():
            dim = self.features(torch.zeros(1, channels + num_classes, image_size, image_size)).numel()
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        maps = F.one_hot(y, self.num_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return self.head(self.features(torch.cat([x, maps], dim=1)).flatten(1)).squeeze(1)
