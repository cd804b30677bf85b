"""Federated partitioners: every index exactly once, deterministic, and the skew each one promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpdistill.data import partition as P
from dpdistill.errors import DataError

# 10 unbalanced classes, 2,000 records.
LABELS = np.random.default_rng(42).choice(10, size=2000, p=np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum())


def assert_exact_cover(part: P.Partition, labels: np.ndarray) -> None:
    everything = np.concatenate(part.indices)
    assert len(everything) == len(labels), "client sizes must add up to N"
    assert np.array_equal(np.sort(everything), np.arange(len(labels))), "each index exactly once"
    assert part.class_counts.shape == (len(part.indices), 10)
    assert int(part.class_counts.sum()) == len(labels)
    for idx, counts in zip(part.indices, part.class_counts, strict=True):
        assert np.array_equal(np.bincount(labels[idx], minlength=10), counts)


def mean_max_share(part: P.Partition) -> float:
    return float(part.max_class_share().mean())


def mean_entropy(part: P.Partition) -> float:
    p = part.class_counts / np.maximum(part.class_counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(h.mean())


def test_iid_is_balanced_and_exact() -> None:
    part = P.iid(torch.as_tensor(LABELS), 7, seed=0)
    assert_exact_cover(part, LABELS)
    assert part.sizes.max() - part.sizes.min() <= 1
    assert mean_max_share(part) < 0.2  # balanced-ish classes: ~0.1-0.15


@pytest.mark.parametrize("alpha", [100.0, 1.0, 0.1])
def test_dirichlet_is_exact_and_respects_min_size(alpha: float) -> None:
    part = P.dirichlet(LABELS, 10, alpha=alpha, seed=1, min_size=20)
    assert_exact_cover(part, LABELS)
    assert part.sizes.min() >= 20


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    shares = {a: np.mean([mean_max_share(P.dirichlet(LABELS, 10, a, seed=s, min_size=5)) for s in range(3)])
              for a in (100.0, 1.0, 0.1)}
    entropies = {a: np.mean([mean_entropy(P.dirichlet(LABELS, 10, a, seed=s, min_size=5)) for s in range(3)])
                 for a in (100.0, 0.1)}
    assert shares[100.0] < shares[1.0] < shares[0.1]
    assert shares[100.0] < 0.2 and shares[0.1] > 0.5
    assert entropies[100.0] > np.log(10) * 0.9 > entropies[0.1]


def test_dirichlet_repairs_when_rejection_sampling_gives_up() -> None:
    labels = np.repeat(np.arange(10), 30)
    part = P.dirichlet(labels, 30, alpha=0.01, seed=0, min_size=8, max_tries=2)
    assert_exact_cover(part, labels)
    assert part.sizes.min() >= 8


@pytest.mark.parametrize("spc", [1, 2, 3])
def test_shards_limit_classes_per_client(spc: int) -> None:
    part = P.shards(LABELS, 20, shards_per_client=spc, seed=3)
    assert_exact_cover(part, LABELS)
    classes_per_client = (part.class_counts > 0).sum(axis=1)
    assert classes_per_client.max() <= spc
    assert classes_per_client.min() >= 1
    if spc == 1:
        assert mean_max_share(part) == 1.0


def test_partitioners_are_deterministic_by_seed() -> None:
    for kind, opts in (("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {"shards_per_client": 2})):
        a = P.make_partition(kind, LABELS, 8, seed=11, **opts)
        b = P.make_partition(kind, LABELS, 8, seed=11, **opts)
        c = P.make_partition(kind, LABELS, 8, seed=12, **opts)
        assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True)), kind
        assert not all(np.array_equal(x, y) for x, y in zip(a.indices, c.indices, strict=True)), kind


def test_get_binds_options_and_rejects_unknown_kinds() -> None:
    fn = P.get("dirichlet", alpha=0.3, min_size=2)
    part = fn(LABELS, 5, seed=0)
    assert part.n_clients == 5 and part.sizes.min() >= 2
    with pytest.raises(DataError, match="unknown partition 'pathological'; expected one of: dirichlet, iid, shards"):
        P.get("pathological")


def test_invalid_arguments_raise_data_errors() -> None:
    with pytest.raises(DataError, match="alpha"):
        P.dirichlet(LABELS, 5, alpha=0.0)
    with pytest.raises(DataError, match="min_size"):
        P.dirichlet(LABELS[:50], 10, alpha=1.0, min_size=10)
    with pytest.raises(DataError, match="cannot cover 10 classes"):
        P.shards(LABELS, 3, shards_per_client=2)
    with pytest.raises(DataError, match="cannot fill"):
        P.iid(LABELS[:3], 5)


def test_summary_is_a_table() -> None:
    part = P.shards(LABELS, 4, shards_per_client=3, seed=0)
    text = part.summary()
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["client", "n", "classes", "top%"]
    assert len(lines) == 4 + 2
    assert f"{len(LABELS)}" in lines[-1] and "clients=4" in lines[-1]
    assert lines[1].split()[1] == str(int(part.sizes[0]))
    many = P.iid(LABELS, 50, seed=0).summary(max_rows=5)
    assert "45 more clients" in many
