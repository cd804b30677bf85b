"""DP-SGD for any network: Poisson sampling, per-record clipping, one Gaussian draw per step, on one or N workers.

The engine trains whatever an objective (:class:`DPObjective`) builds, from a public schedule
(:class:`DPSGDSchedule`: σ, q, steps, C, n) that the driver has already charged to its ledger; this module never
sees a ledger. One step, on every worker (``rank`` of ``world_size``, each holding one shard of the sensitive
set):

1. Poisson-sample the worker's shard at the GLOBAL rate q, with the mask from the privacy source
   (:meth:`PrivacyRandomness.poisson_mask`). Every record of the whole set is then in the batch independently
   with probability q, whatever the sharding: the sampling the accountant's PoissonGaussian assumes.
2. Per-record gradients of the trainable parameters (:meth:`DPObjective.trainable`); a record's K rows
   (``multiplicity``: DPDM's several timesteps / noise draws per image) are averaged BEFORE clipping, so the K
   rows together are one record's contribution.
3. Clip each record's gradient to L2 norm C as ONE vector over all trainable parameters
   (:func:`~dpdistill.privacy.dp_ops.clipped_per_example_sum`) and sum.
4. ``all_reduce(SUM)`` of the clipped sums across workers (one flat vector, one collective per step); rank 0 adds
   N(0, (σC)² I) to its part before the reduce, so the noise is in the total EXACTLY ONCE (as opacus'
   distributed optimiser does). The draw is one :meth:`PrivacyRandomness.gaussian` call per step (the guarded
   path: a non-positive std or an all-zero draw is refused, never a silent noiseless step).
5. Divide by the expected global batch q·n (public; the realised batch size is not) and take the optimiser step.
   Every worker applies the same averaged update, so the replicas stay identical (they start identical: rank
   0's parameters and buffers are broadcast before the first step).

Per-record gradients (step 2-3): one of three backends of :mod:`dpdistill.training.per_record`, chosen per
model by the schedule's public ``grad_sample_mode`` (``auto`` | ``hooks`` | ``ghost`` | ``functorch``; never by
the data): opacus' ``GradSampleModule`` hooks (any layer opacus knows; per-record gradients materialised),
ghost clipping (per-record norms from each layer's inputs and output gradients, one backward pass, the
clipped sum assembled per layer; Linear, Conv2d, GroupNorm, LayerNorm and Embedding only) or ``torch.func`` vmap over records (objectives that draw their
randomness outside the loss: ``draw_rows`` / ``row_losses``). All three compute the same clipped sum (tests/
test_dp_sgd_backends.py); ``auto`` takes ghost where the model allows it, else hooks (the fastest measured,
benchmarks/bench_dp_step.py; :func:`resolve_grad_sample_mode` gives the choice for a plan to record). The
hooks and ghost let the objective call the network however it likes (several calls, keyword arguments,
attribute access) in one ordinary batched forward. Layers that mix records (BatchNorm) are refused by opacus'
validation (hooks) or are not ghost-clippable.

Privacy of what leaves: the returned state and the checkpoints hold the network (DP by the noisy updates), the
optimiser state (computed from the same noisy gradients) and, with ``ema_decay``, the moving average of the
network's iterates (post-processing of them; its start is the public starting weights). ``on_step`` receives
step numbers and wall time only: no loss, no batch size, nothing computed from the data without noise.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpdistill.errors import PrivacyError, SpecError
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.training.per_record import (
    GRAD_SAMPLE_MODES,
    HooksBackend,
    choose_backend,
    hooks_clipped_sum,
    open_backend,
)

OPTIMIZERS = ("adam", "sgd")
# How the learning rate moves over the planned steps (public: a function of the step index only).
LR_SCHEDULES = ("constant", "cosine")
# On CPU a forward/backward of more rows than this is split further, whatever max_physical_batch allows: the
# activations of a 64-row chunk stay in cache. Measured on one thread (2-core AVX-512 machine), the clipped sum
# of a ConvNet-3 width 32 (512 records) took 1,310 ms in one pass and 358 ms in 64-row chunks; the pdp-diffusion
# UNet (256 records) 2,234 ms and 1,286 ms. Speed only: the sum is the same up to float summation order.
CPU_CHUNK_ROWS = 64


@runtime_checkable
class DPObjective(Protocol):
    """What DP-SGD trains: a network, the parameters it may change, and one loss per row.

    Implementations are picklable (a dataclass instance): the object ships to Ray Train workers. The optional
    attribute ``device`` (default ``"cpu"``) names where the network is trained.
    """

    def build(self) -> nn.Module:
        """The network, with the same initialisation on every call (every worker builds its own)."""
        ...

    def trainable(self, net: nn.Module) -> list[nn.Parameter]:
        """The parameters DP-SGD trains (LoRA: the adapters only); every other parameter stays bit-identical."""
        ...

    def losses(self, net: nn.Module, images: Tensor, labels: Tensor, multiplicity: int,
               generator: torch.Generator) -> Tensor:
        """One loss per ROW, shape [B*multiplicity]: record i's rows are i*K .. i*K+K-1 (K = multiplicity).

        ``generator`` (from the privacy source, on the training device) drives any randomness.
        """
        ...


@dataclass(frozen=True)
class DPSGDSchedule:
    """The public numbers of one DP-SGD run (they come from the charged plan).

    ``q`` is the GLOBAL Poisson rate (each record of the whole set independently with probability q),
    ``n_records`` the size of the whole sensitive set (the expected batch is q·n), ``clip`` the per-record
    L2 bound C, ``sigma`` the noise multiplier (noise std σ·C on the summed gradient). ``max_physical_batch``
    is at most how many rows one forward/backward holds (memory; on CPU chunks are smaller still,
    :data:`CPU_CHUNK_ROWS`), not a privacy parameter. ``grad_sample_mode`` picks
    how per-record clipped gradients are computed (:mod:`dpdistill.training.per_record`: ``auto``, ``hooks``,
    ``ghost``, ``functorch``): speed only, the clipped sum is the same; public (a function of the model).
    """

    sigma: float
    q: float
    steps: int
    clip: float
    n_records: int
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD only (heavy ball on the noisy averaged gradient: post-processing)
    multiplicity: int = 1
    checkpoint_every: int = 0
    max_physical_batch: int = 256
    # The charged plan this schedule executes (its unique id): checkpoints carry the schedule, so a checkpoint
    # of another plan — another run with the same numbers — is never resumed as this one.
    plan_id: str = ""
    grad_sample_mode: str = "auto"
    lr_schedule: str = "constant"  # constant, or cosine decay from lr towards 0 over the planned steps
    # An exponential moving average of the trainable parameters' iterates is what the fit returns when > 0 (0:
    # the last iterate). Post-processing of the noisy iterates: it reads no record and charges nothing. Where a
    # loss holds the iterates near a minimum it averages their noisy scatter away (DPDM and DP fine-tuning of
    # diffusion models release such an average); on a pure random walk it removes little (tests/test_dp_sgd.py).
    # A diffusers-like warm-up: step t's decay (t = 0, 1, ...) is min(ema_decay, (1 + t) / (10 + t)), so over
    # 200 steps any ema_decay above about 0.955 acts as 0.955.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, integer: bool = False) -> None:
            ok = isinstance(value, int) if integer else isinstance(value, int | float)
            if isinstance(value, bool) or not ok or not value > 0 or value != value:
                raise SpecError(f"dp-sgd schedule: {name} must be a {'positive integer' if integer else 'number > 0'}"
                                f", got {value!r}")

        positive("sigma", self.sigma)
        positive("clip", self.clip)
        positive("lr", self.lr)
        positive("steps", self.steps, integer=True)
        positive("n_records", self.n_records, integer=True)
        positive("multiplicity", self.multiplicity, integer=True)
        positive("max_physical_batch", self.max_physical_batch, integer=True)
        if isinstance(self.q, bool) or not isinstance(self.q, int | float) or not 0 < self.q <= 1:
            raise SpecError(f"dp-sgd schedule: q must lie in (0, 1], got {self.q!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"dp-sgd schedule: optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                            f"{self.optimizer!r}")
        if isinstance(self.weight_decay, bool) or not self.weight_decay >= 0:
            raise SpecError(f"dp-sgd schedule: weight_decay must be >= 0, got {self.weight_decay!r}")
        if isinstance(self.momentum, bool) or not 0 <= self.momentum < 1:
            raise SpecError(f"dp-sgd schedule: momentum must lie in [0, 1), got {self.momentum!r}")
        if self.momentum and self.optimizer != "sgd":
            raise SpecError(f"dp-sgd schedule: momentum is an SGD setting; optimizer {self.optimizer!r} has its own")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SpecError(f"dp-sgd schedule: lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                            f"{self.lr_schedule!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise SpecError(f"dp-sgd schedule: grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, "
                            f"got {self.grad_sample_mode!r}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise SpecError(f"dp-sgd schedule: checkpoint_every must be an integer >= 0, got "
                            f"{self.checkpoint_every!r}")
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, int | float) \
                or not 0 <= self.ema_decay < 1:
            raise SpecError(f"dp-sgd schedule: ema_decay must lie in [0, 1), got {self.ema_decay!r}")

    def ema_decay_at(self, step: int) -> float:
        """The EMA's decay after step ``step`` (0-based): min(ema_decay, (1 + step) / (10 + step)), so the first
        iterates do not pin the average to the starting weights. Indexed by step: a resumed fit follows it too."""
        return min(float(self.ema_decay), (1.0 + step) / (10.0 + step))

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): ``lr``, or with ``cosine`` lr·(1 + cos(π·step/steps))/2,
        from lr at the first step towards 0 at the last. Indexed by step, so a resumed fit follows the same curve."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        return self.lr

    @property
    def expected_batch(self) -> float:
        """q·n: the public denominator of every step's noisy mean (the realised batch size stays secret)."""
        return self.q * self.n_records

    @property
    def noise_std(self) -> float:
        """σ·C: the std of the noise on the summed clipped gradient."""
        return self.sigma * self.clip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def objective_device(objective: Any) -> torch.device:
    """Where ``objective``'s network is trained: its ``device`` attribute, default cpu."""
    return torch.device(getattr(objective, "device", "cpu") or "cpu")


# ------------------------------------------------------------------------------------------ per-record gradients


def attach_grad_sampler(net: nn.Module) -> Any:
    """Opacus' per-sample-gradient hooks on ``net`` (loss reduction "sum": grad_sample[i] = ∂loss_i/∂θ).

    The hooks sit on ``net``'s submodules, so calling ``net`` itself (not the wrapper) fills ``p.grad_sample``.
    Call ``.remove_hooks()`` on the result when done.
    """
    return HooksBackend(net, []).sampler


def resolve_grad_sample_mode(objective: DPObjective, mode: str = "auto") -> str:
    """The per-record backend ``mode`` means for ``objective``'s network (hooks | ghost | functorch).

    Public: it depends on the architecture and the trainable parameters only (the network is built, no data is
    read), so a plan may record it. SpecError when an explicit mode cannot serve the model.
    """
    if dataclasses.is_dataclass(objective) and any(f.name == "device" for f in dataclasses.fields(objective)):
        objective = dataclasses.replace(objective, device="cpu")  # a driver without the training device decides
    net = objective.build()
    params = list(objective.trainable(net))
    return choose_backend(mode, objective, net, params)


def clipped_gradient_sum(objective: DPObjective, net: nn.Module, params: list[nn.Parameter], images: Tensor,
                         labels: Tensor, multiplicity: int, clip: float, generator: torch.Generator,
                         max_physical_batch: int = 256, backend: Any = None) -> list[Tensor]:
    """Σ over the records of clip_C(mean of the record's K row gradients), one tensor per parameter in ``params``.

    ``backend``: an open :mod:`~dpdistill.training.per_record` backend (:func:`open_backend`); None: opacus'
    hooks, which ``net`` must then carry (:func:`attach_grad_sampler`). Records are processed in chunks of
    ``max_physical_batch // multiplicity`` (a record's rows never split across chunks), on CPU of at most
    :data:`CPU_CHUNK_ROWS` rows. No noise here: the result is what the noise protects and must not leave the
    caller unnoised.
    """
    total = [torch.zeros_like(p) for p in params]
    n = len(images)
    if n == 0:
        return total
    rows = min(max_physical_batch, CPU_CHUNK_ROWS) if images.device.type == "cpu" else max_physical_batch
    per_chunk = max(1, rows // multiplicity)
    for start in range(0, n, per_chunk):
        x, y = images[start:start + per_chunk], labels[start:start + per_chunk]
        if backend is None:
            part = hooks_clipped_sum(objective, net, params, x, y, multiplicity, clip, generator)
        else:
            part = backend.clipped_sum(objective, net, params, x, y, multiplicity, clip, generator)
        for acc, p in zip(total, part, strict=True):
            acc += p
    for p in params:
        p.grad_sample = None
        p.grad = None
    return total


# ------------------------------------------------------------------------------------------------- the loop


def make_optimizer(params: list[nn.Parameter], schedule: DPSGDSchedule) -> torch.optim.Optimizer:
    """The schedule's optimiser over ``params`` (weight decay, if any, is L2 on the parameters: public; momentum
    acts on the noisy averaged gradients only: post-processing)."""
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum,
                               weight_decay=schedule.weight_decay)
    return torch.optim.Adam(params, lr=schedule.lr, weight_decay=schedule.weight_decay)


def _cpu_copy(state: Any) -> Any:
    """A detached CPU copy of a (nested) state dict, safe to keep while training goes on."""
    if isinstance(state, Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_cpu_copy(v) for v in state)
    return copy.deepcopy(state)


def _broadcast_from_rank0(net: nn.Module) -> None:
    """Make every worker's parameters and buffers rank 0's (so replicas start identical whatever build() did)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            dist.broadcast(t.data, src=0)


def _check_shard_sizes(n_local: int, schedule: DPSGDSchedule, world_size: int, device: torch.device) -> None:
    """The shards together must be the whole set the schedule was charged for (n_records)."""
    total = n_local
    if world_size > 1:
        import torch.distributed as dist

        t = torch.tensor([n_local], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        total = int(t.item())
    if total != schedule.n_records:
        raise PrivacyError(f"dp-sgd: the schedule was planned for n_records={schedule.n_records} but the "
                           f"{'shards hold' if world_size > 1 else 'data holds'} {total} records")


def progress_printer(steps: int) -> Callable[[int, dict], None]:
    """An ``on_step`` hook printing "dp-sgd step k/steps (t s)" to stderr about 20 times over a fit (public
    information only: the step count and wall time)."""
    every = max(1, steps // 20)

    def show(step: int, info: dict) -> None:
        if step % every == 0 or step == steps:
            print(f"dp-sgd step {step}/{steps} ({info['elapsed_s']:.0f} s)", file=sys.stderr, flush=True)

    return show


def train_dp_sgd(objective: DPObjective, initial_state: dict[str, Tensor] | None, images: Tensor, labels: Tensor,
                 schedule: DPSGDSchedule, noise: PrivacyRandomness, *, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, optimizer_state: dict[str, Any] | None = None,
                 ema_state: dict[str, Tensor] | None = None, device: str | torch.device | None = None,
                 on_checkpoint: Callable[[int, dict], None] | None = None,
                 on_step: Callable[[int, dict], None] | None = None) -> dict[str, Tensor]:
    """Train ``objective``'s network with DP-SGD on this worker's shard; returns the final state_dict (CPU).

    ``images``/``labels`` are THIS worker's shard (all of the set when ``world_size`` is 1); with
    ``world_size`` > 1 the default torch.distributed process group must be initialised (Ray Train does it).
    ``initial_state`` (a state_dict, e.g. public pre-training) is loaded after ``build()``. Resuming:
    ``start_step`` steps are already done and ``optimizer_state`` is the optimiser's state at that step (both
    from a checkpoint), and with ``schedule.ema_decay`` > 0 ``ema_state`` is the average at that step (the
    checkpoint's "ema"). ``device`` overrides the objective's ``device`` (a Ray GPU worker's own device).

    The returned state is the released one: the last iterate, or with ``ema_decay`` > 0 the last iterate with
    every trainable parameter replaced by its moving average (frozen ones never move).

    ``on_step(step, info)`` after every step (``step`` counts steps done; ``info``: step, steps, rank,
    elapsed_s: nothing computed from the data). ``on_checkpoint(step, state)`` every ``checkpoint_every`` steps
    on every rank, ``state`` = {"step", "net", "optimizer", "schedule", "ema"} (CPU copies; "ema": the moving
    average of the trainable parameters by name, or None without one). At the last step "net" is the released
    state, so a finished run's checkpoint holds what the fit returns.
    """
    noise = noise if isinstance(noise, PrivacyRandomness) else _refuse_noise(noise)
    if not 0 <= rank < world_size:  # rank 0 adds the noise: a lone worker that is not rank 0 would add none
        raise PrivacyError(f"dp-sgd: rank {rank} of world size {world_size}")
    if not 0 <= start_step <= schedule.steps:
        raise SpecError(f"dp-sgd: start_step must lie in [0, {schedule.steps}], got {start_step}")
    if len(images) != len(labels):
        raise SpecError(f"dp-sgd: {len(images)} images but {len(labels)} labels")
    device = torch.device(device) if device is not None else objective_device(objective)
    distributed = world_size > 1
    _check_shard_sizes(len(images), schedule, world_size, device)

    net = objective.build().to(device)
    if initial_state is not None:
        net.load_state_dict(initial_state)
    net.train()
    params = list(objective.trainable(net))
    if not params:
        raise SpecError("dp-sgd: the objective names no trainable parameters")
    trainable_ids = {id(p) for p in params}
    for p in net.parameters():  # everything else is frozen: no gradient, never in the optimiser
        p.requires_grad_(id(p) in trainable_ids)
    if distributed:
        _broadcast_from_rank0(net)
    optimizer = make_optimizer(params, schedule)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    ema = _start_ema(net, trainable_ids, schedule, start_step, ema_state, device)
    averaged = [(ema[name], p) for name, p in net.named_parameters() if name in ema] if ema is not None else []

    images, labels = images.to(device), labels.to(device)
    # Public: a function of the architecture and the trainable parameters (resolve_grad_sample_mode).
    backend = open_backend(choose_backend(schedule.grad_sample_mode, objective, net, params), net, params)
    numels = [p.numel() for p in params]
    started = time.monotonic()
    try:
        for step in range(start_step, schedule.steps):
            keep = noise.poisson_mask(len(images), schedule.q).to(device)
            batch_x, batch_y = images[keep], labels[keep]
            generator = noise.generator(device)
            sums = clipped_gradient_sum(objective, net, params, batch_x, batch_y, schedule.multiplicity,
                                        schedule.clip, generator, schedule.max_physical_batch, backend)
            flat = torch.cat([s.reshape(-1) for s in sums])
            if rank == 0:  # the one draw of this step, from the guarded path; added before the reduce
                flat = flat + noise.gaussian(flat.shape, schedule.noise_std, flat.device, flat.dtype)
            if distributed:
                import torch.distributed as dist

                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat = flat / schedule.expected_batch
            for p, g in zip(params, flat.split(numels), strict=True):
                p.grad = g.view_as(p).to(p.dtype)
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if averaged:
                weight = 1.0 - schedule.ema_decay_at(step)  # once a step, not once a parameter
                with torch.no_grad():
                    for average, p in averaged:
                        average.lerp_(p.detach(), weight)
            done = step + 1
            if on_checkpoint is not None and schedule.checkpoint_every and done % schedule.checkpoint_every == 0:
                state = _released_state(net, ema) if done == schedule.steps else _cpu_copy(net.state_dict())
                on_checkpoint(done, {"step": done, "net": state, "optimizer": _cpu_copy(optimizer.state_dict()),
                                     "schedule": schedule.to_dict(), "ema": _cpu_copy(ema)})
            if on_step is not None:
                on_step(done, {"step": done, "steps": schedule.steps, "rank": rank,
                               "elapsed_s": time.monotonic() - started})
    finally:
        backend.close()
    return _released_state(net, ema)


def _start_ema(net: nn.Module, trainable_ids: set[int], schedule: DPSGDSchedule, start_step: int,
               ema_state: dict[str, Tensor] | None, device: torch.device) -> dict[str, Tensor] | None:
    """The moving average of the trainable parameters by name (None when ``ema_decay`` is 0): the starting
    weights at step 0, the checkpoint's average when resuming."""
    if not schedule.ema_decay:
        return None
    names = [name for name, p in net.named_parameters() if id(p) in trainable_ids]
    aliases = [k for k, v in net.state_dict(keep_vars=True).items() if id(v) in trainable_ids]
    if len(aliases) != len(names):  # a tied parameter: its state_dict aliases would be released apart
        raise SpecError(f"dp-sgd: ema_decay needs each trainable parameter under one name; {sorted(aliases)} "
                        f"name {len(names)} parameters")
    if start_step == 0 and ema_state is None:
        own = dict(net.named_parameters())
        return {name: own[name].detach().clone() for name in names}
    if ema_state is None or sorted(ema_state) != sorted(names):
        raise SpecError(f"dp-sgd: resuming at step {start_step} with ema_decay {schedule.ema_decay:g} needs the "
                        "checkpoint's moving average of every trainable parameter")
    return {name: ema_state[name].detach().to(device, copy=True) for name in names}


def _released_state(net: nn.Module, ema: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """CPU copy of what the fit releases: ``net``'s state, its trainable parameters replaced by ``ema`` if any."""
    state = dict(net.state_dict())
    if ema is not None:
        state.update(ema)
    return _cpu_copy(state)


def _refuse_noise(noise: Any) -> PrivacyRandomness:
    raise PrivacyError(f"dp-sgd: noise must be a PrivacyRandomness, got {type(noise).__name__}")


# ------------------------------------------------------------------------------------------- an objective


class CrossEntropyRows:
    """The loss side of a classifier objective: every parameter trainable, cross-entropy per row (the
    ``losses`` / ``draw_rows`` / ``row_losses`` of :class:`DPObjective` and the functorch backend)."""

    def trainable(self, net: nn.Module) -> list[nn.Parameter]:
        return list(net.parameters())

    def losses(self, net: nn.Module, images: Tensor, labels: Tensor, multiplicity: int,
               generator: torch.Generator) -> Tensor:
        return self.row_losses(net, *self.draw_rows(images, labels, multiplicity, generator))

    def draw_rows(self, images: Tensor, labels: Tensor, multiplicity: int,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The rows (each record repeated K times; no randomness here), for the functorch backend."""
        x = images.repeat_interleave(multiplicity, 0) if multiplicity > 1 else images
        y = labels.repeat_interleave(multiplicity, 0) if multiplicity > 1 else labels
        return x, y.long()

    def row_losses(self, net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy per row (deterministic)."""
        return F.cross_entropy(net(x), y, reduction="none")


@dataclass(frozen=True)
class ClassifierObjective(CrossEntropyRows):
    """A classifier from the model registry (``model``, e.g. convnet) trained with cross-entropy under DP-SGD.

    The network is built from ``seed`` (public initialisation) without touching the global RNG. Used by the
    Ray Train scaling benchmark and as the simplest real objective; ``norm`` must not mix records (the
    registry's ``instance``/``group``/``layer`` are fine, ``batch`` is refused by opacus).
    """

    model: str = "convnet"
    channels: int = 1
    num_classes: int = 10
    image_size: int = 28
    options: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    device: str = "cpu"

    def build(self) -> nn.Module:
        from dpdistill import models

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return models.get(self.model, channels=self.channels, num_classes=self.num_classes,
                              image_size=self.image_size, **dict(self.options))


@dataclass(frozen=True, eq=False)
class FineTuneObjective(CrossEntropyRows):
    """A given classifier (e.g. DP-GenG's expert, pre-trained on DP-generated data) fine-tuned with cross-entropy
    under DP-SGD: ``build()`` is a fresh copy of ``net``, which itself is never changed. The network must not
    mix records (no batch norm in training mode)."""

    net: nn.Module
    device: str = "cpu"

    def build(self) -> nn.Module:
        return copy.deepcopy(self.net)
