"""DP-SGD objectives the engine tests share (tests/test_dp_sgd.py in process, tests/test_dp_train_ray.py on Ray
Train workers, which get this module by value: they cannot import the tests folder)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ZeroGradient:
    """Per-sample gradients exactly zero (the loss multiplies the output by 0): the update is the noise alone.

    With ``log_dir`` set, every losses() call appends the number of records it got to ``log_dir``/rows-<pid>.txt
    (a test hook for the sampling rate: never logged by the platform).
    """

    d: int = 100
    m: int = 100
    log_dir: str | None = None

    def build(self) -> nn.Module:
        g = torch.Generator().manual_seed(0)
        net = nn.Linear(self.d, self.m)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return net

    def trainable(self, net: nn.Module) -> list[nn.Parameter]:
        return list(net.parameters())

    def losses(self, net, images, labels, multiplicity, generator):
        if self.log_dir is not None:
            with open(Path(self.log_dir) / f"rows-{os.getpid()}.txt", "a") as f:
                f.write(f"{len(images)}\n")
        x = images.flatten(1).repeat_interleave(multiplicity, 0)
        return (net(x) * 0.0).sum(1)


def noise_gain(schedule) -> float:
    """How many per-step noise stds one coordinate of the RELEASE moves by, for zero per-sample gradients and SGD
    at a constant lr of 1: √T for the last iterate; with ``schedule.ema_decay`` > 0 the release is the moving
    average e_T (e_0 = w_0, e_t = d·e_{t-1} + (1 - d)·w_t, d = schedule.ema_decay_at(t - 1)), i.e. Σ_s c_s·u_s
    over the steps' updates u_s with c_s the weight the average puts on iterates w_s..w_T; gain = √(Σ c_s²)."""
    weights = [1.0]  # on w_0, w_1, ... as the average goes
    for t in range(schedule.steps):
        d = schedule.ema_decay_at(t) if schedule.ema_decay else 0.0
        weights = [w * d for w in weights] + [1.0 - d]
    return sum(sum(weights[s:]) ** 2 for s in range(1, schedule.steps + 1)) ** 0.5
