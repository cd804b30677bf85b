"""Federated partitioners: split one labelled set into per-client index sets (IID, Dirichlet, shards).

Every partitioner assigns each index to exactly one client, so client datasets are disjoint — the basis for
treating per-client DP releases as acting on disjoint records. All are deterministic given `seed`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpdistill.errors import DataError

Labels = np.ndarray | torch.Tensor | list[int]


@dataclass
class Partition:
    """Per-client index arrays into the partitioned set, and the resulting [n_clients, num_classes] counts."""

    indices: list[np.ndarray]
    class_counts: np.ndarray

    @property
    def n_clients(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> np.ndarray:
        return self.class_counts.sum(axis=1)

    def max_class_share(self) -> np.ndarray:
        """Per client, the share of its largest class (1/num_classes when balanced, 1.0 when one class)."""
        sizes = np.maximum(self.sizes, 1)
        return self.class_counts.max(axis=1) / sizes

    def summary(self, max_rows: int = 20) -> str:
        """A text table: one row per client with its size, class count, top-class share (and per-class counts
        when there are at most 10 classes); long partitions show the first `max_rows` rows and a total."""
        k = self.class_counts.shape[1]
        per_class = k <= 10
        head = f"{'client':>6} {'n':>7} {'classes':>7} {'top%':>5}"
        if per_class:
            head += " " + " ".join(f"{c:>5}" for c in range(k))
        rows = [head]
        shares = self.max_class_share()
        for i in range(min(self.n_clients, max_rows)):
            counts = self.class_counts[i]
            row = f"{i:>6} {int(counts.sum()):>7} {int((counts > 0).sum()):>7} {100 * shares[i]:>5.0f}"
            if per_class:
                row += " " + " ".join(f"{int(v):>5}" for v in counts)
            rows.append(row)
        if self.n_clients > max_rows:
            rows.append(f"{'...':>6} ({self.n_clients - max_rows} more clients)")
        sizes = self.sizes
        rows.append(f"{'total':>6} {int(sizes.sum()):>7}   clients={self.n_clients} size min/median/max="
                    f"{int(sizes.min())}/{int(np.median(sizes))}/{int(sizes.max())}")
        return "\n".join(rows)


def _labels(labels: Labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0)):
        raise DataError("partition labels must be a 1-D array of non-negative integers")
    return arr.astype(np.int64)


def _check_clients(n: int, n_clients: int) -> None:
    if n_clients < 1:
        raise DataError(f"partition: n_clients must be >= 1, got {n_clients}")
    if n < n_clients:
        raise DataError(f"partition: {n} records cannot fill {n_clients} clients; use fewer clients")


def _build(labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None) -> Partition:
    k = max(num_classes or 0, int(labels.max()) + 1 if labels.size else 0)
    indices = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    counts = np.stack([np.bincount(labels[p], minlength=k) for p in indices]) if indices else np.zeros((0, k))
    return Partition(indices, counts.astype(np.int64))


def iid(labels: Labels, n_clients: int, seed: int = 0, num_classes: int | None = None) -> Partition:
    """A uniformly random split into `n_clients` parts whose sizes differ by at most one."""
    y = _labels(labels)
    _check_clients(len(y), n_clients)
    perm = np.random.default_rng(seed).permutation(len(y))
    return _build(y, np.array_split(perm, n_clients), num_classes)


def dirichlet(labels: Labels, n_clients: int, alpha: float, seed: int = 0, min_size: int = 10,
              num_classes: int | None = None, max_tries: int = 100) -> Partition:
    """Label-skewed split: each class spread over clients by proportions ~ Dir(alpha) (small alpha: skewed).

    The usual recipe (Hsu et al. 2019; NIID-Bench, FedLab): clients already holding N/n_clients records get
    no more, and draws are repeated until every client has `min_size` records. If `max_tries` draws all fail
    (tiny alpha, many clients), the last draw is repaired by moving random records from the largest clients.
    """
    if alpha <= 0:
        raise DataError(f"partition: dirichlet alpha must be > 0, got {alpha}")
    y = _labels(labels)
    n = len(y)
    _check_clients(n, n_clients)
    if min_size * n_clients > n:
        raise DataError(f"partition: min_size={min_size} x {n_clients} clients exceeds the {n} records; "
                        f"lower min_size or n_clients")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    parts: list[list[int]] = []
    for _ in range(max_tries):
        parts = [[] for _ in range(n_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(n_clients, alpha))
            full = np.array([len(p) >= n / n_clients for p in parts])
            props = np.where(full, 0.0, props)
            total = props.sum()
            props = props / total if total > 0 else np.full(n_clients, 1.0 / n_clients)
            cuts = (np.cumsum(props) * len(members)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _repair(parts, min_size, rng)
    return _build(y, [np.asarray(p, dtype=np.int64) for p in parts], num_classes)


def _repair(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Top up clients below `min_size` with random records taken from the currently largest client."""
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            take = int(rng.integers(len(parts[donor])))
            parts[i].append(parts[donor].pop(take))


def shards(labels: Labels, n_clients: int, shards_per_client: int = 2, seed: int = 0,
           num_classes: int | None = None) -> Partition:
    """Pathological non-IID split (McMahan et al. 2017): single-class shards, `shards_per_client` per client.

    Shards never straddle two classes (each class is cut into its own shards, their number proportional to
    the class size), so a client sees at most `shards_per_client` classes.
    """
    if shards_per_client < 1:
        raise DataError(f"partition: shards_per_client must be >= 1, got {shards_per_client}")
    y = _labels(labels)
    _check_clients(len(y), n_clients)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    total = n_clients * shards_per_client
    if total < len(classes):
        raise DataError(f"partition: {n_clients} clients x {shards_per_client} shards = {total} shards cannot "
                        f"cover {len(classes)} classes; raise shards_per_client or n_clients")
    if total > len(y):
        raise DataError(f"partition: {total} shards exceed the {len(y)} records; lower shards_per_client")
    # Every class gets one shard, the rest go by largest remainder of its share, capped at its size.
    alloc = np.ones(len(classes), dtype=np.int64)
    extra = total - len(classes)
    quota = counts / counts.sum() * extra
    alloc += np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    for j in order[: total - int(alloc.sum())]:
        alloc[j] += 1
    alloc = np.minimum(alloc, counts)
    while alloc.sum() < total:  # caps freed some shards: give them to classes that can still be cut
        j = int(np.argmax(counts - alloc))
        alloc[j] += 1
    pieces: list[np.ndarray] = []
    for c, k in zip(classes, alloc, strict=True):
        pieces.extend(np.array_split(rng.permutation(np.flatnonzero(y == c)), k))
    order = rng.permutation(len(pieces))
    parts = [np.concatenate([pieces[j] for j in order[i::n_clients]]) for i in range(n_clients)]
    return _build(y, parts, num_classes)


PARTITIONERS: dict[str, Callable[..., Partition]] = {"iid": iid, "dirichlet": dirichlet, "shards": shards}


def get(kind: str, **kwargs: Any) -> Callable[..., Partition]:
    """The partitioner `kind` with options bound: call it as fn(labels, n_clients, seed=...)."""
    if kind not in PARTITIONERS:
        raise DataError(f"unknown partition '{kind}'; expected one of: {', '.join(sorted(PARTITIONERS))}")
    return functools.partial(PARTITIONERS[kind], **kwargs)


def make_partition(kind: str, labels: Labels, n_clients: int, seed: int = 0, **opts: Any) -> Partition:
    """Partition `labels` over `n_clients` with the partitioner named `kind` and its options."""
    return get(kind, **opts)(labels, n_clients, seed=seed)
