"""SFDD's registries: server strategies, client defences and attacks, name -> "module:attr", imported on demand.

Same style as :mod:`dpdistill.synthesis.registry` and :mod:`dpdistill.distill.registry`: naming an entry here
is its registration, and this module imports no federated module, so the choices can be listed (spec checks,
the CLI) without importing torch. ``"none"`` (no defence, no attack) is the absence of an entry, not an entry.

>>> from dpdistill.federated import registry
>>> registry.defences.names()                 # ['ldpo-rld', 'localdp']
>>> LocalDP = registry.defences.get("localdp")
"""

from __future__ import annotations

import importlib
from typing import Any

from dpdistill.errors import SpecError


class Registry:
    """One table of name -> "module:attr" (or the object itself, for one registered at run time)."""

    def __init__(self, what: str, entries: dict[str, str]) -> None:
        self.what = what
        self._entries: dict[str, str | Any] = dict(entries)

    def register(self, name: str, target: str | Any) -> None:
        """Make ``target`` ("module:attr", or the object) findable as ``get(name)``; a taken name is a
        ValueError."""
        if not name or name != name.strip() or name == "none":
            raise ValueError(f"SFDD {self.what} name must be a non-empty identifier other than 'none', got {name!r}")
        if isinstance(target, str) and target.count(":") != 1:
            raise ValueError(f"SFDD {self.what} {name!r}: target must be 'module:attr', got {target!r}")
        if name in self._entries and self._entries[name] != target:
            raise ValueError(f"SFDD {self.what} {name!r} is already registered")
        self._entries[name] = target

    def names(self) -> list[str]:
        """The registered names, sorted (nothing is imported)."""
        return sorted(self._entries)

    def choices(self) -> tuple[str, ...]:
        """What a config may name: ``"none"`` and every registered name."""
        return ("none", *self.names())

    def get(self, name: str) -> Any:
        """The object registered as ``name`` (its module imported now); SpecError listing the names if unknown."""
        if name not in self._entries:
            raise SpecError(f"unknown SFDD {self.what} '{name}'; expected one of: {', '.join(self.names())}")
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
        return target


# Server strategies: a class implementing dpdistill.federated.strategy.Strategy.
strategies = Registry("strategy", {
    "fedavg": "dpdistill.federated.strategy:FedAvg",
})

# Client defences against a curious server: what changes how a client computes or releases its update.
defences = Registry("defence", {
    "ldpo-rld": "dpdistill.federated.defences:ldpo_rld_soft_labels",
    "localdp": "dpdistill.federated.defences:LocalDP",
})

# Attacks that measure the defences: the curious server's gradient inversions (one entry point, told which by
# its ``method`` argument: DLG learns the label, iDLG reads it off the gradient) and Doorping's malicious clients.
attacks = Registry("attack", {
    "dlg": "dpdistill.federated.attacks.dlg:attack_records",
    "idlg": "dpdistill.federated.attacks.dlg:attack_records",
    "doorping": "dpdistill.federated.attacks.doorping:DoorpingClient",
})
