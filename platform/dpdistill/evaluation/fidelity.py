"""Fidelity of a synthetic set against real images: FID, Inception Score and k-NN precision / recall.

All three are computed on features from one extractor (:mod:`dpdistill.evaluation.extractors`), whose name is
part of the result: numbers from different extractors are not comparable, so reports always print it.

- FID (Heusel et al., 2017): ||μ_r − μ_g||² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½) over the feature Gaussians.
- IS (Salimans et al., 2016): exp E_x KL(p(y|x) || p(y)) over ``splits`` chunks of the synthetic set, mean
  and std; computed on the extractor's own classes (ImageNet's for Inception, the public set's for the
  domain extractor).
- Precision / recall (Kynkäänniemi et al., 2019): the real (generated) manifold is the union of balls around
  each real (generated) feature reaching its k-th nearest neighbour; precision is the share of generated
  samples inside the real manifold, recall the share of real samples inside the generated one.

The real images used here are the REAL TEST split in the job (never the sensitive training records).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dpdistill.errors import DataError
from dpdistill.evaluation.extractors import Extractor
from dpdistill.evaluation.training import thread_limit


@dataclass
class FidelityResult:
    """Fidelity numbers and the extractor they were computed with."""

    fid: float
    inception_score: float
    inception_score_std: float
    precision: float
    recall: float
    extractor: str
    n_real: int
    n_fake: int
    k: int

    def as_metrics(self) -> dict[str, float]:
        """Flat metrics (the extractor name goes to tags / the summary, being a string)."""
        return {"fid": self.fid, "is_mean": self.inception_score, "is_std": self.inception_score_std,
                "precision": self.precision, "recall": self.recall}

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product (few samples): regularise as pytorch-fid does.
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets [N, F]."""
    r, f = real.double().numpy(), fake.double().numpy()
    return frechet_distance(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS mean and std over ``splits`` chunks of class probabilities [N, K]."""
    probs = probs.double().clamp_min(1e-12)
    scores = []
    for chunk in torch.chunk(probs, max(1, min(splits, len(probs)))):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.log() - marginal.log())).sum(1).mean()
        scores.append(math.exp(float(kl)))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


def _kth_radii(feats: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row to its k-th nearest OTHER row."""
    radii = []
    for start in range(0, len(feats), chunk):
        d = torch.cdist(feats[start : start + chunk], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Share of ``points`` inside at least one ball (centre, radius)."""
    inside = 0
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start : start + chunk], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / max(1, len(points))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds) of fake features against real ones."""
    if min(len(real), len(fake)) <= k:
        raise DataError(f"precision/recall with k={k} needs more than {k} real and generated samples")
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _kth_radii(real, k))
    recall = _coverage(real, fake, _kth_radii(fake, k))
    return precision, recall


def evaluate_fidelity(real_images: torch.Tensor, fake_images: torch.Tensor, extractor: Extractor, *, k: int = 3,
                      max_samples: int = 10_000, seed: int = 0, is_splits: int = 10) -> FidelityResult:
    """FID, IS and precision/recall of ``fake_images`` against ``real_images`` with ``extractor``.

    At most ``max_samples`` of each are used (a seeded random subset), since precision/recall is quadratic.
    """
    for what, x in (("real_images", real_images), ("fake_images", fake_images)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or len(x) < 2:
            raise DataError(f"evaluate_fidelity: {what} must be a tensor [N >= 2, C, H, W] in [0, 1]")
    g = torch.Generator().manual_seed(seed)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x if len(x) <= max_samples else x[torch.randperm(len(x), generator=g)[:max_samples]]

    real_images, fake_images = pick(real_images), pick(fake_images)
    with thread_limit(None):  # 1 thread on a busy machine: spin-waiting OpenMP threads are far slower
        real_f, _ = extractor.features_and_probs(real_images)
        fake_f, fake_p = extractor.features_and_probs(fake_images)
        is_mean, is_std = inception_score(fake_p, is_splits)
        precision, recall = precision_recall(real_f.float(), fake_f.float(), k)
    return FidelityResult(
        fid=fid_from_features(real_f, fake_f), inception_score=is_mean, inception_score_std=is_std,
        precision=precision, recall=recall, extractor=extractor.name, n_real=len(real_images),
        n_fake=len(fake_images), k=k,
    )
