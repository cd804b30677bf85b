"""The Synthesizer interface every DP image synthesiser implements (DPImageBench's one-interface design).

Life cycle::

    synth = synthesis.create("dp-merf", channels=1, image_size=28, num_classes=10, seed=0, bandwidth=6.0)
    synth.pretrain(public_set)                 # optional, non-private: public data costs nothing
    report = synth.fit(sensitive_set, ledger)  # charges the ledger BEFORE each release, spends its budget
    images, labels = synth.generate(n_per_class=6000)   # post-processing: free
    synth.save("synth.pt"); synth = Synthesizer.load("synth.pt")

Privacy notion. Every ledger charge is stated for add-or-remove-one record of the sensitive split (the
platform's relation). Each method also declares the notion its paper states (``paper_neighbouring``) and how
that was converted (``privacy_note``), following DPImageBench's Appendix A: a replace-one bound on a sum of
clipped contributions (2C) becomes C under add-or-remove; the replace-one figure implied by our guarantee,
(2ε, (1 + e^ε)δ) by group privacy, is reported beside it (:attr:`FitReport.replace_one`).

Budget. ``fit(..., epsilon=E)`` spends the ledger up to a composed total of E (default: the ledger's whole
budget), so earlier charges of the same job are included: σ is calibrated against ``ledger.would_cost`` —
exactly the figure the ledger will charge — by the platform's one σ solver
(:func:`~dpdistill.privacy.dp_ops.solve_free_sigma`), and the ledger total lands within 0.3 % below E.

Randomness. Two sources, never mixed. ``seed`` drives the data-independent randomness (weight init, random
features, latents, public pretraining), which is public and worth reproducing. ``noise`` (a
:class:`~dpdistill.privacy.noise.PrivacyRandomness`, secret by default) drives every privacy noise draw and every
random decision that touches sensitive records (Poisson samples, subset assignments, private choices, opacus'
noise): a release plus its spec must not let anyone regenerate the noise and subtract it.

What is saved. ``save`` writes the config, the generator's weights and the method's released (noisy) statistics
— DP outputs only. Nothing computed from sensitive data without noise (e.g. GS-WGAN's discriminators) is ever
kept past ``fit``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dpdistill.data.base import check_finite_pixels
from dpdistill.errors import DataError, PrivacyError, SpecError
from dpdistill.evaluation.training import thread_limit
from dpdistill.privacy import ADD_OR_REMOVE_ONE, PrivacyLedger, replace_one_guarantee
from dpdistill.privacy.disclosure import ACCOUNTING, PUBLIC
from dpdistill.privacy.dp_ops import solve_free_sigma
from dpdistill.privacy.ledger import BUDGET_REL_TOL
from dpdistill.privacy.noise import PrivacyRandomness, resolve
from dpdistill.privacy.plan import Plan
from dpdistill.spec import scalar_types, type_hints

log = logging.getLogger(__name__)

FORMAT = "dpdistill.synthesizer/1"

Callback = Callable[[int, dict[str, float]], None]


@dataclass
class FitReport:
    """What ``fit`` did: the charges, the noise it calibrated, the ledger total and the time it took."""

    method: str
    epsilon: float  # the ledger's composed ε after fit (PLD, at the ledger's δ)
    delta: float
    noise: dict[str, float]  # the calibrated noise parameters (e.g. {"sigma": 0.57})
    mechanisms: list[str]  # descriptions of the charges this fit made, in order
    neighbouring: str = ADD_OR_REMOVE_ONE
    paper_neighbouring: str = ADD_OR_REMOVE_ONE
    replace_one: tuple[float, float] = (math.nan, math.nan)
    seconds: float = 0.0
    steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for metrics.json / MLflow."""
        out = {"fit_seconds": self.seconds, "fit_epsilon": self.epsilon, "fit_steps": float(self.steps)}
        out.update({f"noise_{k}": float(v) for k, v in self.noise.items()})
        out.update({k: float(v) for k, v in self.extra.items()})
        return out


# What every FitReport writes whatever the method: its metrics (``as_metrics``) and its fields (fit_report.json
# and the saved synthesiser's report, nested dicts flattened with dots).
FIT_DISCLOSURE: dict[str, str] = {
    "fit_seconds": PUBLIC,
    "fit_epsilon": ACCOUNTING,
    "fit_steps": PUBLIC,
    "method": PUBLIC,
    "epsilon": ACCOUNTING,
    "delta": ACCOUNTING,
    "mechanisms": ACCOUNTING,
    "neighbouring": PUBLIC,
    "paper_neighbouring": PUBLIC,
    "replace_one": ACCOUNTING,
    "seconds": PUBLIC,
    "steps": PUBLIC,
}


def fit_disclosure(*, noise: dict[str, str], extra: dict[str, str] | None = None,
                   stepped: dict[str, str] | None = None) -> dict[str, str]:
    """A method's declared disclosure: :data:`FIT_DISCLOSURE` plus its noise parameters, extras and callbacks.

    ``noise`` and ``extra`` are the keys of its FitReport's dicts (declared under both spellings they are
    written in: ``noise_sigma`` as a metric, ``noise.sigma`` in the report); ``stepped`` the keys its
    callback logs every few steps (MLflow only). Kinds from :mod:`dpdistill.privacy.disclosure`.
    """
    out = dict(FIT_DISCLOSURE)
    for key, kind in noise.items():
        out[f"noise_{key}"] = out[f"noise.{key}"] = kind
    for key, kind in (extra or {}).items():
        out[key] = out[f"extra.{key}"] = kind
    out.update(stepped or {})
    return out


# The one σ solver (privacy/dp_ops.py), under the name the synthesisers call it by:
# ``calibrate_for_ledger(ledger, make, target_total, guess, what)`` is the smallest noise parameter s with the
# ledger's total ε ≤ target_total after charging ``make(s)``, solved on ``ledger.would_cost`` (exactly what
# ``charge`` will compute, composed with every earlier charge), landing within SIGMA_REL_TOL below the target.
calibrate_for_ledger = solve_free_sigma


def check_config(config: Any) -> None:
    """Every number in a method config must be finite and > 0 (sizes, rates, steps): one-line SpecError.

    A field declared ``int`` takes an integer only (not 2.5, 3.0, True or "5e3", which YAML reads as a string),
    one declared ``float`` any real number, one declared ``bool`` true or false (``X | None``: also None). The
    declared types are read as the spec layer reads a job's fields (:func:`dpdistill.spec.scalar_types`), but
    stricter: a job's whole float 3.0 is coerced to 3 by its model, while a dataclass keeps what it is given, so
    3.0 would reach ``range()``. A field that may be zero (a weight decay, a dropout rate) says so in its
    metadata: ``field(default=0.0, metadata={"zero_ok": True})``.
    """
    hints = type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in hints:  # every config's annotations resolve (test_plan_contract); a guard, not a path
            raise SpecError(f"method option '{f.name}': its declared type {f.type!r} does not resolve")
        allowed = scalar_types(hints[f.name]) or set()
        if value is None and type(None) in allowed:
            continue
        kinds = allowed - {type(None)}
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if kinds == {int} and not (is_number and isinstance(value, int)):
            raise SpecError(f"method option '{f.name}' must be an integer, got {value!r}")
        if kinds in ({float}, {int, float}) and not is_number:
            raise SpecError(f"method option '{f.name}' must be a number, got {value!r}")
        if kinds == {bool} and not isinstance(value, bool):
            raise SpecError(f"method option '{f.name}' must be true or false, got {value!r}")
        if not is_number:
            continue
        zero_ok = bool(f.metadata.get("zero_ok"))
        if not math.isfinite(float(value)) or value < 0 or (value == 0 and not zero_ok):
            raise SpecError(f"method option '{f.name}' must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


class Synthesizer(ABC):
    """A DP image synthesiser: pretrain (optional) → fit (charges the ledger) → generate; save / load.

    Subclasses set ``name``, ``config_type`` (a dataclass with defaults for MNIST-scale data),
    ``paper_neighbouring`` and ``privacy_note``, build their conditional generator in :meth:`build`, and
    implement :meth:`_fit` (and :meth:`_pretrain` if they support public pretraining). Each also declares
    ``disclosure`` (see :func:`fit_disclosure`): every key its fit report and callbacks write, with its kind
    (:mod:`dpdistill.privacy.disclosure`); a number computed from sensitive records without noise has no kind
    and must not be written at all.
    """

    name: ClassVar[str] = ""
    config_type: ClassVar[type] = object
    paper_neighbouring: ClassVar[str] = ADD_OR_REMOVE_ONE
    privacy_note: ClassVar[str] = ""
    disclosure: ClassVar[dict[str, str]] = FIT_DISCLOSURE
    # Whether execute() trains through a DP-SGD executor (training.dp_sgd / runtime.dp_train), so a job may
    # shard the fit over Ray Train workers.
    runs_dp_sgd: ClassVar[bool] = False
    # Whether a fit needs pretrain() on a public set first (DP-MEPF's feature extractor): jobs refuse a spec that
    # names none before anything is read or charged.
    needs_public: ClassVar[bool] = False
    # Whether pretrain() on a public set does anything: False (dpdm, which trains from scratch) makes jobs refuse
    # a public set named for it before anything is read, rather than fail in the pretrain stage.
    pretrains_on_public: ClassVar[bool] = True
    # Options the config no longer has, with the value earlier versions resolved them to: a run folder's spec.yaml
    # or a saved synthesiser of then still loads (spec.load_run_spec, from_state) where they hold that value.
    retired_options: ClassVar[dict[str, Any]] = {}
    # Whether _pretrain is a deterministic function of (config, shape, seed, starting weights, public images) that
    # only sets the generator and extra_state, so pretrain(cache=True) may restore it from the public cache.
    pretrain_cacheable: ClassVar[bool] = False

    def __init__(self, config: Any = None, *, channels: int, image_size: int, num_classes: int,
                 seed: int = 0, device: str | torch.device = "cpu",
                 noise: PrivacyRandomness | None = None) -> None:
        self.config = config if config is not None else self.config_type()
        if not isinstance(self.config, self.config_type):
            raise SpecError(f"{self.name}: config must be a {self.config_type.__name__}, got "
                            f"{type(self.config).__name__}")
        check_config(self.config)
        for what, v in (("channels", channels), ("image_size", image_size), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DataError(f"{self.name}: {what} must be a positive integer, got {v!r}")
        if num_classes < 2:
            raise DataError(f"{self.name}: num_classes must be >= 2, got {num_classes}")
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        self.seed = int(seed)
        # The privacy randomness: secret unless the caller passed the reproducible (NOT PRIVATE) debugging mode.
        self.noise = resolve(noise)
        self.device = torch.device(device)
        self.fitted = False
        self.pretrained_on: str | None = None
        self.report: FitReport | None = None
        self.last_plan: Plan | None = None  # the plan the last fit charged and ran (plan/execute methods)
        # Model weights are seeded from the synthesiser's (public) seed; privacy noise comes from self.noise.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.generator_net: nn.Module = self.build().to(self.device)

    # -- what subclasses provide ------------------------------------------------------------------------

    @abstractmethod
    def build(self) -> nn.Module:
        """The conditional generator G(z, y) → images in [0, 1] (with a ``z_dim`` attribute)."""

    # A method implements EITHER the plan → charge → execute contract (``plan`` and ``execute``: the driver
    # charges the plan, then ``execute`` runs it anywhere — in process, on Ray Train workers — without the
    # ledger), OR ``_fit`` (charges the ledger itself, in process, before each release).

    def plan(self, n_records: int, ledger: PrivacyLedger, target_epsilon: float) -> Plan | None:
        """Every release the fit will make, σ solved against ``ledger`` up to ``target_epsilon``; reads no data.

        ``None`` (the default): the method charges inside :meth:`_fit` instead.
        """
        return None

    def check_plan(self, plan: Plan) -> None:  # noqa: B027 - optional hook, no-op by default
        """Before the charge: ``plan.params`` (what execute runs) must be what ``plan.charges`` pay for, and every
        option execute needs must be valid, so a bad option never costs budget. Methods with a plan override it."""

    def execute(self, plan: Plan, sensitive: Any, executor: Any, progress: bool,
                callback: Callback | None) -> FitReport:
        """Run a CHARGED plan on the sensitive set (on ``executor``, if the method can use one)."""
        raise NotImplementedError(f"{self.name}: plan() returned a plan but execute() is not implemented")

    def _fit(self, sensitive: Any, ledger: PrivacyLedger, target_epsilon: float, progress: bool,
             callback: Callback | None) -> FitReport:
        """Train on the sensitive set, charging ``ledger`` before each release, up to ``target_epsilon``."""
        raise NotImplementedError(f"{self.name}: implement plan()/execute() or _fit()")

    def _pretrain(self, public: Any, progress: bool) -> None:
        raise SpecError(f"{self.name}: public pretraining is not supported by this method")

    def extra_state(self) -> dict[str, Any]:
        """Released statistics to save beside the generator (DP outputs only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook, no-op by default
        """Restore what :meth:`extra_state` saved."""

    def generator_state(self) -> dict[str, torch.Tensor]:
        """The generator tensors the release holds (default: all; a LoRA method: its adapters only)."""
        return {k: v.detach().cpu() for k, v in self.generator_net.state_dict().items()}

    def load_generator_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`generator_state` saved (after :meth:`load_extra_state`)."""
        self.generator_net.load_state_dict(state)

    # -- the interface ----------------------------------------------------------------------------------

    def _check_set(self, images_set: Any, what: str) -> None:
        images = getattr(images_set, "images", None)
        labels = getattr(images_set, "labels", None)
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor) or images.ndim != 4:
            raise DataError(f"{self.name}: {what} must be an ImageSet with images [N, C, H, W] and labels [N]")
        if tuple(images.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise DataError(
                f"{self.name}: {what} images are {tuple(images.shape[1:])}; this synthesiser was built for "
                f"{(self.channels, self.image_size, self.image_size)}"
            )
        if len(images) < 2:
            raise DataError(f"{self.name}: {what} has {len(images)} records; need at least 2")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise DataError(f"{self.name}: {what} labels must lie in [0, {self.num_classes - 1}]")
        check_finite_pixels(images, f"{self.name}: {what}")  # before anything is charged

    def pretrain(self, public: Any, *, progress: bool = False, cache: bool = False) -> bool:
        """Train the generator non-privately on PUBLIC data (never the sensitive set: it is not charged).

        ``cache``: for a class with ``pretrain_cacheable``, restore the result of this exact pre-training (config,
        shape, seed, starting weights, public images, package source) from the public pre-training cache when it
        holds it, and store it there otherwise (:func:`dpdistill.synthesis.cache.cached_pretrain`). Returns True on
        a cache hit.
        """
        if getattr(public, "num_classes", self.num_classes) != self.num_classes:
            raise DataError(
                f"{self.name}: public set has {public.num_classes} classes; the synthesiser generates "
                f"{self.num_classes} (pretrain on a public set with the same label space)"
            )
        self._check_set(public, "public set")
        hit = False
        with thread_limit(None):
            if cache and self.pretrain_cacheable:
                from dpdistill.synthesis.cache import cached_pretrain

                hit = cached_pretrain(self, public, progress)
            else:
                self._pretrain(public, progress)
        self.pretrained_on = str(getattr(public, "name", "public"))
        return hit

    def fit(self, sensitive: Any, ledger: PrivacyLedger, *, epsilon: float | None = None,
            progress: bool = False, callback: Callback | None = None, executor: Any = None,
            plan: Plan | None = None) -> FitReport:
        """Fit on the sensitive set, spending the ledger up to a composed total of ``epsilon``.

        ``epsilon`` defaults to the ledger's budget. Every release is charged before it happens, so a
        refused charge (BudgetExceeded) leaves nothing released. A method with a :meth:`plan` has the whole
        plan charged here, on the caller's (driver's) ledger, and then runs it on ``executor`` (None: in
        process). ``plan``: a plan made earlier (e.g. on another driver); it is charged here and then run. A plan
        this ledger already holds is refused: executing it again would release a second, differently noised
        result for one charge (a worker failure inside one fit is resumed by the executor, from checkpoints
        tied to the plan's id, without leaving this call).
        """
        if not isinstance(ledger, PrivacyLedger):
            raise PrivacyError(f"{self.name}: fit needs a PrivacyLedger, got {type(ledger).__name__}")
        if ledger.neighbouring != ADD_OR_REMOVE_ONE:
            raise PrivacyError(f"{self.name}: accounts under add-or-remove-one; the ledger uses "
                               f"{ledger.neighbouring}")
        self._check_set(sensitive, "sensitive set")
        target = ledger.epsilon_budget if epsilon is None else float(epsilon)
        if not 0 < target <= ledger.epsilon_budget * (1 + BUDGET_REL_TOL):
            raise PrivacyError(f"{self.name}: epsilon={epsilon!r} must lie in (0, ledger budget "
                               f"{ledger.epsilon_budget:g}]")
        before = len(ledger.entries)
        started = time.perf_counter()
        # Intra-op threads: the cores other processes leave free (OpenMP spin-waits otherwise); logged, because a
        # fit on one thread of an idle 2-core machine takes twice as long.
        with thread_limit(None) as threads:
            log.info("%s: fitting on %d intra-op thread%s", self.name, threads, "" if threads == 1 else "s")
            if plan is not None and plan.method != self.name:
                raise PrivacyError(f"{self.name}: cannot resume a plan made by {plan.method!r}")
            plan = plan or self.plan(len(sensitive.images), ledger, target)
            if plan is None:
                report = self._fit(sensitive, ledger, target, progress, callback)
            else:
                if plan.already_charged(ledger):
                    raise PrivacyError(f"{self.name}: plan {plan.fingerprint()[:12]} is already on this ledger; "
                                       "executing it again would release a second result for one charge")
                self.check_plan(plan)
                plan.charge(ledger)
                self.last_plan = plan
                report = self.execute(plan, sensitive, executor, progress, callback)
        report.seconds = time.perf_counter() - started
        report.method = self.name
        report.epsilon = ledger.spent_epsilon()
        report.delta = ledger.delta
        report.paper_neighbouring = self.paper_neighbouring
        report.mechanisms = [e["description"] for e in ledger.entries[before:]]
        try:
            report.replace_one = replace_one_guarantee(report.epsilon, ledger.delta)
        except OverflowError:  # e^ε beyond floats: the replace-one δ is vacuous
            report.replace_one = (2.0 * report.epsilon, 1.0)
        self.generator_net.eval()
        self.fitted = True
        self.report = report
        return report

    def generation_labels(self, labels: torch.Tensor | None, n_per_class: int | None) -> torch.Tensor:
        """The labels ``generate`` makes images for: the given ones, or ``n_per_class`` of every class (checked)."""
        if (labels is None) == (n_per_class is None):
            raise SpecError(f"{self.name}: generate needs exactly one of labels or n_per_class")
        if labels is None:
            if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
                raise SpecError(f"{self.name}: n_per_class must be a positive integer, got {n_per_class!r}")
            labels = torch.arange(self.num_classes).repeat_interleave(n_per_class)
        labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise SpecError(f"{self.name}: labels must lie in [0, {self.num_classes - 1}]")
        return labels

    @torch.no_grad()
    def generate(self, labels: torch.Tensor | None = None, *, n_per_class: int | None = None,
                 seed: int | None = None, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """Labelled synthetic images in [0, 1]: for the given ``labels``, or ``n_per_class`` of every class.

        Post-processing of the fitted generator (no privacy cost). ``seed`` fixes the latent draws.
        """
        labels = self.generation_labels(labels, n_per_class)
        g = torch.Generator().manual_seed(self.seed + 1 if seed is None else seed)
        net = self.generator_net
        was_training = net.training
        net.eval()
        out = []
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size]
            z = torch.randn(len(y), net.z_dim, generator=g).to(self.device)
            out.append(net(z, y.to(self.device)).float().clamp(0, 1).cpu())
        net.train(was_training)
        images = torch.cat(out) if out else torch.zeros(0, self.channels, self.image_size, self.image_size)
        return images, labels

    # -- persistence ------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything :meth:`load` needs: DP outputs and public facts only."""
        return {
            "format": FORMAT,
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "shape": {"channels": self.channels, "image_size": self.image_size, "num_classes": self.num_classes},
            "seed": self.seed,
            "fitted": self.fitted,
            "pretrained_on": self.pretrained_on,
            "report": dataclasses.asdict(self.report) if self.report else None,
            "generator": self.generator_state(),
            "extra": self.extra_state(),
        }

    def transport_state(self) -> dict[str, Any]:
        """What a worker needs to generate from this release (default: :meth:`state`; DP outputs only)."""
        return self.state()

    def save(self, path: str | Path) -> Path:
        """Write the synthesiser (generator weights, config, released statistics) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)
        return path

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu",
             noise: PrivacyRandomness | None = None) -> Synthesizer:
        """Rebuild a saved synthesiser of any registered method (``noise``: for a further fit; default secret)."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no saved synthesiser there")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise DataError(f"{path}: not a dpdistill synthesiser file (expected format {FORMAT})")
        return Synthesizer.from_state(state, device=device, noise=noise)

    @classmethod
    def retired(cls, options: dict[str, Any]) -> list[str]:
        """The keys of ``options`` that are retired options holding their retired value (safe to drop)."""
        return [k for k, v in options.items() if k in cls.retired_options and v == cls.retired_options[k]]

    @staticmethod
    def from_state(state: dict[str, Any], device: str | torch.device = "cpu",
                   noise: PrivacyRandomness | None = None) -> Synthesizer:
        """Rebuild a synthesiser from :meth:`state` (DP outputs only: it may travel to a worker)."""
        from dpdistill.synthesis.registry import get

        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise DataError(f"not a dpdistill synthesiser state (expected format {FORMAT})")
        cls = get(state["method"])
        retired = cls.retired(state["config"])
        config = {k: v for k, v in state["config"].items() if k not in retired}
        synth = cls(cls.config_type(**config), seed=state["seed"], device=device, noise=noise,
                    **state["shape"])
        synth.load_extra_state(state["extra"])
        synth.load_generator_state(state["generator"])
        synth.fitted = bool(state["fitted"])
        synth.pretrained_on = state["pretrained_on"]
        if state["report"] is not None:
            rep = dict(state["report"])
            rep["replace_one"] = tuple(rep["replace_one"])
            synth.report = FitReport(**rep)
        synth.generator_net.eval()
        return synth


def public_poisson_batches(n: int, q: float, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` Poisson samples of range(n) for PUBLIC data (pretraining), reproducible from ``seed``.

    Never for the sensitive set: its samples must come from the privacy source
    (``self.noise.poisson_batches``), or anyone holding the spec would know which records each step used.
    """
    g = torch.Generator().manual_seed(int(seed))
    for _ in range(int(steps)):
        yield (torch.rand(int(n), generator=g) < q).nonzero().flatten()
