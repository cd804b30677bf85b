"""Split indices: DPImageBench sizes, pairwise disjoint and complete, deterministic, test independent of val_seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpdistill import data
from dpdistill.data import splits


def assert_partition_of(parts: list[np.ndarray], n: int) -> None:
    """Pairwise disjoint and together exactly range(n)."""
    for i, a in enumerate(parts):
        assert len(np.unique(a)) == len(a), "an index repeats within a split"
        for b in parts[i + 1:]:
            assert not np.intersect1d(a, b).size, "splits overlap"
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [(60000, 5000, 5000), (50000, 5000, 5000), (73257, 5000, 5000), (40, 5000, 4), (9000, 5000, 900),
     (39209, 0.1, 3921), (27000, 4000 / 27000, 4000), (23000, 2000 / 23000, 2000), (5, 0.01, 1), (3, 0.99, 2),
     (1, 0.5, 0)],
)
def test_holdout_size(n: int, size: int | float, expected: int) -> None:
    assert splits.holdout_size(n, size) == expected


def test_holdout_size_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fraction"):
        splits.holdout_size(100, 1.5)


def test_mnist_split_indices_are_dpimagebench_sizes_disjoint_and_seeded() -> None:
    a = splits.official_train_val(60000, 5000, val_seed=0)
    assert (len(a["train"]), len(a["val"])) == (55000, 5000)
    assert_partition_of([a["train"], a["val"]], 60000)
    again = splits.official_train_val(60000, 5000, val_seed=0)
    assert all(np.array_equal(a[k], again[k]) for k in a)
    other = splits.official_train_val(60000, 5000, val_seed=1)
    overlap = np.intersect1d(a["val"], other["val"]).size
    assert overlap < 1000, "another seed must give a (mostly) different validation set"  # ~417 expected


def test_carved_split_fixes_test_and_moves_only_val() -> None:
    labels = np.repeat(np.arange(5), [100, 50, 30, 15, 5])
    a = splits.carved_train_val_test(labels, 0.2, 0.1, val_seed=0)
    b = splits.carved_train_val_test(labels, 0.2, 0.1, val_seed=1)
    for parts in (a, b):
        assert_partition_of([parts["train"], parts["val"], parts["test"]], len(labels))
    assert np.array_equal(a["test"], b["test"]), "test must not depend on val_seed"
    assert not np.array_equal(a["val"], b["val"])
    assert np.array_equal(np.sort(np.concatenate([a["train"], a["val"]])),
                          np.sort(np.concatenate([b["train"], b["val"]])))
    # Stratified: each class keeps its share of the test part (40 of 200: 20, 10, 6, 3, 1).
    assert np.bincount(labels[a["test"]], minlength=5).tolist() == [20, 10, 6, 3, 1]


def test_stratified_holdout_hits_the_exact_size_with_uneven_classes() -> None:
    labels = np.array([0] * 7 + [1] * 7 + [2] * 7)
    kept, held = splits.stratified_holdout(labels, 0.2, seed=3)
    assert len(held) == 4 and len(kept) == 17
    assert sorted(np.bincount(labels[held], minlength=3).tolist()) == [1, 1, 2]
    assert_partition_of([kept, held], len(labels))


def test_random_holdout_is_uniform_over_seeds() -> None:
    # Over many seeds each index is held out about equally often (no positional bias).
    hits = np.zeros(20)
    for seed in range(400):
        _, held = splits.random_holdout(20, 5, seed)
        hits[held] += 1
    assert hits.min() > 60 and hits.max() < 140  # mean 100


def test_digits_splits_are_fixed_and_stratified() -> None:
    a = data.load_splits("digits", val_seed=0)
    b = data.load_splits("digits", val_seed=5)
    assert torch.equal(a["test"].images, b["test"].images), "digits test is fixed (seed 0), whatever val_seed"
    assert not torch.equal(a["val"].images, b["val"].images)
    counts = a["test"].class_counts()
    assert int(counts.sum()) == 359 and int(counts.max() - counts.min()) <= 2  # 174..183 per class * 0.2
    # All 1,797 records appear exactly once across the splits (rows of pixels identify them up to duplicates).
    rows = torch.cat([a[s].images.flatten(1) for s in data.SPLITS])
    assert rows.shape[0] == 1797
    from sklearn.datasets import load_digits

    ref = torch.from_numpy((load_digits().images / 16.0).astype(np.float32)).flatten(1)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, ref.tolist()))


def test_loaded_splits_are_disjoint_by_index_for_digits() -> None:
    from dpdistill.data.digits import DigitsSource

    idx = DigitsSource()._indices(val_seed=2)
    assert_partition_of([idx["train"], idx["val"], idx["test"]], 1797)
