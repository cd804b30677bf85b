"""LiRA membership inference on a whole release pipeline: shadow releases, shadow models, likelihood-ratio scores.

The attack of Carlini et al., "Membership Inference Attacks From First Principles" (S&P 2022), online variant,
lifted from one model to the pipeline the DP-GenG paper evaluates: the "model" attacked is everything from the
sensitive records to a classifier trained on the released set. M shadow runs each take a random half of a
target pool (:func:`membership_matrix`: each record IN each run with probability 1/2), run the release
function on that half, train an evaluation model on what it released and record, for every pool record, the
logit-scaled confidence ``φ = log(p_y / (1 - p_y))`` of its true label (:func:`logit_confidence`).

:func:`lira_scores` then plays each shadow in turn as the target (leave-one-out, as the reference code scores
its held-out models): for record n it fits one Gaussian to φ over the OTHER shadows that included n (IN) and
one over those that excluded it (OUT), and scores the target's φ by the log likelihood ratio
``log N(φ; μ_in, σ_in²) - log N(φ; μ_out, σ_out²)`` (higher: more likely a member). With fewer than 64 shadows
per fit the variances are pooled over records (the paper's global-variance variant; per-record variances need
many shadows). Every (target, record) pair is one attack trial with a known answer; :func:`roc_curve` over them
gives TPR at a fixed low FPR (the paper's headline, e.g. TPR @ 0.1 % FPR) and the AUC.

Privacy: a membership-inference study reads the sensitive pool by design and its output (scores, ROC) is a
function of those records without noise. It is an EVALUATION of a release method, not a private release: the
runner stamps its folder NOT PRIVATE and refuses specs that charge a data owner's budget.

Pure torch + numpy/scipy; Ray fan-out of the shadow runs lives in :mod:`dpdistill.runtime.lira_tasks`
(:func:`run_study` takes any ``map`` function, in-process by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# A release pipeline as the study sees it: (member images [n,C,H,W] in [0,1], labels [n], seed) -> the released
# (images, labels). It must be picklable to run as a Ray task (a module-level function or a dataclass instance).
Release = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# How a study runs its shadow jobs: map(fn, jobs, on_result) -> [fn(*job) for job in jobs], calling
# on_result(i, row) as job i finishes (in any order).
MapFn = Callable[[Callable[..., np.ndarray], list[tuple[Any, ...]], Callable[[int, np.ndarray], None]],
                 list[np.ndarray]]

# Below this many shadows per Gaussian the per-record variance is too noisy; the paper pools it instead.
GLOBAL_VARIANCE_BELOW = 64
DEFAULT_FPRS: tuple[float, ...] = (0.001, 0.01)
_MIN_STD = 1e-6


# ------------------------------------------------------------------------------------------------ shadows


def membership_matrix(shadows: int, n_records: int, seed: int) -> np.ndarray:
    """Which pool records each shadow run trains on: bool [shadows, n_records], each entry IN with probability
    1/2 independently (so each run gets a random half of the pool, about).

    Independent, not balanced per record (the reference code's "exactly half the runs"): in a leave-one-out
    test a balanced design ties the target's membership to the other runs' IN/OUT counts (IN target: one IN
    fewer among the others), which biases the score against members; on null confidences we measured AUC
    0.490 ± 0.002 balanced vs 0.498 ± 0.002 independent (40 draws of 16 runs x 300 records), i.e. the balanced
    design under-reports the attack, the wrong direction for a privacy evaluation.
    """
    if shadows < 4:
        raise ValueError(f"LiRA needs at least 4 shadow runs, got {shadows}")
    if n_records < 2:
        raise ValueError(f"LiRA needs a pool of at least 2 records, got {n_records}")
    return np.random.default_rng(seed).random((shadows, n_records)) < 0.5


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``φ = log(p_y / (1 - p_y))`` of the true label, from logits [N, K] (float64; finite even when p_y
    rounds to 1, computed as ``z_y - logsumexp_{j≠y} z_j``)."""
    z = logits.double()
    y = labels.long().view(-1, 1)
    true = z.gather(1, y).squeeze(1)
    others = z.scatter(1, y, float("-inf"))
    return true - torch.logsumexp(others, dim=1)


@dataclass(frozen=True)
class ShadowModel:
    """The evaluation model each shadow run trains on its release (see :func:`~.training.train_classifier`)."""

    name: str = "convnet"
    options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    lr: float = 0.01
    batch_size: int = 256
    augment: str | None = None
    mean: Sequence[float] | None = None  # public normalisation statistics (the dataset's published constants)
    std: Sequence[float] | None = None
    device: str = "cpu"


def shadow_confidences(
    release: Release,
    images: torch.Tensor,
    labels: torch.Tensor,
    member: np.ndarray | torch.Tensor,
    seed: int,
    model: ShadowModel,
    num_classes: int,
    *,
    num_threads: int | None = None,
) -> np.ndarray:
    """One shadow run: release the ``member`` records, train ``model`` on the release, return φ of every pool
    record (float64 [N]); ``seed`` drives the release's public randomness and the model's init and batches."""
    from dpdistill import models
    from dpdistill.evaluation.training import Normalise, thread_limit, train_classifier

    member_t = torch.as_tensor(np.asarray(member), dtype=torch.bool)
    with thread_limit(num_threads):
        released_x, released_y = release(images[member_t], labels[member_t], int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = models.get(model.name, channels=images.shape[1], num_classes=num_classes,
                             image_size=images.shape[-1], **model.options)
        train_classifier(net, released_x, released_y, epochs=model.epochs, batch_size=model.batch_size,
                         lr=model.lr, augment=model.augment, mean=model.mean, std=model.std, device=model.device,
                         generator=torch.Generator().manual_seed(int(seed) + 1), num_threads=num_threads)
        device = torch.device(model.device)
        normalise = Normalise(model.mean, model.std, images.shape[1], device)
        with torch.no_grad():
            logits = torch.cat([net(normalise(chunk.to(device))).cpu() for chunk in images.split(1024)])
    return logit_confidence(logits, labels).numpy()


# ----------------------------------------------------------------------------------------------- the test


def _norm_logpdf(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)


def _leave_one_out(conf: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and sum of squared deviations of ``conf`` over the rows in ``mask`` other than row t, for
    every (t, n): [M, N] each (exact, from running sums: O(M·N), not O(M²·N))."""
    x = np.where(mask, conf, 0.0)
    s1, s2, c = x.sum(0), (x * x).sum(0), mask.sum(0)
    c_t = c[None, :] - mask
    s1_t = s1[None, :] - x
    s2_t = s2[None, :] - x * x
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(c_t > 0, s1_t / np.maximum(c_t, 1), np.nan)
        ss = np.where(c_t > 0, np.maximum(s2_t - s1_t * s1_t / np.maximum(c_t, 1), 0.0), np.nan)
    return c_t.astype(np.float64), mean, ss


def _std(count: np.ndarray, ss: np.ndarray, pooled: bool) -> np.ndarray:
    """Per-(t, n) standard deviations: per record (ddof 1) or pooled over records for each target t."""
    if pooled:
        have = count > 0
        dof = (np.where(have, count, 0).sum(1) - have.sum(1)).astype(np.float64)
        total = np.where(have, ss, 0.0).sum(1)
        sd = np.sqrt(np.where(dof > 0, total / np.maximum(dof, 1), np.nan))
        sd = np.broadcast_to(sd[:, None], count.shape)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            sd = np.where(count > 1, np.sqrt(ss / np.maximum(count - 1, 1)), np.nan)
    return np.maximum(sd, _MIN_STD)


def lira_scores(
    confidences: np.ndarray, membership: np.ndarray, *, variance: str = "auto", online: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out LiRA scores: ([M, N] scores, [M, N] bool valid) from φ [M, N] and membership [M, N].

    ``scores[t, n]`` tests whether record n was in shadow t's training half, fitting on the other shadows only.
    ``variance``: ``"global"`` (pooled over records), ``"per-record"``, or ``"auto"`` (global below
    :data:`GLOBAL_VARIANCE_BELOW` shadows per fit). ``online=False`` is the offline test (OUT fit only, one-sided:
    how far above the OUT mean, in OUT standard deviations). A pair whose fits lack data (no IN or OUT shadow
    left; per-record variance: fewer than 2) is not valid and is left out of the ROC (counted as ``excluded``).
    """
    conf = np.asarray(confidences, dtype=np.float64)
    keep = np.asarray(membership, dtype=bool)
    if conf.ndim != 2 or conf.shape != keep.shape:
        raise ValueError(f"confidences {conf.shape} and membership {keep.shape} must both be [shadows, records]")
    if not np.isfinite(conf).all():
        raise ValueError("confidences must be finite")
    if variance not in ("auto", "global", "per-record"):
        raise ValueError(f"variance must be 'auto', 'global' or 'per-record', got {variance!r}")
    c_out, mu_out, ss_out = _leave_one_out(conf, ~keep)
    shadows_per_fit = (conf.shape[0] - 1) / 2
    pooled = variance == "global" or (variance == "auto" and shadows_per_fit < GLOBAL_VARIANCE_BELOW)
    sd_out = _std(c_out, ss_out, pooled)
    if not online:
        score = (conf - mu_out) / sd_out
        valid = np.isfinite(score)
        return np.where(valid, score, 0.0), valid
    c_in, mu_in, ss_in = _leave_one_out(conf, keep)
    sd_in = _std(c_in, ss_in, pooled)
    score = _norm_logpdf(conf, mu_in, sd_in) - _norm_logpdf(conf, mu_out, sd_out)
    valid = np.isfinite(score)
    return np.where(valid, score, 0.0), valid


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the rule "member iff score >= threshold", one point per distinct score,
    starting at (0, 0); ties move together, so no point claims a split the scores cannot make."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"an ROC needs members and non-members, got {pos} and {neg}")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / neg]
    tpr = np.r_[0.0, tps / pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR among ROC points with FPR <= ``target`` (0 when only the origin qualifies)."""
    ok = np.asarray(fpr) <= target + 1e-12
    return float(np.max(np.asarray(tpr)[ok])) if ok.any() else 0.0


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC (trapezoids; 0.5 for a test that cannot tell members from non-members)."""
    return float(np.trapezoid(tpr, fpr))


def _thin(fpr: np.ndarray, tpr: np.ndarray, points: int) -> tuple[list[float], list[float]]:
    """At most about ``points`` ROC points, log-spaced in FPR so the low-FPR end (the one that matters) stays."""
    if fpr.size <= points:
        return fpr.tolist(), tpr.tolist()
    grid = np.r_[0.0, np.logspace(-5, 0, points - 1)]
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, fpr.size - 1))
    idx = np.unique(np.r_[idx, fpr.size - 1])
    return fpr[idx].tolist(), tpr[idx].tolist()


@dataclass
class LiraResult:
    """The attack's outcome over every (target shadow, pool record) pair."""

    tpr_at: dict[float, float]  # FPR -> TPR
    auc: float
    fpr: np.ndarray
    tpr: np.ndarray
    members: int  # (target, record) pairs that were members
    non_members: int
    shadows: int
    pool: int
    variance: str  # "global" or "per-record": the variant actually used
    online: bool = True
    excluded: int = 0  # pairs without enough shadows to fit (rare from 16 shadows on)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (TPR keyed as ``tpr_at_0.1%fpr``) plus a thinned ROC."""
        fpr, tpr = _thin(self.fpr, self.tpr, 200)
        out: dict[str, Any] = {f"tpr_at_{100 * a:g}%fpr": v for a, v in sorted(self.tpr_at.items())}
        out.update(auc=self.auc, members=self.members, non_members=self.non_members, shadows=self.shadows,
                   pool=self.pool, variance=self.variance, online=self.online, excluded=self.excluded,
                   roc={"fpr": fpr, "tpr": tpr})
        return out


def evaluate_lira(
    confidences: np.ndarray, membership: np.ndarray, *, fprs: Iterable[float] = DEFAULT_FPRS,
    variance: str = "auto", online: bool = True,
) -> LiraResult:
    """LiRA over all (target shadow, record) pairs: TPR at each FPR in ``fprs``, AUC and the ROC."""
    keep = np.asarray(membership, dtype=bool)
    scores, valid = lira_scores(confidences, keep, variance=variance, online=online)
    fpr, tpr, _ = roc_curve(scores[valid], keep[valid])
    m, n = keep.shape
    pooled = variance == "global" or (variance == "auto" and (m - 1) / 2 < GLOBAL_VARIANCE_BELOW)
    return LiraResult(
        tpr_at={float(a): tpr_at_fpr(fpr, tpr, float(a)) for a in fprs}, auc=auc(fpr, tpr), fpr=fpr, tpr=tpr,
        members=int(keep[valid].sum()), non_members=int((~keep[valid]).sum()), shadows=m, pool=n,
        variance="global" if pooled else "per-record", online=online, excluded=int((~valid).sum()),
    )


# ------------------------------------------------------------------------------------------------- study


@dataclass
class LiraStudy:
    """A finished study: the attack's result, and the per-shadow confidences and membership it came from."""

    result: LiraResult
    confidences: np.ndarray  # [M, N] φ of every pool record under every shadow's model
    membership: np.ndarray  # [M, N] bool


def run_study(
    release: Release,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    shadows: int,
    model: ShadowModel,
    seed: int = 0,
    fprs: Iterable[float] = DEFAULT_FPRS,
    variance: str = "auto",
    map_fn: MapFn | None = None,
    done: Mapping[int, np.ndarray] | None = None,
    on_shadow: Callable[[int, np.ndarray], None] | None = None,
) -> LiraStudy:
    """Run ``shadows`` shadow releases of ``release`` on random halves of the pool and attack them with LiRA.

    ``map_fn(fn, argument_tuples, on_result)`` runs :func:`shadow_confidences` on every tuple, calls
    ``on_result(i, row)`` as the i-th finishes and returns the rows in order (default: one after another here;
    :mod:`dpdistill.runtime.lira_tasks` passes a Ray one). Shadow m's public seed is derived from ``seed`` and m;
    the membership halves from ``seed`` alone, so a study can be finished in parts: ``done`` holds the rows of
    shadows already run (by index; they are not run again) and ``on_shadow(m, row)`` is told of each new one as
    it finishes (to persist it before the next ends).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} pool images but {len(labels)} labels")
    keep = membership_matrix(shadows, len(labels), seed)
    base = np.random.SeedSequence([int(seed), 0x11EA]).generate_state(shadows, dtype=np.uint32)
    rows: dict[int, np.ndarray] = {}
    for m, row in (done or {}).items():
        if not 0 <= int(m) < shadows:
            raise ValueError(f"done: shadow {m} is outside 0..{shadows - 1}")
        row = np.asarray(row, dtype=np.float64)
        if row.shape != (len(labels),):
            raise ValueError(f"done: shadow {m} holds {row.shape} confidences, the pool has {len(labels)} records")
        rows[int(m)] = row
    todo = [m for m in range(shadows) if m not in rows]
    jobs = [(release, images, labels, keep[m], int(base[m]), model, num_classes) for m in todo]

    def finished(i: int, row: np.ndarray) -> None:
        rows[todo[i]] = np.asarray(row, dtype=np.float64)
        if on_shadow is not None:
            on_shadow(todo[i], rows[todo[i]])

    (map_fn or map_in_process)(shadow_confidences, jobs, finished)
    conf = np.stack([rows[m] for m in range(shadows)])
    result = evaluate_lira(conf, keep, fprs=fprs, variance=variance)
    return LiraStudy(result=result, confidences=conf, membership=keep)


def map_in_process(fn: Callable[..., np.ndarray], jobs: list[tuple[Any, ...]],
                   on_result: Callable[[int, np.ndarray], None]) -> list[np.ndarray]:
    """:func:`run_study`'s default map: each job here, one after another, ``on_result`` after each."""
    out = []
    for i, job in enumerate(jobs):
        out.append(fn(*job))
        on_result(i, out[-1])
    return out
