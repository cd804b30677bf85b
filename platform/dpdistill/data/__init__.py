"""Datasets for dpdistill: a registry of named sources, DPImageBench splits, public glyphs, partitioners.

>>> from dpdistill import data
>>> train = data.load("digits", "train")          # embedded, no root needed
>>> mnist = data.load("mnist", "val", root="/data")  # torchvision layout under /data (or DPDISTILL_DATA)
"""

from __future__ import annotations

from dpdistill.data import partition, splits, transforms
from dpdistill.data.base import SPLITS, DatasetInfo, DatasetSource, ImageSet, default_root
from dpdistill.data.digits import DigitsSource
from dpdistill.data.glyphs import SIMARD_ELASTIC, GlyphsSource, Jitter
from dpdistill.data.registry import get, load, load_splits, names, register
from dpdistill.data.torchvision_sets import SOURCES as _TORCHVISION_SOURCES
from dpdistill.data.user_sets import ImageFolderSource, NpzSource

register(DigitsSource())
for _source in _TORCHVISION_SOURCES:
    register(_source)
register(ImageFolderSource())
register(NpzSource())
register(GlyphsSource("digits"))
register(GlyphsSource("alnum"))
register(GlyphsSource("digits", name="glyphs_elastic", jitter=Jitter(elastic=SIMARD_ELASTIC)))

__all__ = [
    "SPLITS",
    "DatasetInfo",
    "DatasetSource",
    "GlyphsSource",
    "ImageSet",
    "default_root",
    "get",
    "load",
    "load_splits",
    "names",
    "partition",
    "register",
    "splits",
    "transforms",
]
