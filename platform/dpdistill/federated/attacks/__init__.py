"""Attacks on SFDD: a curious server inverting gradients (DLG, iDLG) and malicious clients planting a backdoor
(Doorping). They measure the defences; nothing here is used by an honest run."""

from __future__ import annotations

from dpdistill.federated.attacks.dlg import (
    AttackResult,
    attack_records,
    dlg,
    idlg_label,
    observed_gradient,
    reconstruction_mse,
)
from dpdistill.federated.attacks.doorping import DoorpingClient, attack_success_rate, evaluate_backdoor, stamp

__all__ = [
    "AttackResult",
    "DoorpingClient",
    "attack_records",
    "attack_success_rate",
    "dlg",
    "evaluate_backdoor",
    "idlg_label",
    "observed_gradient",
    "reconstruction_mse",
    "stamp",
]
