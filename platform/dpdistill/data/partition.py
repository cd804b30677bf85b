"""Federated partitioners: split one labelled set into per-client index sets (IID, Dirichlet, shards).

Why a record's client depends on that record alone. SFDD charges each round's per-client releases as one
parallel release (:class:`~dpdistill.privacy.mechanisms.Parallel`), which holds only if adding or removing one
record changes exactly one client's data. A partitioner that permutes and splits the whole set (``np.array_split``
of a permutation, Dirichlet cuts of each class) fails that: removing one record shifts the cut points and moves
hundreds of records between clients. So here every record goes to a client chosen by a keyed hash of its own
bytes (pixels and label; BLAKE2b keyed with the data-independent ``seed``), mapped through a client layout drawn
from ``seed`` and the public number of classes only:

- ``iid``: the client is ``floor(u * n_clients)`` for the record's hash ``u`` in [0, 1): every client holds an
  independent uniform share (sizes are multinomial, not equal to within one).
- ``dirichlet``: each class ``c`` gets client proportions ``p_c ~ Dir(alpha)`` drawn from ``seed``; a record of
  class ``c`` goes to the client where ``u`` falls in ``p_c``'s cumulative distribution (inverse CDF).
- ``shards``: each client holds ``shards_per_client`` class slots dealt from ``seed``; a record of class ``c``
  goes to one of the slots of class ``c``, chosen by ``u``.

Removing a record changes only the client its hash names; every other client's records are byte-identical.
There is no repair step (a step that moved records by global counts would break this): a client left with
fewer than ``min_size`` records is a :class:`~dpdistill.errors.DataError`. Identical records (same pixels and
label) share a client, which the add-or-remove-one argument allows. The layout is a function of ``seed`` and
``num_classes``: pass ``num_classes`` (the dataset's, public) so it does not depend on the labels present.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpdistill.errors import DataError

Labels = np.ndarray | torch.Tensor | list[int]
Images = np.ndarray | torch.Tensor

RELATION = ("add-or-remove-one record of the training split; a record's client is a keyed hash (BLAKE2b, key "
            "spec.seed) of its own pixels and label, so adding or removing one record changes exactly one "
            "client's partition and leaves every other client's records byte-identical")


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


def _num_classes(y: np.ndarray, num_classes: int | None) -> int:
    k = int(y.max()) + 1 if y.size else 0
    if num_classes is None:
        return max(k, 1)
    if k > num_classes:
        raise DataError(f"partition: label {k - 1} is outside the {num_classes} classes")
    return int(num_classes)


def _check_clients(n_clients: int, min_size: int) -> None:
    if n_clients < 1:
        raise DataError(f"partition: n_clients must be >= 1, got {n_clients}")
    if min_size < 0:
        raise DataError(f"partition: min_size must be >= 0, got {min_size}")


def record_hashes(images: Images, labels: Labels, seed: int) -> np.ndarray:
    """Each record's keyed hash as a uniform float in [0, 1): a function of its bytes (pixels, label) and seed.

    The key is the data-independent ``seed``; the message is the record's label (int64) and its pixel bytes, so
    neither the record's position nor any other record enters.
    """
    y = _labels(labels)
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if len(x) != len(y):
        raise DataError(f"partition: {len(x)} images but {len(y)} labels")
    rows = np.ascontiguousarray(x).reshape(len(x), -1)
    key = int(seed).to_bytes(16, "little", signed=True)
    out = np.empty(len(y), dtype=np.float64)
    for i in range(len(y)):
        h = hashlib.blake2b(key=key, digest_size=8, person=b"dpd-partition")
        h.update(int(y[i]).to_bytes(8, "little"))
        h.update(rows[i].tobytes())
        # 53 bits: exactly representable, so u < 1 always.
        out[i] = (int.from_bytes(h.digest(), "little") >> 11) * 2.0 ** -53
    return out


def _build(y: np.ndarray, client: np.ndarray, n_clients: int, num_classes: int, min_size: int,
           hint: str) -> Partition:
    indices = [np.flatnonzero(client == i).astype(np.int64) for i in range(n_clients)]
    counts = np.zeros((n_clients, num_classes), dtype=np.int64)
    np.add.at(counts, (client, y), 1)
    sizes = counts.sum(axis=1)
    small = np.flatnonzero(sizes < min_size)
    if small.size:
        i = int(small[0])
        # No repair: moving records by global counts would tie one record's client to the others.
        raise DataError(f"partition: client {i} holds {int(sizes[i])} records, fewer than min_size={min_size} "
                        f"({small.size} such clients); {hint}")
    return Partition(indices, counts)


def iid(labels: Labels, n_clients: int, seed: int = 0, num_classes: int | None = None, *, images: Images,
        min_size: int = 1) -> Partition:
    """A uniform split: each record goes to client ``floor(u * n_clients)`` for its keyed hash ``u``."""
    y = _labels(labels)
    _check_clients(n_clients, min_size)
    k = _num_classes(y, num_classes)
    u = record_hashes(images, y, seed)
    client = np.minimum((u * n_clients).astype(np.int64), n_clients - 1)
    return _build(y, client, n_clients, k, min_size, "use fewer clients")


def dirichlet(labels: Labels, n_clients: int, alpha: float, seed: int = 0, min_size: int = 1,
              num_classes: int | None = None, *, images: Images) -> Partition:
    """Label-skewed split: class ``c``'s records spread over clients by proportions ``p_c ~ Dir(alpha)``.

    The proportions are drawn once from ``seed`` for every class (small alpha: skewed); a record goes to the
    client where its keyed hash falls in its class's cumulative proportions. Unlike the usual recipe (Hsu et al.
    2019) there is no redraw until every client is large enough and no capping of full clients: both decide
    from the whole data where a record goes. A client below ``min_size`` is an error instead.
    """
    if alpha <= 0:
        raise DataError(f"partition: dirichlet alpha must be > 0, got {alpha}")
    y = _labels(labels)
    _check_clients(n_clients, min_size)
    k = _num_classes(y, num_classes)
    props = np.random.default_rng(seed).dirichlet(np.full(n_clients, float(alpha)), size=k)  # [k, n_clients]
    cdf = np.cumsum(props, axis=1)
    u = record_hashes(images, y, seed)
    client = np.empty(len(y), dtype=np.int64)
    for c in range(k):
        members = np.flatnonzero(y == c)
        client[members] = np.searchsorted(cdf[c], u[members] * cdf[c, -1], side="right")
    client = np.minimum(client, n_clients - 1)
    return _build(y, client, n_clients, k, min_size, "raise alpha, lower n_clients or min_size, or change the seed")


def shards(labels: Labels, n_clients: int, shards_per_client: int = 2, seed: int = 0,
           num_classes: int | None = None, *, images: Images, min_size: int = 1) -> Partition:
    """Pathological non-IID split (after McMahan et al. 2017): each client holds ``shards_per_client`` classes.

    The ``n_clients x shards_per_client`` class slots are dealt from ``seed`` (repeated random orders of the
    classes, so every class has a slot and the slots are spread evenly); a record of class ``c`` goes to one of
    class ``c``'s slots, picked by its keyed hash. A client sees at most ``shards_per_client`` classes (fewer
    when one order ends and the next begins with a class it already holds).
    """
    if shards_per_client < 1:
        raise DataError(f"partition: shards_per_client must be >= 1, got {shards_per_client}")
    y = _labels(labels)
    _check_clients(n_clients, min_size)
    k = _num_classes(y, num_classes)
    total = n_clients * shards_per_client
    if total < k:
        raise DataError(f"partition: {n_clients} clients x {shards_per_client} shards = {total} shards cannot "
                        f"cover {k} classes; raise shards_per_client or n_clients")
    rng = np.random.default_rng(seed)
    deals = -(-total // k)
    slot_class = np.concatenate([rng.permutation(k) for _ in range(deals)])[:total]
    slot_client = np.repeat(np.arange(n_clients), shards_per_client)
    u = record_hashes(images, y, seed)
    client = np.empty(len(y), dtype=np.int64)
    for c in range(k):
        slots = slot_client[slot_class == c]
        members = np.flatnonzero(y == c)
        client[members] = slots[np.minimum((u[members] * len(slots)).astype(np.int64), len(slots) - 1)]
    return _build(y, client, n_clients, k, min_size, "raise shards_per_client, lower n_clients or change the seed")


PARTITIONERS: dict[str, Callable[..., Partition]] = {"iid": iid, "dirichlet": dirichlet, "shards": shards}


def get(kind: str, **kwargs: Any) -> Callable[..., Partition]:
    """The partitioner `kind` with options bound: call it as fn(labels, n_clients, seed=..., images=...)."""
    if kind not in PARTITIONERS:
        raise DataError(f"unknown partition '{kind}'; expected one of: {', '.join(sorted(PARTITIONERS))}")
    return functools.partial(PARTITIONERS[kind], **kwargs)


def make_partition(kind: str, labels: Labels, n_clients: int, seed: int = 0, *, images: Images,
                   **opts: Any) -> Partition:
    """Partition the records (``images``, ``labels``) over `n_clients` with the partitioner named `kind`."""
    return get(kind, **opts)(labels, n_clients, seed=seed, images=images)
