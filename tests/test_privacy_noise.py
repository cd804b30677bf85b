"""The privacy randomness source: secret by default, reproducible only on request, and never noiseless."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from dpdistill.errors import PrivacyError
from dpdistill.privacy.noise import PrivacyRandomness, resolve


def test_secret_draws_differ_between_sources_and_calls() -> None:
    a, b = PrivacyRandomness.secret(), PrivacyRandomness.secret()
    x, y, z = a.gaussian((64,), 1.0), a.gaussian((64,), 1.0), b.gaussian((64,), 1.0)
    assert not torch.equal(x, y) and not torch.equal(x, z)


def test_secret_generators_are_not_seeded_from_anything_public() -> None:
    # Every generator gets fresh entropy: two generators never start in the same state, and neither matches a
    # generator seeded with a small public seed (the bug this replaces seeded noise from spec.seed = 0, 1, ...).
    src = PrivacyRandomness.secret()
    first = [src.generator().initial_seed() for _ in range(50)]
    assert len(set(first)) == 50
    assert not set(first) & set(range(10_000))


def test_reproducible_mode_repeats_and_is_marked_not_private() -> None:
    a, b = PrivacyRandomness.reproducible(7), PrivacyRandomness.reproducible(7)
    assert torch.equal(a.gaussian((16,), 2.0), b.gaussian((16,), 2.0))
    assert torch.equal(a.poisson_mask(100, 0.3), b.poisson_mask(100, 0.3))
    assert not a.private and PrivacyRandomness.secret().private
    assert "NOT PRIVATE" in repr(a)
    # Different seeds or labels give different streams.
    assert not torch.equal(PrivacyRandomness.reproducible(8).gaussian((16,), 1.0),
                           PrivacyRandomness.reproducible(7).gaussian((16,), 1.0))


def test_pickled_secret_source_carries_no_state() -> None:
    # What a Ray worker (e.g. a federated client) receives: the mode only, so its noise is its own.
    src = PrivacyRandomness.secret()
    blob = pickle.dumps(src)
    assert b"reproducible" not in blob
    got = pickle.loads(blob)
    assert got.private
    assert not torch.equal(got.gaussian((32,), 1.0), pickle.loads(blob).gaussian((32,), 1.0))
    rep = pickle.loads(pickle.dumps(PrivacyRandomness.reproducible(3)))
    assert torch.equal(rep.gaussian((4,), 1.0), PrivacyRandomness.reproducible(3).gaussian((4,), 1.0))


def test_spawn_keeps_the_mode() -> None:
    assert PrivacyRandomness.secret().spawn("client-3").private
    child_a = PrivacyRandomness.reproducible(1).spawn("client-3")
    child_b = PrivacyRandomness.reproducible(1).spawn("client-3")
    assert not child_a.private
    assert torch.equal(child_a.gaussian((8,), 1.0), child_b.gaussian((8,), 1.0))


@pytest.mark.parametrize("std", [0.0, -1.0, math.nan, math.inf, True, "1"])
def test_gaussian_refuses_a_release_without_noise(std) -> None:
    with pytest.raises(PrivacyError):
        PrivacyRandomness.secret().gaussian((4,), std)


def test_gaussian_has_the_asked_scale() -> None:
    x = PrivacyRandomness.secret().gaussian((200_000,), 3.0)
    assert abs(float(x.std()) - 3.0) < 0.05 and abs(float(x.mean())) < 0.05


def test_poisson_sampling_rate_and_independence() -> None:
    src = PrivacyRandomness.secret()
    masks = torch.stack([src.poisson_mask(1000, 0.1) for _ in range(50)])
    assert abs(float(masks.float().mean()) - 0.1) < 0.01
    batches = list(src.poisson_batches(1000, 0.1, 5))
    assert len(batches) == 5 and all(b.ndim == 1 for b in batches)
    with pytest.raises(PrivacyError):
        src.poisson_mask(10, 0.0)


def test_resolve_never_returns_a_seeded_source() -> None:
    assert resolve(None).private
    rep = PrivacyRandomness.reproducible(0)
    assert resolve(rep) is rep
    with pytest.raises(PrivacyError):
        resolve(torch.Generator().manual_seed(0))  # a seeded generator is not a privacy source
