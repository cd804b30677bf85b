"""SFDD clients on Ray: a bounded pool of actors, each holding the partitions of the clients it serves.

It lives in ``runtime/`` so the federated algorithms stay plain torch (Ray is confined to ``runtime/``).

The training set goes into Ray's object store once (numpy, so actors map it without copying); each actor
materialises a client's partition the first time it serves that client and keeps it (the per-client state),
so 100 simulated clients run on as many actors as there are CPUs. Client ``k`` always goes to actor
``k mod size``: its cached partition stays where it is used.

Randomness: each actor creates its own secret :class:`~dpdistill.privacy.noise.PrivacyRandomness` from the OS
entropy of its process, and every task it runs draws from a fresh child of it; nothing the server sends with a
task determines a client's noise or sampling. Only in the debugging mode (a reproducible source handed to the
pool: NOT PRIVATE) are a client's draws a function of (client, round, attempt), and then the pool size never
changes the result.

Failures: an actor that dies mid-round (killed, out of memory, node lost) fails the tasks it was running or had
queued; those clients are dropped from the round and logged, and the actor is replaced before the next dispatch.
An exception raised by client code is a bug and propagates.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dpdistill.errors import ClusterError
from dpdistill.federated.client import (
    ClientContext,
    ClientTask,
    ClientUpdate,
    RoundOutcome,
    local_update,
    task_label,
)
from dpdistill.privacy.noise import PrivacyRandomness, resolve

log = logging.getLogger("dpdistill.federated")


class ClientWorker:
    """The body of one client actor (a plain class; :class:`ActorPool` wraps it with ``ray.remote``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, name: str,
                 indices: list[np.ndarray], noise: PrivacyRandomness | None = None) -> None:
        # One intra-op thread per actor: the pool's parallelism is across actors, and a fixed count keeps
        # float reductions, hence results, the same on any pool size.
        torch.set_num_threads(1)
        # The clients' own randomness, created here in the actor's process (None: secret, from this process's
        # OS entropy). Only a reproducible (NOT PRIVATE) source is ever passed in.
        self._noise = resolve(noise)
        self._images, self._labels = images, labels
        self._num_classes, self._name = num_classes, name
        self._indices = indices
        self._clients: dict[int, Any] = {}

    def _client(self, client_id: int) -> Any:
        from dpdistill.data import ImageSet

        if client_id not in self._clients:
            idx = self._indices[client_id]
            # Fancy indexing copies out of the read-only shared array: the client's own, writable data.
            self._clients[client_id] = ImageSet(torch.from_numpy(self._images[idx]),
                                                torch.from_numpy(self._labels[idx]), self._num_classes, self._name)
        return self._clients[client_id]

    def run(self, task: ClientTask, syn_state: dict[str, Any], ctx: ClientContext) -> ClientUpdate:
        """One client's local update."""
        import ray

        noise = self._noise.spawn(task_label(task))
        update = local_update(self._client(task.client_id), syn_state, task, ctx, noise)
        update.worker = ray.get_runtime_context().get_actor_id() or "driver"
        return update

    def cached_clients(self) -> list[int]:
        """The clients whose partitions this actor holds."""
        return sorted(self._clients)


def _death_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


class ActorPool:
    """A bounded pool of client actors (Ray must be running; see ``runtime.cluster.ray_session``).

    The actors hold data; the config (``ctx``) travels with each round, so one pool can serve several runs
    over the same partition. ``noise``: None or a secret source (the default and the private setting) lets each
    actor create its own secret randomness; a reproducible source (debugging, NOT PRIVATE) is handed to every
    actor so that runs repeat exactly. With ``ctx.device`` on CUDA every actor asks Ray for an equal share of
    one GPU and runs its clients there.
    """

    def __init__(self, train: Any, partition: Any, ctx: ClientContext, size: int | None = None,
                 actor_cpus: float = 1.0, noise: PrivacyRandomness | None = None) -> None:
        import ray

        if not ray.is_initialized():
            raise ClusterError("SFDD actor pool: Ray is not running; start it with dpdistill.runtime.cluster.ray_session")
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        n_clients = partition.n_clients
        if size is None:
            size = max(1, min(n_clients, int(cpus // actor_cpus)))
        size = min(size, n_clients)
        if size * actor_cpus > cpus + 1e-9:
            raise ClusterError(f"method.pool_size: {size} actors x {actor_cpus:g} CPUs exceed the {cpus:g} CPUs of "
                               f"the Ray cluster; lower pool_size or actor_cpus")
        free = float(ray.available_resources().get("CPU", 0.0))
        if size * actor_cpus > free + 1e-9:
            # Actors that cannot be placed wait silently; say why the first round may stall.
            log.warning("SFDD actor pool: %d actors x %g CPUs, but only %g of %g CPUs are free; the round waits "
                        "until they are", size, actor_cpus, free, cpus)
        self.size = size
        # A secret source is not sent at all (it would unpickle to a fresh secret one anyway): the actors make
        # their own.
        client_noise = noise if noise is not None and not resolve(noise).private else None
        self._args = (ray.put(train.images.numpy()), ray.put(train.labels.numpy()), train.num_classes, train.name,
                      ray.put([np.asarray(i, dtype=np.int64) for i in partition.indices]), client_noise)
        from dpdistill.runtime.device import ray_gpus, resolve_device, worker_device

        # A GPU share places the actor on a GPU node and pins its CUDA_VISIBLE_DEVICES (numbered from 0 there).
        device = resolve_device(ctx.device)
        self.ctx = dataclasses.replace(ctx, device=worker_device(device))
        self._remote = ray.remote(num_cpus=actor_cpus, num_gpus=ray_gpus(device, size), max_restarts=0,
                                  max_task_retries=0)(ClientWorker)
        self.actors = [self._spawn() for _ in range(size)]
        self.replaced = 0

    def _spawn(self) -> Any:
        return self._remote.remote(*self._args)

    def actor_for(self, client_id: int) -> int:
        """Index of the actor that serves ``client_id``."""
        return client_id % self.size

    def run_round(self, tasks: list[ClientTask], syn_state: dict[str, Any],
                  on_dispatch: Callable[[Any, list[ClientTask]], None] | None = None) -> RoundOutcome:
        """Dispatch every task, collect the answers; clients on actors that die are dropped and logged."""
        import ray

        syn_ref = ray.put(syn_state)  # one copy in the object store, shared by every client
        ctx_ref = ray.put(self.ctx)
        pending: dict[Any, tuple[int, int]] = {}
        for task in tasks:
            i = self.actor_for(task.client_id)
            pending[self.actors[i].run.remote(task, syn_ref, ctx_ref)] = (task.client_id, i)
        if on_dispatch is not None:
            on_dispatch(self, tasks)
        outcome = RoundOutcome()
        dead: set[int] = set()
        waiting = list(pending)
        deaths = _death_errors()
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                client_id, i = pending[ref]
                try:
                    outcome.updates.append(ray.get(ref))
                except deaths as err:
                    reason = f"actor {i} died ({type(err).__name__})"
                    outcome.dropped[client_id] = reason
                    dead.add(i)
                    log.warning("round %d: client %d dropped: %s", tasks[0].round, client_id, reason)
        for i in sorted(dead):
            ray.kill(self.actors[i])
            self.actors[i] = self._spawn()
            self.replaced += 1
        return outcome

    def shutdown(self) -> None:
        """Kill every actor (their partitions go with them)."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception as err:  # noqa: BLE001 - already gone is fine
                log.debug("ray.kill: %s", err)
        self.actors = []
