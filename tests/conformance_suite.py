"""The conformance suite's machinery: which checks apply to which registered method, how a method is run small
on ``digits``, and a privacy source that logs every noise draw.

Membership comes from the registries alone. :func:`methods` reads ``synthesis.names()`` and ``distill.names()``
at the moment it is called, so a method registered at run time (a toy one in a test) is a case like any other.
Nothing here names a method: a method is run with its own defaults shrunk by option *name* (:data:`TINY`,
:data:`UTILITY`: "iterations", "ipc", "net_width", ... wherever a config has such a field). :data:`TUNING` is the
one exception, and it only tunes: a method missing from it is still run and checked, with the generic settings.

Runs are cached per (method, settings, seed, noise source), so the checks that read the same run share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from dpdistill import data, distill, synthesis
from dpdistill.privacy import PrivacyLedger
from dpdistill.privacy.noise import PrivacyRandomness

DATASET = "digits"
PUBLIC = "glyphs"  # the public set of a method that needs one (Synthesizer.needs_public)
DELTA = 1e-5  # below 1/n for digits' 1 000-odd training records
SEED = 3  # the spec seed of every conformance run (data-independent randomness only)
NOISE_SEED = 11  # the reproducible (NOT PRIVATE, debugging) noise source of the determinism runs
LATENT_SEED = 5  # the latents a synthesiser generates from
PER_CLASS = 4  # images per class a synthesiser generates for the comparisons
EPSILON = 2.0  # the target ε of the tiny runs
UTILITY_EPSILON = 4.0  # the target ε of the utility runs (see the margins noted in test_conformance.py)

# Tiny settings by option name: any method config with such a field gets the value. The fields named here are
# sizes and step counts (never learning rates or privacy knobs), so shrinking them cannot change what a check
# tests, only how long it takes.
TINY: dict[str, Any] = {
    # synthesisers
    "num_features": 200, "ntk_width": 32, "embed_batch_size": 512, "gen_batch_size": 50, "gen_hidden": 64,
    "critic_width": 8, "num_discriminators": 4, "critic_iterations": 1, "pretrain_d_iterations": 2,
    "pretrain_iterations": 2, "batch_size": 32,
    "block_out_channels": [16, 16], "attention": [False, False], "sample_steps": 2,  # diffusion UNets
    "ae_block_out_channels": [16, 16], "ae_pretrain_iterations": 2,  # DP-LDM's autoencoder
    # distillers
    "ipc": 1, "factor": 1, "batch_real": 16, "net_width": 8, "net_depth": 2, "outer_loop": 1, "inner_loop": 1,
    "batch_train": 32, "generated_per_class": 20, "extractors": 2, "extractor_epochs": 1,
    "expert_pretrain_epochs": 1, "expert_dp_epochs": 0.5, "expert_batch": 128, "eg_refs": 2,
    # both
    "iterations": 3,
}
# Settings at which a private distiller's release is expected to beat its initial set on digits: a few stored
# images per class (one per class makes the evaluator's accuracy a coin toss) and tens of steps.
UTILITY: dict[str, Any] = {
    **TINY, "ipc": 3, "iterations": 60, "batch_real": 32, "net_width": 16, "generated_per_class": 100,
    "extractor_epochs": 2, "expert_pretrain_epochs": 2,
}
# The generator a distiller trains inside (DP-GenG's stage a), at utility settings: it must make usable images.
UTILITY_GENERATOR: dict[str, Any] = {"iterations": 100, "num_features": 400, "batch_size": 100}
# Per-method tuning of the utility settings, measured on digits (3 seeds each, margins in test_conformance.py).
# A method not listed here is still checked, with UTILITY alone.
TUNING: dict[str, dict[str, Any]] = {
    # PSG's matching step costs ~10x NDPDC's (per-sample gradients): 20 steps keep it to seconds, and at its
    # default image learning rate (0.1) 20 steps move the noise init too little (margins +0.14 to +0.23).
    "psg": {"iterations": 20, "lr_img": 1.0},
    # DP-GenG starts from generated images (DP-Init), not noise: at its MNIST learning rate (100) 60 steps on
    # 8x8 digits beat that init by +0.03 to +0.19 only.
    "dpgeng": {"lr_img": 10.0},
}


# ------------------------------------------------------------------------------------------------ methods


# Options that switch a method to another mechanism (not a size): a method whose config has one is also a case
# for each of its other values (read from the field's Literal type), so each mechanism gets every check.
VARIANT_OPTIONS = ("matching",)  # per-iteration | decoupled private matching (NDPDC, DP-GenG)


@dataclass(frozen=True)
class Method:
    """One registered method: its registry (``synthesis`` or ``distill``), name, whether it is private, and the
    mechanism-switching options of this case (``variant``; empty for the method's defaults)."""

    kind: str
    name: str
    private: bool
    variant: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.name + "".join(f"[{k}={v}]" for k, v in self.variant)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.label}"


def methods() -> list[Method]:
    """Every method the registries hold right now (a distiller's module is imported to read its privacy), and
    each one's variants (:data:`VARIANT_OPTIONS`)."""
    out = [Method("synthesis", name, True) for name in synthesis.names()]  # every synthesiser is DP
    out += [Method("distill", name, distill.get(name).private) for name in distill.names()]
    return out + [variant for m in out for variant in variants(m)]


def variants(method: Method) -> list[Method]:
    """The method once per non-default value of each mechanism-switching option its config has."""
    config = synthesis.get(method.name).config_type if method.kind == "synthesis" else distill.get(method.name).config
    fields = getattr(config, "model_fields", {})
    out = []
    for name in VARIANT_OPTIONS:
        if name not in fields or typing.get_origin(fields[name].annotation) is not typing.Literal:
            continue
        out += [dataclasses.replace(method, variant=((name, value),))
                for value in typing.get_args(fields[name].annotation) if value != fields[name].default]
    return out


def config_fields(method: Method) -> set[str]:
    """The option names the method's config accepts."""
    config = synthesis.get(method.name).config_type if method.kind == "synthesis" else distill.get(method.name).config
    if config is None:
        return set()
    if dataclasses.is_dataclass(config):
        return {f.name for f in dataclasses.fields(config)}
    return set(config.model_fields)


def options(method: Method, profile: str = "tiny") -> dict[str, Any]:
    """The method's options for a profile ("tiny" or "utility"): its defaults with the profile's sizes applied."""
    table = TINY if profile == "tiny" else UTILITY
    fields = config_fields(method)
    out = {k: v for k, v in table.items() if k in fields}
    if {"generator", "generator_options"} <= fields:
        # A distiller that trains a registered synthesiser inside: shrink that one by the same names.
        config = distill.get(method.name).config
        generator = config.model_fields["generator"].default
        inner = Method("synthesis", generator, True)
        extra = {k: v for k, v in UTILITY_GENERATOR.items() if k in config_fields(inner)}
        out["generator_options"] = {**options(inner, "tiny"), **(extra if profile == "utility" else {})}
    if profile == "utility":
        out.update({k: v for k, v in TUNING.get(method.name, {}).items() if k in fields})
    return out | dict(method.variant)


# ------------------------------------------------------------------------------------- counting randomness


@dataclass
class Draw:
    """One Gaussian noise draw: its shape, std, the path it came through, and how many charges preceded it."""

    shape: tuple[int, ...]
    std: float
    via: str  # "gaussian" (PrivacyRandomness.gaussian) or "opacus" (opacus' DP optimiser, our generator)
    charges: int  # ledger entries recorded when the draw was made

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class DrawLog:
    """Every draw made through a :class:`CountingRandomness` family, and the ledger their charges go to."""

    ledger: PrivacyLedger | None = None
    draws: list[Draw] = field(default_factory=list)
    generators: list[torch.Generator] = field(default_factory=list)

    def record(self, shape: Any, std: float, via: str) -> None:
        charges = len(self.ledger.entries) if self.ledger is not None else 0
        self.draws.append(Draw(tuple(int(s) for s in shape), float(std), via, charges))


class CountingRandomness(PrivacyRandomness):
    """A privacy source that draws exactly what its plain twin draws, and logs every Gaussian draw.

    Children (``spawn``) share the log, so a method that hands sub-stages their own sources is counted whole.
    Generators it hands out are remembered, so opacus' noise drawn with one of them is logged too (see
    :func:`counting_opacus`).
    """

    def __init__(self, mode: str, seed: int | None = None, label: str = "root", log: DrawLog | None = None) -> None:
        super().__init__(mode, seed, label)
        self.log = log if log is not None else DrawLog()

    @classmethod
    def like(cls, source: PrivacyRandomness, log: DrawLog | None = None) -> CountingRandomness:
        """A counting source with ``source``'s mode (and, if reproducible, its seed and stream)."""
        return cls(source.mode, source._seed, source._label, log)

    def spawn(self, label: str) -> PrivacyRandomness:
        return CountingRandomness.like(super().spawn(label), self.log)

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        g = super().generator(device)
        self.log.generators.append(g)
        return g

    def gaussian(self, shape: Any, std: float, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = super().gaussian(shape, std, device, dtype)  # raises (and logs nothing) when it would not add noise
        self.log.record(out.shape, std, "gaussian")
        return out


_ACTIVE_LOGS: list[DrawLog] = []


@contextlib.contextmanager
def counting_opacus(log: DrawLog) -> Iterator[None]:
    """Log the noise opacus' DP optimiser draws with a generator from ``log``'s sources (DP-SGD methods).

    Opacus draws its gradient noise itself (``opacus.optimizers.optimizer._generate_noise``) from the generator
    the method got from its privacy source, not through ``PrivacyRandomness.gaussian``; this wraps that function
    while the block runs. A std of 0 (opacus then returns zeros) is logged as what it is.
    """
    try:
        from opacus.optimizers import optimizer as opacus_optimizer
    except ImportError:  # no opacus, no DP-SGD method to count
        yield
        return
    original = opacus_optimizer._generate_noise

    def generate_noise(std: float, reference: Any, generator: Any = None, secure_mode: bool = False) -> Any:
        for active in _ACTIVE_LOGS:
            if any(generator is g for g in active.generators):
                active.record(reference.shape, std, "opacus")
        return original(std, reference, generator, secure_mode)

    _ACTIVE_LOGS.append(log)
    opacus_optimizer._generate_noise = generate_noise
    try:
        yield
    finally:
        _ACTIVE_LOGS.remove(log)
        opacus_optimizer._generate_noise = original


# ------------------------------------------------------------------------------------ what a ledger implies


def gaussian_releases(mechanism: dict[str, Any]) -> int:
    """How many Gaussian releases a ledger entry's mechanism (its JSON) describes.

    PoissonGaussian: one per step; Gaussian: ``count``; Parallel: one set per partition (each partition's
    release is drawn, even though the accounting counts one); Composed: the sum of its parts. Laplace and
    randomised response release no Gaussian noise.
    """
    kind = mechanism["type"]
    if kind == "poisson_gaussian":
        return int(mechanism["steps"])
    if kind == "gaussian":
        return int(mechanism["count"])
    if kind == "parallel":
        return int(mechanism["partitions"]) * gaussian_releases(mechanism["mechanism"])
    if kind == "composed":
        return sum(gaussian_releases(p) for p in mechanism["parts"])
    return 0


def noise_std_rule(mechanism: dict[str, Any]) -> tuple[str, float] | None:
    """What a ledger entry says about the std of its draws: ("exact", σ) for a Gaussian (σ is the noise std),
    ("multiple", σ) for a Poisson-Gaussian (std = σ·C for one clip norm C, which the ledger does not record),
    None when it says nothing checkable (a composition of different mechanisms)."""
    kind = mechanism["type"]
    if kind == "parallel":
        return noise_std_rule(mechanism["mechanism"])
    if kind == "gaussian":
        return ("exact", float(mechanism["sigma"]))
    if kind == "poisson_gaussian":
        return ("multiple", float(mechanism["sigma"]))
    return None


# ------------------------------------------------------------------------------------------------- runs


@cache
def splits() -> dict[str, data.ImageSet]:
    """digits' train / val / test splits as a distill job loads them (default val_seed)."""
    return data.get(DATASET).load_splits()


@cache
def stats() -> tuple[list[float], list[float]]:
    """digits' published normalisation constants (what a distill job passes, never computed from the data)."""
    info = data.get(DATASET).info
    return list(info.mean), list(info.std)


@cache
def public_set(image_size: int) -> data.ImageSet:
    """The public set a method that needs one pretrains on (:data:`PUBLIC`, at digits' size; a public stand-in,
    never a sensitive split)."""
    return data.load(PUBLIC, "train", image_size=image_size)


@dataclass
class Outcome:
    """One run of a method: its release, its ledger and draw log (private methods), and the fitted object."""

    images: torch.Tensor
    labels: torch.Tensor
    ledger: PrivacyLedger | None
    log: DrawLog | None
    target: float | None
    obj: Any  # the fitted Synthesizer, or the SyntheticSet a distiller returned


def noise_source(kind: str) -> PrivacyRandomness:
    """A fresh privacy source: "secret", "reproducible" (NOISE_SEED) or "counting" (reproducible, logged)."""
    if kind == "secret":
        return PrivacyRandomness.secret()
    if kind == "reproducible":
        return PrivacyRandomness.reproducible(NOISE_SEED)
    if kind == "counting":
        return CountingRandomness.like(PrivacyRandomness.reproducible(NOISE_SEED))
    raise ValueError(kind)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for the block: the same float reductions on every run, whatever the machine's load
    (the methods' own thread_limit picks 1 or all cores by load average, which would make reruns differ)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(method: Method, noise: str = "reproducible", profile: str = "tiny", seed: int = SEED,
        overrides: tuple[tuple[str, Any], ...] = (), epsilon: float | None = None, cached: bool = True) -> Outcome:
    """Run ``method`` on digits' training split (a fresh ledger at the target ε when it is private).

    Cached by its arguments unless ``noise`` is "secret" or ``cached`` is off (a secret run must be a new run).
    """
    key = (method, noise, profile, seed, overrides, epsilon)
    if cached and noise != "secret" and key in _RUNS:
        return _RUNS[key]
    opts = {**options(method, profile), **dict(overrides)}
    target = epsilon if epsilon is not None else (UTILITY_EPSILON if profile == "utility" else EPSILON)
    train = splits()["train"]
    source = noise_source(noise)
    log = source.log if isinstance(source, CountingRandomness) else None
    ledger = PrivacyLedger(None, target, DELTA, n_records=len(train)) if method.private else None
    if log is not None:
        log.ledger = ledger
    with one_thread(), counting_opacus(log) if log is not None else contextlib.nullcontext():
        if method.kind == "synthesis":
            obj = synthesis.create(method.name, channels=train.channels, image_size=train.image_size,
                                   num_classes=train.num_classes, seed=seed, noise=source, **opts)
            if getattr(obj, "needs_public", False):  # e.g. a public feature extractor: free, before the fit
                obj.pretrain(public_set(train.image_size))
            obj.fit(train, ledger, epsilon=target)
            images, labels = obj.generate(n_per_class=PER_CLASS, seed=LATENT_SEED)
        else:
            record = distill.get(method.name)
            mean, std = stats()
            kwargs: dict[str, Any] = {"seed": seed, "mean": mean, "std": std, "progress": False}
            if method.private:
                kwargs.update(ledger=ledger, noise=source)
            obj = record.run(train, record.make_config(**opts), **kwargs)
            images, labels = obj.export()
    out = Outcome(images, labels, ledger, log, target if method.private else None, obj)
    if cached and noise != "secret":
        _RUNS[key] = out
    return out


_RUNS: dict[tuple, Outcome] = {}


def distill_job(method: Method, runs_dir: Path | None = None) -> tuple[Any, Any]:
    """Run ``method`` through the product's distill job (tiny options, reproducible noise when private, no
    evaluation or tracking); returns (RunResult, the spec)."""
    from dpdistill.runner import run_job
    from dpdistill.spec import validate_spec

    doc: dict[str, Any] = {
        "name": f"conformance-{method.name}", "kind": "distill", "seed": SEED, "data": {"name": DATASET},
        "method": {"name": method.name, **options(method, "tiny")},
        "evaluation": {"enabled": False}, "tracking": {"enabled": False},
    }
    if method.private:
        doc["privacy"] = {"epsilon": EPSILON, "reproducible_noise": True}
    spec = validate_spec(doc, "<conformance>")
    runs_dir = runs_dir if runs_dir is not None else Path(tempfile.mkdtemp(prefix="conformance-"))
    with one_thread():
        return run_job(spec, runs_dir, progress=False), spec


# ------------------------------------------------------------------------------------------------ utility


def accuracy_of(images: torch.Tensor, labels: torch.Tensor, seeds: tuple[int, ...] = (0, 1)) -> float:
    """Mean test accuracy on digits of a small ConvNet trained on (images, labels), over evaluator seeds."""
    from dpdistill import models
    from dpdistill.evaluation.training import accuracy, train_classifier

    test = splits()["test"]
    mean, std = stats()
    accs = []
    with one_thread():
        for seed in seeds:
            torch.manual_seed(seed)  # the evaluator's weights (its own seed, never the method's)
            net = models.get("convnet", channels=test.channels, num_classes=test.num_classes,
                             image_size=test.image_size, width=16, depth=2)
            train_classifier(net, images, labels, epochs=100, batch_size=256, lr=0.01, mean=mean, std=std,
                             generator=torch.Generator().manual_seed(seed))
            accs.append(accuracy(net, test.images, test.labels, mean=mean, std=std))
    return sum(accs) / len(accs)


def initial_set(method: Method, outcome: Outcome, profile: str = "utility",
                seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The set a distiller started from: the one its release reports (``report['init_set']``, e.g. DP-GenG's
    DP-Init set), else its release after 0 iterations at the same seed (an init drawn from the seed alone)."""
    report = getattr(outcome.obj, "report", None)
    if isinstance(report, dict) and report.get("init_set") is not None:
        images, labels = report["init_set"]
        return images, labels
    if "iterations" not in config_fields(method):
        raise AssertionError(f"{method.id}: its release reports no init_set and it has no 'iterations' option; "
                             "the conformance suite cannot find the set it started from")
    zero = run(method, "reproducible", profile, seed, overrides=(("iterations", 0),))
    return zero.images, zero.labels

