"""Decoding folders of image files (JPEG, PNG, PPM …) into one uint8 tensor, in parallel threads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpdistill.errors import DataError

GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def _decode_one(path: str, size: int | tuple[int, int] | None, channels: int, center_crop: bool) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if size is not None and img.format == "JPEG":
                # JPEG can decode at 1/2, 1/4, 1/8 scale directly: much faster for large photos (CelebA).
                target = size if isinstance(size, tuple) else (size, size)
                img.draft("RGB" if channels == 3 else "L", target)
            img = img.convert("RGB" if channels == 3 else "L")
            if center_crop:
                w, h = img.size
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                img = img.crop((left, top, left + s, top + s))
            if size is not None:
                target = size if isinstance(size, tuple) else (size, size)
                if img.size != target:
                    # PIL's bilinear widens its kernel when shrinking, i.e. it antialiases.
                    img = img.resize(target, Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_files(paths: Sequence[str | os.PathLike[str]], size: int | None, channels: int,
                 center_crop: bool = False, workers: int | None = None) -> torch.Tensor:
    """Decode image files to uint8 [N, C, H, W]; every image is resized to `size` (or must share one size)."""
    if not paths:
        return torch.zeros((0, channels, size or 1, size or 1), dtype=torch.uint8)
    workers = workers or min(8, os.cpu_count() or 1)
    args = [str(p) for p in paths]
    if workers > 1 and len(args) > 64:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            arrays = list(pool.map(lambda p: _decode_one(p, size, channels, center_crop), args))
    else:
        arrays = [_decode_one(p, size, channels, center_crop) for p in args]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images under {Path(args[0]).parent.parent} have different sizes "
                        f"({', '.join(sorted(f'{s[1]}x{s[0]}' for s in shapes)[:4])}); set data.image_size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def peek(path: str | os.PathLike[str]) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) of an image file without decoding its pixels."""
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
