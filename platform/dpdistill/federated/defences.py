"""Client-side defences against a curious server: LDPO-RLD soft labels and LocalDP on returned updates.

LDPO-RLD (Label Differential Privacy Obfuscation via Randomized Linear Dispersion) changes what a client's real
gradients are computed against: each real record's one-hot label keeps ``1 - alpha`` on its class and spreads
``alpha`` over ``k`` randomly chosen other classes with linearly decreasing weights (k, k-1, ..., 1). The
gradient a server could invert then belongs to a label it cannot guess. It carries no formal (ε, δ) figure,
so it is never charged to a ledger.

LocalDP clips each returned update (the change of the synthetic set) to L2 norm C and adds N(0, (σC)^2). Its
sensitivity is 2C, not C: the update is a function of the client's whole partition, not a sum of per-record
clipped terms, so adding or removing one record can move it anywhere in the C-ball (two points of a C-ball are
at most 2C apart). The noise comes from the client's own :class:`~dpdistill.privacy.noise.PrivacyRandomness`
(secret unless the run is in the NOT PRIVATE debugging mode), never from a seed the server knows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpdistill.errors import PrivacyError
from dpdistill.privacy.dp_ops import clip_tensor, noisy_sum
from dpdistill.privacy.mechanisms import Gaussian, Parallel
from dpdistill.privacy.noise import PrivacyRandomness, resolve

DISJOINT_CLIENTS = (
    "each participating client releases one LocalDP update computed only from its own partition, and the "
    "partitioners send every training record to exactly one client chosen by a keyed hash of that record alone "
    "(data/partition.py), so adding or removing one record changes one client's input only"
)


def ldpo_rld_soft_labels(
    labels: torch.Tensor, num_classes: int, alpha: float, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LDPO-RLD soft labels [N, num_classes]: ``1 - alpha`` on the true class, ``alpha`` over k random others.

    The k classes (drawn per record, without replacement, never the true one; k is capped at num_classes - 1)
    receive ``alpha * (k - j) / (k (k + 1) / 2)`` for j = 0..k-1, so the first drawn gets the most. Rows sum to 1.
    """
    if not 0 <= alpha < 1:
        raise PrivacyError(f"ldpo_alpha must be in [0, 1), got {alpha}")
    if k < 1:
        raise PrivacyError(f"ldpo_k must be >= 1, got {k}")
    labels = labels.reshape(-1).long().cpu()
    n = len(labels)
    k = min(k, num_classes - 1)
    out = torch.zeros(n, num_classes, dtype=torch.float32)
    out[torch.arange(n), labels] = 1.0 - alpha
    if k < 1 or alpha == 0 or n == 0:
        return out
    # A random order of the other classes per record: rank all classes, push the true class last.
    keys = torch.rand(n, num_classes, generator=generator)
    keys[torch.arange(n), labels] = 2.0
    others = keys.argsort(dim=1)[:, :k]
    weights = torch.arange(k, 0, -1, dtype=torch.float32) / (k * (k + 1) / 2) * alpha
    out.scatter_(1, others, weights.expand(n, k).clone())
    return out


@dataclass(frozen=True)
class LocalDP:
    """Clip an update to L2 norm ``clip`` and add N(0, (sigma * clip)^2) per coordinate (sigma: multiplier)."""

    sigma: float
    clip: float

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise PrivacyError(f"localdp_sigma must be a positive number, got {self.sigma}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise PrivacyError(f"localdp_clip must be a positive number, got {self.clip}")

    def privatise(self, update: torch.Tensor, noise: PrivacyRandomness | None = None) -> torch.Tensor:
        """The released version of ``update``: clipped as one vector, plus Gaussian noise from ``noise``.

        ``noise`` is the client's own source (None: a fresh secret one); its ``gaussian`` refuses a no-noise draw.
        """
        return noisy_sum(clip_tensor(update.detach(), self.clip), self.clip, self.sigma, resolve(noise))

    def mechanism(self) -> Gaussian:
        """One client's release: noise std σC on a query of L2 sensitivity 2C (see the module docstring)."""
        return Gaussian(sigma=self.sigma * self.clip, sensitivity=2.0 * self.clip)

    def round_mechanism(self, n_clients: int) -> Parallel:
        """One round's releases by ``n_clients`` owners of disjoint partitions: costs one release (parallel)."""
        return Parallel(self.mechanism(), n_clients, DISJOINT_CLIENTS)


@dataclass
class LocalDPSearch:
    """Result of :func:`grid_search_localdp`: the least-noise (σ, C) meeting the threshold, and every try."""

    sigma: float | None
    clip: float | None
    mse: float | None
    threshold: float
    tried: list[dict[str, Any]] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.sigma is not None


def grid_search_localdp(
    attack_mse: Callable[[LocalDP], float],
    sigmas: Sequence[float],
    clips: Sequence[float],
    threshold: float,
    *,
    exhaustive: bool = False,
) -> LocalDPSearch:
    """Find LocalDP's (σ, C) whose attack MSE reaches ``threshold``, trying the least noise first.

    Candidates go by σ ascending, then C descending (less noise, then less clipping: the utility order);
    ``attack_mse(LocalDP(σ, C))`` runs the attack on a protected observation. The first candidate whose MSE is
    at least ``threshold`` is returned (``exhaustive`` tries every one and still returns the first). Every try
    runs a full attack: this search is the tuning cost that LDPO-RLD, with its fixed α and k, avoids.
    """
    candidates = [(float(s), float(c)) for s in sorted(sigmas) for c in sorted(clips, reverse=True)]
    if not candidates:
        raise PrivacyError("grid_search_localdp: sigmas and clips must each name at least one value")
    result = LocalDPSearch(None, None, None, float(threshold))
    for sigma, clip in candidates:
        mse = float(attack_mse(LocalDP(sigma, clip)))
        result.tried.append({"sigma": sigma, "clip": clip, "mse": mse, "meets": mse >= threshold})
        if mse >= threshold and not result.found:
            result.sigma, result.clip, result.mse = sigma, clip, mse
            if not exhaustive:
                break
    return result
