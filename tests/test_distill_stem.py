"""A ConvNet's first block from patch moments (distill/stem.py) computes what the plain layers compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpdistill import models
from dpdistill.distill import embedding, stem


def _net(channels: int = 1, size: int = 28, seed: int = 0, **kwargs: object) -> nn.Module:
    """A ConvNet with every parameter moved off its initial value (non-trivial γ, β and conv bias)."""
    torch.manual_seed(seed)
    net = models.get("convnet", channels=channels, num_classes=10, image_size=size, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return embedding.prepare(net)


def test_non_square_images_kernels_and_padding() -> None:
    # A swapped height/width anywhere (unfold, the output view) would fail here.
    conv = nn.Conv2d(3, 16, (1, 5), padding=(0, 2)).to(memory_format=torch.channels_last)
    norm = nn.GroupNorm(16, 16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = embedding.channels_last(torch.randn(5, 3, 9, 13))
    with torch.no_grad():
        want = norm(conv(x))
    torch.testing.assert_close(stem.conv_instance_norm(x, conv, norm), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (1, 7)])
def test_conv_instance_norm_equals_the_plain_layers(channels: int, size: int) -> None:
    net = _net(channels, size, width=24)
    conv, norm = net.features[0], net.features[1]
    x = torch.randn(6, channels, size, size)
    x[0] = 0.0  # a constant image: zero variance everywhere, the eps alone keeps the scale finite
    x[1] = 3.0
    x[2] *= 50  # large pixels: the variance comes from a covariance, not from E[x²] - E[x]²
    with torch.no_grad():
        want = norm(conv(embedding.channels_last(x)))
    got = stem.conv_instance_norm(embedding.channels_last(x), conv, norm)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)  # what the next layer's kernels expect
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [
    {}, {"width": 32, "depth": 1}, {"act": "leakyrelu", "pool": "max"}, {"act": "sigmoid", "pool": "none"},
    {"depth": 4, "width": 16}, {"channels": 3, "size": 32, "width": 16},
])
def test_stem_then_rest_is_the_network_embedding(kwargs: dict[str, object]) -> None:
    channels, size = int(kwargs.pop("channels", 1)), int(kwargs.pop("size", 28))  # type: ignore[call-overload]
    net = _net(channels, size, **kwargs)
    split = stem.split_stem(net, min_width=1)
    assert split is not None
    first_block, rest = split
    x = torch.randn(20, channels, size, size)
    with torch.no_grad():
        want = net.embed(x)
        got = rest(first_block(embedding.channels_last(x))).flatten(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "group", "layer", "none"])
def test_other_norms_keep_the_plain_layers(norm: str) -> None:
    # The patch-moment identity is instance norm's only; group/layer norm pool statistics over channels.
    assert stem.split_stem(_net(norm=norm, width=8), min_width=1) is None


def test_other_networks_and_convolutions_keep_the_plain_layers() -> None:
    assert stem.split_stem(models.get("lenet", channels=1, num_classes=10, image_size=28), min_width=1) is None
    assert stem.split_stem(models.get("resnet18", channels=3, num_classes=10, image_size=32), min_width=1) is None
    assert stem.split_stem(_net(channels=4, size=16, width=8), min_width=1) is None  # 36 patch values > MAX_PATCH
    assert stem._plain_conv(nn.Conv2d(1, 8, 3, padding=1))
    assert not stem._plain_conv(nn.Conv2d(1, 8, 3, padding=1, stride=2))
    assert not stem._plain_conv(nn.Conv2d(1, 8, 3, padding=1, dilation=2))
    assert not stem._plain_conv(nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect"))
    assert not stem._plain_conv(nn.Conv2d(1, 8, 3, padding="same"))


def test_lookalikes_keep_the_plain_layers() -> None:
    # Exact types only: a subclass or wrapper may compute something else than the block's formula.
    class Doubled(models.convnet.ConvNet):
        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().embed(x)

    class Wrapped(nn.Module):
        def __init__(self, conv: nn.Conv2d) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).abs()

    class HalfNorm(nn.GroupNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * super().forward(x)

    assert stem.split_stem(Doubled(1, 10, 28, width=8), min_width=1) is None
    wrapped = _net(width=8)
    wrapped.features[0] = Wrapped(wrapped.features[0])
    assert stem.split_stem(wrapped, min_width=1) is None
    half = _net(width=8)
    half.features[1] = HalfNorm(8, 8)
    assert stem.split_stem(half, min_width=1) is None
    assert stem.split_stem(_net(width=8).double(), min_width=1) is None  # the stem computes in float32


def test_the_stem_carries_no_gradient_and_runs_on_cpu_only(monkeypatch) -> None:
    net = _net(width=stem.MIN_WIDTH)
    split = stem.split_stem(net)
    assert split is not None
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    assert not split[0](embedding.channels_last(x)).requires_grad  # never a silently partial gradient
    calls: list[int] = []
    monkeypatch.setattr(stem, "conv_instance_norm", lambda *a: calls.append(1))
    out = embedding.embed_chunks(net.to("meta"), torch.randn(4, 1, 28, 28, device="meta"))  # not CPU: plain layers
    assert calls == [] and out[0].shape == (4, net.feature_dim)


def test_the_stem_is_used_from_the_width_where_it_pays() -> None:
    # A fixed rule on the width (measured: slower at 32 and 64, faster at 128), never a timing.
    assert stem.split_stem(_net(width=64)) is None
    assert stem.split_stem(_net(width=stem.MIN_WIDTH)) is not None
    assert stem.split_stem(_net(width=64), min_width=64) is not None


def test_real_side_embedding_runs_the_stem_in_sub_chunks(monkeypatch) -> None:
    # A spy on the stem: embed_chunks must take this path (else the speed-up is silently lost) and give the
    # plain embedding. 50 images in chunks of 32 -> 32 + 18 -> sub-chunks of 8: 4 + 3 stem calls.
    calls: list[int] = []
    real = stem.conv_instance_norm

    def spy(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm) -> torch.Tensor:
        calls.append(len(x))
        return real(x, conv, norm)

    monkeypatch.setattr(stem, "conv_instance_norm", spy)
    net = _net(width=stem.MIN_WIDTH)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(50, 1, 28, 28)
    with torch.no_grad():
        want = net.embed(x)
    parts = embedding.embed_chunks(net, x, chunk=32)
    assert [len(p) for p in parts] == [32, 18]
    assert calls == [8, 8, 8, 8, 8, 8, 2]
    torch.testing.assert_close(torch.cat(parts), want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_bfloat16_real_side_keeps_the_stem_in_float32(monkeypatch) -> None:
    # With one block there is no other convolution: the bf16 path must then equal float32 to rounding, which it
    # would not if the stem's convolution were rounded to bf16 (~0.5 % here).
    net = _net(width=stem.MIN_WIDTH, depth=1)
    x = torch.randn(40, 1, 28, 28)
    exact = embedding.embed_no_grad(net, x)
    low = embedding.embed_no_grad(net, x, precision="bfloat16")
    torch.testing.assert_close(low, exact, rtol=1e-5, atol=1e-6)
    # A network low_precision already converted (what DP matching passes) gets the same float32 stem.
    split = stem.split_stem(embedding.low_precision(net))
    assert split is not None
    with torch.no_grad():
        torch.testing.assert_close(split[1](split[0](embedding.channels_last(x))).flatten(1), exact,
                                   rtol=1e-5, atol=1e-6)
    # Deeper, the later convolutions are rounded (so bf16 really runs there).
    deep = _net(width=stem.MIN_WIDTH)
    assert not torch.equal(embedding.embed_no_grad(deep, x, precision="bfloat16"), embedding.embed_no_grad(deep, x))
