"""The SFDD server loop: initialise, broadcast, collect local distillations, aggregate, repeat for R rounds.

Per round the strategy picks clients (from a generator seeded by the job seed and the round, so retries and
pool sizes do not change the choice), the pool runs them, and the strategy merges the answers. A round that
gets fewer than ``min_clients`` answers is retried (up to ``max_round_retries`` times) with the same clients.
The server's own draws (initial set, client sampling, Doorping's choice of attackers) are data-independent and
stay seeded; a task carries no seed, because a client's randomness is its own (:mod:`.client`).

Privacy (LocalDP only): each dispatch is charged to the ledger before it goes out, as one
``Parallel(Gaussian(σC, Δ=2C), m)`` for its m clients. Clients own disjoint partitions and a record's client is
a function of that record alone (:mod:`dpdistill.data.partition`), so adding or removing one record changes one
client's data and so one client's release per round; the rounds compose sequentially: the ledger's total is the
ε of a client that took part in every dispatch, an upper bound on the max over clients (exact when every client
takes part every round). Per-client figures (:func:`client_epsilons`) come from how often each client was
dispatched.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpdistill.distill.synthetic import SyntheticSet
from dpdistill.errors import ClusterError
from dpdistill.federated.client import ClientTask, ClientUpdate, derive_seed
from dpdistill.federated.config import SFDDConfig
from dpdistill.federated.defences import LocalDP
from dpdistill.federated.strategy import FedAvg, Strategy

log = logging.getLogger("dpdistill.federated")

_SERVER_STREAM = 0x5E4E  # keeps the server's sampling stream apart from its other seeded streams
_ATTACKER_STREAM = 0xBAD


@dataclass
class RoundRecord:
    """What happened in one round (aggregate figures only: nothing a client sent is kept here)."""

    round: int
    sampled: list[int]
    answered: list[int]
    dropped: dict[int, str]
    attempts: int
    seconds: float
    loss: float  # mean local matching loss; nan when the clients withhold it (LocalDP)
    client_seconds: float  # clients' summed compute time; nan when they withhold it (LocalDP)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow (what the clients withheld is left out, not logged as nan).

        The round's wall time is the slowest client's compute time on its own records: when the clients withhold
        their time (LocalDP), the round's is left out too.
        """
        out = {"clients_answered": float(len(self.answered)), "clients_dropped": float(len(self.dropped)),
               "round_attempts": float(self.attempts)}
        if math.isfinite(self.client_seconds):
            out["client_seconds"] = self.client_seconds
            out["round_seconds"] = self.seconds
        if math.isfinite(self.loss):
            out["local_loss"] = self.loss
        return out

    def to_json(self) -> dict[str, Any]:
        """The record for ``rounds.json``; what the clients withheld is absent (under LocalDP: loss and time,
        the round's time included)."""
        out: dict[str, Any] = {"round": self.round, "sampled": list(self.sampled), "answered": list(self.answered),
                               "dropped": [{"client": c, "reason": why} for c, why in sorted(self.dropped.items())],
                               "attempts": self.attempts}
        if math.isfinite(self.client_seconds):  # withheld under LocalDP, and with it the round's time
            out["client_seconds"] = self.client_seconds
            out["seconds"] = self.seconds
        if math.isfinite(self.loss):
            out["loss"] = self.loss
        return out


@dataclass
class SFDDResult:
    """The distilled set, the per-round history, and per-client dispatch counts (for LocalDP accounting)."""

    synthetic: SyntheticSet
    history: list[RoundRecord] = field(default_factory=list)
    dispatches: dict[int, int] = field(default_factory=dict)
    client_states: dict[int, dict[str, Any]] = field(default_factory=dict)
    malicious: list[int] = field(default_factory=list)


def initial_set(cfg: SFDDConfig, num_classes: int, shape: Sequence[int], seed: int, *, mean: Sequence[float],
                std: Sequence[float], public: Any | None = None) -> SyntheticSet:
    """The server's starting set: N(mean, std) noise clipped to [0, 1] (DC's randn), or public images.

    Never client data: the server has none, and initialising from it would release it.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, _SERVER_STREAM, 1 << 20))
    if cfg.init == "public":
        if public is None:
            raise ValueError("initial_set: init=public needs the public ImageSet")
        return SyntheticSet.from_real(public, cfg.stored_ipc, g, cfg.factor)
    return SyntheticSet.from_noise(num_classes, cfg.stored_ipc, shape, g, cfg.factor, mean=mean, std=std)


def malicious_clients(cfg: SFDDConfig, seed: int) -> list[int]:
    """The ids of the Doorping clients (seeded choice; none unless the attack is doorping)."""
    if cfg.attack != "doorping" or cfg.malicious_clients == 0:
        return []
    g = torch.Generator().manual_seed(derive_seed(seed, _ATTACKER_STREAM))
    return sorted(int(i) for i in torch.randperm(cfg.n_clients, generator=g)[: cfg.malicious_clients])


def run_sfdd(
    pool: Any,
    init: SyntheticSet,
    cfg: SFDDConfig,
    *,
    seed: int = 0,
    strategy: Strategy | None = None,
    ledger: Any | None = None,
    callback: Callable[[RoundRecord, SyntheticSet], None] | None = None,
    on_dispatch: Callable[[Any, list[ClientTask]], None] | None = None,
) -> SFDDResult:
    """Run ``cfg.rounds`` SFDD rounds on ``pool`` (an ActorPool or LocalPool) from ``init``; returns the result.

    ``callback(record, synthetic)`` runs after each round (metrics, evaluation); ``on_dispatch(pool, tasks)``
    right after a round's tasks go out (tests use it to kill an actor mid-round).
    """
    strategy = strategy if strategy is not None else FedAvg(cfg.fraction, cfg.min_clients, cfg.aggregation_weighting,
                                                              cfg.server_momentum, cfg.server_lr)
    syn = SyntheticSet(init.images.detach().clone(), init.labels.clone(), init.num_classes, init.factor)
    ldp = LocalDP(cfg.localdp_sigma, cfg.localdp_clip) if cfg.defence == "localdp" else None
    result = SFDDResult(synthetic=syn, malicious=malicious_clients(cfg, seed))
    evil = set(result.malicious)
    for r in range(cfg.rounds):
        started = time.perf_counter()
        sampled = strategy.configure(r, cfg.n_clients, torch.Generator().manual_seed(derive_seed(seed, _SERVER_STREAM, r)))
        state = syn.state_dict()
        for attempt in range(cfg.max_round_retries + 1):
            tasks = [ClientTask(cid, r, attempt, cid in evil, result.client_states.get(cid)) for cid in sampled]
            if ldp is not None and ledger is not None:
                ledger.charge("localdp", ldp.round_mechanism(len(tasks)),
                              note=f"round {r} attempt {attempt}: clients {_ids(sampled)}")
            for cid in sampled:
                result.dispatches[cid] = result.dispatches.get(cid, 0) + 1
            outcome = pool.run_round(tasks, state, on_dispatch)
            if len(outcome.updates) >= cfg.min_clients:
                break
            log.warning("round %d attempt %d: %d of %d clients answered (min_clients=%d); retrying", r, attempt,
                        len(outcome.updates), len(tasks), cfg.min_clients)
        else:
            raise ClusterError(f"round {r}: fewer than min_clients={cfg.min_clients} clients answered in "
                               f"{cfg.max_round_retries + 1} attempts; check the Ray cluster")
        updates: list[ClientUpdate] = sorted(outcome.updates, key=lambda u: u.client_id)
        for u in updates:
            if u.state is not None:
                result.client_states[u.client_id] = u.state
        images = strategy.aggregate(r, syn.images.detach(), syn.labels, updates)
        syn = SyntheticSet(images, syn.labels, syn.num_classes, syn.factor)
        if cfg.clamp:
            syn.clamp_()
        record = RoundRecord(
            round=r, sampled=list(sampled), answered=[u.client_id for u in updates], dropped=dict(sorted(outcome.dropped.items())),
            attempts=attempt + 1, seconds=time.perf_counter() - started,
            loss=_mean([u.loss for u in updates if u.loss is not None]),
            client_seconds=_total([u.seconds for u in updates if u.seconds is not None]),
        )
        if record.dropped:
            log.warning("round %d: dropped clients %s", r, record.dropped)
        result.history.append(record)
        result.synthetic = syn
        if callback is not None:
            callback(record, syn)
    return result


def client_epsilons(dispatches: dict[int, int], ldp: LocalDP, delta: float) -> dict[int, float]:
    """Each client's LocalDP ε at ``delta`` (PLD): its release, composed as often as it was dispatched."""
    from dpdistill.privacy.accountant import epsilon
    from dpdistill.privacy.mechanisms import Gaussian

    base = ldp.mechanism()
    return {cid: epsilon(Gaussian(base.sigma, base.sensitivity, count=n), delta)
            for cid, n in sorted(dispatches.items())}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _total(values: list[float]) -> float:
    return sum(values) if values else math.nan


def _ids(ids: list[int], limit: int = 20) -> str:
    head = ",".join(str(i) for i in ids[:limit])
    return head + (f",... ({len(ids)} in all)" if len(ids) > limit else "")
