"""A user's own data: a folder of class subfolders (`imagefolder`) or one .npz file (`npz`).

For both, ``root`` is the data itself (the folder, or the .npz path), not a parent folder. Neither has an
official split: a stratified 20% test part is drawn with a fixed seed and 10% of the rest is validation
(seeded by ``val_seed``), see `dpdistill.data.splits`. Images keep their stored size unless ``image_size`` is
given; an image folder whose files differ in size must give one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision import datasets as tvd

from dpdistill.data import imageio
from dpdistill.data import transforms as T
from dpdistill.data.base import DatasetInfo
from dpdistill.data.source import FileSource, RawPart
from dpdistill.errors import DataError

_EXTS = ",".join(e.lstrip(".") for e in tvd.folder.IMG_EXTENSIONS)


def _square(name: str, where: Path, images: torch.Tensor) -> None:
    h, w = images.shape[-2:]
    if h != w:
        raise DataError(f"dataset '{name}' at {where}: images are {w}x{h}, not square; set data.image_size")


class ImageFolderSource(FileSource):
    """A folder <root>/<class name>/<image>; classes are numbered in sorted order of their folder names."""

    official_test = False
    test_size = 0.2
    val_size = 0.1
    default_size = None

    def __init__(self) -> None:
        self.info = DatasetInfo("imagefolder", 3, 32, 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), True, False)

    def data_folder(self, root: Path) -> Path:
        return root

    def expected(self, part: str) -> list[str]:
        return [f"<class>/<image>.{{{_EXTS}}}"]

    def exists(self, folder: Path, name: str) -> bool:
        return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())

    def read(self, part: str, root: Path, size: int | None) -> RawPart:
        try:
            ds = tvd.ImageFolder(str(root))
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"dataset 'imagefolder' at {root}: {exc}") from exc
        paths = [p for p, _ in ds.samples]
        # Grey only when every file is grey: one colour image makes the whole set RGB.
        channels = 1 if all(imageio.peek(p)[0] in imageio.GREY_MODES for p in paths) else 3
        images = imageio.decode_files(paths, size, channels)
        _square("imagefolder", root, images)
        labels = torch.as_tensor([t for _, t in ds.samples], dtype=torch.int64)
        return RawPart(images, labels, num_classes=len(ds.classes), class_names=tuple(ds.classes))


class NpzSource(FileSource):
    """One .npz file with `x` (N, H, W[, C]) uint8 0-255 or float 0-1 and integer labels `y` (N,)."""

    official_test = False
    test_size = 0.2
    val_size = 0.1
    default_size = None

    def __init__(self) -> None:
        self.info = DatasetInfo("npz", 3, 32, 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), True, False)

    def data_folder(self, root: Path) -> Path:
        return root

    def expected(self, part: str) -> list[str]:
        return ["a .npz file with arrays x (N,H,W[,C]) and y (N,)"]

    def exists(self, folder: Path, name: str) -> bool:
        return folder.is_file()

    def read(self, part: str, root: Path, size: int | None) -> RawPart:
        try:
            with np.load(root, allow_pickle=False) as f:
                keys = set(f.files)
                if not {"x", "y"} <= keys:
                    raise DataError(f"{root}: expected arrays 'x' and 'y', found {', '.join(sorted(keys)) or 'none'}")
                x, y = f["x"], f["y"]
                names = tuple(str(s) for s in f["class_names"]) if "class_names" in keys else None
        except (OSError, ValueError) as exc:
            raise DataError(f"{root}: not a readable .npz file ({exc})") from exc
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise DataError(f"{root}: x must be (N, H, W) or (N, H, W, C) with C 1 or 3, got {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DataError(f"{root}: y must be {len(x)} non-negative integer labels, got {y.dtype} {y.shape}")
        if x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.floating):
                raise DataError(f"{root}: x must be uint8 (0-255) or float (0-1), got {x.dtype}")
            if x.size and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
                raise DataError(f"{root}: float x must lie in [0, 1] (got {x.min():.3g}..{x.max():.3g}); "
                                f"store uint8 0-255 instead")
            x = x.astype(np.float32, copy=False)
        images = T.hwc_to_chw(x)
        if size is None:
            _square("npz", root, images)
        num_classes = int(y.max()) + 1 if len(y) else 0
        if names is not None and len(names) < num_classes:
            raise DataError(f"{root}: class_names has {len(names)} entries but labels go up to {num_classes - 1}")
        return RawPart(images, torch.from_numpy(y.astype(np.int64)), num_classes=num_classes, class_names=names)
