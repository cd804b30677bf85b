"""Feature maps of the kernel methods: random Fourier features (DP-MERF, DP-Kernel) and NTK features (DP-NTK).

Both maps give every input a feature vector of L2 norm exactly 1, which is what bounds one record's
contribution to a released sum (see :func:`labelled_feature_sum`). Both are drawn from a seed, never from data,
so they cost no privacy and are rebuilt from ``(in_dim, num_features, bandwidth, seed)`` on load.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


class RandomFourierFeatures:
    """Random Fourier features of the Gaussian kernel exp(-||x - x'||² / (2 bandwidth²)) (Rahimi & Recht).

    ``phi(x) = [cos(xW), sin(xW)] / sqrt(D/2)`` with W ~ N(0, bandwidth⁻² I): phi(x)·phi(x') estimates the
    kernel and ||phi(x)|| = 1 for every x (each frequency contributes cos² + sin² = 1).
    """

    def __init__(self, in_dim: int, num_features: int, bandwidth: float, seed: int = 0) -> None:
        if num_features < 2 or num_features % 2:
            raise ValueError(f"num_features must be an even number >= 2, got {num_features}")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        self.in_dim, self.num_features, self.bandwidth, self.seed = in_dim, num_features, float(bandwidth), seed
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(in_dim, num_features // 2, generator=g) / self.bandwidth

    @property
    def dim(self) -> int:
        return self.num_features

    def to(self, device: torch.device | str) -> RandomFourierFeatures:
        self.weight = self.weight.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        proj = x.flatten(1) @ self.weight
        return torch.cat([proj.cos(), proj.sin()], dim=1) / math.sqrt(self.num_features // 2)


class NTKFeatures:
    """Empirical neural-tangent-kernel features of a random one-hidden-layer ReLU network, unit-normalised.

    f(x) = v · relu(W x + b) / sqrt(width) (NTK parametrisation) and phi(x) = ∇_θ f(x) / ||∇_θ f(x)|| with
    θ = (W, b, v), as DP-NTK (Yang et al., 2023) uses. The gradient has a closed form, so the features are
    computed without autograd per sample: ∂f/∂v = h, ∂f/∂b = u, ∂f/∂W = u xᵀ with h = relu(Wx + b)/√m and
    u = v ⊙ 1[Wx + b > 0]/√m. The W block (width × in_dim) dominates the dimension.
    """

    def __init__(self, in_dim: int, width: int = 800, seed: int = 0) -> None:
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.in_dim, self.width, self.seed = in_dim, width, seed
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(width, in_dim, generator=g) / math.sqrt(in_dim)
        self.b = torch.randn(width, generator=g) * 0.1
        self.v = torch.randn(width, generator=g)

    @property
    def dim(self) -> int:
        return self.width * (self.in_dim + 2)

    def to(self, device: torch.device | str) -> NTKFeatures:
        self.w, self.b, self.v = self.w.to(device), self.b.to(device), self.v.to(device)
        return self

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, u, x_aug) such that phi(x) = [u ⊗ x, u, h] / norm, without forming the outer product.

        Returned already divided by the per-sample norm, so sums of outer products u xᵀ over records give the
        W block of the summed (unit-norm) features.
        """
        x = x.flatten(1)
        pre = x @ self.w.T + self.b
        scale = 1.0 / math.sqrt(self.width)
        h = torch.relu(pre) * scale
        u = (pre > 0).to(x.dtype) * self.v * scale
        # ||u xᵀ||_F² = ||u||² ||x||²; the tiny floor keeps a dead unit (all-zero gradient) finite.
        norm = torch.sqrt(h.pow(2).sum(1) + u.pow(2).sum(1) * (1.0 + x.pow(2).sum(1))).clamp_min(1e-12)
        return h / norm[:, None], u / norm[:, None], x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features [N, dim] (for small inputs and tests; the methods use :meth:`class_sums`)."""
        h, u, x = self.parts(x)
        return torch.cat([(u[:, :, None] * x[:, None, :]).flatten(1), u, h], dim=1)

    def class_sums(self, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_i w_i phi(x_i) ⊗ e_{y_i} as [num_classes, dim], via one matrix product per class (no N × dim)."""
        h, u, x = self.parts(x)
        if weights is not None:
            h, u = h * weights[:, None], u * weights[:, None]
        out = []
        for k in range(num_classes):
            mask = labels == k
            uk, xk, hk = u[mask], x[mask], h[mask]
            out.append(torch.cat([(uk.T @ xk).flatten(), uk.sum(0), hk.sum(0)]))
        return torch.stack(out)


def labelled_feature_sum(
    feature_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Σ over EVERY record of ``feature_fn(x_batch, y_batch)`` (a per-batch sum), visiting all batches.

    The sum of a release must cover the whole sensitive set: summing only the first batch (the DP-NTK defect
    the issue names) would release a statistic of a few records while dividing by the count of all of them.
    """
    total: torch.Tensor | None = None
    for start in range(0, len(images), batch_size):
        xb = images[start : start + batch_size].to(device)
        yb = labels[start : start + batch_size].to(device)
        part = feature_fn(xb, yb)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("labelled_feature_sum: no records")
    return total
