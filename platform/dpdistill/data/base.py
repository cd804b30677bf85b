"""Core data types: what a dataset is (DatasetInfo), where it comes from (DatasetSource), what it loads (ImageSet)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpdistill.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
ENV_ROOT = "DPDISTILL_DATA"


def check_finite_pixels(images: torch.Tensor, what: str) -> None:
    """Refuse images with a NaN or inf pixel (one-line DataError naming ``what``).

    Called by every private method before its first charge: such a pixel survives clipping (inf * 0 is NaN)
    and would turn a released coordinate into NaN, a noise-free signal that the record is there.
    """
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise DataError(f"{what} holds non-finite pixel values (NaN or inf); clean the data first")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: shape of what `load` returns by default, labels, and how it is obtained."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    needs_root: bool
    downloadable: bool
    class_names: tuple[str, ...] | None = None


@dataclass
class ImageSet:
    """An in-memory labelled image set: float32 images [N, C, H, W] in [0, 1] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"ImageSet {self.name}: images must be [N, C, H, W], got {tuple(self.images.shape)}")
        if self.images.dtype != torch.float32:
            raise ValueError(f"ImageSet {self.name}: images must be float32, got {self.images.dtype}")
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise ValueError(f"ImageSet {self.name}: labels must be int64 [N], got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"ImageSet {self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, idx: Any) -> ImageSet:
        """Select records by index (tensor, array, list or slice); the name and class set are kept."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx.astype(np.int64, copy=False))
        elif isinstance(idx, list | tuple):
            idx = torch.as_tensor(idx, dtype=torch.int64)
        return ImageSet(self.images[idx], self.labels[idx], self.num_classes, self.name, self.class_names)

    def class_counts(self) -> torch.Tensor:
        """Number of records per class, [num_classes] int64."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def per_class_indices(self) -> list[torch.Tensor]:
        """Indices of the records of each class, in order (one tensor per class, possibly empty)."""
        order = torch.argsort(self.labels, stable=True)
        counts = self.class_counts().tolist()
        return list(torch.split(order, counts))


def default_root() -> Path | None:
    """The data root from the environment variable DPDISTILL_DATA, or None when unset or empty."""
    value = os.environ.get(ENV_ROOT, "").strip()
    return Path(value).expanduser() if value else None


def resolve_root(root: str | os.PathLike[str] | None) -> Path | None:
    """An explicit root wins; otherwise DPDISTILL_DATA; otherwise None."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    return default_root()


def check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' for dataset '{name}'; expected one of: {', '.join(SPLITS)}")


class DatasetSource(ABC):
    """Where a named dataset comes from and how it is split; registered by name in `dpdistill.data`."""

    info: DatasetInfo

    @abstractmethod
    def is_present(self, root: Path | None) -> bool:
        """Whether every file the set needs is on disk under `root` (always True for embedded sets)."""

    @abstractmethod
    def expected_files(self, root: Path | None) -> list[str]:
        """The files or folders the set reads, as paths under `root` (relative when `root` is None)."""

    @abstractmethod
    def load(
        self,
        split: str = "train",
        root: str | os.PathLike[str] | None = None,
        download: bool = False,
        image_size: int | None = None,
        val_seed: int = 0,
    ) -> ImageSet:
        """Load one split ("train", "val" or "test") as an ImageSet."""

    def load_splits(
        self,
        root: str | os.PathLike[str] | None = None,
        download: bool = False,
        image_size: int | None = None,
        val_seed: int = 0,
    ) -> dict[str, ImageSet]:
        """Load train, val and test together (sources that read files override this to read them once)."""
        return {s: self.load(s, root, download, image_size, val_seed) for s in SPLITS}


def missing_error(name: str, folder: Path, expected: Sequence[str], missing: Sequence[str],
                  downloadable: bool) -> DataError:
    """The one-line error for a set that is not on disk: the folder, the files expected, how to fix it."""
    hint = "set data.root or DPDISTILL_DATA" + (", or data.download: true" if downloadable else "")
    partial = ""
    if missing and len(missing) < len(expected):
        partial = f" (missing: {', '.join(missing)})"
    return DataError(f"dataset '{name}' not found under {folder}: expected {', '.join(expected)}{partial}; {hint}")


def needs_root_error(name: str, expected: Sequence[str], downloadable: bool) -> DataError:
    hint = "set data.root or DPDISTILL_DATA" + (" (and data.download: true to fetch it)" if downloadable else "")
    return DataError(f"dataset '{name}' needs a data root and none was given: {hint}; "
                     f"expected {', '.join(expected)} under it")
