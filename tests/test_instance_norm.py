"""The ConvNet's InstanceNorm (models/instance_norm.py): the same function as nn.GroupNorm(C, C) on every path
(channels-last fast path with and without gradient, NCHW fallback, second derivatives, per-record gradients
through ghost clipping, opacus hooks and torch.func), so swapping it in changed no result but speed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpdistill.models.convnet import ConvNet
from dpdistill.models.instance_norm import InstanceNorm, _fast_path, _InstanceNormNHWC
from dpdistill.training import per_record
from dpdistill.training.dp_sgd import clipped_gradient_sum

CL = torch.channels_last


def _norm(width: int, seed: int = 0) -> InstanceNorm:
    torch.manual_seed(seed)
    m = InstanceNorm(width)
    nn.init.normal_(m.weight)
    nn.init.normal_(m.bias)
    return m


@pytest.mark.parametrize("size", [2, 4, 8, 16, 32])
def test_forward_and_backward_equal_group_norm_in_channels_last(size: int) -> None:
    m = _norm(16)
    # An offset mean three times the spread: a one-pass E[x²] - E[x]² would lose digits here.
    x = (torch.randn(6, 16, size, size) * 3 + 9).contiguous(memory_format=CL).requires_grad_()
    assert _fast_path(x)
    g = torch.randn(6, 16, size, size)
    y = m(x)
    assert y.is_contiguous(memory_format=CL)  # the next conv gets the layout it wants
    grads = torch.autograd.grad(y, (x, m.weight, m.bias), g)
    # Against GroupNorm in float64: the error of ours within a small multiple of torch's own float32 kernel's.
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, m.weight, m.bias))
    y64 = F.group_norm(x64, 16, w64, b64, m.eps)
    ref64 = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    y32 = F.group_norm(x, 16, m.weight, m.bias, m.eps)
    ref32 = torch.autograd.grad(y32, (x, m.weight, m.bias), g)
    for got, torch32, exact in zip((y, *grads), (y32, *ref32), (y64, *ref64), strict=True):
        err, torch_err = float((got.detach().double() - exact).abs().max()), \
            float((torch32.detach().double() - exact).abs().max())
        assert err <= 4 * torch_err + 1e-5 * float(exact.abs().max()), (err, torch_err)
    with torch.no_grad():  # the forward-only path (no saved tensors)
        err = float((m(x).double() - y64).abs().max())
        assert err <= 4 * float((y32.double() - y64).abs().max()) + 1e-5 * float(y64.abs().max()), err


def test_nchw_input_takes_torch_kernel_and_agrees() -> None:
    m = _norm(8)
    x = torch.randn(4, 8, 16, 16)
    assert not _fast_path(x)
    torch.testing.assert_close(m(x), F.group_norm(x, 8, m.weight, m.bias, m.eps))


def test_second_derivatives_are_exact() -> None:
    """DC's gradient matching and gradient-inversion attacks differentiate a gradient: the recorded backward
    differentiates the plain-ops formula (gradgradcheck in float64 would fail on a wrong one)."""
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(a, ww, bb):
        return _InstanceNormNHWC.apply(a, ww, bb, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_a_convnet_gradient_of_a_gradient_equals_the_group_norm_one() -> None:
    """What DC computes: d/d(images) of ||d loss/d params||², the same with InstanceNorm as with GroupNorm."""
    fast, plain = _twins(2)
    x = torch.rand(5, 1, 28, 28).contiguous(memory_format=CL)
    y = torch.arange(5)

    def second(net):
        xs = x.clone().requires_grad_()
        grads = torch.autograd.grad(F.cross_entropy(net(xs), y), list(net.parameters()), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), xs)[0]

    torch.testing.assert_close(second(fast), second(plain), rtol=1e-4, atol=1e-6)


class _ChannelsLastCrossEntropy:
    """A DP-SGD objective that feeds the net channels-last images (so InstanceNorm takes its fast path)."""

    def draw_rows(self, images, labels, multiplicity, generator):
        return images.repeat_interleave(multiplicity, 0), labels.repeat_interleave(multiplicity, 0)

    def row_losses(self, net, x, y):
        return F.cross_entropy(net(x.contiguous(memory_format=CL)), y, reduction="none")

    def losses(self, net, images, labels, multiplicity, generator):
        return self.row_losses(net, *self.draw_rows(images, labels, multiplicity, generator))


def _twins(seed: int) -> tuple[nn.Module, nn.Module]:
    """A ConvNet with InstanceNorm and the same network with nn.GroupNorm(C, C) in its place."""
    torch.manual_seed(seed)
    fast = ConvNet(1, 10, 28, width=8).to(memory_format=CL)
    plain = ConvNet(1, 10, 28, width=8).to(memory_format=CL)
    for i, layer in enumerate(plain.features):
        if isinstance(layer, InstanceNorm):
            plain.features[i] = nn.GroupNorm(8, 8)
    plain.load_state_dict(fast.state_dict())
    assert sum(isinstance(m, InstanceNorm) for m in fast.modules()) == 3
    assert not any(isinstance(m, InstanceNorm) for m in plain.modules())
    return fast, plain


@pytest.mark.parametrize("mode", ["ghost", "hooks", "functorch"])
def test_per_record_clipped_sums_equal_group_norm_ones(mode: str) -> None:
    """Ghost clipping and opacus dispatch on exact types: InstanceNorm is registered beside GroupNorm and gives
    the same clipped per-record gradient sum (torch.func sees the torch kernel: batched tensors fall back).
    A clip of 0.05 clips every record, so a wrong per-record norm would show."""
    fast, plain = _twins(3)
    assert per_record.ghost_support(fast, list(fast.parameters())) is None
    x = torch.rand(12, 1, 28, 28)
    y = torch.arange(12) % 10
    sums = []
    for net in (fast, plain):
        params = list(net.parameters())
        backend = per_record.open_backend(mode, net, params)
        try:
            sums.append(torch.cat([s.reshape(-1) for s in clipped_gradient_sum(
                _ChannelsLastCrossEntropy(), net, params, x, y, 1, 0.05, torch.Generator().manual_seed(0), 256,
                backend)]))
        finally:
            backend.close()
    torch.testing.assert_close(sums[0], sums[1], rtol=1e-4, atol=1e-6)
    assert float(sums[0].norm()) <= 12 * 0.05 + 1e-6
