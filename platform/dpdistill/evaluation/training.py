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
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

Augment = Callable[..., torch.Tensor]
Stat = float | Sequence[float] | torch.Tensor | None


THREADS_ENV = "DPDISTILL_THREADS"  # set by the runner for a job whose spec pins ``threads``


def resolve_threads(num_threads: int | None) -> int:
    """The intra-op thread count a block should use: ``num_threads``, else the job's pinned count
    (``$DPDISTILL_THREADS``, from the spec's ``threads``), else the default below.

    Default (unpinned): the cores this process may use (torch's own default counts the host's cores, which in a
    container or under Ray can exceed ours), and 1 when the machine is already oversubscribed (1-min load average
    above those cores). OpenMP threads spin-wait, so two threads competing with other work ran a digits ConvNet
    20x slower than one thread in our measurements, while on an idle 2-core machine two threads gain only
    ~1.5-2x. The unpinned default depends on the machine's load, and float reductions on the thread count: pin
    ``threads`` in the spec when results must repeat to the last digit.
    """
    if num_threads is not None:
        return max(1, int(num_threads))
    pinned = os.environ.get(THREADS_ENV)
    if pinned:
        return max(1, int(pinned))
    previous = torch.get_num_threads()
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        available = os.cpu_count() or 1
    threads = max(1, min(previous, available))
    try:
        if os.getloadavg()[0] > available:
            threads = 1
    except (AttributeError, OSError):  # no load average on this platform
        pass
    return threads


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
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
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
) -> nn.Module:
    """Train ``model`` in place with DC's schedule (SGD, lr x0.1 at epochs//2) and return it in eval mode.

    ``images`` are float [N,C,H,W] in [0,1]; ``labels`` are class indices [N] or soft labels [N, classes].
    Augmentation acts on [0,1] images before normalisation, except ``"dsa"`` (see :class:`NormalisedDSA`),
    which acts after it. Shuffling and augmentation draw from
    ``generator`` (CPU); weight initialisation is the caller's business (seed before building the model).
    Intra-op threads follow :func:`thread_limit` (``num_threads``) during training and are restored after.
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
        )


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
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
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
            loss = F.cross_entropy(model(x), y_all[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if on_epoch is not None:
            on_epoch(epoch)
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
    """Top-1 accuracy in [0,1] of ``model`` (eval mode) on [0,1] images with integer labels."""
    device = torch.device(device)
    normalise = Normalise(mean, std, images.shape[1], device)
    was_training = model.training
    model.to(device).eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device=device, dtype=torch.float32)
        y = labels[start : start + batch_size].to(device)
        correct += int((model(normalise(x)).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(images))
