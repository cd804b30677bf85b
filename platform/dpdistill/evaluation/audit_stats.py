"""Statistics of an empirical privacy audit: Clopper–Pearson intervals and the (ε, δ) lower bound they imply.

The bound. If a mechanism M is (ε, δ)-DP under a neighbouring pair (D, D'), then for every set S of outputs
P[M(D') ∈ S] ≤ e^ε P[M(D) ∈ S] + δ and the same with D and D' exchanged. An attack that says "the canary was
in" when its score is ≥ t has TPR = P[score ≥ t | D'] and FPR = P[score ≥ t | D]; the four inequalities (S and
its complement, either world first) give

    ε ≥ log((TPR − δ) / FPR),  ε ≥ log((TNR − δ) / FNR),  ε ≥ log((FPR − δ) / TPR),  ε ≥ log((FNR − δ) / TNR).

With n trials per world the rates are only estimated, so the audit replaces each numerator rate by its
one-sided Clopper–Pearson LOWER bound and each denominator rate by its one-sided UPPER bound, both at
confidence 1 − α. This is the estimator of Jagielski, Ullman & Oprea, "Auditing Differentially Private
Machine Learning: How Private is Private SGD?" (NeurIPS 2020, §3: ε_LB from Clopper–Pearson bounds on FPR and
FNR) and Nasr, Song, Thakurta, Papernot & Carlini, "Adversary Instantiation: Lower Bounds for Differentially
Private Machine Learning" (IEEE S&P 2021, §4), who take the maximum over thresholds of the attack score.

Choosing the threshold. The maximum over thresholds computed on the same trials is optimistic for the auditor
(each threshold's interval holds at 1 − α, their maximum does not; with a few thousand trials it put a
correctly calibrated DP-MERF release at 1.01 against a claimed 0.995 in our runs). So by default half of the
trials choose the threshold and the rule, and the other half, untouched by that choice, give the bound: one
interval, valid at confidence 1 − α, at the price of half the trials (the held-out practice Steinke, Nasr &
Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023, also follow for their guesses).
``select_fraction=0`` gives the published maximum over all trials.

scipy is always present (scikit-learn, a dependency, requires it); the Clopper–Pearson quantiles are
``scipy.stats.beta.ppf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def clopper_pearson(successes: int | np.ndarray, trials: int, alpha: float = 0.05
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper–Pearson bounds (lower, upper) on a binomial rate, each holding with confidence 1 − α.

    lower = Beta⁻¹(α; k, n − k + 1) (0 when k = 0), upper = Beta⁻¹(1 − α; k + 1, n − k) (1 when k = n).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if trials < 1:
        raise ValueError(f"trials must be positive, got {trials}")
    k = np.asarray(successes, dtype=float)
    if np.any(k < 0) or np.any(k > trials):
        raise ValueError("successes must lie in [0, trials]")
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), trials - k + 1), 0.0)
        upper = np.where(k < trials, stats.beta.ppf(1 - alpha, k + 1, np.maximum(trials - k, 1)), 1.0)
    return lower, upper


@dataclass(frozen=True)
class EpsilonBound:
    """The audit's lower bound on ε and the attack operating point that achieved it."""

    epsilon: float  # ≥ 0; 0 when no threshold gives a positive bound
    tpr: float  # empirical rates at the chosen threshold (canary world: positives)
    fpr: float
    threshold: float
    rule: str  # which of the four inequalities gave the bound


def _log_ratio(num: np.ndarray, den: np.ndarray, delta: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log((num - delta) / den)
    return np.where((num - delta > 0) & (den > 0), out, -np.inf)


def _rule_bounds(out: np.ndarray, inn: np.ndarray, thresholds: np.ndarray, delta: float, alpha: float
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per threshold: the four rules' ε bounds, and the true / false positive counts (sorted scores in)."""
    n_out, n_in = len(out), len(inn)
    tp = n_in - np.searchsorted(inn, thresholds, side="left")  # in-world scores >= t
    fp = n_out - np.searchsorted(out, thresholds, side="left")
    fn, tn = n_in - tp, n_out - fp
    tp_lo, tp_hi = clopper_pearson(tp, n_in, alpha)
    fp_lo, fp_hi = clopper_pearson(fp, n_out, alpha)
    fn_lo, fn_hi = clopper_pearson(fn, n_in, alpha)
    tn_lo, tn_hi = clopper_pearson(tn, n_out, alpha)
    rules = {
        "TPR vs FPR": _log_ratio(tp_lo, fp_hi, delta),
        "TNR vs FNR": _log_ratio(tn_lo, fn_hi, delta),
        "FPR vs TPR": _log_ratio(fp_lo, tp_hi, delta),
        "FNR vs TNR": _log_ratio(fn_lo, tn_hi, delta),
    }
    return rules, tp, fp


def _best(out: np.ndarray, inn: np.ndarray, delta: float, alpha: float) -> tuple[str, float, float]:
    """(rule, threshold, bound) maximising the bound over every distinct score as a threshold."""
    thresholds = np.unique(np.concatenate([out, inn, [np.inf]]))
    rules, _, _ = _rule_bounds(out, inn, thresholds, delta, alpha)
    best_rule, best_t, best = "none", float(np.inf), 0.0
    for name, values in rules.items():
        i = int(np.argmax(values))
        if values[i] > best:
            # Halfway down to the next lower score: the same split of these trials, robust to rounding on others.
            t = thresholds[i] if i == 0 else (thresholds[i - 1] + thresholds[i]) / 2
            best_rule, best_t, best = name, float(t), float(values[i])
    return best_rule, best_t, best


def epsilon_lower_bound(scores_out: np.ndarray, scores_in: np.ndarray, delta: float, alpha: float = 0.05,
                        select_fraction: float = 0.5) -> EpsilonBound:
    """The Clopper–Pearson lower bound on ε from attack scores without (``scores_out``) and with the canary.

    Higher scores mean "canary present"; every distinct score is tried as a threshold and all four DP
    inequalities (module docstring) are used, so an attack whose direction is reversed is still counted.
    ``select_fraction`` of each world's trials (the first ones; trials are i.i.d.) choose the threshold and
    rule, and the bound is computed on the remaining trials at that one threshold, so it holds with
    confidence 1 − α. ``select_fraction=0`` takes the maximum over thresholds on all trials instead (the
    published practice; optimistic for the auditor, see the module docstring).
    """
    out_all = np.asarray(scores_out, dtype=float)
    in_all = np.asarray(scores_in, dtype=float)
    if not 0 <= select_fraction < 1:
        raise ValueError(f"select_fraction must lie in [0, 1), got {select_fraction}")
    k_out, k_in = int(len(out_all) * select_fraction), int(len(in_all) * select_fraction)
    if len(out_all) - k_out < 1 or len(in_all) - k_in < 1 or (select_fraction > 0 and min(k_out, k_in) < 1):
        raise ValueError("both worlds need trials to select the threshold on and to evaluate it on")
    out, inn = np.sort(out_all[k_out:]), np.sort(in_all[k_in:])
    if select_fraction > 0:
        rule, threshold, _ = _best(np.sort(out_all[:k_out]), np.sort(in_all[:k_in]), delta, alpha)
    else:
        rule, threshold, _ = _best(out, inn, delta, alpha)
    rules, tp, fp = _rule_bounds(out, inn, np.array([threshold]), delta, alpha)
    value = float(rules[rule][0]) if rule in rules else 0.0
    return EpsilonBound(epsilon=max(0.0, value) if math.isfinite(value) else 0.0, tpr=float(tp[0] / len(inn)),
                        fpr=float(fp[0] / len(out)), threshold=threshold, rule=rule)
