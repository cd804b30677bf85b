"""What every distiller shares around its loss, written once: its run contract, its loop, its image update.

- The contract: every run function is ``run(real, cfg=None, seed=0, **options)`` with the keyword options of
  :class:`RunOptions` (private methods: :class:`PrivateRunOptions`), plus at most its own extras (``init``,
  ``generated``); the distill job passes them by name.
- The loop (:func:`run_iterations`): ``iterations`` steps, each returning its loss, with a progress bar, the
  caller's ``callback(iteration, loss)`` after every step, and on Ctrl-C the set as it stands attached to the
  KeyboardInterrupt (:func:`partial_set_on_interrupt`) so the runner can save it.
- The image update (:func:`image_step`): DM, NDPDC and DP-GenG differ only in the loss; gradients go into the
  images only (never into the matching network's parameters), are converted to normalised-image units so the
  learning rate means the same for every dataset, one optimiser step, then the images clamped to the valid
  range. DC and PSG accumulate per-class gradients and step with :func:`apply_image_gradient`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

from dpdistill.errors import PrivacyError
from dpdistill.privacy import noise as privacy_noise
from dpdistill.privacy.noise import PrivacyRandomness

Callback = Callable[[int, float], None]


class RunOptions(TypedDict, total=False):
    """The keyword options every distiller's run function takes (the distill job passes them by name)."""

    mean: list[float] | None  # normalisation statistics; a private method takes public ones only (default 0.5)
    std: list[float] | None
    device: str | torch.device
    progress: bool  # a progress bar on a terminal
    callback: Callback | None  # callback(iteration, loss) after every step


class PrivateRunOptions(RunOptions, total=False):
    """A private distiller's options: :class:`RunOptions` plus its ledger and privacy randomness."""

    ledger: Any  # the run's PrivacyLedger: charged before any release
    noise: PrivacyRandomness | None  # every noise draw and private sampling decision (None: a fresh secret source)


def require_ledger(ledger: Any, method: str) -> Any:
    """The ledger a private method must be given (a PrivacyError naming the method if it is missing)."""
    if ledger is None:
        raise PrivacyError(f"method '{method}' is private: pass ledger= (a dpdistill.privacy.PrivacyLedger)")
    return ledger


@dataclass(frozen=True)
class RunArgs:
    """A run function's keyword options with their defaults applied (the one place the defaults live)."""

    mean: list[float] | None = None
    std: list[float] | None = None
    device: torch.device = torch.device("cpu")
    progress: bool = True
    callback: Callback | None = None
    ledger: Any = None
    noise: PrivacyRandomness | None = None

    @classmethod
    def of(cls, *, mean: list[float] | None = None, std: list[float] | None = None,
           device: str | torch.device = "cpu", progress: bool = True, callback: Callback | None = None) -> RunArgs:
        """A non-private method's :class:`RunOptions` (an unknown or private option is a TypeError)."""
        return cls(mean, std, torch.device(device), progress, callback)

    @classmethod
    def private(cls, method: str, *, ledger: Any = None, noise: PrivacyRandomness | None = None,
                **options: Any) -> RunArgs:
        """A private method's :class:`PrivateRunOptions`: the ledger required, ``noise`` None made a fresh secret
        source."""
        return dataclasses.replace(cls.of(**options), ledger=require_ledger(ledger, method),
                                   noise=privacy_noise.resolve(noise))

    def loop(self, syn: Any, iterations: int, label: str, step: Callable[[int], float]) -> Any:
        """:func:`run_iterations` with this run's progress bar and callback."""
        return run_iterations(syn, iterations, label, self.progress, self.callback, step)


def run_iterations(syn: Any, iterations: int, label: str, progress: bool, callback: Callback | None,
                   step: Callable[[int], float]) -> Any:
    """Run ``step(iteration) -> loss`` ``iterations`` times (progress bar, ``callback``, Ctrl-C); returns ``syn``."""
    with partial_set_on_interrupt(syn), progress_steps(iterations, label, progress) as advance:
        for it in range(iterations):
            value = step(it)
            advance(value)
            if callback is not None:
                callback(it, value)
    return syn


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
def progress_steps(total: int, label: str, enabled: bool) -> Iterator[Callable[[float], None]]:
    """A rich progress bar on a terminal (a no-op elsewhere); yields ``advance(loss)``."""
    bar = None
    if enabled:
        from rich.console import Console

        if Console(file=sys.stdout).is_terminal:
            from rich.progress import Progress

            bar = Progress(*Progress.get_default_columns(), "loss {task.fields[loss]:.4g}", transient=True)
    if bar is None:
        yield lambda _loss: None
        return
    with bar:
        task = bar.add_task(label, total=total, loss=float("nan"))
        yield lambda loss: bar.update(task, advance=1, loss=loss)


@contextlib.contextmanager
def partial_set_on_interrupt(syn: Any) -> Iterator[None]:
    """On Ctrl-C, attach the set as it stands to the KeyboardInterrupt so the runner can save it."""
    try:
        yield
    except KeyboardInterrupt as exc:
        exc.synthetic_set = syn  # type: ignore[attr-defined]
        raise
