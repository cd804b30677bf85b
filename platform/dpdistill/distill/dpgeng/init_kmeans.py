"""DP-Init (DP-GenG stage b): start the distilled set from representative DP-generated images, packed by factor f.

Per class, k-means (scikit-learn) on features of the class's generated images with k = ipc · f² clusters;
the generated image nearest each centroid (distinct images) is kept, and each group of f² kept images is
packed into one stored image (multi-formation). Only DP outputs are read: the stage is free.

Optionally the generated set is filtered first (:func:`confident_subset`): a DP generator also emits failed
samples (DP-MERF on MNIST: blobs, broken strokes), and k-means gives outliers clusters of their own, so
they would be picked. Dropping, per class, the images the extractors classify least confidently as their
own label removes them; the extractors are trained on generated data, so the filter is free too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dpdistill.distill.synthetic import SyntheticSet
from dpdistill.errors import DataError

Embed = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def features_of(images: torch.Tensor, embed: Embed | None, chunk: int = 512) -> np.ndarray:
    """Feature rows for k-means: ``embed`` in chunks, or the flattened pixels when ``embed`` is None."""
    if embed is None:
        return images.flatten(1).cpu().numpy().astype(np.float64)
    parts = [embed(images[s:s + chunk]).flatten(1).cpu() for s in range(0, len(images), chunk)]
    return torch.cat(parts).numpy().astype(np.float64)


def nearest_distinct(features: np.ndarray, centroids: np.ndarray) -> list[int]:
    """For each centroid the index of the nearest feature row, never the same row twice (greedy by distance)."""
    d = ((centroids[:, None, :] - features[None, :, :]) ** 2).sum(-1)  # [k, n]
    chosen: list[int] = [-1] * len(centroids)
    used: set[int] = set()
    # Settle the centroids with the closest match first, so a shared nearest row goes to the closer one.
    for k in np.argsort(d.min(axis=1)):
        for i in np.argsort(d[k]):
            if int(i) not in used:
                chosen[int(k)] = int(i)
                used.add(int(i))
                break
    return chosen


def kmeans_select(images: torch.Tensor, k: int, embed: Embed | None, seed: int) -> torch.Tensor:
    """The ``k`` images nearest the centroids of k-means on their features, ordered by cluster size (largest first)."""
    from sklearn.cluster import KMeans

    if len(images) < k:
        raise DataError(f"DP-Init: {len(images)} generated images for a class, need at least {k} (ipc x factor^2); "
                        "raise generated_per_class")
    feats = features_of(images, embed)
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(feats)
    sizes = np.bincount(km.labels_, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    picks = nearest_distinct(feats, km.cluster_centers_[order])
    return images[torch.as_tensor(picks, dtype=torch.int64)]


@torch.no_grad()
def confident_subset(generated: Any, classify: Callable[[torch.Tensor], torch.Tensor], drop: float,
                     chunk: int = 512) -> Any:
    """``generated`` without the ``drop`` fraction of each class scored least confidently as that class.

    ``classify`` maps pixel images to class probabilities [N, classes]. Each class keeps
    ``ceil((1 - drop) · n_c)`` images (at least one), in their original order.
    """
    if drop <= 0:
        return generated
    probs = torch.cat([classify(generated.images[s:s + chunk]).cpu() for s in range(0, len(generated), chunk)])
    own = probs.gather(1, generated.labels.view(-1, 1).cpu()).flatten()
    keep = []
    for idx in generated.per_class_indices():
        n_keep = max(1, math.ceil((1.0 - drop) * len(idx)))
        best = torch.argsort(own[idx], descending=True, stable=True)[:n_keep]
        keep.append(idx[best.sort().values])
    return generated.subset(torch.cat(keep))


def dp_init(generated: Any, ipc: int, factor: int, embed: Embed | None = None, seed: int = 0) -> SyntheticSet:
    """A SyntheticSet of ``ipc`` stored images per class built from the k-means picks of ``generated`` (an ImageSet)."""
    per = factor * factor
    chosen, labels = [], []
    for c, idx in enumerate(generated.per_class_indices()):
        chosen.append(kmeans_select(generated.images[idx], ipc * per, embed, seed + c))
        labels.append(torch.full((ipc * per,), c, dtype=torch.int64))
    return SyntheticSet.from_images(torch.cat(chosen), torch.cat(labels), generated.num_classes, factor, packed=False)


def random_init(generated: Any, ipc: int, factor: int, generator: torch.Generator) -> SyntheticSet:
    """The ablation's alternative: randomly chosen generated images of each class, packed the same way."""
    return SyntheticSet.from_real(generated, ipc, generator, factor)
