"""The dataset registry: find a DatasetSource by name, and load a split by name."""

from __future__ import annotations

import os

from dpdistill.data.base import DatasetSource, ImageSet
from dpdistill.errors import DataError

_SOURCES: dict[str, DatasetSource] = {}


def register(source: DatasetSource) -> DatasetSource:
    """Add (or replace) a source under its info.name; returns it so it can be used as an expression."""
    name = source.info.name
    if not name or name != name.strip():
        raise ValueError(f"dataset name must be a non-empty identifier, got {name!r}")
    _SOURCES[name] = source
    return source


def names() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_SOURCES)


def get(name: str) -> DatasetSource:
    """The source registered as `name`, or a DataError listing the known names."""
    try:
        return _SOURCES[name]
    except KeyError:
        raise DataError(f"unknown dataset '{name}'; expected one of: {', '.join(names())}") from None


def load(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    val_seed: int = 0,
) -> ImageSet:
    """Load one split of a registered set (root: explicit, else DPDISTILL_DATA; download only if asked)."""
    return get(name).load(split, root=root, download=download, image_size=image_size, val_seed=val_seed)


def load_splits(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    val_seed: int = 0,
) -> dict[str, ImageSet]:
    """Load train, val and test of a registered set, reading its files once."""
    return get(name).load_splits(root=root, download=download, image_size=image_size, val_seed=val_seed)
