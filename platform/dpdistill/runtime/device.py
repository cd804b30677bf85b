"""The job's compute device: one resolver for every pipeline, and the preflight that refuses an absent device.

A spec's ``device`` (``cpu | cuda | cuda:N | mps | auto``) is checked in each pipeline's ``prepare`` by
:func:`check_device`, before any data is read and before the run folder exists, so ``device: cuda`` on a machine
without CUDA is one line and exit 2, not a failure after the budget was spent. ``execute`` then resolves it once
with :func:`resolve_device` and passes the ``torch.device`` down to the method, the evaluation and the SFDD
clients, and :func:`record_device` writes the device actually used to status.json, the summary and MLflow.

Where the check runs: the job's process (the driver). The methods run there, and Ray tasks and actors that
take part (utility evaluation, SFDD clients) ask Ray for GPU shares (:func:`ray_gpus`) and use the device the
driver resolved. A submitted job's driver is placed by the spec's ``resources`` (``resources.gpus: 1`` puts it on
a GPU node, where the check passes); ``dpdistill submit`` refuses a CUDA job that reserves no GPU. The driver's
reservation and its tasks' shares are separate Ray resources: on a one-GPU cluster reserve a fraction for the
driver (``resources.gpus: 0.5``) or turn ``evaluation.parallel`` off, or the evaluation tasks wait for a GPU.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from dpdistill.errors import SpecError

# What JobSpec.device accepts (spec.py validates the spelling; this module what the machine can do).
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` a spec's ``device`` names in this process: ``auto`` is cuda when available, else cpu.

    No availability check (that is :func:`check_device`, run in ``prepare``): a Ray worker resolves the name
    the driver sent on its own side.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cuda_build() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} built for CPU"
    return f"torch {torch.__version__} built for CUDA {torch.version.cuda}, but no usable GPU is visible"


def check_device(name: str, where: str = "this machine") -> None:
    """Refuse (one-line SpecError naming field 'device') a device ``where`` does not have: cuda, cuda:N, mps.

    ``cpu`` and ``auto`` always pass. ``where`` names the place checked in the message (the job's process).
    """
    if name in ("cpu", "auto"):
        return
    cuda = _CUDA.fullmatch(name)
    if cuda is not None:
        if not torch.cuda.is_available():
            raise SpecError(f"field 'device': {name} requested but torch.cuda.is_available() is False on {where} "
                            f"({_cuda_build()}); use device: cpu or auto")
        count = torch.cuda.device_count()
        if cuda.group(1) is not None and int(cuda.group(1)) >= count:
            raise SpecError(f"field 'device': {name} requested but {where} has {count} CUDA device(s) "
                            f"(cuda:0 to cuda:{count - 1}); use device: cuda, a listed index, or auto")
        return
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise SpecError(f"field 'device': mps requested but torch.backends.mps.is_available() is False on "
                            f"{where} (torch {torch.__version__}); use device: cpu or auto")
        return
    raise SpecError(f"field 'device': expected cpu, cuda, cuda:N, mps or auto, got '{name}'")


def ray_gpus(device: torch.device, sharing: int = 1) -> float:
    """The GPUs one Ray task or actor working on ``device`` asks for: none off CUDA, else a 1/``sharing`` share.

    The request is what places the worker on a GPU node and pins CUDA_VISIBLE_DEVICES to its share (Ray 2.60
    leaves a worker that asks for none seeing every GPU of its node, so it would use GPUs nothing reserved, or
    land on a CPU node); ``sharing`` workers that run at once (evaluation seeds, client actors) share one GPU,
    which small evaluation and matching networks fill far from fully.
    """
    if device.type != "cuda":
        return 0.0
    return 1.0 / max(1, int(sharing))


def worker_device(device: torch.device) -> str:
    """The device name a Ray task or actor uses for the driver's resolved ``device``.

    Ray shows a worker only the GPUs it was assigned, numbered from 0, so the driver's ``cuda:N`` is the
    worker's ``cuda``; any other device is passed as it is.
    """
    return "cuda" if device.type == "cuda" else str(device)


def record_device(ctx: Any, device: torch.device) -> None:
    """Say which device the run actually used: status.json ``device``, a summary row, an MLflow tag."""
    ctx.run.set_status("running", device=str(device))
    ctx.add_summary("device", str(device) if str(device) == ctx.spec.device
                    else f"{device} (device: {ctx.spec.device})")
    ctx.tracker.set_tags({"dpdistill.device": str(device)})
