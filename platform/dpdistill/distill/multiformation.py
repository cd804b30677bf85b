"""Multi-formation (IDC, Kim et al. ICML'22): one stored HxW image holds f x f smaller images.

``decode`` cuts each stored image into an f x f grid of blocks and upsamples every block back to HxW
(bilinear), so a budget of ``ipc`` stored images trains on ``ipc * f^2`` images; ``pack`` is the inverse used
for initialisation (downsample f^2 images and tile them). Both are differentiable.

Ordering: decoded image ``i * f^2 + k`` is block ``k`` (row-major) of stored image ``i``, so labels are
``labels.repeat_interleave(f^2)`` and a class's images stay contiguous. (IDC's reference orders block-major;
the set of images is the same.) When f does not divide H or W the blocks differ by at most one pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpdistill.errors import SpecError


def check_factor(factor: int, height: int, width: int) -> int:
    """Validate a multi-formation factor for HxW images (each block must be at least one pixel)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise SpecError(f"factor: expected a positive integer, got {factor!r}")
    if factor > min(height, width):
        raise SpecError(f"factor: {factor} is larger than the image size {height}x{width}")
    return factor


def block_bounds(size: int, factor: int) -> list[tuple[int, int]]:
    """Start/stop of the ``factor`` blocks splitting ``size`` pixels as evenly as possible."""
    cuts = [round(i * size / factor) for i in range(factor + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(factor)]


def decode(stored: torch.Tensor, labels: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode stored images [M, C, H, W] into [M * f^2, C, H, W] images and their labels [M * f^2]."""
    if factor == 1:
        return stored, labels
    m, c, h, w = stored.shape
    check_factor(factor, h, w)
    blocks = []
    for r0, r1 in block_bounds(h, factor):
        for c0, c1 in block_bounds(w, factor):
            block = stored[:, :, r0:r1, c0:c1]
            blocks.append(F.interpolate(block, size=(h, w), mode="bilinear", align_corners=False))
    out = torch.stack(blocks, dim=1).reshape(m * factor * factor, c, h, w)
    return out, labels.repeat_interleave(factor * factor)


def pack(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Tile each consecutive group of f^2 images [M * f^2, C, H, W] into one stored image [M, C, H, W]."""
    if factor == 1:
        return images
    n, c, h, w = images.shape
    check_factor(factor, h, w)
    per = factor * factor
    if n % per:
        raise ValueError(f"pack: {n} images do not split into groups of factor^2 = {per}")
    groups = images.reshape(n // per, per, c, h, w)
    out = images.new_zeros(n // per, c, h, w)
    k = 0
    for r0, r1 in block_bounds(h, factor):
        for c0, c1 in block_bounds(w, factor):
            small = F.interpolate(groups[:, k], size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False,
                                  antialias=True)
            out[:, :, r0:r1, c0:c1] = small
            k += 1
    return out
