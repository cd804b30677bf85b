"""Tensor-level image transforms shared by the loaders and the models: scaling, normalising, resizing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (0-255) or float images to float32 in [0, 1]; float input is trusted to be in range already."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def hwc_to_chw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[N, H, W] or [N, H, W, C] to a contiguous [N, C, H, W] tensor (dtype kept)."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dim() == 3:
        return t.unsqueeze(1).contiguous()
    if t.dim() == 4:
        return t.permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"expected [N, H, W] or [N, H, W, C] images, got shape {tuple(t.shape)}")


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel (x - mean) / std for [N, C, H, W] or [C, H, W] images."""
    c = images.shape[-3]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"normalize: images have {c} channels but mean/std have {len(mean)}/{len(std)}")
    shape = (c, 1, 1)
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - m) / s


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of `normalize`."""
    c = images.shape[-3]
    shape = (c, 1, 1)
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return images * s + m


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize [N, C, H, W] (or [C, H, W]) float images to `size` (square when an int): bilinear, antialiased.

    Antialiasing matters when shrinking (e.g. 64x64 EuroSAT to 32x32): plain bilinear would alias. The
    triangle filter has non-negative weights, so [0, 1] inputs stay in [0, 1].
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"resize: size must be positive, got {size}")
    if tuple(images.shape[-2:]) == hw:
        return images
    squeeze = images.dim() == 3
    x = images.unsqueeze(0) if squeeze else images
    if not x.is_floating_point():
        x = x.to(torch.float32)
    out = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
    return out.squeeze(0) if squeeze else out


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Match a channel count: grey to RGB by repetition, RGB to grey by ITU-R 601 luma."""
    c = images.shape[-3]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(3, 1, 1)
        return (images * w).sum(dim=-3, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")
