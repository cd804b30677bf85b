"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen ICML'21) for dataset-distillation matching losses.

The point of DSA is that the real and the synthetic batch are transformed with the *same* sampled parameters,
and that every transform is differentiable w.r.t. its input so the matching loss reaches the synthetic images.
Parameters are therefore sampled once and applied separately::

    dsa = DSA("color_crop_cutout_flip_scale_rotate")
    params = dsa.sample(1, generator)          # one parameter set, shared by the whole batch
    loss = match(net(dsa.apply(real, params)), net(dsa.apply(syn, params)))

What we do, and how it relates to the reference code (VICO-UoE/DatasetCondensation, ``DiffAugment``):

- ``mode="single"`` (the reference default, ``aug_mode='S'``): each parameter set picks ONE op group of the
  strategy at random (``color`` = brightness, saturation, contrast in turn); ``mode="all"`` applies every group.
- ``sample(1, g)`` gives one value per op that broadcasts over any batch size: this is the reference's Siamese
  mode, where every image of both batches gets the first image's parameters. ``sample(n, g)`` gives per-image
  values (the reference's non-Siamese mode, used to augment a network's own training batches); it then only
  applies to batches of exactly ``n`` images.
- Parameters are stored as uniforms in [0, 1) and turned into pixel shifts / cutout offsets at apply time, so
  one parameter set fits images of any size (crop shift and cutout size are fractions of the image size).
- Crop is an integer translation with zero fill (gather based); cutout zeroes a square; flip mirrors the width;
  scale and rotate resample with ``affine_grid`` / ``grid_sample`` (bilinear, zero padding, align_corners=True).
  Zero means "0 in the space the images are in": DSA is applied to normalised images, as in the reference.
- Randomness comes only from the ``torch.Generator`` passed to ``sample`` (on the CPU), never the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dpdistill.errors import SpecError

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
MODES: tuple[str, ...] = ("single", "all")

# How many uniforms each op group consumes per image (colour: brightness, saturation, contrast).
_WIDTH = {"color": 3, "crop": 2, "cutout": 2, "flip": 1, "scale": 2, "rotate": 1}


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """Split a DSA strategy string ("color_crop_...") into op-group names; "", "none" or None mean no augmentation."""
    if strategy is None:
        return ()
    text = str(strategy).strip().lower()
    if text in ("", "none"):
        return ()
    ops = tuple(p for p in text.split("_") if p)
    unknown = [p for p in ops if p not in OPS]
    if unknown:
        raise SpecError(
            f"dsa_strategy: unknown augmentation '{unknown[0]}' in '{strategy}'; expected '_'-joined names from "
            f"{', '.join(OPS)} (or 'none')"
        )
    return ops


@dataclass(frozen=True)
class DSAParams:
    """One sampled DSA parameter set: which op groups to apply, and their uniforms [n, k] (n = 1: shared)."""

    ops: tuple[str, ...]
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    n: int = 1


class DSA:
    """Differentiable Siamese augmentation: ``sample`` parameters once, ``apply`` them to real and synthetic images."""

    def __init__(
        self,
        strategy: str | None = DEFAULT_STRATEGY,
        *,
        mode: str = "single",
        prob_flip: float = 0.5,
        ratio_scale: float = 1.2,
        ratio_rotate: float = 15.0,
        ratio_crop_pad: float = 0.125,
        ratio_cutout: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
    ) -> None:
        self.ops = parse_strategy(strategy)
        if mode not in MODES:
            raise SpecError(f"dsa_mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if ratio_scale < 1.0:
            raise SpecError(f"DSA ratio_scale: expected >= 1, got {ratio_scale}")
        self.mode = mode
        self.prob_flip = prob_flip
        self.ratio_scale = ratio_scale
        self.ratio_rotate = ratio_rotate
        self.ratio_crop_pad = ratio_crop_pad
        self.ratio_cutout = ratio_cutout
        self.brightness = brightness
        self.saturation = saturation
        self.contrast = contrast

    @property
    def enabled(self) -> bool:
        """Whether any op is configured (an empty strategy makes ``apply`` the identity)."""
        return bool(self.ops)

    def __repr__(self) -> str:
        return f"DSA(strategy={'_'.join(self.ops) or 'none'!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------------------------------ sampling

    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> DSAParams:
        """Draw one parameter set: ``n=1`` is shared by every image of any batch (Siamese); ``n>1`` is per image."""
        if n < 1:
            raise ValueError(f"DSA.sample: n must be >= 1, got {n}")
        if not self.ops:
            return DSAParams((), {}, n)
        if self.mode == "single":
            pick = int(torch.randint(len(self.ops), (1,), generator=generator))
            chosen: tuple[str, ...] = (self.ops[pick],)
        else:
            chosen = self.ops
        values = {op: torch.rand(n, _WIDTH[op], generator=generator) for op in chosen}
        return DSAParams(chosen, values, n)

    # ------------------------------------------------------------------------------------------ applying

    def apply(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        """Transform images [N, C, H, W] with ``params`` (differentiable w.r.t. ``x``)."""
        if not params.ops:
            return x
        if params.n != 1 and params.n != x.shape[0]:
            raise ValueError(f"DSA.apply: parameters were sampled for {params.n} images, got a batch of {x.shape[0]}")
        for op in params.ops:
            u = params.values[op].to(device=x.device, dtype=x.dtype)
            x = getattr(self, f"_{op}")(x, u)
        return x.contiguous()

    def __call__(
        self,
        x: torch.Tensor,
        params: DSAParams | int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Augment ``x``: with given params, with a shared set drawn from seed ``params``, or (None) per image."""
        if isinstance(params, DSAParams):
            return self.apply(x, params)
        if isinstance(params, int):
            return self.apply(x, self.sample(1, torch.Generator().manual_seed(params)))
        return self.apply(x, self.sample(x.shape[0], generator))

    # -------------------------------------------------------------------------------------------- the ops

    def _color(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1, 1)
        x = x + (u[:, 0].view(shape) - 0.5) * self.brightness
        # Saturation scales each pixel's deviation from its channel mean (a no-op on one-channel images).
        x_mean = x.mean(dim=1, keepdim=True)
        x = (x - x_mean) * (u[:, 1].view(shape) * self.saturation) + x_mean
        x_mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - x_mean) * (u[:, 2].view(shape) + self.contrast) + x_mean

    def _crop(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        sh, sw = int(h * self.ratio_crop_pad + 0.5), int(w * self.ratio_crop_pad + 0.5)
        if sh == 0 and sw == 0:
            return x
        # Uniforms -> integer shifts in [-s, s]; clamp guards u == 1 - eps rounding up.
        th = (u[:, 0] * (2 * sh + 1)).floor().clamp(max=2 * sh).long() - sh
        tw = (u[:, 1] * (2 * sw + 1)).floor().clamp(max=2 * sw).long() - sw
        th, tw = th.expand(n), tw.expand(n)
        x_pad = F.pad(x, [sw, sw, sh, sh])
        rows = torch.arange(h, device=x.device).view(1, h, 1) + th.view(n, 1, 1) + sh
        cols = torch.arange(w, device=x.device).view(1, 1, w) + tw.view(n, 1, 1) + sw
        batch = torch.arange(n, device=x.device).view(n, 1, 1)
        # Advanced indices split by a slice go first: the result is [N, H, W, C].
        return x_pad[batch, :, rows, cols].permute(0, 3, 1, 2)

    def _cutout(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ch, cw = int(h * self.ratio_cutout + 0.5), int(w * self.ratio_cutout + 0.5)
        if ch == 0 or cw == 0:
            return x
        # Centre ranges as in the reference: [0, size + (1 - cut % 2)).
        oh = (u[:, 0] * (h + 1 - ch % 2)).floor().long().clamp(max=h - ch % 2)
        ow = (u[:, 1] * (w + 1 - cw % 2)).floor().long().clamp(max=w - cw % 2)
        top, left = (oh - ch // 2).view(-1, 1, 1), (ow - cw // 2).view(-1, 1, 1)
        r = torch.arange(h, device=x.device).view(1, h, 1)
        c = torch.arange(w, device=x.device).view(1, 1, w)
        hole = (r >= top) & (r < top + ch) & (c >= left) & (c < left + cw)
        return x * (~hole).unsqueeze(1).to(x.dtype)

    def _flip(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        flip = (u[:, 0] < self.prob_flip).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(3), x)

    def _affine(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _scale(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        lo, hi = 1.0 / self.ratio_scale, self.ratio_scale
        s = u * (hi - lo) + lo
        theta = torch.zeros(u.shape[0], 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
        return self._affine(x, theta)

    def _rotate(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        angle = (u[:, 0] - 0.5) * 2 * self.ratio_rotate * math.pi / 180
        cos, sin = angle.cos(), angle.sin()
        theta = torch.zeros(u.shape[0], 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos
        return self._affine(x, theta)


def make_dsa(strategy: str | None, mode: str = "single") -> DSA | None:
    """A DSA for ``strategy``, or None when the strategy is empty / "none" (so callers can skip augmentation)."""
    dsa = DSA(strategy, mode=mode)
    return dsa if dsa.enabled else None


def siamese_pair(dsa: DSA | None, real: torch.Tensor, syn: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real, syn)`` augmented with ONE shared parameter set drawn from ``generator`` (unchanged without a DSA).

    The augmentation step of DM, PSG and DP feature matching (DC passes its parameters in). An empty real
    batch (a Poisson sample may be empty) is passed through; the parameters are drawn all the same, so the
    random stream does not depend on it.
    """
    if dsa is None:
        return real, syn
    params = dsa.sample(1, generator)
    return (dsa.apply(real, params) if len(real) else real), dsa.apply(syn, params)
