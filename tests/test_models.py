"""Shapes, options and errors of the model registry (ConvNet, ResNet18, LeNet)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dpdistill import models
from dpdistill.errors import SpecError
from dpdistill.models.convnet import ACTS, NORMS, POOLS

SIZES = (8, 28, 32)


def _check(model: nn.Module, channels: int, size: int, num_classes: int = 7) -> None:
    x = torch.rand(2, channels, size, size)
    logits = model(x)
    feats = model.embed(x)
    assert logits.shape == (2, num_classes)
    assert feats.shape == (2, model.feature_dim)
    assert torch.isfinite(logits).all()


def test_names_lists_the_three_models() -> None:
    assert {"convnet", "resnet18", "lenet"} <= set(models.names())


@pytest.mark.parametrize(("norm", "act", "pool"), list(itertools.product(NORMS, ACTS, POOLS)))
def test_convnet_shapes_for_every_option(norm: str, act: str, pool: str) -> None:
    for channels, size in itertools.product((1, 3), (*SIZES, 64)):
        model = models.get(
            "convnet",
            channels=channels,
            num_classes=7,
            image_size=size,
            width=4,
            norm=norm,
            act=act,
            pool=pool,
        )
        model.train()  # batch norm must also work with a batch of two in train mode
        _check(model, channels, size)


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_shapes(norm: str, channels: int) -> None:
    for size in SIZES:
        model = models.get("resnet18", channels=channels, num_classes=7, image_size=size, norm=norm)
        assert model.feature_dim == 512
        _check(model, channels, size)


@pytest.mark.parametrize("act", ["sigmoid", "relu", "leakyrelu"])
@pytest.mark.parametrize("channels", [1, 3])
def test_lenet_shapes(act: str, channels: int) -> None:
    for size in SIZES:
        _check(
            models.get("lenet", channels=channels, num_classes=7, image_size=size, act=act), channels, size
        )
    # The DLG paper's 32x32 LeNet has a 768-wide linear layer.
    assert models.get("lenet", channels=3, num_classes=10, image_size=32).feature_dim == 768


def test_lenet_supports_second_order_gradients() -> None:
    # Gradient-inversion attacks differentiate the gradient itself.
    model = models.get("lenet", channels=1, num_classes=10, image_size=8)
    x = torch.rand(1, 1, 8, 8, requires_grad=True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([3]))
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_convnet_defaults_match_dc() -> None:
    model = models.get("convnet", channels=3, num_classes=10, image_size=32)
    assert model.feature_shape == (128, 4, 4)
    assert model.feature_dim == 2048
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    # DC's "instancenorm" is GroupNorm with one group per channel.
    assert len(norms) == 3 and all(n.num_groups == 128 and n.affine for n in norms)


def test_convnet_28_follows_the_32_path() -> None:
    mnist = models.get("convnet", channels=1, num_classes=10, image_size=28)
    cifar = models.get("convnet", channels=3, num_classes=10, image_size=32)
    assert mnist.feature_shape == cifar.feature_shape == (128, 4, 4)
    assert mnist.features[0].padding == (3, 3)


def test_convnet_layer_norm_is_one_group() -> None:
    model = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, norm="layer")
    assert [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)] == [1, 1, 1]


def test_convnet_depth_never_shrinks_maps_below_one_pixel() -> None:
    model = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, depth=5)
    assert model.feature_shape == (8, 1, 1)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 5
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize(
    ("alias", "depth", "width"), [("convnet_d4", 4, 128), ("ConvNetD2", 2, 128), ("convnet_w16", 3, 16)]
)
def test_dc_style_aliases(alias: str, depth: int, width: int) -> None:
    model = models.get(alias, channels=3, num_classes=10, image_size=64)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == depth
    assert model.feature_shape[0] == width


def test_unknown_option_names_model_option_and_choices() -> None:
    with pytest.raises(SpecError) as err:
        models.get("convnet", channels=1, num_classes=10, image_size=8, foo=1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model 'convnet': unknown option 'foo'; expected one of ")
    for option in ("width", "depth", "norm", "act", "pool"):
        assert option in message


def test_unknown_model_and_bad_values_are_spec_errors() -> None:
    with pytest.raises(
        SpecError, match="model 'vgg': unknown model; expected one of convnet, lenet, lenet5, mlp, resnet18"
    ):
        models.get("vgg", channels=1, num_classes=10, image_size=8)
    with pytest.raises(SpecError, match="option 'norm' must be one of instance, group, batch, layer, none"):
        models.get("convnet", channels=1, num_classes=10, image_size=8, norm="weird")
    with pytest.raises(SpecError, match="option 'depth' must be a positive integer"):
        models.get("convnet", channels=1, num_classes=10, image_size=8, depth=0)
    with pytest.raises(SpecError, match="image_size must be a positive integer"):
        models.get("lenet", channels=1, num_classes=10, image_size=0)
    with pytest.raises(SpecError, match="model 'resnet18': option 'norm'"):
        models.get("resnet18", channels=1, num_classes=10, image_size=8, norm="layer")


def test_register_adds_a_model_and_refuses_a_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    from dpdistill.models import registry

    # Keep the throwaway model out of the registry other tests see.
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))

    @models.register("test-tiny-linear")
    def tiny(channels: int, num_classes: int, image_size: int, hidden: int = 3) -> nn.Module:
        model = nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size**2, num_classes))
        model.feature_dim = hidden  # type: ignore[assignment]
        return model

    assert "test-tiny-linear" in models.names()
    model = models.get("test-tiny-linear", channels=1, num_classes=4, image_size=5, hidden=2)
    assert model(torch.rand(2, 1, 5, 5)).shape == (2, 4)
    with pytest.raises(SpecError, match="unknown option 'width'; expected one of hidden"):
        models.get("test-tiny-linear", channels=1, num_classes=4, image_size=5, width=2)
    with pytest.raises(ValueError, match="already registered"):
        models.register("test-tiny-linear")(lambda channels, num_classes, image_size: nn.Identity())


def test_lenet5_follows_dc_feature_path() -> None:
    """DC's LeNet: grey 28x28 padded to follow CIFAR's path to 16 x 5 x 5 features; 8x8 digits keep a 2x2 map."""
    for channels, size, features in ((1, 28, 400), (3, 32, 400), (1, 8, 64)):
        net = models.get("lenet5", channels=channels, num_classes=10, image_size=size)
        assert net.feature_dim == features
        x = torch.rand(3, channels, size, size)
        assert net(x).shape == (3, 10) and net.embed(x).shape == (3, 84)
