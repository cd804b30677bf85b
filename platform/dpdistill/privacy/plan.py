"""A privacy plan: every release a method will make, with its public parameters, known before any data is read.

The method contract is plan → charge → execute:

1. ``plan``: the method turns the budget and the public facts of the data (record count, shape, classes) into a
   :class:`Plan` — the mechanisms it will run (σ, q, steps) and the public schedule parameters ``execute``
   needs. No sensitive byte is read; σ comes from the one solver (:func:`dpdistill.privacy.dp_ops.solve_free_sigma`).
2. ``charge``: the DRIVER charges the whole plan to the ledger (:meth:`Plan.charge`), before anything is
   released. A plan the budget cannot pay is refused whole, and nothing is recorded.
3. ``execute``: the method runs the plan on the sensitive data, anywhere — in process, in a Ray task, on Ray
   Train workers. Workers receive the plan (plain numbers), never the ledger.

Because the plan is data (``to_dict`` / ``from_dict``, a ``fingerprint`` over a random ``plan_id``), the ledger
shows which plan each charge paid for (:meth:`Plan.already_charged`) and an executor's checkpoints name the plan
they belong to, so a checkpoint of another run is never resumed as this one. A plan is executed once: executing
a charged plan again would release a second, differently noised result for one charge (``Synthesizer.fit``
refuses it).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from dpdistill.errors import BudgetExceeded, PrivacyError
from dpdistill.privacy.ledger import BUDGET_REL_TOL
from dpdistill.privacy.mechanisms import Composed, Mechanism, mechanism_from_dict

PLAN_FORMAT = "dpdistill-plan/1"


def new_plan_id() -> str:
    """A fresh random plan id (not derived from the spec: runs with the same spec get different ids)."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class PlannedCharge:
    """One ledger entry the plan will make: which component releases what."""

    component: str
    mechanism: Mechanism
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"component": self.component, "mechanism": self.mechanism.to_dict(), "note": self.note}


@dataclass(frozen=True)
class Plan:
    """What a method will release (``charges``) and the public parameters its execution follows (``params``).

    ``params`` hold public numbers and names only (σ, q, steps, clip, learning rate, ...): they are charged for
    through ``charges`` or carry no information about the sensitive records. ``method`` names who made it.
    ``plan_id`` is random (:func:`new_plan_id`): two plans with the same numbers are still two plans, so the
    ledger, checkpoints and the run folder can tell which one was charged and executed.
    """

    method: str
    charges: tuple[PlannedCharge, ...]
    params: dict[str, Any] = field(default_factory=dict)
    plan_id: str = field(default_factory=lambda: new_plan_id())

    def __post_init__(self) -> None:
        if not self.charges:
            raise PrivacyError(f"{self.method}: a plan must release something (no charges)")
        try:
            json.dumps(self.params, sort_keys=True)
        except TypeError as e:
            raise PrivacyError(f"{self.method}: plan params must be plain JSON values ({e})") from None

    @property
    def mechanisms(self) -> list[Mechanism]:
        return [c.mechanism for c in self.charges]

    def would_total(self, ledger: Any) -> float:
        """The ledger's composed ε if this plan were charged now (nothing recorded)."""
        ms = self.mechanisms
        return ledger.would_cost(ms[0] if len(ms) == 1 else Composed(tuple(ms)))

    def charge(self, ledger: Any) -> float:
        """Charge every planned release to ``ledger`` (the driver's); returns the total ε after.

        All or nothing: the plan's charges go to the ledger in one locked step (``ledger.charge_many``), so a
        plan that does not fit records nothing and no other writer's charge lands between its parts. The budget
        is checked here first only for a message that names the whole plan. Call it before ``execute``.
        """
        total = self.would_total(ledger)
        if not total <= ledger.epsilon_budget * (1.0 + BUDGET_REL_TOL):
            raise BudgetExceeded(
                f"{self.method}: the plan ({'; '.join(m.describe() for m in self.mechanisms)}) would bring ε to "
                f"{total:.4g} > budget {ledger.epsilon_budget:g}; nothing recorded")
        return ledger.charge_many([(c.component, c.mechanism, f"{c.note} [{self._tag()}]".lstrip())
                                   for c in self.charges])

    def _tag(self) -> str:
        return f"plan {self.fingerprint()[:16]}"

    def already_charged(self, ledger: Any) -> bool:
        """Whether ``ledger`` already holds this plan's charges (a resumed run: do not charge twice)."""
        # By the plan's tag (its fingerprint, random plan id included) and mechanisms, not component names: a
        # wrapping ledger (DP-GenG's ComponentLedger) books the charges under its own component.
        tag = f"[{self._tag()}]"
        entries = [e["mechanism"] for e in ledger.entries if str(e.get("note", "")).endswith(tag)]
        return entries == [c.mechanism.to_dict() for c in self.charges]

    # -- as data -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "method": self.method, "plan_id": self.plan_id,
                "charges": [c.to_dict() for c in self.charges], "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != PLAN_FORMAT:
            raise PrivacyError(f"not a dpdistill plan (format {d.get('format')!r}, expected {PLAN_FORMAT})")
        charges = tuple(PlannedCharge(c["component"], mechanism_from_dict(c["mechanism"]), c.get("note", ""))
                        for c in d["charges"])
        return cls(d["method"], charges, dict(d.get("params", {})), str(d["plan_id"]))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: ties checkpoints and ledger entries to exactly this plan."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
