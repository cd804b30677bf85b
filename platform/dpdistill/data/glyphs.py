"""`glyphs`: a public pretraining set of digits (and letters) rendered from the fonts matplotlib ships.

Nothing here comes from a sensitive set, so models pretrained on glyphs cost no privacy. Each sample draws a
font (DejaVu Sans/Serif/Mono, STIX General and Computer Modern, with their bold/italic variants), a stroke
width, and a random affine jitter (rotation, scale, shear, translation); the glyph is drawn white on black and
fitted into the central 20/28 of the frame like MNIST, then reduced to the output size with antialiasing.
Everything is drawn from one seeded generator, so the same arguments give the same tensor.

Elastic distortion (``Jitter.elastic``, off by default): a smooth random displacement field warps the strokes as
Simard, Steinkraus and Platt (2003) warped MNIST (a field of uniform(-1, 1) draws, Gaussian-smoothed with
standard deviation ``sigma`` and scaled by ``alpha``, both in output pixels), so printed glyphs take on some of
handwriting's wobble. ``glyphs_elastic`` is the registered digits set with their MNIST values (alpha 34,
sigma 4); plain ``glyphs`` draws no field, and its images are unchanged by this option.

Character sets: "digits" (10 classes, label = the digit, aligned with MNIST/SVHN/digits) and "alnum"
(62 classes: 0-9, A-Z, a-z; some pairs such as O/0 and l/1 are genuinely ambiguous in some fonts).
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dpdistill.data.base import SPLITS, DatasetInfo, DatasetSource, ImageSet, check_split
from dpdistill.errors import DataError

CHARSETS: dict[str, str] = {
    "digits": string.digits,
    "alnum": string.digits + string.ascii_uppercase + string.ascii_lowercase,
}
# Symbol / fallback fonts whose character map claims ASCII but whose shapes are not letters.
_EXCLUDED_FONTS = ("LastResort", "cmex10", "cmsy10", "Display", "STIXNonUni", "STIXSiz")
_RENDER_PX = 64  # glyphs are drawn at this font size, then transformed and reduced


@dataclass(frozen=True)
class Jitter:
    """Ranges of the random affine and stroke variation (uniform draws)."""

    rotation_deg: float = 12.0
    scale: tuple[float, float] = (0.8, 1.1)
    shear: float = 0.25
    translate: float = 0.08  # fraction of the image side
    stroke: tuple[int, int] = (0, 3)  # extra outline width in render pixels, [low, high)
    elastic: tuple[float, float] = (0.0, 0.0)  # (alpha, sigma) in output pixels; alpha 0: no distortion


SIMARD_ELASTIC = (34.0, 4.0)  # Simard et al. (2003), MNIST at 28 px


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=4)
def font_paths(charset: str = "digits") -> tuple[str, ...]:
    """The matplotlib TTF fonts that have every character of `charset`, sorted by file name."""
    from fontTools.ttLib import TTFont

    chars = CHARSETS[charset]
    found = []
    for path in sorted(_font_dir().glob("*.ttf")):
        if any(x in path.name for x in _EXCLUDED_FONTS):
            continue
        cmap = TTFont(str(path), lazy=True).getBestCmap() or {}
        if all(ord(c) in cmap for c in chars):
            found.append(str(path))
    if not found:
        raise DataError(f"no usable TTF fonts found in {_font_dir()} (matplotlib's mpl-data/fonts/ttf)")
    return tuple(found)


@lru_cache(maxsize=64)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, _RENDER_PX)


@lru_cache(maxsize=4096)
def _draw_glyph(char: str, font_path: str, stroke: int) -> Image.Image:
    """The character white on black, cropped to its ink (cached: only the affine differs between samples)."""
    side = _RENDER_PX * 2
    img = Image.new("L", (side, side), 0)
    ImageDraw.Draw(img).text((side / 2, side / 2), char, fill=255, font=_font(font_path), anchor="mm",
                             stroke_width=stroke, stroke_fill=255)
    box = img.getbbox()
    return img.crop(box) if box else img


def _render_one(char: str, font_path: str, rng: np.random.Generator, size: int, jitter: Jitter) -> np.ndarray:
    glyph = _draw_glyph(char, font_path, int(rng.integers(jitter.stroke[0], jitter.stroke[1])))
    work = size * 4  # supersample, then reduce: smooth edges at any output size
    gw, gh = glyph.size
    scale = (work * 20 / 28) / max(gw, gh) * rng.uniform(*jitter.scale)
    theta = math.radians(rng.uniform(-jitter.rotation_deg, jitter.rotation_deg))
    shear = rng.uniform(-jitter.shear, jitter.shear)
    tx, ty = rng.uniform(-jitter.translate, jitter.translate, size=2) * work
    # Forward map glyph -> frame: centre, scale, shear, rotate, move to frame centre + offset.
    cos, sin = math.cos(theta), math.sin(theta)
    rot = np.array([[cos, -sin], [sin, cos]])
    fwd = rot @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inv = np.linalg.inv(fwd)
    centre_out = np.array([work / 2 + tx, work / 2 + ty])
    centre_in = np.array([gw / 2, gh / 2])
    offset = centre_in - inv @ centre_out
    # PIL wants the inverse map: for each output pixel, where to sample the glyph.
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    frame = glyph.transform((work, work), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                            fillcolor=0)
    if jitter.elastic[0] > 0:  # drawn only when on, so plain glyphs keep their exact images (and cache keys)
        frame = _elastic(frame, rng, size, *jitter.elastic)
    frame = frame.resize((size, size), Image.Resampling.BOX)
    return np.asarray(frame, dtype=np.uint8)


def _elastic(frame: Image.Image, rng: np.random.Generator, size: int, alpha: float, sigma: float) -> Image.Image:
    """``frame`` (supersampled ``size`` px) warped by a smooth random displacement field, alpha and sigma in
    output pixels. The field is drawn and smoothed at the output size (as Simard et al. drew it at MNIST's) and
    interpolated up to the frame: 16x cheaper than smoothing at the frame's size, and as smooth."""
    from scipy.ndimage import gaussian_filter, map_coordinates, zoom

    img = np.asarray(frame, dtype=np.float32)
    h, w = img.shape
    scale = h / size
    dy, dx = (zoom(gaussian_filter(rng.uniform(-1.0, 1.0, size=(size, size)), sigma, mode="constant"), scale,
                   order=1, grid_mode=True, mode="grid-constant") * alpha * scale
              for _ in range(2))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = map_coordinates(img, (yy + dy, xx + dx), order=1, mode="constant", cval=0.0)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), mode="L")


def render(num_per_class: int = 100, image_size: int = 28, charset: str = "digits", seed: int = 0,
           jitter: Jitter | None = None, name: str = "glyphs") -> ImageSet:
    """Render `num_per_class` jittered samples of every character of `charset` as an ImageSet (shuffled)."""
    if charset not in CHARSETS:
        raise DataError(f"unknown glyph charset '{charset}'; expected one of: {', '.join(CHARSETS)}")
    if num_per_class < 1 or image_size < 4:
        raise DataError(f"glyphs: num_per_class must be >= 1 and image_size >= 4, got {num_per_class}, {image_size}")
    jitter = jitter or Jitter()
    chars = CHARSETS[charset]
    fonts = font_paths(charset)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(chars)), num_per_class))
    font_idx = rng.integers(0, len(fonts), size=len(labels))
    out = np.empty((len(labels), image_size, image_size), dtype=np.uint8)
    for i, (c, f) in enumerate(zip(labels, font_idx, strict=True)):
        out[i] = _render_one(chars[c], fonts[f], rng, image_size, jitter)
    images = torch.from_numpy(out).unsqueeze(1).to(torch.float32).div_(255.0)
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)), len(chars), name, tuple(chars))


def _split_seed(seed: int, split: str, val_seed: int) -> int:
    # Distinct, well-mixed seeds per split so the three parts are independent draws.
    words = [seed, SPLITS.index(split)] + ([val_seed] if split == "val" else [])
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class GlyphsSource(DatasetSource):
    """Registered `glyphs` / `glyphs_alnum` / `glyphs_elastic`: rendered on load, no root, no files."""

    def __init__(self, charset: str = "digits", num_per_class: int | None = None, seed: int = 0,
                 name: str | None = None, jitter: Jitter | None = None) -> None:
        chars = CHARSETS[charset]
        self.charset = charset
        self.jitter = jitter
        # A few seconds to render on one core: 10,000 digits, or 31,000 alnum glyphs (elastic digits: about 20 s).
        self.num_per_class = num_per_class or (1000 if charset == "digits" else 500)
        self.seed = seed
        self.info = DatasetInfo(name or ("glyphs" if charset == "digits" else f"glyphs_{charset}"), 1, 28,
                                len(chars), (0.1591,), (0.3372,), needs_root=False, downloadable=False,
                                class_names=tuple(chars))

    def is_present(self, root: Path | None) -> bool:
        return True

    def expected_files(self, root: Path | None) -> list[str]:
        return []

    def load(
        self,
        split: str = "train",
        root: str | os.PathLike[str] | None = None,
        download: bool = False,
        image_size: int | None = None,
        val_seed: int = 0,
    ) -> ImageSet:
        """Train has `num_per_class` per class; val and test a tenth of that, from their own seeds."""
        check_split(self.info.name, split)
        n = self.num_per_class if split == "train" else max(1, self.num_per_class // 10)
        return render(n, int(image_size or self.info.image_size), self.charset,
                      _split_seed(self.seed, split, val_seed), jitter=self.jitter, name=f"{self.info.name}/{split}")
