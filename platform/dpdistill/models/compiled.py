"""Opt-in ``torch.compile`` of the CPU hot loops: the job field ``compile`` (``$DPDISTILL_COMPILE``).

Where it pays, measured on this project's 2-core CPU machines (inductor's C++ backend; README "Performance"): the
small-network loops whose time goes to memory-bound elementwise work that inductor fuses (instance norm, ReLU,
average pooling around each convolution):

- :func:`~dpdistill.evaluation.training.train_classifier`'s micro-batch step (evaluation models, DP-GenG's
  extractors, the expert's pre-training): a width-32 ConvNet epoch on 400 MNIST images 0.203 -> 0.156 s on one
  thread, 0.114 -> 0.089 s on two;
- the matchers' embeddings (:mod:`dpdistill.distill.embedding`): 1,280 real images without gradient 92 -> 56 ms,
  400 synthetic images forward and backward 96 -> 70 ms (two threads, width-32 ConvNet).

Where it does not (measured, so not compiled): DP-MEPF's generator fit (0.089 -> 0.092 s a step: its time is
in the convolutions). Every compiled graph costs a one-off compile (about 10-25 s on 2 cores) the first time a
shape is seen; torch keeps the compiled code in its on-disk cache (``$TORCHINDUCTOR_CACHE_DIR``, by default
under the system temp directory), so a rerun, another noise draw or a Ray task on the same machine loads it in
about a second. So it is for long runs, off by default.

What changes: the same functions, computed with differently fused kernels, so results move by float rounding
only (as a different thread count moves them). Nothing about privacy depends on it: clipping and noise act on
the features after the network, whatever kernels computed them. Shapes are what a compile cache records, so
every compiled call on sensitive records sees public shapes only (the matchers' real side pads its last chunk,
:mod:`dpdistill.distill.embedding`); the training steps compiled here see released or public data. The
compiled kernels follow the caller's
thread count at run time (inductor's dynamic threads), so a one-thread evaluation task does not run kernels
compiled for two.

If the machine cannot compile (no C++ compiler, an unsupported torch build), :func:`available` finds out once
per process on a tiny probe, logs one warning and everything runs eagerly, as with the field off: a run never
fails, after its budget is charged, for want of a compiler.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

COMPILE_ENV = "DPDISTILL_COMPILE"  # "1": compile (set by the runner for a job with ``compile: true``)

_COMPILED: dict[tuple[type, str], Callable[..., Any]] = {}  # (module class, method) -> compiled function


def requested(flag: bool | None = None) -> bool:
    """``flag`` when given, else whether the job asked for compiled loops (``$DPDISTILL_COMPILE`` = 1)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(COMPILE_ENV, "").strip() == "1"


@functools.cache
def available() -> bool:
    """Whether ``torch.compile`` works on this machine: a tiny forward and backward compiled once per process.
    False (with one warning) when it fails; callers then run eagerly."""
    try:
        import torch._inductor.config as inductor_config

        # Kernels read the thread count when they run, not when they were compiled: a graph compiled in a
        # two-thread stage and reused by a one-thread evaluation must not start two OpenMP threads.
        inductor_config.cpp.dynamic_threads = True
        probe = torch.compile(lambda x: torch.relu(x * 2.0 + 1.0).mean(dim=1), dynamic=False)
        x = torch.linspace(-1.0, 1.0, 8).view(2, 4).requires_grad_(True)
        probe(x).sum().backward()
        ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
        if not ok:
            raise RuntimeError("the compiled probe's gradient is missing or not finite")
        return True
    except Exception as err:  # no compiler, unsupported build, ...: eager is always correct
        log.warning("compile: torch.compile is unavailable here (%s); running eagerly",
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        return False


def compiled(module: torch.nn.Module, method: str = "forward", flag: bool | None = None) -> Callable[..., Any]:
    """``module.<method>`` as a callable of its inputs: compiled when requested and available, else the eager
    bound method.

    The compiled code is kept per (class, method), with the module passed as an argument, so networks of one
    architecture share their graphs (dynamo guards on the parameters' shapes, not on which module) and nothing
    here keeps a network alive. Only plain methods are compiled: a module with forward hooks (opacus' grad
    sampler, for one) keeps its eager call, hooks included.
    """
    bound = getattr(module, method)
    if not (requested(flag) and available()) or module._forward_hooks or module._forward_pre_hooks:
        return module if method == "forward" else bound
    key = (type(module), method)
    wrapper = _COMPILED.get(key)
    if wrapper is None:
        # dynamic=None: a batch dimension seen with a second size is compiled once more as dynamic (the real
        # side's last chunk varies with the Poisson batch), not once per size.
        wrapper = _COMPILED[key] = torch.compile(getattr(type(module), method))
    return functools.partial(wrapper, module)
