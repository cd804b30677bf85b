"""DSA: the same parameters give the same transform on real and synthetic batches, and every op is differentiable."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from dpdistill.distill.augment import (
    DEFAULT_STRATEGY,
    DSA,
    OPS,
    DSAParams,
    make_dsa,
    parse_strategy,
    siamese_pair,
)
from dpdistill.errors import SpecError


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """64 sklearn digits as [N, 1, 8, 8] in [0, 1] (normalised roughly as the distillers do)."""
    x = torch.from_numpy(load_digits().images[:64] / 16.0).float().unsqueeze(1)
    return (x - 0.3) / 0.37


def _params(op: str, *values: float) -> DSAParams:
    return DSAParams((op,), {op: torch.tensor([list(values)])}, 1)


@pytest.mark.parametrize("op", OPS)
def test_same_params_same_output_on_identical_inputs(op: str, digits: torch.Tensor) -> None:
    dsa = DSA(op)
    params = dsa.sample(1, torch.Generator().manual_seed(3))
    real, syn = digits.clone(), digits.clone()
    assert torch.equal(dsa.apply(real, params), dsa.apply(syn, params))


@pytest.mark.parametrize("op", OPS)
def test_shared_params_transform_every_image_alike(op: str, digits: torch.Tensor) -> None:
    # A real batch of 64 and a synthetic batch of 5 (its first images) get exactly the same transform.
    dsa = DSA(op)
    params = dsa.sample(1, torch.Generator().manual_seed(11))
    assert torch.allclose(dsa.apply(digits, params)[:5], dsa.apply(digits[:5], params), atol=1e-6)


def test_siamese_pair_shares_one_draw_and_passes_empty_real_batches(digits: torch.Tensor) -> None:
    dsa = DSA("crop_rotate", mode="all")
    real, syn = siamese_pair(dsa, digits, digits[:5], torch.Generator().manual_seed(4))
    assert torch.allclose(real[:5], syn, atol=1e-6) and not torch.allclose(syn, digits[:5])
    # An empty real batch (an empty Poisson sample) passes through, and the draw happens all the same: the
    # stream after the pair is the same with or without real images.
    g_empty, g_full = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    empty, syn_e = siamese_pair(dsa, digits[:0], digits[:5], g_empty)
    siamese_pair(dsa, digits, digits[:5], g_full)
    assert empty.shape[0] == 0 and torch.equal(syn_e, syn)
    assert torch.equal(torch.rand(3, generator=g_empty), torch.rand(3, generator=g_full))
    few = digits[:5]
    same_real, same_syn = siamese_pair(None, digits, few, g_full)
    assert same_real is digits and same_syn is few  # no DSA: untouched


def test_mode_all_is_siamese_and_seeds_are_deterministic(digits: torch.Tensor) -> None:
    dsa = DSA(DEFAULT_STRATEGY, mode="all")
    a = dsa(digits, 7)
    b = dsa(digits.clone(), 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, dsa(digits, 8))
    p1 = dsa.sample(4, torch.Generator().manual_seed(0))
    p2 = dsa.sample(4, torch.Generator().manual_seed(0))
    assert p1.ops == p2.ops and all(torch.equal(p1.values[k], p2.values[k]) for k in p1.ops)


@pytest.mark.parametrize("op", OPS)
def test_different_seeds_give_different_transforms(op: str, digits: torch.Tensor) -> None:
    # Colour on one channel: saturation is a no-op but brightness / contrast still vary.
    dsa = DSA(op)
    outs = [dsa(digits[:8], seed) for seed in range(6)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_single_mode_picks_different_ops() -> None:
    dsa = DSA(DEFAULT_STRATEGY)
    g = torch.Generator().manual_seed(0)
    picked = {dsa.sample(1, g).ops for _ in range(60)}
    assert all(len(ops) == 1 for ops in picked)
    assert len(picked) == len(OPS)


@pytest.mark.parametrize("op", OPS)
def test_each_op_passes_gradients_to_its_input(op: str, digits: torch.Tensor) -> None:
    dsa = DSA(op)
    # Parameters that make each op do something (flip on, cutout inside, 9 degrees, 1.1x scale, shift 1 px).
    params = {
        "color": _params("color", 0.9, 0.3, 0.8),
        "crop": _params("crop", 0.0, 1.0),
        "cutout": _params("cutout", 0.5, 0.5),
        "flip": _params("flip", 0.1),
        "scale": _params("scale", 0.8, 0.3),
        "rotate": _params("rotate", 0.8),
    }[op]
    x = digits[:4].clone().requires_grad_(True)
    weights = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    (dsa.apply(x, params) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    # An op that changes the image must change the gradient pattern too (not a pass-through).
    assert not torch.allclose(x.grad, weights)


@pytest.mark.parametrize("op", ["scale", "rotate", "color", "crop"])
def test_gradcheck(op: str) -> None:
    dsa = DSA(op)
    params = dsa.sample(1, torch.Generator().manual_seed(5))
    params = DSAParams(params.ops, {k: v.double() for k, v in params.values.items()}, 1)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, params), (x,))


def test_ops_do_what_they_say(digits: torch.Tensor) -> None:
    x = digits[:3]
    dsa = DSA(DEFAULT_STRATEGY)
    assert torch.equal(dsa.apply(x, _params("flip", 0.0)), x.flip(3))
    assert torch.equal(dsa.apply(x, _params("flip", 0.9)), x)
    # u = 0.5 is a zero shift / zero angle / unit scale.
    assert torch.equal(dsa.apply(x, _params("crop", 0.5, 0.5)), x)
    assert torch.allclose(dsa.apply(x, _params("rotate", 0.5)), x, atol=1e-5)
    unit = (1 - 1 / 1.2) / (1.2 - 1 / 1.2)
    assert torch.allclose(dsa.apply(x, _params("scale", unit, unit)), x, atol=1e-5)
    # u = 0 shifts down by one pixel (8 px * 0.125) with zero fill.
    shifted = dsa.apply(x, _params("crop", 0.0, 0.5))
    assert torch.equal(shifted[:, :, 1:], x[:, :, :-1]) and torch.all(shifted[:, :, 0] == 0)
    # Cutout of half the size in the middle zeroes a 4x4 square.
    ones = torch.ones(1, 1, 8, 8)
    cut = dsa.apply(ones, _params("cutout", 0.5, 0.5))
    assert int((cut == 0).sum()) == 16


def test_per_image_params_need_matching_batch(digits: torch.Tensor) -> None:
    dsa = DSA("rotate")
    params = dsa.sample(4, torch.Generator().manual_seed(0))
    assert dsa.apply(digits[:4], params).shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="sampled for 4 images"):
        dsa.apply(digits[:5], params)
    # Per-image parameters differ between images.
    same = digits[:1].expand(4, 1, 8, 8)
    out = dsa.apply(same, params)
    assert not torch.allclose(out[0], out[1])


def test_strategy_parsing() -> None:
    assert parse_strategy(DEFAULT_STRATEGY) == OPS
    assert parse_strategy("none") == () and parse_strategy("") == () and parse_strategy(None) == ()
    assert make_dsa("none") is None
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(DSA("none")(x, 3), x)
    with pytest.raises(SpecError, match="unknown augmentation 'blur'"):
        DSA("color_blur")
    with pytest.raises(SpecError, match="dsa_mode"):
        DSA(mode="double")
