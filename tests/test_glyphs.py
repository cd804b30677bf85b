"""The public `glyphs` set: deterministic by seed, right shapes and labels, varied, and label-aligned with MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpdistill import data
from dpdistill.data import glyphs
from dpdistill.errors import DataError


def nearest_centroid_accuracy(train: data.ImageSet, test: data.ImageSet) -> float:
    centroids = torch.stack([train.images[train.labels == c].mean(0).flatten() for c in range(train.num_classes)])
    pred = torch.cdist(test.images.flatten(1), centroids).argmin(1)
    return float((pred == test.labels).float().mean())


def test_same_seed_same_images_other_seed_other_images() -> None:
    a = glyphs.render(num_per_class=4, seed=3)
    b = glyphs.render(num_per_class=4, seed=3)
    c = glyphs.render(num_per_class=4, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_shape_range_and_balanced_digit_labels() -> None:
    s = glyphs.render(num_per_class=6, seed=0)
    assert s.images.shape == (60, 1, 28, 28) and s.images.dtype == torch.float32
    assert s.labels.dtype == torch.int64 and s.class_counts().tolist() == [6] * 10
    assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0
    assert s.class_names == tuple("0123456789") and s.num_classes == 10
    # Every sample has ink, on a black border like MNIST, and no two samples are identical.
    assert bool((s.images.flatten(1).max(dim=1).values > 0.7).all())
    assert float(s.images[:, :, 0, :].max()) < 0.2 and float(s.images[:, :, :, -1].max()) < 0.2
    assert len({tuple(x.flatten().tolist()) for x in s.images}) == 60


def test_size_and_alnum_charset() -> None:
    s = glyphs.render(num_per_class=2, image_size=16, charset="alnum", seed=1)
    assert s.images.shape == (124, 1, 16, 16) and s.num_classes == 62
    assert s.class_names[10] == "A" and s.class_names[36] == "a"
    with pytest.raises(DataError, match="unknown glyph charset 'greek'"):
        glyphs.render(2, charset="greek")


def test_fonts_come_from_matplotlib() -> None:
    fonts = glyphs.font_paths("alnum")
    assert len(fonts) >= 12
    assert all("mpl-data" in f and f.endswith(".ttf") for f in fonts)
    assert any("DejaVuSans" in Path(f).name for f in fonts) and any("Serif" in f for f in fonts)
    assert not any("LastResort" in f or "cmsy" in f for f in fonts)


def test_jitter_widens_the_spread() -> None:
    still = glyphs.Jitter(rotation_deg=0.0, scale=(1.0, 1.0), shear=0.0, translate=0.0, stroke=(0, 1))
    calm = glyphs.render(20, seed=0, jitter=still)
    wild = glyphs.render(20, seed=0)

    def spread(s: data.ImageSet) -> float:
        return float(torch.stack([s.images[s.labels == c].std(0).mean() for c in range(10)]).mean())

    assert spread(wild) > spread(calm) * 1.1


def test_glyphs_are_learnable_and_labels_match_mnist() -> None:
    train = glyphs.render(50, seed=0)
    test = glyphs.render(20, seed=1)
    assert nearest_centroid_accuracy(train, test) > 0.35  # chance 0.10
    root = data.default_root()
    if root is None or not data.get("mnist").is_present(root):
        pytest.skip("DPDISTILL_DATA has no MNIST: label alignment with MNIST not checked")
    mnist = data.load("mnist", "test", root=root).subset(torch.arange(2000))
    assert nearest_centroid_accuracy(train, mnist) > 0.25, "glyph labels must mean the same digits as MNIST's"


def test_registered_source_splits() -> None:
    src = data.GlyphsSource("digits", num_per_class=20)
    train, val, test = (src.load(s) for s in data.SPLITS)
    assert (len(train), len(val), len(test)) == (200, 20, 20)
    assert train.name == "glyphs/train" and not torch.equal(val.images, test.images[: len(val)])
    assert torch.equal(src.load("val").images, val.images)
    assert not torch.equal(src.load("val", val_seed=1).images, val.images)
    assert src.load("test", image_size=20).images.shape[1:] == (1, 20, 20)
    info = data.get("glyphs").info
    assert not info.needs_root and info.num_classes == 10 and info.image_size == 28
    assert data.get("glyphs_alnum").info.num_classes == 62


def test_elastic_distortion_warps_the_strokes_and_leaves_plain_glyphs_as_they_were() -> None:
    plain = glyphs.render(10, seed=0)
    # alpha 0 draws no field: plain glyphs keep their exact images, so their pre-training cache keys hold
    assert torch.equal(glyphs.render(10, seed=0, jitter=glyphs.Jitter(elastic=(0.0, 4.0))).images, plain.images)
    frame = Image.fromarray((plain.images[0, 0] * 255).round().to(torch.uint8).numpy(), mode="L").resize((112, 112))
    before = torch.from_numpy(np.asarray(frame, dtype=np.float32))
    after = [torch.from_numpy(np.asarray(glyphs._elastic(frame, np.random.default_rng(s), 28, *glyphs.SIMARD_ELASTIC),
                                         dtype=np.float32)) for s in range(2)]
    assert all(float((a - before).abs().mean()) > 5.0 for a in after)  # the strokes moved (mean |Δ| over 0-255)
    assert float((after[0] - after[1]).abs().mean()) > 5.0  # a fresh field per draw
    assert all(abs(float(a.sum() / before.sum()) - 1) < 0.25 for a in after)  # warped, not erased or smeared
    tiny = glyphs._elastic(frame, np.random.default_rng(0), 28, 0.5, 4.0)
    assert float((torch.from_numpy(np.asarray(tiny, dtype=np.float32)) - before).abs().mean()) < 1.0
    warped, held_out = (data.load("glyphs_elastic", split) for split in ("val", "test"))  # 1,000 each: quick
    assert warped.num_classes == 10 and len(warped) == 1000 and warped.name == "glyphs_elastic/val"
    # A black border like MNIST's still (the odd warped stroke reaches the edge: 97 % of top rows stay dark in the
    # train split, 99.5 % of plain glyphs')
    assert float((warped.images[:, 0, 0, :].amax(1) < 0.2).float().mean()) > 0.95
    assert nearest_centroid_accuracy(warped, held_out) > 0.35  # still digits of their labels (chance 0.10)
