"""A data owner's privacy budget across runs: a persistent store, keyed by the sensitive data's content.

A run's ledger bounds what that run releases. Nothing stops the next run on the same records from spending a
fresh budget, so an owner who wants a total over every run (and every sweep trial) names one:
``privacy.owner_budget`` (ε) in the job spec. The store (``privacy.budget_store``, else ``$DPDISTILL_BUDGETS``,
else ``<runs-dir>/budgets/``) holds one account file per dataset: its total (ε, δ) and one entry per run.

Identity. An account is keyed by a content fingerprint of the records the owner holds: HMAC-SHA256, under a
secret key kept in the store (``.owner-key``, 32 random bytes, mode 0600, written with the first account), over the
sorted per-record digests (image tensor at native size plus label) of the training and validation splits together.
Keyed because the fingerprint is shown (account file name, run summary, MLflow tag): an unkeyed hash of the
records would let anyone who holds every record but one test that record's membership exactly.
So the key does not depend on the run (train_limit, val_seed, image_size, record order) or on where the files
live: the same records copied to another folder are the same account.

One split per account. A run's ledger bounds add-or-remove-one of ITS training split, which the platform cuts
from the owner's records by position (``data.val_seed`` chooses the validation records, ``data.train_limit`` a
prefix of the shuffled rest). Runs on different cuts read overlapping records in different roles, and adding
one owner record can move many records between the cuts, so their ledgers do not compose into a bound for the
owner's records. An account therefore records the split of its first run (``val_seed``, ``train_limit``) and
refuses a run with another one, rather than add up figures that do not bound anything.
The dataset's name and resolved root are recorded beside the key, for people. A set that differs by one record
is, by content, another dataset: the store cannot know two files belong to one owner.

Order: reserve, run, settle. Before the run folder exists the runner *reserves* the run's whole planned budget
(its ``privacy.epsilon`` at its δ): the reservation must fit the owner's total together with everything already
in the account, or the run is refused (BudgetExceeded, nothing written). After the run the reservation is
*settled*: replaced by the mechanisms the run's ledger actually charged. A run that crashes leaves its
reservation in place, so the account never counts less than what may have been released.

Composition. Settled runs contribute their ledgers' mechanisms, composed by PLD with every other run's
(sequentially: every run may read every record). A reservation is a run not yet known beyond "(ε, δ)-DP", so it
enters as the dominating pair of every (ε, δ)-DP mechanism (dp-accounting's ``from_privacy_parameters``; its
δ is an atom at infinite loss). The account's ε is read at the owner's δ, which therefore must exceed the δ of
every reservation pending at once: ``privacy.owner_delta``, by default 1/(2N) for the owner's N records (twice
the largest-δ rule the platform applies to one run, δ < 1/n, would allow none; runs default to 1/(n ln n)).

Writers serialise on an exclusive ``flock`` of the store folder and write account files atomically (fsynced),
as the ledger does. Selection on the sensitive validation split is not charged here (see the sweep summary).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dpdistill.errors import BudgetExceeded, PrivacyError
from dpdistill.privacy.analysis import pld as pld_analysis
from dpdistill.privacy.defaults import validate_delta, validate_epsilon
from dpdistill.privacy.ledger import BUDGET_REL_TOL, atomic_write_text, ledger_digest
from dpdistill.privacy.mechanisms import Mechanism, mechanism_from_dict
from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE

FORMAT = "dpdistill.owner-budget/1"
ENV_STORE = "DPDISTILL_BUDGETS"
RESERVED = "reserved"
CHARGED = "charged"
_FINGERPRINT_TAG = b"dpdistill.dataset-records/1\n"
KEY_FILE = ".owner-key"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ------------------------------------------------------------------------------------------------ identity


@dataclass(frozen=True)
class DatasetIdentity:
    """Which records an account covers: the content fingerprint (the key), plus name and root for people."""

    name: str
    root: str
    fingerprint: str
    n_records: int

    def describe(self) -> str:
        return f"{self.name} ({self.n_records} records, {self.fingerprint[:12]})"


def record_digests(images: Any, labels: Any) -> list[bytes]:
    """One sha256 per record over its label and its image tensor's bytes (dtype and shape included)."""
    import numpy as np

    x = images.detach().cpu().contiguous().numpy() if hasattr(images, "detach") else np.ascontiguousarray(images)
    y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if len(x) != len(y):
        raise PrivacyError(f"fingerprint: {len(x)} images but {len(y)} labels")
    head = f"{x.dtype.str}{tuple(x.shape[1:])}".encode()
    out = []
    for i in range(len(x)):
        h = hashlib.sha256(head)
        h.update(int(y[i]).to_bytes(8, "little", signed=True))
        h.update(x[i].tobytes())
        out.append(h.digest())
    return out


def fingerprint(*parts: tuple[Any, Any], key: bytes) -> tuple[str, int]:
    """HMAC-SHA256 under ``key`` over the sorted record digests of (images, labels) parts, and the record count.

    Sorted, so neither the order of the records nor how they are split between the parts changes it; keyed, so
    nobody without the store's key can recompute it with and without a record.
    """
    if not isinstance(key, bytes) or len(key) < 16:
        raise PrivacyError("fingerprint: the store key must be at least 16 bytes")
    digests = sorted(d for images, labels in parts for d in record_digests(images, labels))
    h = hmac.new(key, _FINGERPRINT_TAG, hashlib.sha256)
    for d in digests:
        h.update(d)
    return h.hexdigest(), len(digests)


def store_key(store: Path) -> tuple[bytes, bool]:
    """The store's secret fingerprint key and whether it is on disk (a new store gets a fresh one in memory)."""
    path = Path(store) / KEY_FILE
    if path.exists():
        key = path.read_bytes()
        if len(key) < 16:
            raise PrivacyError(f"{path}: the budget store's key is damaged (expected 32 random bytes)")
        return key, True
    return secrets.token_bytes(32), False


def _persist_key(store: Path, key: bytes) -> None:
    """Write a new store's key (0600, exclusive); refuse if another process created a different one meanwhile."""
    path = Path(store) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.read_bytes() != key:
            raise PrivacyError(f"{store}: another run opened this budget store at the same moment; run again") \
                from None
        return
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())


def dataset_identity(spec: Any, key: bytes) -> DatasetIdentity:
    """The identity of the sensitive data a job spec reads: its training and validation records at native size.

    Reads the data (never the run folder): call it after the pipeline's ``prepare`` has checked the data is there.
    """
    from dpdistill import data

    source = data.get(spec.data.name)
    if source.info.needs_root:
        where = spec.data.root if spec.data.root else data.default_root()
        root = str(Path(where).expanduser().resolve()) if where else ""
    else:
        root = "embedded"
    # Native size and both sensitive splits: train_limit, image_size and val_seed select from the same records.
    splits = data.load_splits(spec.data.name, root=spec.data.root, download=False, image_size=None,
                              val_seed=spec.data.val_seed)
    fp, n = fingerprint(*((splits[s].images, splits[s].labels) for s in ("train", "val")), key=key)
    return DatasetIdentity(name=source.info.name, root=root, fingerprint=fp, n_records=n)


def default_owner_delta(n_records: int) -> float:
    """δ of an owner's total when the spec gives none: 1/(2N) for the owner's N records (see the module doc)."""
    return 1.0 / (2.0 * int(n_records))


def resolve_store(configured: str | os.PathLike[str] | None, runs_dir: str | os.PathLike[str]) -> Path:
    """The store folder: the spec's ``privacy.budget_store``, else ``$DPDISTILL_BUDGETS``, else ``<runs>/budgets``."""
    if configured:
        return Path(configured).expanduser().resolve()
    env = os.environ.get(ENV_STORE, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    return (Path(runs_dir).expanduser() / "budgets").resolve()


# ------------------------------------------------------------------------------------------------ composition


def _generic_pld(epsilon: float, delta: float, interval: float) -> Any:
    """The dominating pair of every (ε, δ)-DP mechanism, under either neighbouring relation."""
    from dp_accounting.pld import common as pld_common
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    params = pld_common.DifferentialPrivacyParameters(epsilon=float(epsilon), delta=float(delta))
    return pld_lib.from_privacy_parameters(params, value_discretization_interval=interval)


def composed_epsilon(mechanisms: list[Mechanism], pending: list[tuple[float, float]], delta: float) -> float:
    """ε at ``delta`` of ``mechanisms`` composed by PLD with one generic (ε, δ)-DP part per ``pending`` pair."""
    leaves = tuple(leaf for m in mechanisms for leaf in m.leaves())
    if not leaves and not pending:
        return 0.0
    if leaves:
        interval = pld_analysis.interval_for_leaves(leaves)
    else:
        interval = min(pld_analysis.MAX_INTERVAL, min(e for e, _ in pending) / 100.0)
    pld = pld_analysis.compose(leaves, interval, ADD_OR_REMOVE_ONE)
    for eps, d in pending:
        pld = pld.compose(_generic_pld(eps, d, interval))
    return pld_analysis.epsilon_for_delta(pld, delta)


# ------------------------------------------------------------------------------------------------ the account


class OwnerBudget:
    """One data owner's account in a budget store: the total (ε, δ) and every run's reservation or charges."""

    def __init__(self, store: Path | str, identity: DatasetIdentity, epsilon_total: float | None = None,
                 delta: float | None = None, *, new_key: bytes | None = None,
                 split: dict[str, Any] | None = None) -> None:
        self.store = Path(store)
        self.identity = identity
        self.split = dict(split or {})
        # A new store's key, written with its first reservation (a refused first run leaves nothing behind).
        self._new_key = new_key
        self.path = self.store / f"{identity.fingerprint}.json"
        data = _read(self.path) if self.path.exists() else None
        if data is not None:
            recorded = (data["epsilon_total"], data["delta"])
            if epsilon_total is not None and float(epsilon_total) != recorded[0]:
                raise PrivacyError(
                    f"privacy.owner_budget={epsilon_total:g} but the budget store {self.path} records the owner's "
                    f"total ε={recorded[0]:g} for {identity.describe()}; the total is fixed when the account "
                    "is opened (set privacy.owner_budget to it)"
                )
            if delta is not None and float(delta) != recorded[1]:
                raise PrivacyError(
                    f"privacy.owner_delta={delta:g} but the budget store {self.path} records δ={recorded[1]:g} "
                    f"for {identity.describe()}; leave privacy.owner_delta unset or give the recorded value"
                )
            self.epsilon_total, self.delta = recorded
            held = data.get("split")
            if held is not None and split is not None and held != self.split:
                raise PrivacyError(
                    f"owner budget for {identity.describe()} ({self.path}) covers runs on the split {held}; this run "
                    f"cuts {self.split}: their ledgers do not compose into a bound for the owner's records "
                    "(use the account's data.val_seed / data.train_limit)"
                )
            if held is not None:
                self.split = held
        else:
            if epsilon_total is None:
                raise PrivacyError(f"{self.path}: no account for {identity.describe()} in this budget store")
            self.epsilon_total = validate_epsilon(epsilon_total, "privacy.owner_budget")
            self.delta = validate_delta(delta if delta is not None else default_owner_delta(identity.n_records),
                                        "privacy.owner_delta")

    # -- reading -----------------------------------------------------------------------------------------

    def _load_entries(self) -> list[dict[str, Any]]:
        return list(_read(self.path)["entries"]) if self.path.exists() else []

    @staticmethod
    def _parts(entries: list[dict[str, Any]]) -> tuple[list[Mechanism], list[tuple[float, float]]]:
        mechanisms: list[Mechanism] = []
        pending: list[tuple[float, float]] = []
        for e in entries:
            if e["state"] == RESERVED:
                pending.append((float(e["epsilon_budget"]), float(e["delta"])))
            else:
                mechanisms.extend(mechanism_from_dict(m) for m in e.get("mechanisms", []))
        return mechanisms, pending

    def spent(self, extra: list[tuple[float, float]] | None = None) -> float:
        """The account's composed ε at its δ (settled charges and pending reservations), plus ``extra`` runs."""
        mechanisms, pending = self._parts(self._load_entries())
        return composed_epsilon(mechanisms, pending + list(extra or []), self.delta)

    def fits(self, epsilon: float) -> bool:
        return epsilon <= self.epsilon_total * (1.0 + BUDGET_REL_TOL)

    def refusal(self, what: str, epsilon: float, delta: float, count: int, total: float) -> BudgetExceeded:
        """The one-line refusal for ``count`` runs of (ε, δ) that would bring the account to ``total``."""
        runs = "a run" if count == 1 else f"{count} runs"
        if math.isinf(total):
            held = math.fsum(d for _, d in self._parts(self._load_entries())[1])
            why = (f"but δ {count * delta:.3g} (+ {held:.3g} held by pending reservations) leaves no finite ε at the "
                   f"owner's δ={self.delta:.3g}: each run's δ must be well below the owner's (lower privacy.delta, "
                   "or raise privacy.owner_delta when the account is opened)")
        else:
            why = f"which would bring the owner's ε to {total:.4g} > total {self.epsilon_total:g} at δ={self.delta:.3g}"
        return BudgetExceeded(
            f"owner budget for {self.identity.describe()} ({self.path}): {what} reserves {runs} of ε {epsilon:g} "
            f"at δ={delta:.3g}, {why}; already spent or reserved: ε {self.spent():.4g}; nothing was run"
        )

    def to_dict(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        mechanisms, pending = self._parts(entries)
        total = composed_epsilon(mechanisms, pending, self.delta)
        return {
            "format": FORMAT,
            "fingerprint": self.identity.fingerprint,
            "n_records": self.identity.n_records,
            "split": self.split,
            "datasets": self._datasets(),
            "neighbouring": ADD_OR_REMOVE_ONE,
            "epsilon_total": self.epsilon_total,
            "delta": self.delta,
            "composed": {
                "epsilon": total,
                "delta": self.delta,
                "epsilon_remaining": max(0.0, self.epsilon_total - total),
                "runs_charged": sum(e["state"] == CHARGED for e in entries),
                "reservations_pending": len(pending),
            },
            "entries": entries,
        }

    def _datasets(self) -> list[dict[str, str]]:
        seen = _read(self.path).get("datasets", []) if self.path.exists() else []
        mine = {"name": self.identity.name, "root": self.identity.root}
        return seen if mine in seen else [*seen, mine]

    # -- writing -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.store.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.store, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, entries: list[dict[str, Any]]) -> None:
        text = json.dumps(self.to_dict(entries), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        atomic_write_text(self.path, text)

    def check(self, what: str, epsilon: float, delta: float, count: int = 1) -> float:
        """Refuse (BudgetExceeded) unless ``count`` more runs of (ε, δ) fit; returns the composed ε. Writes nothing."""
        total = self.spent([(epsilon, delta)] * count)
        if not self.fits(total):
            raise self.refusal(what, epsilon, delta, count, total)
        return total

    def reserve(self, job: str, epsilon: float, delta: float) -> str:
        """Reserve a run's whole planned (ε, δ) if it fits; returns the reservation's id.

        Refused (BudgetExceeded) with nothing written — not even the store folder — when it does not fit.
        """
        epsilon, delta = validate_epsilon(epsilon), validate_delta(delta)
        self.check(f"job '{job}'", epsilon, delta)  # unlocked and read-only: a refusal creates nothing
        with self._lock():
            if self._new_key is not None:
                _persist_key(self.store, self._new_key)
                self._new_key = None
            entries = self._load_entries()
            self.check(f"job '{job}'", epsilon, delta)  # again under the lock: another run may have reserved
            rid = uuid.uuid4().hex
            entries.append({"id": rid, "job": job, "state": RESERVED, "epsilon_budget": epsilon, "delta": delta,
                            "reserved_at": _now(), "run_dir": None, "status": "reserved"})
            self._write(entries)
        return rid

    def settle(self, reservation: str, ledger: Any | None, run_dir: Path | str | None, status: str) -> float:
        """Replace a reservation by what the run's ledger charged (nothing if it has none); returns the account's ε.

        What was charged is what may have been released, so this is recorded even if it no longer fits (it
        cannot when the reservation fitted: a run's ledger keeps it within the (ε, δ) it reserved).
        """
        mechanisms: list[dict[str, Any]] = []
        digest = None
        run_epsilon = 0.0
        if ledger is not None:
            if ledger.neighbouring != ADD_OR_REMOVE_ONE:
                raise PrivacyError(f"owner budget: the run's ledger is {ledger.neighbouring}; the store composes "
                                   f"{ADD_OR_REMOVE_ONE} charges only")
            mechanisms = [m.to_dict() for m in ledger.mechanisms]
            run_epsilon = ledger.spent_epsilon()
            if ledger.path is not None and Path(ledger.path).exists() and mechanisms:
                digest = ledger_digest(ledger.path)
        with self._lock():
            entries = self._load_entries()
            matches = [e for e in entries if e["id"] == reservation]
            if not matches:
                raise PrivacyError(f"{self.path}: no reservation {reservation} to settle")
            e = matches[0]
            e.update({"state": CHARGED, "mechanisms": mechanisms, "epsilon_run": run_epsilon,
                      "ledger_sha256": digest, "run_dir": str(run_dir) if run_dir is not None else None,
                      "status": status, "charged_at": _now()})
            self._write(entries)
        return self.spent()

    def summary(self) -> str:
        """One line for the run summary: what the owner's account holds now."""
        entries = self._load_entries()
        pending = sum(e["state"] == RESERVED for e in entries)
        spent = self.spent()
        return (f"ε {spent:.3f} of the owner's {self.epsilon_total:g} at δ={self.delta:.2e} spent on "
                f"{self.identity.describe()} over {sum(e['state'] == CHARGED for e in entries)} run(s)"
                + (f", {pending} reservation(s) pending" if pending else "") + f"; store {self.path}")


def open_for_spec(spec: Any, runs_dir: str | os.PathLike[str]) -> OwnerBudget:
    """The owner account a private job spec with ``privacy.owner_budget`` charges (reads the data to key it)."""
    store = resolve_store(spec.privacy.budget_store, runs_dir)
    key, on_disk = store_key(store)
    return OwnerBudget(store, dataset_identity(spec, key), spec.privacy.owner_budget, spec.privacy.owner_delta,
                       new_key=None if on_disk else key,
                       split={"val_seed": spec.data.val_seed, "train_limit": spec.data.train_limit})


# ------------------------------------------------------------------------------------------------ the store


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrivacyError(f"{path}: no owner budget account here") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrivacyError(f"{path}: not a readable owner budget account ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PrivacyError(f"{path}: not a dpdistill owner budget account (expected format {FORMAT!r})")
    for key in ("fingerprint", "epsilon_total", "delta", "entries"):
        if key not in data:
            raise PrivacyError(f"{path}: owner budget account is missing {key!r}")
    return data


def read_store(path: Path | str) -> list[dict[str, Any]]:
    """Every account in a store folder (or the one account file ``path``), as written, oldest file first."""
    path = Path(path)
    if path.is_file():
        return [_read(path)]
    if not path.is_dir():
        raise PrivacyError(f"{path}: no budget store here (a folder of owner budget accounts, e.g. runs/budgets)")
    accounts = []
    for p in sorted(path.glob("*.json"), key=lambda p: p.stat().st_mtime):
        with contextlib.suppress(PrivacyError):
            accounts.append({**_read(p), "path": str(p)})
    return accounts
