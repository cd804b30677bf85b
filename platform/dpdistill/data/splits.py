"""Deterministic train / val / test index splits, the way DPImageBench makes them.

Validation is carved from the official training split with a seeded random permutation (DPImageBench:
``torch.manual_seed(0); random_split(train, [train_size, val_size])``), so train and val are disjoint by
construction and change only with ``val_seed``. Sets without an official test split first lose a stratified
test part drawn with a fixed seed (TEST_SEED), independent of ``val_seed``: changing the validation seed must
never move a test record into training.

Because train and val are disjoint subsets of one split, mechanisms run on them compose in parallel
(add/remove-one of a training record touches only one of them).
"""

from __future__ import annotations

import numpy as np

TEST_SEED = 0


def holdout_size(n: int, size: int | float) -> int:
    """How many of `n` records a holdout of `size` takes.

    A float is a fraction of `n`. An int is an absolute count (DPImageBench's 5,000 for MNIST/CIFAR) that
    applies while it leaves at least half the records for training; smaller copies of a set (test fixtures,
    truncated downloads) fall back to 10%. At least one record is held out and one kept whenever n >= 2.
    """
    if n < 2:
        return 0
    if isinstance(size, float):
        if not 0.0 < size < 1.0:
            raise ValueError(f"holdout fraction must be in (0, 1), got {size}")
        k = int(round(size * n))
    else:
        k = int(size) if 2 * int(size) <= n else int(round(0.1 * n))
    return min(max(k, 1), n - 1)


def random_holdout(n: int, size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (kept, held) by a seeded permutation; both sorted, disjoint, covering range(n)."""
    k = holdout_size(n, size)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _allocate(counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Split `k` over classes in proportion to `counts` (largest remainder, ties broken by `rng`)."""
    quota = counts * (k / counts.sum())
    alloc = np.floor(quota).astype(np.int64)
    short = k - int(alloc.sum())
    if short > 0:
        frac = quota - alloc
        # Random jitter below the smallest possible difference of remainders breaks ties reproducibly.
        order = np.lexsort((rng.random(len(counts)), -frac))
        alloc[order[:short]] += 1
    return np.minimum(alloc, counts)


def stratified_holdout(labels: np.ndarray, size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held) with each class held out in proportion to its frequency."""
    labels = np.asarray(labels).astype(np.int64)
    n = len(labels)
    k = holdout_size(n, size)
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    alloc = _allocate(counts, k, rng)
    held = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        held.append(rng.permutation(members)[: alloc[c]])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def official_train_val(n_train: int, val_size: int | float, val_seed: int) -> dict[str, np.ndarray]:
    """Indices into the official train split for "train" and "val"."""
    train, val = random_holdout(n_train, val_size, val_seed)
    return {"train": train, "val": val}


def carved_train_val_test(labels: np.ndarray, test_size: int | float, val_size: int | float,
                          val_seed: int) -> dict[str, np.ndarray]:
    """Indices into a set with no official split: a fixed stratified test part, then val from the rest."""
    rest, test = stratified_holdout(labels, test_size, TEST_SEED)
    train_pos, val_pos = random_holdout(len(rest), val_size, val_seed)
    return {"train": rest[train_pos], "val": rest[val_pos], "test": test}
