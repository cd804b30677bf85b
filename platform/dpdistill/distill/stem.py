"""A ConvNet's first block (conv - instance norm - activation - pooling) computed from patch moments, no gradient.

The real side of every matcher (DM, NDPDC, DP feature matching, DP-GenG) pushes thousands of images through
the first block of a fresh ConvNet each iteration. That block is the cheap one in arithmetic (its convolution
sees 1 or 3 input channels: 9 or 27 multiplies an output) and the dear one in memory: a width-128 map of a
28x28 MNIST image (padded to 32x32) holds 131k floats, and the plain layers stream it ~10 times (the conv's
write, instance norm's mean, centring, squaring, variance and affine passes, the activation, the pooling read).

Instance norm after a convolution needs no pass over the convolution's output to find its statistics: with
p the (zero-padded) input patch at each pixel, the conv output of channel c is w_c·p + b_c, so over one image's
pixels its mean is w_c·μ + b_c and its (biased) variance is w_cᵀ Σ w_c, where μ and Σ are the mean and
covariance of that image's patches (9 or 27 numbers a pixel; Σ is 9x9 or 27x27). Normalisation then folds
into the convolution: y_c = (γ_c/σ_c)·w_c·(p - μ) + β_c (the conv bias cancels), one batched matrix product per
image (patches, with a column of ones for the shift, times per-image scaled weights) that writes the normalised
map straight into channels-last memory; the activation runs in place on it and the pooling reads it once.
Small sub-chunks (:data:`STEM_CHUNK` images) keep that map in cache.

Where it pays depends on the width, so it is used from :data:`MIN_WIDTH` output channels up, a fixed rule (a
timing-based choice would make results depend on machine load: the two paths agree to rounding, not to the
bit). Measured on 2 AMD EPYC cores (1,280 or 2,560 images, the real side, medians of 10-12 interleaved runs):

- width 128 (DM's and NDPDC's reference setting, 2,560 images): 1.41-1.44 against 1.50-1.57 s, and DM's
  whole iteration (in-process, 3 interleaved pairs) 1.71 against 1.89 s in float32, 1.13 against 1.30 s with
  bfloat16 convolutions; on a quieter hour the first block alone took 0.17 against 0.43-0.47 s. There the plain
  block's map (512 KB an image, 16 MB a 32-image chunk, plus the norm's temporaries) overflows the 32 MB L3
  and every pass streams memory.
- width 32 and 64 (DP-GenG's matching and extractor networks): 1.2-1.35x SLOWER. The map of a chunk stays in
  cache anyway, and the patch moments' fixed cost (~40 µs an image) is not repaid.

On CPU only (:func:`dpdistill.distill.embedding.embed_chunks`): not measured on an accelerator.

Same function to float rounding (~1e-6 to 1e-5 relative; tests/test_distill_stem.py), on any input: it is the
block's own formula, not an approximation. It is used only where it is exact and applies (:func:`split_stem`):
a :class:`~dpdistill.models.convnet.ConvNet` whose first conv is a plain one (one group, stride 1, no dilation,
zero padding) over at most :data:`MAX_PATCH` patch values, followed by a one-group-per-channel affine GroupNorm
(our :class:`~dpdistill.models.instance_norm.InstanceNorm`), exact types only, float32 weights; everything else
runs as before. Without gradient only: the differentiable synthetic side keeps the plain layers (and their
hand-written backward). The stem calls the block's modules directly, so forward hooks registered on the
network, its ``features`` or the first conv and norm do not fire on this path (none are registered here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpdistill.models.convnet import ConvNet
from dpdistill.models.instance_norm import InstanceNorm

__all__ = ["MAX_PATCH", "MIN_WIDTH", "STEM_CHUNK", "conv_instance_norm", "split_stem"]

MIN_WIDTH = 128  # output channels from which the stem pays (module docstring)
MAX_PATCH = 27  # input channels x kernel pixels: 3x3 kernels on 1 (MNIST) or 3 (RGB) channels
STEM_CHUNK = 8  # images per stem call: 8 x 32x32 x 128 floats = 4 MB, the map stays in cache


def conv_instance_norm(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(conv(x))`` from patch moments (module docstring): a channels-last [N, C, H', W'] float32 tensor.

    ``conv`` must satisfy :func:`_plain_conv` and ``norm`` :func:`_instance_norm` (checked by :func:`split_stem`).
    """
    n, _, h, w = x.shape
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    out_h, out_w = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    patches = F.unfold(x.float(), (kh, kw), padding=(ph, pw))  # [N, K, P]: K = C_in*kh*kw values at P pixels
    pixels = patches.shape[-1]
    mean = patches.mean(2)  # [N, K]
    centred = patches - mean.unsqueeze(2)
    cov = torch.bmm(centred, centred.transpose(1, 2)).div_(pixels)  # [N, K, K], biased as instance norm's
    weight = conv.weight.detach().float().reshape(conv.out_channels, -1)  # [C, K]
    var = ((weight @ cov) * weight).sum(-1).clamp_min_(0)  # [N, C]: w_cᵀ Σ_n w_c (≥ 0 up to rounding)
    scale = torch.rsqrt(var + norm.eps) * norm.weight.detach()  # [N, C]
    shift = norm.bias.detach() - scale * (mean @ weight.t())  # [N, C]: β - scale·(w·μ); the conv bias cancels
    lhs = torch.cat([patches.transpose(1, 2), patches.new_ones(n, pixels, 1)], 2)  # [N, P, K+1]
    rhs = torch.cat([weight.t().unsqueeze(0) * scale.unsqueeze(1), shift.unsqueeze(1)], 1)  # [N, K+1, C]
    out = torch.bmm(lhs, rhs)  # [N, P, C]: the normalised map, pixel-major (= channels-last memory)
    return out.view(n, out_h, out_w, -1).permute(0, 3, 1, 2)


def split_stem(net: nn.Module, min_width: int = MIN_WIDTH
               ) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module] | None:
    """``(stem, rest)`` with ``net.embed(x) == rest(stem(x)).flatten(1)`` when the patch-moment first block
    applies to ``net`` (module docstring) and its first conv has at least ``min_width`` output channels, else None.

    ``stem`` is the first conv + instance norm (:func:`conv_instance_norm`) followed by the block's own
    activation and pooling modules; ``rest`` is the remaining feature layers as an ``nn.Sequential`` (shared with
    ``net``, not copied). A first conv that :func:`dpdistill.distill.embedding.low_precision` wrapped counts as
    its float32 original (the stem always computes in float32).
    """
    # embedding imports this module, so its wrapper class is imported at call time
    from dpdistill.distill.embedding import _BFloat16Conv

    if not isinstance(net, ConvNet) or type(net).embed is not ConvNet.embed:
        return None
    layers = list(net.features)
    if len(layers) < 2:
        return None
    # The exact types only: a subclass or another wrapper may compute something else. A low-precision copy's
    # wrapper keeps the float32 original as .conv.
    conv = layers[0].conv if type(layers[0]) is _BFloat16Conv else layers[0]
    if not (_plain_conv(conv) and _instance_norm(layers[1], conv.out_channels)) or conv.out_channels < min_width:
        return None
    if conv.weight.dtype != torch.float32:  # the stem computes in float32; the rest keeps its own dtype
        return None
    block_end = 2
    while block_end < len(layers) and type(layers[block_end]) not in (nn.Conv2d, _BFloat16Conv):
        block_end += 1  # the block's activation and pooling (up to the next conv)
    tail = layers[2:block_end]
    norm = layers[1]

    @torch.no_grad()  # its parameters are read detached: under autograd they would silently get no gradient
    def stem(x: torch.Tensor) -> torch.Tensor:
        h = conv_instance_norm(x, conv, norm)
        for layer in tail:
            h = layer(h)
        return h

    return stem, nn.Sequential(*layers[block_end:])


def _plain_conv(conv: nn.Module) -> bool:
    """A Conv2d whose output is w·patch + b over zero-padded patches of at most MAX_PATCH values."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= MAX_PATCH)


def _instance_norm(norm: nn.Module, channels: int) -> bool:
    """A GroupNorm (exactly, or our InstanceNorm) with one group per channel and affine parameters."""
    return (type(norm) in (nn.GroupNorm, InstanceNorm) and norm.num_groups == norm.num_channels == channels
            and norm.affine and norm.weight is not None and norm.bias is not None)
