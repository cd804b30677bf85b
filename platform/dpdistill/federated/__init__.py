"""SFDD: several data owners distil one shared synthetic set by DC gradient matching without pooling data.

>>> from dpdistill.federated import SFDDConfig, LocalPool, ClientContext, initial_set, run_sfdd
>>> cfg = SFDDConfig(n_clients=5, rounds=10, ipc=10)
>>> part = data.partition.iid(train.labels, cfg.n_clients, seed=0, images=train.images)
>>> pool = LocalPool(train, part, ClientContext(cfg, mean, std))     # or ActorPool(...) under Ray
>>> result = run_sfdd(pool, initial_set(cfg, 10, (1, 28, 28), 0, mean=mean, std=std), cfg, seed=0)

Algorithms (client, strategy, defences, attacks) are plain torch; the Ray actor pool is
:mod:`dpdistill.runtime.client_pool` (Ray stays in ``runtime/``). Each client's randomness is its own secret source, created where the client runs
(see :mod:`~dpdistill.federated.client`); pass ``noise=PrivacyRandomness.reproducible(seed)`` to a pool only to
debug (NOT PRIVATE).
"""

from __future__ import annotations

from dpdistill.federated.client import (
    ClientContext,
    ClientTask,
    ClientUpdate,
    LocalPool,
    RoundOutcome,
    derive_seed,
    local_update,
)
from dpdistill.federated.config import SFDDConfig
from dpdistill.federated.defences import LocalDP, LocalDPSearch, grid_search_localdp, ldpo_rld_soft_labels
from dpdistill.federated.protocol import (
    RoundRecord,
    SFDDResult,
    client_epsilons,
    initial_set,
    malicious_clients,
    run_sfdd,
)
from dpdistill.federated.strategy import FedAvg, Strategy

__all__ = [
    "ClientContext",
    "ClientTask",
    "ClientUpdate",
    "FedAvg",
    "LocalDP",
    "LocalDPSearch",
    "LocalPool",
    "RoundOutcome",
    "RoundRecord",
    "SFDDConfig",
    "SFDDResult",
    "Strategy",
    "client_epsilons",
    "derive_seed",
    "grid_search_localdp",
    "initial_set",
    "ldpo_rld_soft_labels",
    "local_update",
    "malicious_clients",
    "run_sfdd",
]
