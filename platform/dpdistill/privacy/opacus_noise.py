"""Opacus' DP-SGD noise drawn through the one privacy source, so its guard covers DP-SGD too.

Opacus draws its Gaussian noise itself (``_generate_noise``) and silently returns zeros when ``noise_multiplier``
is 0. Routed here, every DP-SGD noise draw goes through :meth:`PrivacyRandomness.gaussian`: secret (or explicitly
reproducible) randomness, a refusal instead of a noiseless step, and draws a test can count like every other
mechanism's. The arithmetic is opacus' own: ``p.grad = p.summed_grad + N(0, (σ·C)²)`` per parameter.
"""

from __future__ import annotations

from typing import Any

from dpdistill.privacy.noise import PrivacyRandomness


def draw_noise_from(optimizer: Any, noise: PrivacyRandomness) -> Any:
    """Make an opacus ``DPOptimizer`` draw its noise from ``noise``; returns the optimizer."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            g = p.summed_grad
            p.grad = (g + noise.gaussian(g.shape, std, g.device, g.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise  # DPOptimizer.pre_step calls self.add_noise()
    return optimizer
