"""One SFDD client in plain torch: local DC gradient matching of the broadcast synthetic set on private data.

A client receives the server's synthetic set, runs ``local_steps`` DC iterations on its own partition (each a
fresh matching network, ``outer_loop`` matching steps with inner training in between, exactly DC's schedule; see
:mod:`dpdistill.distill.dc`), and returns its updated set. Classes absent from a partition are left untouched.

Randomness. Every random draw of a client (its matching networks, which of its records go into a batch, DSA,
LDPO-RLD's label dispersion, LocalDP's noise, a Doorping attacker's choices) comes from the client's own
:class:`~dpdistill.privacy.noise.PrivacyRandomness`, which the pool that hosts the client creates in the client's
process; nothing the server sends (task, synthetic set, config) determines it. Were the noise seeded from
anything the server knows, the server could replay the client on shadow data and subtract it (the attack of
issue 19, finding 2). In the debugging mode (``privacy.reproducible_noise``, NOT PRIVATE) the pools derive
each task's source from (client, round, attempt), so a client's answer does not depend on which process ran
it or how many others there were.

:class:`LocalPool` runs clients one after another in this process: the no-Ray reference the actor pool is
measured against, and what unit tests use.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpdistill.distill.dc import _train_inner, gradient_match_step
from dpdistill.distill.dm import build_net, dsa_for
from dpdistill.distill.loop import apply_image_gradient
from dpdistill.distill.synthetic import Normalizer, SyntheticSet
from dpdistill.federated.config import SFDDConfig
from dpdistill.federated.defences import LocalDP, ldpo_rld_soft_labels
from dpdistill.privacy.noise import PrivacyRandomness, resolve

log = logging.getLogger("dpdistill.federated")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (job seed, round, ...) for the server's data-independent draws only."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class ClientTask:
    """What the server asks of one client in one round (the synthetic set travels separately, shared).

    No seed: the client's randomness is its own (see the module docstring).
    """

    client_id: int
    round: int
    attempt: int = 0
    malicious: bool = False
    state: dict[str, Any] | None = None  # attack state a client carries between rounds (e.g. its trigger)


@dataclass
class ClientUpdate:
    """A client's answer: its updated stored synthetic images and what FedAvg weights them by."""

    client_id: int
    round: int
    images: torch.Tensor
    n_samples: int
    class_counts: list[int]
    loss: float | None  # None: withheld (LocalDP)
    seconds: float | None  # None: withheld (LocalDP)
    state: dict[str, Any] | None = None
    worker: str = "local"


@dataclass
class RoundOutcome:
    """The answers a pool collected for one dispatch, and the clients dropped (id -> reason)."""

    updates: list[ClientUpdate] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)


@dataclass
class ClientContext:
    """Everything a client needs besides its data and its task: the config, public normalisation stats and the
    device its local distillation runs on (a name the client resolves in its own process)."""

    cfg: SFDDConfig
    mean: Sequence[float]
    std: Sequence[float]
    device: str = "cpu"


def task_label(task: ClientTask) -> str:
    """The stream label a pool spawns a task's randomness under (only the reproducible mode uses it)."""
    return f"sfdd-client/{task.client_id}/round/{task.round}/attempt/{task.attempt}"


def local_update(real: Any, syn_state: dict[str, Any], task: ClientTask, ctx: ClientContext,
                 noise: PrivacyRandomness | None = None) -> ClientUpdate:
    """Run one client's local distillation on ``real`` (its partition, an ImageSet) and return its update.

    ``noise`` is the client's own randomness for this task (None: a fresh secret source); it drives every draw,
    so nothing in ``task``, ``syn_state`` or ``ctx`` lets whoever sent them reproduce the client's answer.
    The set, the client's records and the matching networks live on ``ctx.device``; the update comes back on
    the CPU (the server aggregates there).
    """
    from dpdistill.federated.attacks.doorping import DoorpingClient
    from dpdistill.runtime.device import resolve_device

    started = time.perf_counter()
    cfg = ctx.cfg
    device = resolve_device(ctx.device)
    noise = resolve(noise)
    # A CPU generator on every device: which records and networks a client draws does not depend on where it
    # runs. Only the LocalDP noise is drawn on the device (of the update it perturbs).
    g = noise.generator()
    syn = SyntheticSet.from_state_dict(syn_state).to(device)
    start = syn.images.detach().clone()
    normalize = Normalizer(ctx.mean, ctx.std, device)
    dsa = dsa_for(cfg)
    images, labels = real.images.to(device), real.labels.to(device)  # the same tensors on the CPU
    per_class = [idx.to(device) for idx in real.per_class_indices()]
    present = [c for c in range(syn.num_classes) if len(per_class[c]) > 0]
    outer_loop, inner_loop = cfg.loops()
    opt_img = torch.optim.SGD([syn.images], lr=cfg.lr_img, momentum=cfg.momentum)
    attacker = None
    if task.malicious:
        on_device = real if images is real.images else dataclasses.replace(real, images=images, labels=labels)
        attacker = DoorpingClient.from_task(task, cfg, on_device, g)
    total, count = 0.0, 0
    for _ in range(cfg.local_steps):
        net = build_net(cfg, real, g, device)
        net.train()
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        if attacker is not None:
            attacker.update_trigger(net, normalize, g)
        for ol in range(outer_loop):
            opt_img.zero_grad(set_to_none=True)
            for c in present:
                idx = per_class[c]
                xr = images[idx[torch.randperm(len(idx), generator=g)[: cfg.batch_real].to(device)]]
                if attacker is not None:
                    xr = attacker.poison(c, xr, g)
                yr = real_labels(c, len(xr), syn.num_classes, cfg, g).to(device)
                xs = normalize(syn.class_images(c))
                ys = torch.full((len(xs),), c, dtype=torch.int64, device=device)
                params = dsa.sample(1, g) if dsa is not None else None
                loss = gradient_match_step(net, xs, ys, normalize(xr), yr, cfg.distance, dsa, params)
                # Only the images need this gradient (as in run_dc); the network's own updates come later.
                loss.backward(inputs=[syn.images])
                total += float(loss.detach())
            count += 1
            apply_image_gradient(opt_img, syn, normalize, cfg.clamp)
            if ol == outer_loop - 1 or inner_loop == 0:
                continue
            with torch.no_grad():
                if cfg.inner_on == "synthetic":
                    x_train, y_train = syn.decoded()
                else:
                    pick = torch.randperm(len(real), generator=g)[: cfg.batch_train * inner_loop].to(device)
                    x_train, y_train = images[pick], labels[pick]
                x_train = normalize(x_train)
            epochs = inner_loop if cfg.inner_on == "synthetic" else 1
            _train_inner(net, opt_net, x_train, y_train, epochs, cfg.batch_train, dsa, g)
    released = syn.images.detach().clone()
    n_samples, class_counts, loss = len(real), [len(i) for i in per_class], total / max(1, count)
    seconds: float | None = time.perf_counter() - started
    if cfg.defence == "localdp":
        delta = LocalDP(cfg.localdp_sigma, cfg.localdp_clip).privatise(released - start, noise)
        released = start + delta
        # Under LocalDP the noisy images are the only thing a client may send: its size, class counts, matching
        # loss and compute time are functions of its records with no noise (aggregation is uniform, so none is
        # needed).
        n_samples, class_counts, loss, seconds = 1, [1] * syn.num_classes, None, None
    return ClientUpdate(
        client_id=task.client_id,
        round=task.round,
        images=released.cpu(),
        n_samples=n_samples,
        class_counts=class_counts,
        loss=loss,
        seconds=seconds,
        state=attacker.state() if attacker is not None else None,
    )


def real_labels(c: int, n: int, num_classes: int, cfg: SFDDConfig, g: torch.Generator) -> torch.Tensor:
    """Labels the real side of a matching step uses: class c, or LDPO-RLD soft labels under that defence."""
    hard = torch.full((n,), c, dtype=torch.int64)
    if cfg.defence != "ldpo-rld":
        return hard
    return ldpo_rld_soft_labels(hard, num_classes, cfg.ldpo_alpha, cfg.ldpo_k, g)


class LocalPool:
    """Runs sampled clients one after another in this process (no Ray); same answers as the actor pool.

    ``noise``: the clients' randomness. None (the default) or a secret source: each task gets fresh OS entropy.
    A reproducible source (debugging, NOT PRIVATE) gives each task the stream of (client, round, attempt), the
    same streams an :class:`~dpdistill.runtime.client_pool.ActorPool` of any size derives.
    """

    size = 1

    def __init__(self, train: Any, partition: Any, ctx: ClientContext, num_threads: int | None = None,
                 noise: PrivacyRandomness | None = None) -> None:
        self.train = train
        self.partition = partition
        self.ctx = ctx
        self.num_threads = num_threads
        self.noise = resolve(noise)
        self._clients: dict[int, Any] = {}

    def client_data(self, client_id: int) -> Any:
        """The client's partition (cached: the per-client state this pool holds)."""
        if client_id not in self._clients:
            self._clients[client_id] = self.train.subset(self.partition.indices[client_id])
        return self._clients[client_id]

    def run_round(self, tasks: list[ClientTask], syn_state: dict[str, Any],
                  on_dispatch: Callable[[Any, list[ClientTask]], None] | None = None) -> RoundOutcome:
        """Run every task; a client that raises is a bug here, so the exception propagates."""
        from dpdistill.evaluation.training import thread_limit

        if on_dispatch is not None:
            on_dispatch(self, tasks)
        outcome = RoundOutcome()
        with thread_limit(self.num_threads):
            for task in tasks:
                outcome.updates.append(local_update(self.client_data(task.client_id), syn_state, task, self.ctx,
                                                    self.noise.spawn(task_label(task))))
        return outcome

    def shutdown(self) -> None:
        self._clients.clear()
