"""Federated partitioners: every index exactly once, deterministic, the skew each one promises, and a record's
client a function of that record alone (removing one record changes exactly one client's partition)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpdistill.data import partition as P
from dpdistill.errors import DataError

# 10 unbalanced classes, 2,000 records; random 4x4 "images" make the records distinct.
LABELS = np.random.default_rng(42).choice(10, size=2000, p=np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum())
IMAGES = np.random.default_rng(7).integers(0, 256, size=(2000, 1, 4, 4)).astype(np.float32) / 255
KINDS = (("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {"shards_per_client": 2}))


def part_of(kind: str, labels: np.ndarray, images: np.ndarray, n_clients: int = 8, seed: int = 11,
            **opts) -> P.Partition:
    return P.make_partition(kind, labels, n_clients, seed=seed, images=images, num_classes=10, **opts)


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


def client_records(part: P.Partition, images: np.ndarray, labels: np.ndarray) -> list[list[bytes]]:
    """Each client's records as sorted byte strings (pixels + label): comparable across two data sets."""
    return [sorted(images[i].tobytes() + int(labels[i]).to_bytes(8, "little") for i in idx) for idx in part.indices]


@pytest.mark.parametrize("kind,opts", KINDS)
def test_removing_one_record_changes_exactly_one_clients_partition(kind, opts):
    """The relation SFDD's parallel LocalDP charge relies on; a permute-and-split partitioner moves hundreds."""
    full = client_records(part_of(kind, LABELS, IMAGES, **opts), IMAGES, LABELS)
    for removed in (0, 777, 1999):
        keep = np.delete(np.arange(len(LABELS)), removed)
        less = client_records(part_of(kind, LABELS[keep], IMAGES[keep], **opts), IMAGES[keep], LABELS[keep])
        changed = [k for k in range(len(full)) if full[k] != less[k]]
        assert len(changed) == 1, (kind, removed, changed)
        (k,) = changed
        gone = IMAGES[removed].tobytes() + int(LABELS[removed]).to_bytes(8, "little")
        assert sorted(less[k] + [gone]) == full[k]  # that client lost exactly the removed record


@pytest.mark.parametrize("kind,opts", KINDS)
def test_a_records_client_does_not_depend_on_its_position(kind, opts):
    perm = np.random.default_rng(0).permutation(len(LABELS))
    a = client_records(part_of(kind, LABELS, IMAGES, **opts), IMAGES, LABELS)
    b = client_records(part_of(kind, LABELS[perm], IMAGES[perm], **opts), IMAGES[perm], LABELS[perm])
    assert a == b


def test_the_hash_is_keyed_by_the_seed_and_covers_pixels_and_label():
    u = P.record_hashes(IMAGES[:50], LABELS[:50], seed=0)
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 50
    assert not np.array_equal(u, P.record_hashes(IMAGES[:50], LABELS[:50], seed=1))
    assert not np.array_equal(u, P.record_hashes(IMAGES[:50], (LABELS[:50] + 1) % 10, seed=0))
    touched = IMAGES[:50].copy()
    touched[:, 0, 0, 0] += 1e-3
    assert not np.isin(P.record_hashes(touched, LABELS[:50], seed=0), u).any()
    assert np.array_equal(u, P.record_hashes(torch.from_numpy(IMAGES[:50]), torch.from_numpy(LABELS[:50]), 0))


def test_iid_is_balanced_and_exact() -> None:
    part = P.iid(torch.as_tensor(LABELS), 7, seed=0, images=IMAGES)
    assert_exact_cover(part, LABELS)
    # Multinomial sizes (mean 286, sd ~16), not equal to within one: no record's client depends on another's.
    assert part.sizes.min() > 0.75 * len(LABELS) / 7 and part.sizes.max() < 1.25 * len(LABELS) / 7
    assert mean_max_share(part) < 0.2  # balanced-ish classes: ~0.1-0.15


@pytest.mark.parametrize("alpha", [100.0, 1.0, 0.3])
def test_dirichlet_is_exact(alpha: float) -> None:
    part = P.dirichlet(LABELS, 10, alpha=alpha, seed=1, images=IMAGES, num_classes=10)
    assert_exact_cover(part, LABELS)
    assert part.sizes.min() >= 1


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def parts(a):
        return [P.dirichlet(LABELS, 10, a, seed=s, images=IMAGES, num_classes=10, min_size=0) for s in range(3)]

    shares = {a: np.mean([mean_max_share(p) for p in parts(a)]) for a in (100.0, 1.0, 0.1)}
    entropies = {a: np.mean([mean_entropy(p) for p in parts(a)]) for a in (100.0, 0.1)}
    assert shares[100.0] < shares[1.0] < shares[0.1]
    assert shares[100.0] < 0.2 and shares[0.1] > 0.5
    assert entropies[100.0] > np.log(10) * 0.9 > entropies[0.1]


def test_a_too_small_client_is_an_error_not_a_repair() -> None:
    labels = np.repeat(np.arange(10), 30)
    images = np.random.default_rng(3).random((300, 1, 2, 2)).astype(np.float32)
    with pytest.raises(DataError, match=r"client \d+ holds \d+ records, fewer than min_size=8"):
        P.dirichlet(labels, 30, alpha=0.01, seed=0, min_size=8, images=images, num_classes=10)


@pytest.mark.parametrize("spc", [1, 2, 3])
def test_shards_limit_classes_per_client(spc: int) -> None:
    part = P.shards(LABELS, 20, shards_per_client=spc, seed=3, images=IMAGES, num_classes=10)
    assert_exact_cover(part, LABELS)
    classes_per_client = (part.class_counts > 0).sum(axis=1)
    assert classes_per_client.max() <= spc
    assert classes_per_client.min() >= 1
    if spc == 1:
        assert mean_max_share(part) == 1.0


def test_partitioners_are_deterministic_by_seed() -> None:
    for kind, opts in KINDS:
        a = part_of(kind, LABELS, IMAGES, **opts)
        b = part_of(kind, LABELS, IMAGES, **opts)
        c = part_of(kind, LABELS, IMAGES, seed=12, **opts)
        assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True)), kind
        assert not all(np.array_equal(x, y) for x, y in zip(a.indices, c.indices, strict=True)), kind


def test_get_binds_options_and_rejects_unknown_kinds() -> None:
    fn = P.get("dirichlet", alpha=0.3, min_size=2)
    part = fn(LABELS, 5, seed=0, images=IMAGES)
    assert part.n_clients == 5 and part.sizes.min() >= 2
    with pytest.raises(DataError, match="unknown partition 'pathological'; expected one of: dirichlet, iid, shards"):
        P.get("pathological")


def test_invalid_arguments_raise_data_errors() -> None:
    with pytest.raises(DataError, match="alpha"):
        P.dirichlet(LABELS, 5, alpha=0.0, images=IMAGES)
    with pytest.raises(DataError, match="min_size"):
        P.dirichlet(LABELS[:50], 10, alpha=1.0, min_size=10, images=IMAGES[:50])
    with pytest.raises(DataError, match="cannot cover 10 classes"):
        P.shards(LABELS, 3, shards_per_client=2, images=IMAGES)
    with pytest.raises(DataError, match="fewer than min_size=1"):
        P.iid(LABELS[:3], 5, images=IMAGES[:3])
    with pytest.raises(DataError, match="images but"):
        P.iid(LABELS, 5, images=IMAGES[:3])
    with pytest.raises(DataError, match="outside the 5 classes"):
        P.iid(LABELS, 5, images=IMAGES, num_classes=5)


def test_summary_is_a_table() -> None:
    part = P.shards(LABELS, 4, shards_per_client=3, seed=0, images=IMAGES)
    text = part.summary()
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["client", "n", "classes", "top%"]
    assert len(lines) == 4 + 2
    assert f"{len(LABELS)}" in lines[-1] and "clients=4" in lines[-1]
    assert lines[1].split()[1] == str(int(part.sizes[0]))
    many = P.iid(LABELS, 50, seed=0, images=IMAGES).summary(max_rows=5)
    assert "45 more clients" in many
