"""The privacy ledger: every charge checked against the budget, persisted, then released. Never the reverse.

``charge`` composes the new mechanism with every recorded one by PLD and refuses (``BudgetExceeded``,
nothing recorded, the file untouched) if the composed ε at the ledger's δ would exceed the budget. A check
that passes is appended and written to ``ledger.json`` atomically and durably (temporary file in the same
folder, flush + fsync, ``os.replace``, fsync of the folder) before ``charge`` returns, so a crash leaves
either the old file or the new one, never a torn one, and a ledger reopened on the file reloads every charge.

A ledger is one run's budget. Runs are not resumed: a rerun gets a new folder and a fresh ledger. What spans
runs is the data owner's budget store (:mod:`dpdistill.privacy.owner_budget`, ``privacy.owner_budget``), which
every run on the same sensitive data charges; a sweep composes its trials' ledgers into its own.

Budget tolerance: a charge passes if the composed ε ≤ budget·(1 + 1e-9). The slack absorbs float rounding
only (a σ calibrated to exactly fill the budget must pass); it is nine orders below any accountant error.

All charges are composed on one discretisation grid (see analysis/pld.py). If a new charge needs a finer
grid, everything is recomposed on it, and the total can come out marginally below the previous total:
both are valid upper bounds, the finer one is tighter.

Several writers. ``charge`` holds an exclusive ``flock`` on the ledger's folder from reading the file to
writing it, and first adopts any charges another process (or another ledger object) added to the file since this
one last wrote it. So concurrent charges to one ledger file serialise, each is checked against everything
recorded before it, and none is lost. ``charge_many`` records a set of charges (a method's whole plan) the same
way in one step: all or nothing, with no other writer's charge between its parts. (flock is advisory and local: a
ledger on a network file system shared by several hosts still needs one writer per file.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dpdistill.errors import BudgetExceeded, PrivacyError
from dpdistill.privacy.analysis import pld as pld_analysis
from dpdistill.privacy.analysis.rdp import rdp_epsilon
from dpdistill.privacy.defaults import check_delta, validate_delta, validate_epsilon, validate_n
from dpdistill.privacy.mechanisms import Composed, Mechanism, mechanism_from_dict
from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE, check_relation, validate_neighbouring

FORMAT = "dpdistill.ledger/1"
# The platform's one budget tolerance (see "Budget tolerance" above): every check of a total against a budget
# (this ledger, the data owner's store, sweeps, the synthesisers' targets, the σ solver) imports it from here.
BUDGET_REL_TOL = 1e-9


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open folders; the replace itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash at any point leaves the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


class PrivacyLedger:
    """A job's privacy budget and every charge against it, composed by PLD and persisted to ledger.json.

    ``path=None`` keeps the ledger in memory (for checks before a run folder exists). If ``path`` exists,
    the ledger resumes from it; the budget, δ, n and relation given must match the file's.
    """

    def __init__(
        self,
        path: Path | str | None,
        epsilon_budget: float,
        delta: float,
        n_records: int | None = None,
        neighbouring: str = ADD_OR_REMOVE_ONE,
        noise: str = "secret",
        caveat: str | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        # Where the noise of the charged releases came from: "secret" (OS entropy) or "reproducible" (derived
        # from the public spec.seed, a debugging mode: the charges then describe noise anyone can subtract).
        if noise not in ("secret", "reproducible"):
            raise PrivacyError(f"ledger: noise must be 'secret' or 'reproducible', got {noise!r}")
        self.noise = noise
        # Why the composed ε does not describe the release (e.g. a choice made on sensitive data uncharged).
        self.caveat = caveat
        self.epsilon_budget = validate_epsilon(epsilon_budget, "epsilon_budget")
        self.delta = validate_delta(delta)
        self.n_records = validate_n(n_records) if n_records is not None else None
        if self.n_records is not None:
            check_delta(self.delta, self.n_records)
        self.neighbouring = validate_neighbouring(neighbouring)
        self._entries: list[dict[str, Any]] = []
        self._mechanisms: list[Mechanism] = []
        self._total: float = 0.0
        # The composed PLD of every charge at _pld_interval, so a charge composes one new part, not all.
        self._pld: Any = None
        self._pld_interval: float | None = None
        if self.path is not None and self.path.exists():
            self._resume(self.path)

    # -- persistence -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str) -> PrivacyLedger:
        """Reload a ledger from its file (budget, δ, relation and every charge); the total is recomputed."""
        path = Path(path)
        data = _read(path)
        return cls(
            path,
            epsilon_budget=data["epsilon_budget"],
            delta=data["delta"],
            n_records=data.get("n_records"),
            neighbouring=data.get("neighbouring", ADD_OR_REMOVE_ONE),
            noise=data.get("noise", "secret"),
            caveat=(None if str(data.get("guarantee", "")).startswith("(ε, δ)-DP")
                    or data.get("noise", "secret") != "secret" else data.get("guarantee")),
        )

    def _resume(self, path: Path) -> None:
        data = _read(path)
        for key, mine in (
            ("epsilon_budget", self.epsilon_budget),
            ("delta", self.delta),
            ("n_records", self.n_records),
            ("neighbouring", self.neighbouring),
        ):
            if data.get(key) != mine:
                raise PrivacyError(
                    f"{path}: resuming with {key}={mine!r} but the ledger records {key}={data.get(key)!r}; "
                    "a run's budget cannot change once charged"
                )
        try:
            entries = list(data["entries"])
            mechanisms = [mechanism_from_dict(e["mechanism"]) for e in entries]
        except (KeyError, TypeError) as err:
            raise PrivacyError(f"{path}: malformed ledger entries ({err})") from None
        self._entries = entries
        self._mechanisms = mechanisms
        if mechanisms:
            self._pld, self._pld_interval = self._compose(mechanisms)
            self._total = pld_analysis.epsilon_for_delta(self._pld, self.delta)

    def to_dict(self) -> dict[str, Any]:
        """The ledger as written to ledger.json: budget, every charge and the composed (ε, δ)."""
        return {
            "format": FORMAT,
            "neighbouring": self.neighbouring,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "n_records": self.n_records,
            "noise": self.noise,
            "guarantee": ("NOT PRIVATE: the noise was derived from spec.seed (privacy.reproducible_noise)"
                          if self.noise != "secret" else self.caveat or "(ε, δ)-DP as composed below"),
            "accountant": {
                "authority": "pld",
                "library": _dp_accounting_version(),
                "value_discretization_interval": self._pld_interval,
                "budget_rel_tol": BUDGET_REL_TOL,
            },
            "composed": {
                "epsilon": self._total,
                "delta": self.delta,
                "epsilon_remaining": self.remaining_epsilon(),
                "charges": len(self._entries),
            },
            "entries": [dict(e) for e in self._entries],
        }

    def _write(self) -> None:
        if self.path is None:
            return
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        atomic_write_text(self.path, text)

    # -- accounting ------------------------------------------------------------------------------------

    @staticmethod
    def _interval(mechanisms: list[Mechanism]) -> float:
        return pld_analysis.interval_for_leaves([leaf for m in mechanisms for leaf in m.leaves()])

    def _compose(self, mechanisms: list[Mechanism]) -> tuple[Any, float]:
        for m in mechanisms:
            check_relation(m, self.neighbouring)
        interval = self._interval(mechanisms)
        leaves = tuple(leaf for m in mechanisms for leaf in m.leaves())
        return pld_analysis.compose(leaves, interval, self.neighbouring), interval

    def _compose_epsilon(self, mechanisms: list[Mechanism]) -> float:
        if not mechanisms:
            return 0.0
        return pld_analysis.epsilon_for_delta(self._compose(mechanisms)[0], self.delta)

    def _with(self, mechanism: Mechanism) -> tuple[Any, float]:
        """The composed PLD and its interval if ``mechanism`` were added."""
        if not isinstance(mechanism, Mechanism):
            raise PrivacyError(
                f"mechanism must be a dpdistill.privacy mechanism, got {type(mechanism).__name__}"
            )
        check_relation(mechanism, self.neighbouring)
        interval = self._interval([*self._mechanisms, mechanism])
        if self._pld is None or interval != self._pld_interval:
            # Every part must be on the same grid: recompose from the start (the same sequence of
            # operations as composing incrementally, so a reloaded ledger gets the same figure).
            return self._compose([*self._mechanisms, mechanism])
        pld = self._pld
        for leaf in mechanism.leaves():
            pld = pld.compose(pld_analysis.leaf_pld(leaf, self._pld_interval, self.neighbouring))
        return pld, self._pld_interval

    def would_cost(self, mechanism: Mechanism) -> float:
        """The composed ε (PLD, at the ledger's δ) if ``mechanism`` were charged now; records nothing."""
        return pld_analysis.epsilon_for_delta(self._with(mechanism)[0], self.delta)

    def charge(self, component: str, mechanism: Mechanism, note: str = "") -> float:
        """Record a release of ``mechanism`` by ``component`` if the budget allows; returns the total ε after.

        Raises BudgetExceeded (nothing recorded, file untouched) if the composed ε would exceed the budget.
        Call it before the release: the charge is on disk when this returns.
        """
        return self.charge_many([(component, mechanism, note)])

    def charge_many(self, charges: Sequence[tuple[str, Mechanism, str]]) -> float:
        """Record several releases ``(component, mechanism, note)`` as one step; returns the total ε after.

        All or nothing, under one lock and one file write: another writer can neither slip a charge between
        them nor see some of them, and if the whole set does not fit the budget (or the write fails) nothing is
        recorded. A multi-release plan (:meth:`dpdistill.privacy.plan.Plan.charge`) is charged this way.
        """
        charges = list(charges)
        if not charges:
            raise PrivacyError("charge_many: no charges given")
        for component, _, _ in charges:
            if not isinstance(component, str) or not component.strip():
                raise PrivacyError(f"component must be a non-empty name, got {component!r}")
        with self._file_lock():
            self._adopt_charges_on_disk()
            return self._charge_locked(charges)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Exclusive flock on the ledger's folder (no lock file is left behind; nothing for in-memory ledgers)."""
        if self.path is None:
            yield
            return
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _adopt_charges_on_disk(self) -> None:
        """Take in charges another writer appended to the file since this object last wrote it.

        The file must still begin with exactly this ledger's charges (compared entry by entry, in full) and
        state the same budget, δ, n and relation; anything else means another writer replaced it, and
        overwriting it would erase charges that were paid for releases. A matching count is not enough.
        """
        if self.path is None or not self.path.exists():
            return
        data = _read(self.path)
        on_disk = list(data.get("entries", []))
        mine = [_canonical(e) for e in self._entries]
        header = {"epsilon_budget": self.epsilon_budget, "delta": self.delta, "n_records": self.n_records,
                  "neighbouring": self.neighbouring}
        if (len(on_disk) < len(mine) or [_canonical(e) for e in on_disk[: len(mine)]] != mine
                or any(data.get(k, ADD_OR_REMOVE_ONE if k == "neighbouring" else None) != v
                       for k, v in header.items())):
            raise PrivacyError(f"{self.path}: the file no longer holds this ledger's charges; it was replaced "
                               "or truncated by another writer")
        if len(on_disk) > len(mine):
            self._resume(self.path)

    def _charge_locked(self, charges: list[tuple[str, Mechanism, str]]) -> float:
        previous = (self._entries, self._mechanisms, self._total, self._pld, self._pld_interval)
        try:
            for component, mechanism, note in charges:
                self._append(component, mechanism, note)
            self._write()
        except BaseException:
            # Not on disk means not charged: the caller must not release, and memory must match the file.
            self._entries, self._mechanisms, self._total, self._pld, self._pld_interval = previous
            raise
        return self._total

    def _append(self, component: str, mechanism: Mechanism, note: str) -> None:
        """Add one charge in memory (the caller writes the file, or restores the state if anything fails)."""
        pld, interval = self._with(mechanism)
        total = pld_analysis.epsilon_for_delta(pld, self.delta)
        alone = pld_analysis.pld_epsilon(mechanism, self.delta, self.neighbouring)
        if not total <= self.epsilon_budget * (1.0 + BUDGET_REL_TOL):
            where = f"ledger {self.path}" if self.path else "ledger"
            raise BudgetExceeded(
                f"{where}: {component} asked for {mechanism.describe()} (ε {alone:.4g} alone), which would bring "
                f"ε to {total:.4g} > budget {self.epsilon_budget:g} at δ={self.delta:.3g}; "
                f"ε left: {self.remaining_epsilon():.4g}; nothing recorded"
            )
        entry = {
            "index": len(self._entries),
            "component": component,
            "mechanism": mechanism.to_dict(),
            "description": mechanism.describe(),
            "note": note,
            "epsilon_alone": alone,
            "epsilon_total_after": total,
            "recorded_at": _now(),
        }
        self._entries = [*self._entries, entry]
        self._mechanisms = [*self._mechanisms, mechanism]
        self._total, self._pld, self._pld_interval = total, pld, interval

    # -- reading ---------------------------------------------------------------------------------------

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The recorded charges (copies), oldest first."""
        return [dict(e) for e in self._entries]

    @property
    def mechanisms(self) -> list[Mechanism]:
        """The recorded mechanisms, oldest first."""
        return list(self._mechanisms)

    def spent_epsilon(self) -> float:
        """Composed ε (PLD) of every charge at the ledger's δ."""
        return self._total

    def remaining_epsilon(self) -> float:
        """Budget minus spent ε (never below 0). ε does not add, so this is a guide, not a charge size."""
        return max(0.0, self.epsilon_budget - self._total)

    def composed(self) -> Mechanism | None:
        """All charges as one sequential composition (None if nothing was charged)."""
        return Composed(tuple(self._mechanisms)) if self._mechanisms else None

    def breakdown(self) -> list[dict[str, Any]]:
        """One row per charge: component, mechanism, ε alone and its share of the summed ε-alone figures.

        ε does not add under composition (the total is below the sum), so ``share`` apportions the naive sum:
        it shows which charge dominates, not an ε that charge "owns".
        """
        total_alone = math.fsum(e["epsilon_alone"] for e in self._entries)
        return [
            {
                "index": e["index"],
                "component": e["component"],
                "mechanism": e.get("description") or mechanism_from_dict(e["mechanism"]).describe(),
                "epsilon_alone": e["epsilon_alone"],
                "share": e["epsilon_alone"] / total_alone if total_alone > 0 else 0.0,
                "epsilon_total_after": e["epsilon_total_after"],
                "note": e.get("note", ""),
                "argument": e["mechanism"].get("argument", ""),
            }
            for e in self._entries
        ]

    def component_epsilons(self) -> dict[str, float]:
        """Composed ε (PLD) of each component's charges on their own."""
        by_component: dict[str, list[Mechanism]] = {}
        for e, m in zip(self._entries, self._mechanisms, strict=True):
            by_component.setdefault(e["component"], []).append(m)
        return {c: self._compose_epsilon(ms) for c, ms in by_component.items()}

    def to_mlflow_metrics(self) -> dict[str, float]:
        """Flat numeric metrics for the tracking layer (which imports mlflow; this module does not)."""
        metrics = {
            "privacy_epsilon": self._total,
            "privacy_delta": self.delta,
            "privacy_epsilon_budget": self.epsilon_budget,
            "privacy_epsilon_remaining": self.remaining_epsilon(),
            "privacy_charges": float(len(self._entries)),
        }
        composed = self.composed()
        if composed is not None:
            eps_rdp = rdp_epsilon(composed, self.delta, self.neighbouring)
            if eps_rdp is not None and math.isfinite(eps_rdp):
                metrics["privacy_epsilon_rdp"] = eps_rdp
        for component, eps in self.component_epsilons().items():
            metrics[f"privacy_epsilon_{_metric_name(component)}"] = eps
        return metrics

    def table(self):
        """The ledger as a rich Table (one row per charge, the composed total in the caption)."""
        from dpdistill.privacy.report import ledger_table

        return ledger_table(self)

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger({str(self.path)!r}, ε {self._total:.4g}/{self.epsilon_budget:g}, "
            f"δ={self.delta:.3g}, {len(self._entries)} charges)"
        )


def _metric_name(component: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; keep it to the portable subset.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", component).strip("_") or "component"


def _dp_accounting_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"dp-accounting {version('dp-accounting')}"
    except PackageNotFoundError:
        return "dp-accounting"


def _canonical(entry: dict[str, Any]) -> str:
    """One charge as canonical JSON, so an entry held in memory compares equal to its copy read from disk."""
    return json.dumps(entry, sort_keys=True, ensure_ascii=False, allow_nan=False)


def ledger_digest(path: Path | str) -> str:
    """sha256 of a ledger's charges (canonical JSON of every entry): names what a copy of it was taken from."""
    import hashlib

    entries = _read(Path(path))["entries"]
    return hashlib.sha256("\n".join(_canonical(e) for e in entries).encode("utf-8")).hexdigest()


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrivacyError(
            f"{path}: no ledger here (expected a ledger.json written by a private run)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrivacyError(f"{path}: not a readable ledger ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PrivacyError(f"{path}: not a dpdistill ledger (expected format {FORMAT!r})")
    for key in ("epsilon_budget", "delta", "entries"):
        if key not in data:
            raise PrivacyError(f"{path}: ledger is missing {key!r}")
    return data
