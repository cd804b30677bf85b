"""Server strategies (after Flower's): ``configure`` picks a round's clients, ``aggregate`` merges their answers.

The server loop (:mod:`dpdistill.federated.protocol`) knows nothing else about how clients are chosen or how
their synthetic sets are combined, so a new rule (robust aggregation against Doorping, say) is one new class.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dpdistill.federated.client import ClientUpdate


class Strategy(Protocol):
    """What the server loop needs of a strategy."""

    def configure(self, round: int, n_clients: int, generator: torch.Generator) -> list[int]:
        """The ids of the clients asked to take part in ``round`` (sorted)."""

    def aggregate(self, round: int, current: torch.Tensor, labels: torch.Tensor,
                  updates: list[ClientUpdate]) -> torch.Tensor:
        """The next stored synthetic images from the current ones [M, C, H, W] and the clients' answers."""


class FedAvg:
    """Sample ``round(fraction * n)`` clients (at least ``min_clients``); average their sets, weighted.

    ``weighting``: ``size`` (FedAvg: each client by its number of records), ``class`` (each synthetic image by
    its client's count of that image's class, so a client without a class does not pull it back), ``uniform``
    (equal weights: what LocalDP needs, since sizes are data-dependent). Answers are summed in client-id order
    in float64, so the result does not depend on the order they arrived in.

    Server momentum (FedAvgM, Hsu et al. 2019): with ``server_momentum`` β > 0 or ``server_lr`` η ≠ 1 the server
    treats the weighted mean's change Δ = mean − current as a pseudo-gradient, keeps a velocity v ← β·v + Δ and
    moves the set by η·v. Why it matters here: centralised DC keeps its image optimiser's momentum (0.5) across
    iterations, while each SFDD client starts a fresh optimiser every round, so plain FedAvg takes shorter steps
    for the same iterations; β = 0.5 restores the lost momentum at the server. β = 0, η = 1 is plain FedAvg,
    bit for bit. The velocity is server state built only from what clients released (post-processing).
    """

    def __init__(self, fraction: float = 1.0, min_clients: int = 1, weighting: str = "size",
                 server_momentum: float = 0.0, server_lr: float = 1.0) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"FedAvg: fraction must be in (0, 1], got {fraction}")
        if weighting not in ("size", "class", "uniform"):
            raise ValueError(f"FedAvg: weighting must be size, class or uniform, got {weighting!r}")
        if not 0 <= server_momentum < 1:
            raise ValueError(f"FedAvg: server_momentum must be in [0, 1), got {server_momentum}")
        if not server_lr > 0:
            raise ValueError(f"FedAvg: server_lr must be > 0, got {server_lr}")
        self.fraction = fraction
        self.min_clients = min_clients
        self.weighting = weighting
        self.server_momentum = server_momentum
        self.server_lr = server_lr
        self.velocity: torch.Tensor | None = None  # float64, the stored images' shape

    def sample_size(self, n_clients: int) -> int:
        return min(n_clients, max(self.min_clients, round(self.fraction * n_clients)))

    def configure(self, round: int, n_clients: int, generator: torch.Generator) -> list[int]:
        m = self.sample_size(n_clients)
        if m == n_clients:
            return list(range(n_clients))
        return sorted(int(i) for i in torch.randperm(n_clients, generator=generator)[:m])

    def weights(self, labels: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        """Per client and per stored image, the weight [K, M] (float64) its answer gets."""
        rows = []
        for u in updates:
            if self.weighting == "size":
                w = torch.full((len(labels),), float(u.n_samples), dtype=torch.float64)
            elif self.weighting == "class":
                w = torch.tensor(u.class_counts, dtype=torch.float64)[labels.cpu()]
            else:
                w = torch.ones(len(labels), dtype=torch.float64)
            rows.append(w)
        return torch.stack(rows)

    def aggregate(self, round: int, current: torch.Tensor, labels: torch.Tensor,
                  updates: list[ClientUpdate]) -> torch.Tensor:
        if not updates:
            return current.clone()
        updates = sorted(updates, key=lambda u: u.client_id)
        w = self.weights(labels, updates)  # [K, M]
        stacked = torch.stack([u.images.to(torch.float64) for u in updates])  # [K, M, C, H, W]
        total = w.sum(dim=0)  # [M]
        shape = (-1,) + (1,) * (stacked.dim() - 2)
        summed = (stacked * w.reshape(*w.shape, *([1] * (stacked.dim() - 2)))).sum(dim=0)
        mean = summed / total.clamp_min(1e-300).reshape(shape)
        # An image no answering client could weigh (its class absent everywhere) keeps its current value.
        keep = (total <= 0).reshape(shape)
        merged = torch.where(keep, current.to(torch.float64), mean)
        if self.server_momentum == 0 and self.server_lr == 1:
            return merged.to(current.dtype)
        step = merged - current.to(torch.float64)
        self.velocity = step if self.velocity is None else self.server_momentum * self.velocity + step
        return (current.to(torch.float64) + self.server_lr * self.velocity).to(current.dtype)
