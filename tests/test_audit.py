"""The empirical privacy audit: its statistics, and that it passes correct mechanisms and catches broken ones.

Every mechanism is the product's own code (evaluation/audit.py names which); "broken" means the calibrated
noise scaled down 10x, or noise derived from a public seed (the bug issue 19 fixed), or the product's secret
source replaced by a seeded one. Draws are small vectors, a few thousand per test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpdistill.evaluation.audit import MECHANISMS, audit_mechanism
from dpdistill.evaluation.audit_stats import clopper_pearson, epsilon_lower_bound
from dpdistill.privacy.noise import PrivacyRandomness

DELTA = 1e-5


# -- (3) Clopper–Pearson against known values ------------------------------------------------------------------

def test_clopper_pearson_hand_computed_cases():
    # k = 0 and k = n have closed forms: upper = 1 - α^(1/n), lower = α^(1/n).
    lo, hi = clopper_pearson(np.array([0, 10]), 10, 0.05)
    assert lo[0] == 0.0 and hi[1] == 1.0
    assert hi[0] == pytest.approx(1 - 0.05 ** 0.1, rel=1e-9)  # 0.25887
    assert lo[1] == pytest.approx(0.05 ** 0.1, rel=1e-9)
    # n = 2, k = 1: P[Bin(2, p) <= 1] = 1 - p² = α gives the upper bound; P[Bin(2, p) >= 1] = 1 - (1-p)² = α
    # gives the lower bound.
    lo, hi = clopper_pearson(1, 2, 0.05)
    assert float(hi) == pytest.approx(math.sqrt(0.95), rel=1e-9)
    assert float(lo) == pytest.approx(1 - math.sqrt(0.95), rel=1e-9)
    # n = 1, k = 0: upper = 1 - α.
    assert float(clopper_pearson(0, 1, 0.1)[1]) == pytest.approx(0.9, rel=1e-9)


def test_clopper_pearson_inverts_the_binomial_tail():
    from scipy import stats

    n, alpha = 200, 0.05
    k = np.array([1, 7, 50, 199])
    lo, hi = clopper_pearson(k, n, alpha)
    # The defining equations: P[Bin(n, hi) <= k] = α and P[Bin(n, lo) >= k] = α.
    np.testing.assert_allclose(stats.binom.cdf(k, n, hi), alpha, rtol=1e-6)
    np.testing.assert_allclose(stats.binom.sf(k - 1, n, lo), alpha, rtol=1e-6)
    assert np.all(lo < k / n) and np.all(k / n < hi)


def test_lower_bound_of_a_perfect_and_of_a_useless_attack():
    n = 1000
    # Perfect separation: every in-world score above every out-world score. Half the trials choose the
    # threshold, the other half (m = 500) give TPR_lower = α^(1/m) and FPR_upper = 1 - α^(1/m).
    bound = epsilon_lower_bound(np.zeros(n), np.ones(n), DELTA, 0.05)
    m = n // 2
    expected = math.log((0.05 ** (1 / m) - DELTA) / (1 - 0.05 ** (1 / m)))
    assert bound.epsilon == pytest.approx(expected, rel=1e-9)
    assert (bound.tpr, bound.fpr) == (1.0, 0.0)
    # Identical worlds: nothing to find.
    rng = np.random.default_rng(0)
    same = epsilon_lower_bound(rng.normal(size=n), rng.normal(size=n), DELTA, 0.05)
    assert same.epsilon < 0.3


# -- (1) correctly noised mechanisms: the bound stays below the claim ------------------------------------------

@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_correct_mechanism_lower_bound_below_claimed(mechanism):
    trials = 1000 if mechanism == "dp-sgd" else 2000
    r = audit_mechanism(mechanism, epsilon=1.0, delta=DELTA, trials=trials, alpha=0.01)
    assert r.claimed_epsilon == pytest.approx(1.0, abs=0.02)
    assert 0.0 <= r.epsilon_lower_bound <= r.claimed_epsilon
    assert not r.violated


@pytest.mark.parametrize("mechanism", ["dp-merf", "localdp"])
def test_correct_mechanism_at_large_epsilon_gives_a_positive_bound(mechanism):
    # The attack is real: at ε = 8 it proves some privacy loss, still within the claim.
    r = audit_mechanism(mechanism, epsilon=8.0, delta=DELTA, trials=2000, alpha=0.01)
    assert 0.5 < r.epsilon_lower_bound <= r.claimed_epsilon


# -- (2) broken mechanisms: the bound exceeds the claim --------------------------------------------------------

@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_tenth_of_the_noise_is_caught(mechanism):
    trials = 600 if mechanism == "dp-sgd" else 2000
    r = audit_mechanism(mechanism, epsilon=1.0, delta=DELTA, trials=trials, noise_scale=0.1)
    assert r.epsilon_lower_bound > r.claimed_epsilon + 1.0
    assert r.violated


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_noise_from_a_public_seed_is_caught(mechanism):
    # Issue 19's bug: the adversary who knows the seed regenerates the noise, so the attack is perfect; the bound
    # is then limited only by the number of trials (about 4.6 for 300 held-out trials) and beats ε = 4 as well.
    # Feature matching's canary is Poisson-sampled (TPR ≈ q ≈ 1/2), so it gets more trials.
    trials = 2000 if mechanism == "feature-matching" else 600
    r = audit_mechanism(mechanism, epsilon=4.0, delta=DELTA, trials=trials, noise="public-seed")
    assert (r.tpr, r.fpr) == (1.0, 0.0) or mechanism == "feature-matching"  # Poisson: TPR ≈ q there
    assert r.epsilon_lower_bound > r.claimed_epsilon
    assert r.violated


def test_a_seeded_secret_source_is_caught_in_the_products_own_mode(monkeypatch):
    # If PrivacyRandomness.secret() handed out noise derived from a fixed public seed (the pre-fix behaviour:
    # every draw from spec.seed), the audit run in the product's "secret" mode must notice on its own: both
    # worlds then get the same noise and differ by exactly the canary's contribution.
    monkeypatch.setattr(PrivacyRandomness, "secret", classmethod(lambda cls: cls.reproducible(0)))
    r = audit_mechanism("localdp", epsilon=1.0, delta=DELTA, trials=500)
    assert r.violated and r.epsilon_lower_bound > 3.0


# -- the command ------------------------------------------------------------------------------------------------

def _exit_code(args: list[str]) -> int:
    from dpdistill.cli import main

    try:
        main(args)
    except SystemExit as e:  # main() exits only on a non-zero code
        return int(e.code)
    return 0


def test_audit_command_prints_claimed_and_lower_bound(capsys):
    assert _exit_code(["audit", "--mechanism", "localdp", "--trials", "400", "--epsilon", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mechanism"] == "localdp" and out["trials"] == 400 and out["alpha"] == 0.05
    assert out["epsilon_lower_bound"] <= out["claimed_epsilon"] and not out["violated"]
    assert {"tpr", "fpr", "delta", "threshold"} <= set(out)

    args = ["audit", "--mechanism", "dp-merf", "--trials", "400", "--epsilon", "1", "--noise", "public-seed"]
    assert _exit_code(args) == 3  # a violation
    text = capsys.readouterr().out
    assert "claimed epsilon" in text and "epsilon lower bound" in text and "VIOLATION" in text


def test_unknown_mechanism_is_a_spec_error(capsys):
    assert _exit_code(["audit", "--mechanism", "nope", "--trials", "10"]) == 2
    assert "mechanism must be one of" in capsys.readouterr().err
