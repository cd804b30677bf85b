"""How a release is evaluated: the selection protocols for the evaluation model and the cross-architecture rows.

DPImageBench tunes the classifier that scores a synthetic set (its epochs, its learning rate). Where that
choice is made matters, so ``evaluation.selection`` names it:

- ``none`` (default): train ``evaluation.epochs`` at ``evaluation.lr``; nothing is chosen.
- ``synv``: hold out a tenth of every class of the RELEASED set (public by construction; the split uses the
  public ``spec.seed``), train each candidate on the rest, choose the best on the held-out part, then train the
  choice on the whole release and report its test accuracy. Free: no sensitive record is read (the validation
  split is not touched by the choice). ``synv_acc_mean`` is the choice's held-out accuracy, the figure a sweep
  may select on.
- ``noisy-senv``: train each candidate on the release, count the sensitive validation records each classifies
  correctly (mean over the evaluation seeds), and release only the index of report-noisy-max over those counts:
  Laplace noise of scale 1/ε per count (:class:`~dpdistill.privacy.mechanisms.ReportNoisyMax`). One validation
  record added or removed moves every count by at most 1, all in the same direction, so the choice is ε-DP
  (Dwork & Roth, Claim 3.9); under a replace-one ledger the counts can move apart and the scale is 2/ε. The
  noise comes from the run's privacy source (``ctx.noise``) only. The reported accuracy (``acc_mean``) is the
  test accuracy of the configuration the NOISY choice picked; the noise-free best is never computed into a
  reported figure, and neither the counts nor the validation accuracies are logged. The final models are not
  scored on the validation split either (no ``val_acc_*``): under this protocol that split is sensitive data,
  and its one release is the charged choice.

Budget (noisy-senv). ``evaluation.selection_epsilon`` is part of the job's ``privacy.epsilon``, not added to it:
the selection is charged to the run's ledger first, before the method runs (:func:`charge_selection`, which
the pipelines call before any release), and the method then fills what the ledger leaves (every method
calibrates its noise so the ledger's composed total lands on the budget). So the ledger's composed ε — PLD over
the selection's ε-DP part and the method's charges — is the job's stated ε, the owner's reservation (the whole
``privacy.epsilon``) stays right, and the charge is on disk long before the choice is made or logged. Charging
early is sound (a charge before a release only over-states what was spent up to the release); if the run
fails in between, the selection's ε is spent for nothing. The sequential composition is conservative: the
method reads the training split, the choice the disjoint validation split.

Cross-architecture (``evaluation.models``): the release is also evaluated by each listed model, one row each
(``acc_mean_<model>``). The primary model (``evaluation.model``, also ``acc_mean``) alone gets
``evaluation.model_options`` and the selection's choice; the others train with their default options for
``evaluation.epochs`` at ``evaluation.lr``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpdistill.errors import DataError, PrivacyError, SpecError
from dpdistill.privacy.disclosure import CHARGED, EVALUATION, RELEASED
from dpdistill.privacy.mechanisms import ReportNoisyMax

COMPONENT = "evaluation selection (noisy-senv)"
HOLDOUT_FRACTION = 0.1

# What the evaluation protocol logs beyond privacy.disclosure.COMMON (acc_mean, val_acc_mean, ...); merged into
# each job kind's DISCLOSURE. The synv figures are functions of the released set and public seeds alone
# (tests/test_selection.py recomputes them); the noisy-senv choice is the charged report-noisy-max output.
DISCLOSURE: dict[str, str] = {
    "synv_acc_mean": RELEASED,
    "synv_acc_std": RELEASED,
    "synv_choice": RELEASED,
    "synv_epochs": RELEASED,
    "synv_lr": RELEASED,
    "noisy_senv_choice": CHARGED,
    "noisy_senv_epochs": CHARGED,
    "noisy_senv_lr": CHARGED,
    "acc_mean_*": EVALUATION,
    "acc_std_*": EVALUATION,
    "val_acc_mean_*": EVALUATION,
    "val_acc_std_*": EVALUATION,
}

Pair = tuple[torch.Tensor, torch.Tensor]
# evaluate(train_x, train_y, test_x, test_y, *, model, model_kwargs, epochs, lr, extra_sets) ->
#   {"test": {"mean", "std", "accuracies"}, <extra set>: {...}}: the seeds' models, as runtime.parallel gives them.
Evaluate = Callable[..., dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class Candidate:
    """One evaluation-model configuration the selection may choose."""

    epochs: int
    lr: float

    def label(self) -> str:
        return f"{self.epochs} epochs, lr {self.lr:g}"


def candidates(ev: Any) -> list[Candidate]:
    """The candidates of ``evaluation`` (a spec's EvaluationSpec): selection_epochs × selection_lrs, in order."""
    return [Candidate(int(e), float(lr)) for e in ev.selection_epochs for lr in ev.selection_lrs]


def selection_mechanism(ev: Any) -> ReportNoisyMax:
    """What the noisy-senv choice costs: one report-noisy-max over the candidates at ``selection_epsilon``."""
    return ReportNoisyMax(float(ev.selection_epsilon), len(candidates(ev)))


def check_plan(spec: Any, channels: int, num_classes: int, image_size: int) -> None:
    """Refuse, before any data is read or budget spent, an evaluation plan the run could not carry out."""
    from dpdistill import models

    ev = spec.evaluation
    if not ev.enabled:
        return
    if ev.selection == "noisy-senv":
        if spec.privacy.epsilon is None:
            raise SpecError("field 'evaluation.selection': 'noisy-senv' charges its choice to the run's privacy "
                            "ledger, and this run has none (no privacy.epsilon); use 'synv' (free) or 'none'")
        if not ev.selection_epsilon < spec.privacy.epsilon:
            raise SpecError(f"field 'evaluation.selection_epsilon': {ev.selection_epsilon:g} is part of "
                            f"privacy.epsilon ({spec.privacy.epsilon:g}) and must leave the method some of it")
    for name in ev.models or ():
        if name == ev.model:
            continue  # the primary model is built with its options by pipelines.check_evaluation_model
        try:
            with torch.random.fork_rng(devices=[]):  # building draws weights: keep the caller's RNG
                models.get(name, channels=channels, num_classes=num_classes, image_size=image_size)
        except SpecError as e:
            raise SpecError(f"field 'evaluation.models': {e}") from None


def charge_selection(ev: Any, ledger: Any) -> None:
    """Charge the noisy-senv choice to ``ledger`` unless it already holds that charge (no-op for other protocols).

    The pipelines call it before the method runs, so the method's calibration leaves room for it;
    :func:`evaluate_protocol` calls it again before drawing the noise, so the choice is never made uncharged.
    """
    if ev.selection != "noisy-senv":
        return
    if ledger is None:
        raise PrivacyError("evaluation.selection 'noisy-senv' needs the run's privacy ledger")
    mechanism = selection_mechanism(ev)
    done = [e for e in ledger.entries if e["component"] == COMPONENT]
    if any(e["mechanism"] == mechanism.to_dict() for e in done):
        return
    if done:
        raise PrivacyError(f"ledger: {COMPONENT} was charged {done[0]['description']}, not {mechanism.describe()}")
    ledger.charge(COMPONENT, mechanism, note=(
        f"report-noisy-max over {mechanism.candidates} evaluation-model configurations, scored by correct "
        "counts on the sensitive validation split; charged before the method so it fits the job's budget"))


def report_noisy_max(scores: list[float], mechanism: ReportNoisyMax, noise: Any, monotone: bool = True) -> int:
    """The index of the largest score after Laplace noise of :meth:`ReportNoisyMax.laplace_scale` on each.

    ``scores`` have sensitivity 1 (counts); only the index may be released. ``noise`` is the run's
    :class:`~dpdistill.privacy.noise.PrivacyRandomness`.
    """
    if len(scores) != mechanism.candidates:
        raise PrivacyError(f"report_noisy_max: {len(scores)} scores for a mechanism over {mechanism.candidates}")
    if noise is None:
        raise PrivacyError("report_noisy_max needs the run's privacy randomness (ctx.noise)")
    draws = noise.numpy().laplace(0.0, mechanism.laplace_scale(1.0, monotone), size=len(scores))
    return int(np.argmax(np.asarray(scores, dtype=np.float64) + draws))


def split_released(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                   fraction: float = HOLDOUT_FRACTION) -> tuple[Pair, Pair]:
    """(train part, held-out part) of a released set: ``fraction`` of every class (at least one image) held out.

    Soft labels are split by their argmax and kept soft on the train part; the held-out labels are hard. The
    positions come from the public ``seed`` (the released set is public).
    """
    hard = labels.argmax(1) if labels.ndim == 2 else labels.long()
    g = torch.Generator().manual_seed(seed)
    held: list[torch.Tensor] = []
    for k in range(num_classes):
        idx = (hard == k).nonzero().flatten()
        if len(idx) < 2:
            raise SpecError(f"evaluation.selection 'synv' holds out part of every class of the release; class {k} "
                            f"has {len(idx)} released image(s) (needs 2 or more: raise the images per class)")
        n_out = max(1, round(fraction * len(idx)))
        held.append(idx[torch.randperm(len(idx), generator=g)[:n_out]])
    out = torch.cat(held)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[out] = False
    return (images[keep], labels[keep]), (images[out], hard[out])


@dataclass
class Row:
    """One model's evaluation of the release: accuracy on test (and validation), and how it was trained."""

    model: str
    acc: dict[str, dict[str, Any]]
    epochs: int
    lr: float


@dataclass
class Choice:
    """What the selection chose: its protocol, the candidates, the chosen index (and synv's held-out score)."""

    protocol: str
    options: list[Candidate]
    index: int
    held_out: dict[str, Any] | None = None  # synv: the choice's accuracy on the held-out released part
    epsilon: float | None = None  # noisy-senv

    @property
    def chosen(self) -> Candidate:
        return self.options[self.index]


@dataclass
class Outcome:
    """The evaluation of one release: one row per model (the primary first) and the selection's choice."""

    rows: list[Row]
    choice: Choice | None = None
    cross_architecture: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> Row:
        return self.rows[0]

    def metrics(self) -> dict[str, float]:
        """Every figure to log: acc_mean/std (+ val_) of the primary, per-model rows, the choice."""
        out: dict[str, float] = {}

        def put(row: Row, suffix: str) -> None:
            for split, prefix in (("test", "acc"), ("val", "val_acc")):
                if split in row.acc:
                    out[f"{prefix}_mean{suffix}"] = float(row.acc[split]["mean"])
                    out[f"{prefix}_std{suffix}"] = float(row.acc[split]["std"])

        put(self.primary, "")
        if self.cross_architecture:
            for row in self.rows:
                put(row, f"_{row.model}")
        c = self.choice
        if c is not None:
            key = "synv" if c.protocol == "synv" else "noisy_senv"
            out.update({f"{key}_choice": float(c.index), f"{key}_epochs": float(c.chosen.epochs),
                        f"{key}_lr": float(c.chosen.lr)})
            if c.held_out is not None:
                out.update({"synv_acc_mean": float(c.held_out["mean"]), "synv_acc_std": float(c.held_out["std"])})
        return out


def reads_validation(ev: Any) -> bool:
    """Whether figures on the validation split are reported: not when it is off, nor under noisy-senv (there the
    split feeds the charged selection only)."""
    return bool(ev.validation) and ev.selection != "noisy-senv"


def evaluate_protocol(ev: Any, images: torch.Tensor, labels: torch.Tensor, *, evaluate: Evaluate, test: Pair,
                      val: Callable[[], Pair | None], num_classes: int, seed: int, ledger: Any = None,
                      noise: Any = None) -> Outcome:
    """Evaluate a release by ``evaluation``'s protocol (see the module docstring) and return every row.

    ``evaluate`` trains the seeds' models (see :data:`Evaluate`); ``val`` returns the validation split and is
    only called where the protocol reads it (never by synv's choice). ``ledger`` and ``noise`` are the run's,
    needed by noisy-senv.
    """
    primary_kwargs = dict(ev.model_options)
    use_val = reads_validation(ev)
    val_pair = val() if use_val else None
    final_extra = {"val": val_pair} if val_pair is not None else {}

    def train(train_x: torch.Tensor, train_y: torch.Tensor, test_pair: Pair, c: Candidate,
              extra: dict[str, Pair]) -> dict[str, dict[str, Any]]:
        return evaluate(train_x, train_y, *test_pair, model=ev.model, model_kwargs=primary_kwargs,
                        epochs=c.epochs, lr=c.lr, extra_sets=extra)

    choice: Choice | None = None
    if ev.selection == "none":
        chosen = Candidate(ev.epochs, ev.lr)
        primary = train(images, labels, test, chosen, final_extra)
    elif ev.selection == "synv":
        options = candidates(ev)
        (rest_x, rest_y), held = split_released(images, labels, num_classes, seed)
        scores = [train(rest_x, rest_y, held, c, {})["test"] for c in options]
        index = int(np.argmax([s["mean"] for s in scores]))  # the first best on ties
        choice = Choice("synv", options, index, held_out=scores[index])
        primary = train(images, labels, test, choice.chosen, final_extra)
    elif ev.selection == "noisy-senv":
        options = candidates(ev)
        mechanism = selection_mechanism(ev)
        charge_selection(ev, ledger)  # on disk before any validation record is scored
        sensitive = val()
        if sensitive is None or len(sensitive[1]) == 0:
            raise DataError("evaluation.selection 'noisy-senv' needs a non-empty validation split")
        n_val = len(sensitive[1])
        # Each candidate's models are the ones its test accuracy comes from: the choice needs no retraining.
        results = [train(images, labels, test, c, {"val": sensitive}) for c in options]
        # Correct counts (mean over seeds): sensitivity 1, monotone under add-or-remove-one. Never logged.
        counts = [r["val"]["mean"] * n_val for r in results]
        from dpdistill.privacy.neighbouring import ADD_OR_REMOVE_ONE

        index = report_noisy_max(counts, mechanism, noise, monotone=ledger.neighbouring == ADD_OR_REMOVE_ONE)
        choice = Choice("noisy-senv", options, index, epsilon=mechanism.epsilon)
        primary = {"test": results[index]["test"]}  # the noisy choice's models; their validation scores dropped
    else:
        raise SpecError(f"evaluation.selection: unknown protocol {ev.selection!r}")
    rows = [Row(ev.model, primary, choice.chosen.epochs if choice else ev.epochs,
                choice.chosen.lr if choice else ev.lr)]
    for name in ev.models or ():
        if name == ev.model:
            continue
        acc = evaluate(images, labels, *test, model=name, model_kwargs={}, epochs=ev.epochs, lr=ev.lr,
                       extra_sets=final_extra)
        rows.append(Row(name, acc, ev.epochs, ev.lr))
    return Outcome(rows, choice, cross_architecture=ev.models is not None)


def summary_lines(outcome: Outcome, seeds: int, trained_on: str = "") -> list[tuple[str, str]]:
    """The run summary's rows: one accuracy row per model, then what the selection chose and how."""
    lines = []
    for i, row in enumerate(outcome.rows):
        t = row.acc["test"]
        key = "test accuracy" if i == 0 else f"test accuracy ({row.model})"
        lines.append((key, f"{100 * t['mean']:.2f} ± {100 * t['std']:.2f} % ({row.model}{trained_on}, {seeds} "
                           f"seeds, {row.epochs} epochs)"))
    c = outcome.choice
    if c is not None:
        n = len(c.options)
        if c.protocol == "synv":
            lines.append(("selection", f"synv (free): {c.chosen.label()} chose best of {n} candidates on a held-out "
                                       f"{HOLDOUT_FRACTION:.0%} of the released set (held-out accuracy "
                                       f"{100 * c.held_out['mean']:.2f} %); retrained on the whole release"))
        else:
            lines.append(("selection", f"noisy-senv: report-noisy-max (ε {c.epsilon:g}, charged) over {n} candidates "
                                       f"on the sensitive validation split chose {c.chosen.label()}; the test "
                                       "accuracy is that noisy choice's"))
    return lines
