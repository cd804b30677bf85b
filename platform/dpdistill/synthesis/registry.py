"""The synthesis method registry: method name -> "module:Class", imported only when the method is asked for.

Naming a method here is its registration; this module imports no method module, so listing the names (spec
validation, the CLI) stays cheap and no method module has to import its package to register itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dpdistill.errors import SpecError

if TYPE_CHECKING:
    from dpdistill.synthesis.base import Synthesizer

# name -> "module:attr" (a Synthesizer subclass whose ``name`` is the key), or the class itself (a method
# registered at run time, e.g. a toy one in a test).
_METHODS: dict[str, str | type[Synthesizer]] = {
    "dp-gan": "dpdistill.synthesis.dp_gan:DPGAN",
    "dp-kernel": "dpdistill.synthesis.dp_kernel:DPKernel",
    "dp-ldm": "dpdistill.synthesis.dp_diffusion:DPLDM",
    "dp-merf": "dpdistill.synthesis.dp_merf:DPMERF",
    "dp-mepf": "dpdistill.synthesis.dp_mepf:DPMEPF",
    "dp-lora": "dpdistill.synthesis.dp_diffusion:DPLoRA",
    "dp-ntk": "dpdistill.synthesis.dp_ntk:DPNTK",
    "dpdm": "dpdistill.synthesis.dp_diffusion:DPDM",
    "gs-wgan": "dpdistill.synthesis.gs_wgan:GSWGAN",
    "pdp-diffusion": "dpdistill.synthesis.dp_diffusion:PDPDiffusion",
}


def register(name: str, target: str | type[Synthesizer]) -> None:
    """Make ``target`` ("module:Class", or the class) findable as ``get(name)``; a taken name is a ValueError."""
    key = name.lower()
    if not key or key != key.strip():
        raise ValueError(f"synthesis method name must be a non-empty identifier, got {name!r}")
    if isinstance(target, str) and target.count(":") != 1:
        raise ValueError(f"synthesis.register({name!r}): target must be 'module:Class', got {target!r}")
    if key in _METHODS and _METHODS[key] != target:
        raise ValueError(f"synthesis method {key!r} is already registered")
    _METHODS[key] = target


def names() -> list[str]:
    """The registered method names, sorted (no method module is imported)."""
    return sorted(_METHODS)


def get(name: str) -> type[Synthesizer]:
    """The Synthesizer class registered as ``name`` (its module imported now); SpecError listing the names if
    unknown."""
    key = str(name).lower()
    if key not in _METHODS:
        raise SpecError(f"unknown synthesis method '{name}'; expected one of: {', '.join(names())}")
    target = _METHODS[key]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    if getattr(target, "name", "").lower() != key:
        raise ValueError(f"synthesis method {key!r} resolves to {target!r}, whose name is {getattr(target, 'name', None)!r}")
    return target
