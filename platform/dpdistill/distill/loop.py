"""What every image-optimising distiller does per step and on Ctrl-C, written once.

DM, NDPDC and DP-GenG differ only in the loss; the update of the synthetic images is the same: gradients into
the images only (never into the matching network's parameters), converted to normalised-image units so the
learning rate means the same for every dataset, one optimiser step, then the images clamped to the valid range.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def image_step(opt: torch.optim.Optimizer, loss: torch.Tensor, syn: Any, normalize: Any, clamp: bool) -> float:
    """One update of ``syn.images`` by ``loss``; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=[syn.images])
    apply_image_gradient(opt, syn, normalize, clamp)
    return float(loss.detach())


def apply_image_gradient(opt: torch.optim.Optimizer, syn: Any, normalize: Any, clamp: bool) -> None:
    """Step ``syn.images`` by the gradient already accumulated in them (per-class losses summed by the caller).

    The gradient goes to normalised-image units first (the learning rate's units), then the optimiser steps
    and the images are projected onto [0, 1] when ``clamp``. With no gradient (no class had data) only the
    projection runs.
    """
    if syn.images.grad is not None:
        normalize.to_normalised_units(syn.images.grad)
        opt.step()
    if clamp:
        syn.clamp_()


def image_lr_schedule(opt: torch.optim.Optimizer, kind: str, iterations: int) -> Any:
    """The image learning-rate schedule stepped once per iteration: None (constant) or cosine decay to 0.

    With noisy matching targets (DP noise, Poisson batch sizes, DSA draws) a constant rate leaves the images
    jumping around their optimum with each step's noise; decaying it makes the last steps an average.
    """
    if kind == "constant" or iterations < 1:
        return None
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    raise ValueError(f"lr_schedule: expected 'constant' or 'cosine', got {kind!r}")


@contextlib.contextmanager
def partial_set_on_interrupt(syn: Any) -> Iterator[None]:
    """On Ctrl-C, attach the set as it stands to the KeyboardInterrupt so the runner can save it."""
    try:
        yield
    except KeyboardInterrupt as exc:
        exc.synthetic_set = syn  # type: ignore[attr-defined]
        raise
