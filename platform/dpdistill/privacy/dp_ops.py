"""Shared DP building blocks: private sampling of records, clipping, noisy sums and means, and the one σ solver.

Every private method that releases a noisy sum of per-record contributions does the same four things, and does
them here: sample records (:class:`PoissonClassSampler`, the mask from the privacy source), clip each record's
contribution to L2 norm C (:func:`clip_rows` for feature rows, :func:`clipped_per_example_sum` for per-record
gradients spread over several tensors, :func:`clip_tensor` for one update treated as a single vector), add
N(0, (σC)² I) (:func:`noisy_sum`, :func:`noisy_mean`) and solve σ (:func:`solve_free_sigma`,
:func:`sigma_for_share`). NDPDC, PSG and DP-GenG's feature matching use them through
:mod:`dpdistill.distill.private_matching`; SFDD's LocalDP, the synthesisers' calibration
(:func:`dpdistill.synthesis.base.calibrate_for_ledger`) and the privacy audit use them directly.

Why in ``privacy/``: nothing here knows about distillation (no networks, no synthetic sets); it knows tensors, a
:class:`~dpdistill.privacy.noise.PrivacyRandomness` (the only source of noise and private sampling: nothing here
calls ``torch.randn`` or a seeded generator) and a ledger.

σ. :func:`solve_free_sigma` is the one place that turns a budget into a noise multiplier: the smallest σ
(within :data:`SIGMA_REL_TOL`) for which the ledger's total after charging ``make(σ)`` is at most the target
(default: the ledger's whole budget). It solves on ``ledger.would_cost``, exactly the figure ``charge`` will
compute (same composition, same discretisation grid), so the charge that follows always passes and the total
lands in [(1 − SIGMA_REL_TOL)·target, target]. A σ for a share of ε on its own (:func:`sigma_for_share`) is the
same solve on an empty scratch ledger whose budget is that share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dpdistill.errors import DataError, PrivacyError, SpecError
from dpdistill.privacy.calibration import solve_sigma
from dpdistill.privacy.ledger import BUDGET_REL_TOL, PrivacyLedger
from dpdistill.privacy.mechanisms import Mechanism
from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE
from dpdistill.privacy.noise import PrivacyRandomness

# How far below its target a solved σ may leave the ledger (relative): the σ bracket's width, and so the
# budget left unspent at most. Tighter costs one or two more PLD evaluations per solve.
SIGMA_REL_TOL = 0.003
# Guards the division by a norm of (numerically) zero: such a row is left as it is (it is within the ball).
_NORM_FLOOR = 1e-12


# ------------------------------------------------------------------------------------------------- clipping


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """The factor min(1, C / norm) that brings each norm to at most ``clip`` (rows already inside stay as they are)."""
    return (clip / norms.clamp_min(_NORM_FLOOR)).clamp(max=1.0)


def clip_rows(features: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale every row of ``features`` [N, D] to L2 norm at most ``clip`` (differentiable)."""
    return features * clip_factors(features.norm(dim=1, keepdim=True), clip)


def clipped_sum(features: torch.Tensor, clip: float) -> torch.Tensor:
    """The sum of the clipped rows [D]: the query whose add-or-remove-one sensitivity is ``clip``."""
    return clip_rows(features, clip).sum(dim=0)


def clip_tensor(value: torch.Tensor, clip: float) -> torch.Tensor:
    """``value`` as one vector, scaled to L2 norm at most ``clip`` (one record's or one client's contribution)."""
    return value * clip_factors(value.norm().reshape(1), clip)[0]


def clipped_per_example_sum(per_example: Sequence[torch.Tensor], clip: float) -> list[torch.Tensor]:
    """Σ_i clip(g_i) for per-record contributions split over tensors (e.g. one per parameter), each [N, *shape].

    Record i's contribution is the concatenation of its slices of every tensor; it is scaled as a whole to L2
    norm ≤ ``clip``, so the sums (one per tensor, shapes without N) move by at most ``clip`` together when a
    record is added or removed.
    """
    if not per_example:
        return []
    norms = torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in per_example))
    scale = clip_factors(norms, clip)
    return [torch.einsum("n,n...->...", scale, g) for g in per_example]


# ------------------------------------------------------------------------------------------------- noise


def noisy_sum(total: torch.Tensor, clip: float, sigma: float, noise: PrivacyRandomness) -> torch.Tensor:
    """``total + N(0, (sigma * clip)^2 I)``: the release of a sum whose sensitivity is ``clip``.

    The noise is drawn from ``noise`` (which refuses a non-positive std rather than release no noise).
    """
    return noise.add_gaussian(total, sigma * clip)


def noisy_mean(total: torch.Tensor, clip: float, sigma: float, expected: float,
               noise: PrivacyRandomness) -> torch.Tensor:
    """``(total + N(0, (sigma * clip)^2 I)) / expected``: a noisy sum over the (public) expected batch size."""
    return noisy_sum(total, clip, sigma, noise) / expected


# ------------------------------------------------------------------------------------------------- sampling


class PoissonClassSampler:
    """Poisson sampling within each class of a sensitive ImageSet, at rate q_c = min(1, B / n_c) per class."""

    def __init__(self, real: Any, expected_batch: int, device: str | torch.device = "cpu") -> None:
        if expected_batch < 1:
            raise SpecError(f"batch_real: expected a positive expected batch size, got {expected_batch}")
        self.images = real.images.to(device)
        self.indices = [idx.to(device) for idx in real.per_class_indices()]
        empty = [c for c, idx in enumerate(self.indices) if len(idx) == 0]
        if empty:
            raise DataError(f"{getattr(real, 'name', 'dataset')}: class {empty[0]} has no records to match against")
        self.expected = float(expected_batch)
        self.rates = [min(1.0, expected_batch / len(idx)) for idx in self.indices]

    @property
    def num_classes(self) -> int:
        return len(self.indices)

    @property
    def max_rate(self) -> float:
        """The largest per-class rate: the q every charge uses, so it bounds every class."""
        return max(self.rates)

    def expected_size(self, c: int) -> float:
        """The expected batch size of class ``c`` (q_c * n_c): what its noisy sum is divided by."""
        return self.rates[c] * len(self.indices[c])

    def sample(self, c: int, noise: PrivacyRandomness) -> torch.Tensor:
        """A Poisson batch of class ``c``'s images (possibly empty): each record kept with probability q_c.

        The mask comes from ``noise`` (the privacy source): which records were used must stay secret.
        """
        idx = self.indices[c]
        keep = noise.poisson_mask(len(idx), self.rates[c])
        return self.images[idx[keep.to(idx.device)]]


# ------------------------------------------------------------------------------------------------- σ


def solve_free_sigma(ledger: Any, make: Callable[[float], Mechanism], target: float | None = None,
                     guess: float = 1.0, what: str = "sigma") -> float:
    """The smallest σ (within :data:`SIGMA_REL_TOL`) with the ledger's total after ``make(σ)`` at most ``target``.

    ``target`` is a composed total for the whole ledger (default: its budget), so every earlier charge counts.
    Solved on ``ledger.would_cost`` (what ``charge`` will compute): ``ledger.charge(..., make(σ))`` then passes,
    and the total lands within SIGMA_REL_TOL below the target. PrivacyError if the ledger is already at the
    target, or no σ brings the total down to it.
    """
    target = ledger.epsilon_budget if target is None else float(target)
    spent = ledger.spent_epsilon()
    if not target > spent * (1 + BUDGET_REL_TOL):
        raise PrivacyError(f"{what}: target ε {target:.4g} leaves nothing to spend (ledger already at ε {spent:.4g})")
    return solve_sigma(lambda s: ledger.would_cost(make(s)), target, guess, rel_tol=SIGMA_REL_TOL, what=what).sigma


def sigma_for_share(make: Callable[[float], Mechanism], epsilon: float, delta: float, guess: float = 1.0,
                    neighbouring: str = ADD_OR_REMOVE_ONE) -> float:
    """The smallest σ for which ``make(σ)`` alone is (epsilon, delta)-DP (a fixed share's noise).

    :func:`solve_free_sigma` on an empty in-memory ledger whose budget is ``epsilon``: one solver, one figure.
    """
    scratch = PrivacyLedger(None, epsilon, delta, neighbouring=neighbouring)
    return solve_free_sigma(scratch, make, guess=guess)
