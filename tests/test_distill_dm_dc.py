"""DM and DC on sklearn digits, plus the pieces they stand on: losses, multi-formation, the synthetic set, registry."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from dpdistill import distill
from dpdistill.data import ImageSet
from dpdistill.distill import multiformation
from dpdistill.distill.augment import DSA
from dpdistill.distill.dc import DCConfig, dc_loops, gradient_match_step, run_dc
from dpdistill.distill.dm import DMConfig, build_net, dm_step, run_dm
from dpdistill.distill.losses import feature_mean_distance, gradient_distance, layer_distance
from dpdistill.distill.synthetic import Normalizer, SyntheticSet
from dpdistill.errors import SpecError
from dpdistill.evaluation.utility import evaluate_utility

MEAN, STD = [0.3053], [0.3760]
# Depth 2 on 8x8 ends on a 2x2 map; depth 3 would end with an instance norm over 2x2 maps, a poor embedding.
TINY = dict(net_width=32, net_depth=2, batch_real=32)


@pytest.fixture(scope="module")
def digits() -> tuple[ImageSet, ImageSet]:
    """sklearn digits as [N, 1, 8, 8] in [0, 1]: the first 1,400 to distil, the rest to test."""
    bunch = load_digits()
    x = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)
    y = torch.from_numpy(bunch.target).long()
    return ImageSet(x[:1400], y[:1400], 10, "digits/train"), ImageSet(x[1400:], y[1400:], 10, "digits/test")


# -------------------------------------------------------------------------------------------------- losses


def test_feature_mean_distance() -> None:
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    syn = torch.tensor([[0.0, 0.0]])
    assert feature_mean_distance(real, syn).item() == pytest.approx(2.0**2 + 3.0**2)
    assert feature_mean_distance(real, real.mean(0, keepdim=True)).item() == pytest.approx(0.0)


def test_gradient_distances() -> None:
    g = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    assert layer_distance(g, g).item() == pytest.approx(0.0, abs=1e-5)
    assert layer_distance(g, -g).item() == pytest.approx(8.0, abs=1e-4)  # 4 output nodes x (1 - (-1))
    assert layer_distance(torch.ones(5), -torch.ones(5)).item() == 0.0  # biases are ignored, as in DC
    assert gradient_distance([g, torch.ones(2)], [g, torch.zeros(2)], "mse").item() == pytest.approx(2.0)
    assert gradient_distance([g], [2 * g], "cos").item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(SpecError, match="distance"):
        gradient_distance([g], [g], "l7")


# ---------------------------------------------------------------------------------------- multi-formation


def test_decode_pack_shapes_and_labels() -> None:
    stored = torch.rand(3, 2, 8, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    images, lab = multiformation.decode(stored, labels, 2)
    assert images.shape == (12, 2, 8, 8)
    assert lab.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Decoded image 1 of stored image 0 is its top-right 4x4 block, upsampled.
    block = torch.nn.functional.interpolate(stored[:1, :, :4, 4:], size=(8, 8), mode="bilinear")
    assert torch.allclose(images[1], block[0])
    images.sum().backward()
    assert stored.grad is not None and (stored.grad > 0).all()
    # Odd sizes split into near-equal blocks.
    odd, _ = multiformation.decode(torch.rand(1, 1, 7, 7), torch.tensor([0]), 3)
    assert odd.shape == (9, 1, 7, 7)
    assert multiformation.pack(torch.rand(12, 2, 8, 8), 2).shape == (3, 2, 8, 8)
    with pytest.raises(ValueError, match="groups"):
        multiformation.pack(torch.rand(5, 1, 8, 8), 2)


def test_pack_then_decode_round_trips_flat_images() -> None:
    values = torch.arange(8, dtype=torch.float32) / 8
    flat = values.view(8, 1, 1, 1).expand(8, 1, 8, 8).contiguous()
    stored = multiformation.pack(flat, 2)
    assert stored.shape == (2, 1, 8, 8)
    decoded, _ = multiformation.decode(stored, torch.tensor([0, 1]), 2)
    assert torch.allclose(decoded, flat, atol=1e-6)
    assert torch.equal(multiformation.decode(stored, torch.tensor([0, 1]), 1)[0], stored)


# -------------------------------------------------------------------------------------------- synthetic set


def test_synthetic_set_init_and_export(digits: tuple[ImageSet, ImageSet]) -> None:
    train, _ = digits
    syn = SyntheticSet.from_real(train, 3, torch.Generator().manual_seed(0))
    assert syn.images.shape == (30, 1, 8, 8) and isinstance(syn.images, torch.nn.Parameter)
    assert syn.labels.tolist() == sorted(syn.labels.tolist()) and syn.ipc == 3
    for img, c in zip(syn.images.detach(), syn.labels, strict=True):
        same = (train.images == img).flatten(1).all(1)
        assert same.any() and (train.labels[same] == c).all()
    multi = SyntheticSet.from_real(train, 2, torch.Generator().manual_seed(0), factor=2)
    assert multi.images.shape == (20, 1, 8, 8) and len(multi) == 80
    images, labels = multi.decoded()
    assert images.shape == (80, 1, 8, 8) and torch.bincount(labels).tolist() == [8] * 10
    assert multi.class_images(3).shape == (8, 1, 8, 8)
    noise = SyntheticSet.from_noise(10, 2, (1, 8, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        noise.images.mul_(3).sub_(1)
    x, y = noise.export()
    assert x.min() >= 0 and x.max() <= 1 and not x.requires_grad and y.dtype == torch.int64
    restored = SyntheticSet.from_state_dict(noise.state_dict())
    assert torch.equal(restored.images, noise.images) and restored.factor == 1


def test_pixel_gradient_preconditioning_matches_normalised_sgd() -> None:
    norm = Normalizer([0.5, 0.2], [0.3, 0.1])
    x0 = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    pix = torch.nn.Parameter(x0.clone())
    z = torch.nn.Parameter(norm(x0).clone())
    opt_pix, opt_z = torch.optim.SGD([pix], lr=0.5, momentum=0.5), torch.optim.SGD([z], lr=0.5, momentum=0.5)
    for _ in range(3):
        for opt, loss in ((opt_pix, ((norm(pix) - target) ** 2).sum()), (opt_z, ((z - target) ** 2).sum())):
            opt.zero_grad()
            loss.backward()
        norm.to_normalised_units(pix.grad)
        opt_pix.step()
        opt_z.step()
    assert torch.allclose(norm(pix.detach()), z.detach(), atol=1e-5)


# ------------------------------------------------------------------------------------------------- registry


def test_registry() -> None:
    assert {"dm", "dc"} <= set(distill.names())
    dm = distill.get("dm")
    assert dm.run is run_dm and dm.config is DMConfig and dm.private is False
    assert distill.get("DC").run is run_dc
    assert dm.make_config(ipc=3).ipc == 3
    with pytest.raises(SpecError, match="unknown distillation method 'nope'"):
        distill.get("nope")
    with pytest.raises(SpecError, match="ipc"):
        dm.make_config(ipc=0)
    with pytest.raises(SpecError, match="colour"):
        dm.make_config(colour=True)
    with pytest.raises(SpecError, match="blur"):
        dm.make_config(dsa_strategy="crop_blur")


def test_dc_loop_schedule() -> None:
    assert dc_loops(1) == (1, 1) and dc_loops(10) == (10, 50) and dc_loops(50) == (50, 10)
    assert DCConfig(ipc=10).loops() == (10, 50)
    assert DCConfig(ipc=10, outer_loop=2, inner_loop=0).loops() == (2, 0)


# ------------------------------------------------------------------------------------------------------ DM


def _dm_objective(syn: SyntheticSet, real: ImageSet, cfg: DMConfig, nets: int = 8) -> float:
    """DM loss averaged over a fixed set of random networks, without augmentation (a stable yardstick)."""
    from dpdistill.distill.dm import ClassSampler

    g = torch.Generator().manual_seed(1234)
    sampler, norm = ClassSampler(real, torch.device("cpu")), Normalizer(MEAN, STD)
    total = 0.0
    with torch.no_grad():
        for _ in range(nets):
            net = build_net(cfg, real, g, torch.device("cpu"))
            total += float(dm_step(net, syn, sampler, norm, None, 10_000, g))
    return total / nets


def test_dm_reduces_its_loss_and_beats_noise(digits: tuple[ImageSet, ImageSet]) -> None:
    train, test = digits
    cfg = DMConfig(ipc=2, iterations=30, init="noise", lr_img=10.0, **TINY)
    start = SyntheticSet.from_noise(10, 2, (1, 8, 8), torch.Generator().manual_seed(0))
    noise_x, noise_y = start.export()
    losses: list[float] = []
    syn = run_dm(train, cfg, seed=0, mean=MEAN, std=STD, progress=False, init=start,
                 callback=lambda it, loss: losses.append(loss))
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    before = _dm_objective(SyntheticSet(noise_x, noise_y, 10), train, cfg)
    after = _dm_objective(syn, train, cfg)
    assert after < 0.5 * before
    x, y = syn.export()
    assert x.shape == (20, 1, 8, 8) and torch.bincount(y).tolist() == [2] * 10
    kw = dict(num_classes=10, model_kwargs={"width": 32}, seeds=(0,), epochs=60, mean=MEAN, std=STD, progress=False)
    acc_dm = evaluate_utility(x, y, test.images, test.labels, **kw).mean
    acc_noise = evaluate_utility(noise_x, noise_y, test.images, test.labels, **kw).mean
    assert acc_dm > acc_noise + 0.2


def test_dm_is_deterministic_by_seed(digits: tuple[ImageSet, ImageSet]) -> None:
    train, _ = digits
    cfg = DMConfig(ipc=2, iterations=3, factor=1, **TINY)
    a, _ = run_dm(train, cfg, seed=5, progress=False).export()
    b, _ = run_dm(train, cfg, seed=5, progress=False).export()
    c, _ = run_dm(train, cfg, seed=6, progress=False).export()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dm_with_multiformation(digits: tuple[ImageSet, ImageSet]) -> None:
    train, _ = digits
    syn = run_dm(train, DMConfig(ipc=4, factor=2, iterations=2, **TINY), seed=0, progress=False)
    assert syn.images.shape == (10, 1, 8, 8)
    x, y = syn.export()
    assert x.shape == (40, 1, 8, 8) and torch.bincount(y).tolist() == [4] * 10
    with pytest.raises(Exception, match="multiple of factor"):
        run_dm(train, DMConfig(ipc=3, factor=2, iterations=1, **TINY), progress=False)


def test_interrupt_leaves_the_set_with_the_exception(digits: tuple[ImageSet, ImageSet]) -> None:
    train, _ = digits

    def stop(it: int, loss: float) -> None:
        if it == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        run_dm(train, DMConfig(ipc=2, iterations=10, **TINY), seed=0, progress=False, callback=stop)
    syn = info.value.synthetic_set
    assert isinstance(syn, SyntheticSet) and torch.isfinite(syn.images).all()


# ------------------------------------------------------------------------------------------------------ DC


def test_gradient_match_step(digits: tuple[ImageSet, ImageSet]) -> None:
    train, _ = digits
    cfg = DCConfig(**TINY)
    net = build_net(cfg, train, torch.Generator().manual_seed(0), torch.device("cpu"))
    norm = Normalizer(MEAN, STD)
    real = norm(train.images[train.labels == 3][:16])
    y = torch.full((16,), 3)
    dsa = DSA("rotate")
    params = dsa.sample(1, torch.Generator().manual_seed(0))
    # Identical images with identical augmentation have identical gradients ('ours' is only ~0: its 1e-6
    # guard shifts the cosine of near-zero rows).
    assert gradient_match_step(net, real.clone(), y, real, y, "mse", dsa, params).item() == pytest.approx(0.0)
    same = gradient_match_step(net, real.clone(), y, real, y, "ours", dsa, params)
    syn = norm(train.images[train.labels == 5][:2]).clone().requires_grad_(True)
    loss = gradient_match_step(net, syn, y[:2], real, y, "ours", dsa, params)
    assert loss.item() > 0.1 and same.item() < 0.05 * loss.item()
    loss.backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0


def test_dc_runs_and_is_deterministic(digits: tuple[ImageSet, ImageSet]) -> None:
    train, _ = digits
    cfg = DCConfig(ipc=2, iterations=2, outer_loop=2, inner_loop=1, **TINY)
    losses: list[float] = []
    syn = run_dc(train, cfg, seed=0, progress=False, callback=lambda it, loss: losses.append(loss))
    init = SyntheticSet.from_real(train, 2, torch.Generator().manual_seed(0))
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    x, y = syn.export()
    assert x.shape == (20, 1, 8, 8) and not torch.equal(x, init.export()[0])
    again, _ = run_dc(train, cfg, seed=0, progress=False).export()
    assert torch.equal(x, again)
    real_inner = DCConfig(ipc=2, iterations=1, outer_loop=2, inner_loop=2, inner_on="real", distance="mse", **TINY)
    assert torch.isfinite(run_dc(train, real_inner, seed=1, progress=False).export()[0]).all()
