"""Instance norm as DC defines it (GroupNorm with one group per channel), with a faster channels-last CPU path.

On CPU every network here runs in channels-last layout (oneDNN's convolutions are ~3x faster on NHWC), and
torch's channels-last GroupNorm kernels are slow: in a width-32 ConvNet's training step on 32-image chunks they
took ~42 % of the time (forward 12 %, backward 30 %; the 32x32 layer's backward alone 7 ms per chunk).
:class:`InstanceNorm` computes the same function over the ``[N, H*W, C]`` view of the same memory, forward
and backward written out (:class:`_InstanceNormNHWC`): per-(image, channel) sums over the middle dimension
and three elementwise passes each way, every output written straight into channels-last memory (a view
returned to an in-place ReLU would make autograd copy it).

It IS an ``nn.GroupNorm`` (same parameters, state dict, ``num_groups == num_channels``) and computes the same
function to float rounding (~1e-6; tests/test_instance_norm.py), so everything that reads GroupNorm attributes keeps
working. Per-record gradient code that dispatches on EXACT module types (the project's ghost clipping in
:mod:`dpdistill.training.per_record`, opacus' grad samplers) registers it beside ``nn.GroupNorm``: its
per-record weight and bias gradients are GroupNorm's, computed from the layer's input and output gradient.

Second derivatives (DC's gradient matching, SFDD, gradient-inversion attacks differentiate a gradient): when
the backward itself is recorded (``create_graph=True``) it differentiates the same formula written in plain
torch ops, so higher derivatives are exact; only first-order backwards take the hand-written path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InstanceNorm", "normalise"]


class InstanceNorm(nn.GroupNorm):
    """``nn.GroupNorm(width, width, affine=True)``: each channel of each image normalised over its pixels."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__(width, width, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_path(x):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad
                                               or self.bias.requires_grad):
            return _normalise_no_grad(x, self.weight.detach(), self.bias.detach(), self.eps)
        return _InstanceNormNHWC.apply(x, self.weight, self.bias, self.eps)


def normalise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x̂: each channel of each image normalised over its pixels, no affine (what per-record gradient code needs
    for a GroupNorm(C, C)'s weight gradient), through the fast path where it applies. No gradient."""
    with torch.no_grad():
        if not _fast_path(x):
            return F.group_norm(x, x.shape[1], eps=eps)
        c = x.shape[1]
        return _normalise_no_grad(x, torch.ones(c, dtype=x.dtype), torch.zeros(c, dtype=x.dtype), eps)


def _fast_path(x: torch.Tensor) -> bool:
    """A real channels-last CPU image batch (not under a functorch transform, whose batched tensors have
    their own layouts, nor while torch.compile traces: inductor fuses the plain formula with its neighbours,
    which beats these kernels, see :mod:`dpdistill.models.compiled`): the case the hand-written kernels are for."""
    if torch.compiler.is_compiling():
        return False
    if x.dim() != 4 or x.device.type != "cpu" or x.shape[1] < 2 or x.shape[2] * x.shape[3] < 2:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H*W, C]: a view for channels-last memory, a copy otherwise."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def _normalise_no_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The forward alone (nothing to save): y = v·k + (β - mean·k) with k = γ·rstd, one pass fewer."""
    v = _rows(x)
    mean = v.mean(1, keepdim=True)
    var = (v - mean).square_().mean(1, keepdim=True)
    k = torch.rsqrt(var.add_(eps)).mul_(weight)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    torch.addcmul(bias - mean * k, v, k, out=_rows(out))
    return out


def _composite(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The same function in plain differentiable ops (for recorded backwards: second derivatives)."""
    v = _rows(x)
    centred = v - v.mean(1, keepdim=True)
    y = centred * torch.rsqrt(centred.square().mean(1, keepdim=True) + eps) * weight + bias
    n, c, h, w = x.shape
    return y.view(n, h, w, c).permute(0, 3, 1, 2)


class _InstanceNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        v = _rows(x)
        xhat = v - v.mean(1, keepdim=True)
        # Two passes (centre, then square), as torch's kernel: not E[x²] - E[x]². torch.var_mean over the middle
        # dimension is ~100x slower than mean on CPU (a reduction-kernel quirk), so it is not used.
        rstd = torch.rsqrt(xhat.square().mean(1, keepdim=True) + eps)
        xhat.mul_(rstd)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        torch.addcmul(bias, xhat, weight, out=_rows(out))
        ctx.eps = eps
        ctx.save_for_backward(x, weight, bias, xhat, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, xhat, rstd = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiate the plain-ops formula (exact higher derivatives)
            wanted = [t for t, need in zip((x, weight, bias), (want_x, want_w, want_b), strict=True) if need]
            with torch.enable_grad():
                grads = iter(torch.autograd.grad(_composite(x, weight, bias, ctx.eps), wanted, grad_out,
                                                 create_graph=True))
            return (next(grads) if want_x else None, next(grads) if want_w else None,
                    next(grads) if want_b else None, None)
        g = _rows(grad_out.contiguous(memory_format=torch.channels_last))
        s1 = g.sum(1, keepdim=True)  # [N, 1, C]: Σ_p g
        s2 = (g * xhat).sum(1, keepdim=True)  # Σ_p g·x̂
        grad_w = s2.sum((0, 1)) if want_w else None
        grad_b = s1.sum((0, 1)) if want_b else None
        grad_x = None
        if want_x:
            # dx = γ·rstd·(g - mean_p g - x̂·mean_p(g·x̂)), per image and channel
            pixels = g.shape[1]
            grad_x = torch.empty_like(x, memory_format=torch.channels_last)
            rows = _rows(grad_x)
            torch.addcmul(g, xhat, s2.div_(-pixels), out=rows)
            rows.sub_(s1.div_(pixels)).mul_(rstd * weight)
        return grad_x, grad_w, grad_b, None
