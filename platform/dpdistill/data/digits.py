"""`digits`: scikit-learn's 1,797 8x8 handwritten digits, shipped inside scikit-learn (no root, no download).

Values 0-16 are scaled to [0, 1]. Split: a stratified 20% test part with a fixed seed (independent of
``val_seed``), then 10% of the rest as validation seeded by ``val_seed`` — 1,294 / 144 / 359 records.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from dpdistill.data import splits as _splits
from dpdistill.data import transforms as T
from dpdistill.data.base import SPLITS, DatasetInfo, DatasetSource, ImageSet, check_split


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    return images, bunch.target.astype(np.int64)


class DigitsSource(DatasetSource):
    """The embedded sklearn digits set; the quick-start and integration-test workhorse."""

    test_size = 0.2
    val_size = 0.1

    def __init__(self) -> None:
        self.info = DatasetInfo("digits", 1, 8, 10, (0.3053,), (0.3760,), needs_root=False, downloadable=False,
                                class_names=tuple(str(i) for i in range(10)))

    def is_present(self, root: Path | None) -> bool:
        return True

    def expected_files(self, root: Path | None) -> list[str]:
        return []

    def _indices(self, val_seed: int) -> dict[str, np.ndarray]:
        _, labels = _arrays()
        return _splits.carved_train_val_test(labels, self.test_size, self.val_size, val_seed)

    def _make(self, split: str, idx: np.ndarray, image_size: int | None) -> ImageSet:
        images, labels = _arrays()
        x = torch.from_numpy(images[idx].copy()).unsqueeze(1)
        if image_size is not None:
            x = T.resize(x, int(image_size))
        return ImageSet(x.contiguous(), torch.from_numpy(labels[idx].copy()), 10, f"digits/{split}",
                        self.info.class_names)

    def load(
        self,
        split: str = "train",
        root: str | os.PathLike[str] | None = None,
        download: bool = False,
        image_size: int | None = None,
        val_seed: int = 0,
    ) -> ImageSet:
        check_split("digits", split)
        return self._make(split, self._indices(val_seed)[split], image_size)

    def load_splits(
        self,
        root: str | os.PathLike[str] | None = None,
        download: bool = False,
        image_size: int | None = None,
        val_seed: int = 0,
    ) -> dict[str, ImageSet]:
        idx = self._indices(val_seed)
        return {s: self._make(s, idx[s], image_size) for s in SPLITS}
