"""A DatasetSource skeleton for on-disk sets: locate files, fail clearly when absent, split, convert, resize.

A concrete source says where its files live (`data_folder`, `expected`), how to read one raw part (`read`:
"train"/"test" for sets with an official test split, "all" for sets without) and how to download one part.
Everything else — the missing-data error, the DPImageBench split, float conversion and resizing — is here,
so every set behaves the same way.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpdistill.data import splits as _splits
from dpdistill.data import transforms as T
from dpdistill.data.base import (
    SPLITS,
    DatasetSource,
    ImageSet,
    check_split,
    missing_error,
    needs_root_error,
    resolve_root,
)


@dataclass
class RawPart:
    """One part of a set as read from disk: uint8 or [0, 1] float images [N, C, H, W] and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None


class FileSource(DatasetSource):
    """Base of sets read from files under a root; see the module docstring for the hooks to implement."""

    #: True: "train"/"test" are official parts and val is carved from train. False: one "all" part is cut
    #: into a fixed stratified test part and a seeded val part.
    official_test: bool = True
    #: Validation holdout (int count or float fraction, see splits.holdout_size).
    val_size: int | float = 0.1
    #: Test holdout for sets without an official test split.
    test_size: int | float = 0.2
    #: Resize on load to this square size when the caller gives none (None: keep the stored size).
    default_size: int | None = None

    @abstractmethod
    def data_folder(self, root: Path) -> Path:
        """The folder the set's files live in (named in the missing-data error)."""

    @abstractmethod
    def expected(self, part: str) -> list[str]:
        """Names, relative to `data_folder`, that `part` needs; a trailing "/" marks a folder."""

    @abstractmethod
    def read(self, part: str, root: Path, size: int | None) -> RawPart:
        """Read one part from disk. File-per-image sets decode straight to `size` when it is not None."""

    def download(self, root: Path, part: str) -> None:  # noqa: B027 - optional hook
        """Fetch `part` into `root` (only sets with info.downloadable implement this)."""

    # --- shared machinery ---------------------------------------------------------------------------

    def parts(self) -> tuple[str, ...]:
        return ("train", "test") if self.official_test else ("all",)

    def part_for(self, split: str) -> str:
        if not self.official_test:
            return "all"
        return "test" if split == "test" else "train"

    def exists(self, folder: Path, name: str) -> bool:
        """Whether one expected entry is present (sources override for alternatives such as .gz files)."""
        path = folder / name.rstrip("/")
        return path.is_dir() if name.endswith("/") else path.is_file()

    def missing(self, root: Path, part: str) -> list[str]:
        folder = self.data_folder(root)
        return [n for n in self.expected(part) if not self.exists(folder, n)]

    def _all_expected(self) -> list[str]:
        seen: dict[str, None] = {}
        for part in self.parts():
            for n in self.expected(part):
                seen.setdefault(n, None)
        return list(seen)

    def is_present(self, root: Path | None) -> bool:
        root = resolve_root(root)
        if root is None:
            return False
        return not any(self.missing(root, p) for p in self.parts())

    def expected_files(self, root: Path | None) -> list[str]:
        root = resolve_root(root)
        if root is None:
            return [str(self.data_folder(Path(".")) / n) + ("/" if n.endswith("/") else "")
                    for n in self._all_expected()]
        folder = self.data_folder(root)
        return [str(folder / n) + ("/" if n.endswith("/") else "") for n in self._all_expected()]

    def _ready(self, root: str | os.PathLike[str] | None, download: bool, part: str) -> Path:
        """The resolved root with `part` on disk (downloaded if asked and possible), or a DataError."""
        resolved = resolve_root(root)
        if resolved is None:
            raise needs_root_error(self.info.name, self.expected_files(None), self.info.downloadable)
        missing = self.missing(resolved, part)
        if missing and download and self.info.downloadable:
            self.download(resolved, part)
            missing = self.missing(resolved, part)
        if missing:
            raise missing_error(self.info.name, self.data_folder(resolved), self.expected(part), missing,
                                self.info.downloadable)
        return resolved

    def _split_indices(self, split: str, raw: RawPart, val_seed: int) -> np.ndarray:
        if self.official_test:
            if split == "test":
                return np.arange(len(raw.labels))
            return _splits.official_train_val(len(raw.labels), self.val_size, val_seed)[split]
        return _splits.carved_train_val_test(raw.labels.numpy(), self.test_size, self.val_size, val_seed)[split]

    def _finish(self, raw: RawPart, idx: np.ndarray, split: str, size: int | None) -> ImageSet:
        sel = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        images = T.to_float(raw.images[sel])
        if size is not None:
            images = T.resize(images, size)
        num_classes = raw.num_classes if raw.num_classes is not None else self.info.num_classes
        names = raw.class_names if raw.class_names is not None else self.info.class_names
        return ImageSet(images.contiguous(), raw.labels[sel].to(torch.int64), num_classes,
                        f"{self.info.name}/{split}", names)

    def _size(self, image_size: int | None) -> int | None:
        if image_size is not None and int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        return int(image_size) if image_size is not None else self.default_size

    def load(
        self,
        split: str = "train",
        root: str | os.PathLike[str] | None = None,
        download: bool = False,
        image_size: int | None = None,
        val_seed: int = 0,
    ) -> ImageSet:
        check_split(self.info.name, split)
        part = self.part_for(split)
        resolved = self._ready(root, download, part)
        size = self._size(image_size)
        raw = self.read(part, resolved, size)
        return self._finish(raw, self._split_indices(split, raw, val_seed), split, size)

    def load_splits(
        self,
        root: str | os.PathLike[str] | None = None,
        download: bool = False,
        image_size: int | None = None,
        val_seed: int = 0,
    ) -> dict[str, ImageSet]:
        size = self._size(image_size)
        out: dict[str, ImageSet] = {}
        for part in self.parts():
            resolved = self._ready(root, download, part)
            raw = self.read(part, resolved, size)
            for split in SPLITS:
                if self.part_for(split) == part:
                    out[split] = self._finish(raw, self._split_indices(split, raw, val_seed), split, size)
        return {s: out[s] for s in SPLITS}
