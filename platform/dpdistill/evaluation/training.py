"""Plain supervised training and accuracy for the utility protocols: DC's SGD schedule, optional augmentation.

Two named augmentations: ``"dsa-lite"`` (random shifted crop + rotation on [0,1] images; cheap, used to train
DP-GenG's extractors and expert) and ``"dsa"``, the evaluation protocol of the DC / DSA / DM reference code:
every training batch goes through the full differentiable Siamese augmentation strategy (colour, crop, cutout,
flip, scale, rotate; one op group per batch, parameters drawn per image) AFTER normalisation, as the reference
applies ``DiffAugment`` to normalised images.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dpdistill.models.compiled import compiled
from dpdistill.models.registry import mixes_records

Augment = Callable[..., torch.Tensor]
Stat = float | Sequence[float] | torch.Tensor | None


THREADS_ENV = "DPDISTILL_THREADS"  # set by the runner for a job whose spec pins ``threads``

# Micro-batch and inference chunk for CPU training / scoring of conv models (see ``micro_batch`` in
# train_classifier and ``accuracy``). Measured on a 2-core machine, width-32 ConvNet on 28x28 MNIST, one thread:
# an epoch of 400 images in batches of 256 took 0.28 s (min of 6) whole-batch in the default memory format and
# 0.19 s in micro-batches of 32 in channels_last; 10k-image inference 5.1 s in chunks of 1024 and 1.6 s in
# channels_last chunks of 32. The step's work is memory-bound elementwise ops (pool, relu, group norm) whose
# activations fit in cache at 32 images, not at 256.
MICRO_BATCH = 32
INFERENCE_CHUNK = 32


def resolve_threads(num_threads: int | None) -> int:
    """The intra-op thread count a block should use: ``num_threads``, else the job's pinned count
    (``$DPDISTILL_THREADS``, from the spec's ``threads``), else the default below.

    Default (unpinned): the cores of this process's affinity mask that other processes leave free right now
    (:func:`free_cores`; torch's own default counts the host's cores, which in a container or under Ray can exceed
    ours), at least 1. OpenMP threads spin-wait, so two threads competing with other work ran a digits ConvNet
    20x slower than one thread in our measurements, while on an idle 2-core machine two threads gain only
    ~1.5-2x. The unpinned default depends on the machine's load, and float reductions on the thread count: pin
    ``threads`` in the spec when results must repeat to the last digit.
    """
    if num_threads is not None:
        return max(1, int(num_threads))
    pinned = os.environ.get(THREADS_ENV)
    if pinned:
        return max(1, int(pinned))
    return max(1, min(torch.get_num_threads(), free_cores()))


# How long free_cores watches the CPUs, and how long its answer is reused (a training loop asks once per model;
# a tight loop of short calls must not sleep each time).
BUSY_WINDOW_S = 0.1
BUSY_REUSE_S = 2.0
_free_cores_seen: tuple[float, int] | None = None


def free_cores() -> int:
    """The cores of this process's affinity mask that OTHER processes leave free now, rounded, at least 1.

    Measured over :data:`BUSY_WINDOW_S` from /proc (the busy time of our CPUs less this process's own CPU time),
    so neither this process's own earlier work nor work that has already ended counts. The 1-min load average
    used before counted both: a job started within a minute of heavy work (the previous run's evaluation, even
    its own) saw a loaded machine and ran a whole stage on one of two idle cores (DP-GenG's DP-MEPF fit took
    204 s instead of 105 s in half the runs of benchmarks/results/speed.md's dpgeng_fast_ab). Without /proc
    (macOS, Windows), the load average still decides: all cores, or 1 when it exceeds them.

    Never more than the container's CPU quota (:func:`cgroup_cpus`): a Kubernetes pod limited to 2 CPUs on a
    64-core node sees all 64 in its affinity mask, and 64 spin-waiting threads throttled to 2 CPUs' time would
    run far slower than 2."""
    global _free_cores_seen
    now = time.monotonic()
    if _free_cores_seen is not None and now - _free_cores_seen[0] < BUSY_REUSE_S:
        return _free_cores_seen[1]
    cores = _affinity()
    allowed = min(len(cores), cgroup_cpus() or len(cores))
    others = _others_busy(cores)
    if others is None:
        try:
            free = 1 if os.getloadavg()[0] > allowed else allowed
        except (AttributeError, OSError):  # no load average on this platform either
            free = allowed
    else:
        free = max(1, min(allowed, round(len(cores) - others)))
    _free_cores_seen = (time.monotonic(), free)
    return free


CGROUP_CPU_FILES = ("/sys/fs/cgroup/cpu.max",  # cgroup v2: "<quota> <period>" or "max <period>"
                    "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # cgroup v1: quota (-1: none), period beside it


def cgroup_cpus() -> int | None:
    """The CPUs this process's cgroup may use per period (its quota over its period, rounded up), or None when
    no quota is set or none can be read."""
    for path in CGROUP_CPU_FILES:
        try:
            with open(path) as f:
                fields = f.read().split()
            if path.endswith("cpu.max"):
                quota, period = fields[0], fields[1]
            else:
                with open(os.path.join(os.path.dirname(path), "cpu.cfs_period_us")) as f:
                    quota, period = fields[0], f.read().split()[0]
            if quota in ("max", "-1"):
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def _affinity() -> list[int]:
    """The CPU numbers this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return list(range(os.cpu_count() or 1))


def _others_busy(cores: list[int]) -> float | None:
    """How many of ``cores`` other processes keep busy, averaged over BUSY_WINDOW_S; None without /proc."""
    try:
        machine0, own0, t0 = _busy_ticks(cores), _own_ticks(), time.monotonic()
        time.sleep(BUSY_WINDOW_S)
        machine1, own1, t1 = _busy_ticks(cores), _own_ticks(), time.monotonic()
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    return max(0.0, ((machine1 - machine0) - (own1 - own0)) / hz / max(t1 - t0, 1e-3))


def _busy_ticks(cores: list[int]) -> int:
    """Busy clock ticks (user, nice, system, irq, softirq, steal) of ``cores`` since boot, from /proc/stat."""
    wanted = {f"cpu{c}" for c in cores}
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in wanted:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
                total += user + nice + system + irq + softirq + steal
    return total


def _own_ticks() -> int:
    """This process's CPU clock ticks (all its threads, user + system) since it started, from /proc/self/stat."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def _ray_task_cpus() -> int | None:
    """The CPUs Ray assigned to the task or actor this process runs (None in a driver or without Ray)."""
    ray = sys.modules.get("ray")  # never import Ray just to ask: a process that has not imported it is no worker
    if ray is None:
        return None
    try:
        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # an older or partial Ray install: fall back to the affinity mask
        return None
    return max(1, int(cpus)) if cpus else None


def usable_cores() -> int:
    """The CPU cores this process may keep busy: a Ray task's or actor's assigned CPUs, else the cores of its
    affinity mask that other processes leave free now (:func:`free_cores`)."""
    ray_cpus = _ray_task_cpus()
    if ray_cpus is not None:
        return ray_cpus
    return free_cores()


@contextlib.contextmanager
def thread_limit(num_threads: int | None) -> Iterator[int]:
    """Run the block with :func:`resolve_threads` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    num_threads = resolve_threads(num_threads)
    torch.set_num_threads(num_threads)
    try:
        yield num_threads
    finally:
        torch.set_num_threads(previous)


def dsa_lite(
    images: torch.Tensor, generator: torch.Generator | None = None, *, max_degrees: float = 15.0
) -> torch.Tensor:
    """Per-image random crop (zero-padded shift of up to size/8 px) and rotation (up to ±15°) of [N,C,H,W] in [0,1]."""
    n, _, h, w = images.shape
    pad = max(1, min(h, w) // 8)
    device = images.device
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=generator).to(device=device, dtype=images.dtype)
    angles = (torch.rand(n, generator=generator) * 2 - 1).to(device=device, dtype=images.dtype)
    angles = angles * math.radians(max_degrees)
    cos, sin = angles.cos(), angles.sin()
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    # Normalised coordinates span 2 units over the width (align_corners=False), so one pixel is 2/size.
    theta[:, 0, 2] = shifts[:, 0] * 2 / w
    theta[:, 1, 2] = shifts[:, 1] * 2 / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class NormalisedDSA:
    """The reference evaluation augmentation: DSA with per-image parameters on NORMALISED images.

    ``on_normalised`` tells the training loop to call it after normalisation (zero fill then means "the mean
    pixel", and colour jitter acts in normalised units, as in the reference code).
    """

    on_normalised = True

    def __init__(self, strategy: str | None = None) -> None:
        # Imported here: evaluation must not import distill at module load.
        from dpdistill.distill.augment import DEFAULT_STRATEGY, DSA

        self.dsa = DSA(strategy or DEFAULT_STRATEGY, mode="single")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.dsa.apply(images, self.dsa.sample(images.shape[0], generator))


def resolve_augment(augment: str | Augment | None) -> Augment | None:
    """Turn ``None | "dsa-lite" | "dsa" | callable`` into a callable (or None); raises ValueError for other names."""
    if augment is None or callable(augment):
        return augment
    if augment == "dsa-lite":
        return dsa_lite
    if augment == "dsa":
        return NormalisedDSA()
    raise ValueError(f"unknown augmentation {augment!r}")


def _call_augment(augment: Augment, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    try:
        takes_generator = "generator" in inspect.signature(augment).parameters
    except (TypeError, ValueError):
        takes_generator = False
    return augment(images, generator=generator) if takes_generator else augment(images)


def _stat(value: Stat, channels: int, device: torch.device, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(f"{name} has {t.numel()} values; expected 1 or {channels} (one per channel)")
    return t.view(1, -1, 1, 1)


class Normalise(nn.Module):
    """(x - mean) / std per channel; identity when both are None."""

    def __init__(self, mean: Stat, std: Stat, channels: int, device: torch.device) -> None:
        super().__init__()
        self.mean = _stat(mean, channels, device, "mean")
        self.std = _stat(std, channels, device, "std")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    chunks = list(order.split(batch_size))
    # A lone last sample breaks BatchNorm in train mode; fold it into the previous batch.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        lone = chunks.pop()  # popped first: `chunks[-2] = cat([..., chunks.pop()])` indexes the shortened list
        chunks[-1] = torch.cat([chunks[-1], lone])
    return chunks


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 256,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: str | Augment | None = None,
    mean: Stat = None,
    std: Stat = None,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    on_epoch: Callable[[int], None] | None = None,
    num_threads: int | None = None,
    micro_batch: int | None = None,
    compile: bool | None = None,
) -> nn.Module:
    """Train ``model`` in place with DC's schedule (SGD, lr x0.1 at epochs//2) and return it in eval mode.

    ``images`` are float [N,C,H,W] in [0,1]; ``labels`` are class indices [N] or soft labels [N, classes].
    Augmentation acts on [0,1] images before normalisation, except ``"dsa"`` (see :class:`NormalisedDSA`),
    which acts after it. Shuffling and augmentation draw from
    ``generator`` (CPU); weight initialisation is the caller's business (seed before building the model).
    Intra-op threads follow :func:`thread_limit` (``num_threads``) during training and are restored after.

    ``micro_batch`` (e.g. :data:`MICRO_BATCH`), for a conv model on CPU: each step's forward/backward runs in
    chunks of that many images in channels_last (the model's memory format is restored afterwards), gradients
    accumulated to the whole batch's mean loss, so the SGD step is the same up to float summation order. Ignored
    on other devices, for models without convolutions, and with batch normalisation (its statistics depend on
    the whole batch). None: one forward per batch, as before.

    ``compile``: the model's forward through ``torch.compile`` on CPU (:mod:`dpdistill.models.compiled`; None:
    the job's ``compile`` field, ``$DPDISTILL_COMPILE``). The same training up to float rounding.
    """
    with thread_limit(num_threads):
        return _train(
            model,
            images,
            labels,
            epochs,
            batch_size,
            lr,
            momentum,
            weight_decay,
            augment,
            mean,
            std,
            device,
            generator,
            on_epoch,
            micro_batch,
            compile,
        )


def _convolutional(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _memory_format(model: nn.Module) -> torch.memory_format:
    """The memory format the model's 4-d weights are in now (to restore after a channels_last block)."""
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


def _train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    augment: str | Augment | None,
    mean: Stat,
    std: Stat,
    device: str | torch.device,
    generator: torch.Generator | None,
    on_epoch: Callable[[int], None] | None,
    micro_batch: int | None = None,
    compile: bool | None = None,
) -> nn.Module:
    device = torch.device(device)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    augment_fn = resolve_augment(augment)
    after_normalise = bool(getattr(augment_fn, "on_normalised", False))
    normalise = Normalise(mean, std, images.shape[1], device)
    x_all = images.to(device=device, dtype=torch.float32)
    y_all = labels.to(device)
    if y_all.is_floating_point():
        y_all = y_all.float()
    model.to(device).train()
    # Measured to win only for conv models on CPU (cache-sized activations); elsewhere whole batches.
    if micro_batch is not None and (
        micro_batch < 1 or device.type != "cpu" or not _convolutional(model) or mixes_records(model)
    ):
        micro_batch = None
    channels_last = micro_batch is not None
    prior_format = _memory_format(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    call = compiled(model, "forward", compile) if device.type == "cpu" else model

    def forward(x: torch.Tensor) -> torch.Tensor:
        return call(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    for epoch in range(epochs):
        if epochs > 1 and epoch == epochs // 2:
            for group in optimiser.param_groups:
                group["lr"] = lr * 0.1
        for idx in _batches(len(x_all), batch_size, generator):
            idx = idx.to(device)
            x = x_all[idx]
            if augment_fn is not None and not after_normalise:
                x = _call_augment(augment_fn, x, generator)
            x = normalise(x)
            if augment_fn is not None and after_normalise:
                x = _call_augment(augment_fn, x, generator)
            y = y_all[idx]
            optimiser.zero_grad(set_to_none=True)
            if micro_batch is None or len(x) <= micro_batch:
                F.cross_entropy(forward(x), y).backward()
            else:
                # Per-image losses are independent without batch norm: summing the chunks' losses over the
                # whole batch gives the batch's mean-loss gradient.
                for x_chunk, y_chunk in zip(x.split(micro_batch), y.split(micro_batch), strict=True):
                    (F.cross_entropy(forward(x_chunk), y_chunk, reduction="sum") / len(x)).backward()
            optimiser.step()
        if on_epoch is not None:
            on_epoch(epoch)
    if channels_last:
        model.to(memory_format=prior_format)
    return model.eval()


@torch.no_grad()
def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1024,
    *,
    mean: Stat = None,
    std: Stat = None,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy in [0,1] of ``model`` (eval mode) on [0,1] images with integer labels.

    ``batch_size`` images at a time go to the device; on CPU a conv model scores them in channels_last chunks of
    :data:`INFERENCE_CHUNK` (about 3x faster than whole batches; the model's memory format is restored after).
    """
    device = torch.device(device)
    normalise = Normalise(mean, std, images.shape[1], device)
    was_training = model.training
    model.to(device).eval()
    chunked = device.type == "cpu" and _convolutional(model)
    prior_format = _memory_format(model)
    if chunked:
        model.to(memory_format=torch.channels_last)
    correct = 0
    try:
        for start in range(0, len(images), batch_size):
            x = normalise(images[start : start + batch_size].to(device=device, dtype=torch.float32))
            y = labels[start : start + batch_size].to(device)
            if chunked:
                logits = torch.cat(
                    [model(c.contiguous(memory_format=torch.channels_last)) for c in x.split(INFERENCE_CHUNK)]
                )
            else:
                logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
    finally:
        if chunked:
            model.to(memory_format=prior_format)
        model.train(was_training)
    return correct / max(1, len(images))
