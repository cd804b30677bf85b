"""Image grids of released sets (one row per class), for the run folder and MLflow.

Only ever call this on released outputs (distilled or DP-synthetic images), never on sensitive data.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_class_grid(
    images: torch.Tensor, labels: torch.Tensor, path: Path, *, num_classes: int, per_class: int = 10,
    upscale_to: int = 32,
) -> Path:
    """Save a PNG grid: row c holds up to ``per_class`` images of class c (blank where fewer)."""
    import torch.nn.functional as F
    from torchvision.utils import save_image

    images = images.detach().float().cpu().clamp(0, 1)
    labels = labels.detach().cpu()
    c, h, w = images.shape[1:]
    if h < upscale_to:  # 8x8 digits are unreadable at native size
        scale = max(1, upscale_to // h)
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
        h, w = images.shape[2:]
    tiles = torch.ones(num_classes * per_class, c, h, w)
    for k in range(num_classes):
        idx = (labels == k).nonzero().flatten()[:per_class]
        tiles[k * per_class : k * per_class + len(idx)] = images[idx]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles, str(path), nrow=per_class, padding=2, pad_value=0.5)
    return path
