"""Defaults and refusals: δ = 1/(n ln n); δ ≥ 1/n, ε ≤ 0, q ∉ (0, 1], σ ≤ 0, steps < 1 refused in one line."""

from __future__ import annotations

import math

import pytest

from dpdistill.errors import DpdistillError, PrivacyError
from dpdistill.privacy import (
    Gaussian,
    Laplace,
    Parallel,
    PoissonGaussian,
    PrivacyLedger,
    RandomizedResponse,
    calibrate_sigma,
    check_delta,
    default_delta,
    epsilon,
    mechanism_from_dict,
)
from dpdistill.privacy.cli import privacy_command


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg
    assert isinstance(err.value, PrivacyError) and isinstance(err.value, DpdistillError)
    return msg


def test_default_delta_is_one_over_n_log_n():
    assert default_delta(60_000) == pytest.approx(1 / (60_000 * math.log(60_000)), rel=1e-15)
    assert default_delta(1797) < 1 / 1797
    assert check_delta(default_delta(1000), 1000) == default_delta(1000)


@pytest.mark.parametrize("delta", [1 / 1000, 0.002, 0.5])
def test_delta_at_or_above_one_over_n_is_refused(delta):
    with pytest.raises(PrivacyError) as err:
        check_delta(delta, 1000)
    msg = one_line(err)
    assert f"delta={delta!r} must be < 1/n = 0.001 for n=1000 sensitive records" in msg
    with pytest.raises(PrivacyError, match="must be < 1/n"):
        PrivacyLedger(None, epsilon_budget=1.0, delta=delta, n_records=1000)


@pytest.mark.parametrize("delta", [0.0, -1e-5, 1.0, float("nan")])
def test_delta_outside_unit_interval_is_refused(delta):
    with pytest.raises(PrivacyError) as err:
        epsilon(Gaussian(1.0), delta)
    assert "delta must" in one_line(err)


def test_n_too_small_is_refused():
    with pytest.raises(PrivacyError) as err:
        default_delta(1)
    assert "n_records (size of the sensitive training split) must be an integer >= 2, got 1" == one_line(err)


@pytest.mark.parametrize("eps", [0, 0.0, -1.0, float("inf")])
def test_epsilon_at_or_below_zero_is_refused(eps):
    with pytest.raises(PrivacyError) as err:
        PrivacyLedger(None, epsilon_budget=eps, delta=1e-5)
    assert one_line(err) == f"epsilon_budget must be a finite number > 0, got {eps!r}"
    with pytest.raises(PrivacyError) as err:
        calibrate_sigma(eps, 1e-5, 0.01, 100)
    assert one_line(err) == f"target_epsilon must be a finite number > 0, got {eps!r}"
    with pytest.raises(PrivacyError) as err:
        RandomizedResponse(eps)
    assert one_line(err) == f"epsilon must be a finite number > 0, got {eps!r}"


@pytest.mark.parametrize("q", [0.0, -0.1, 1.0000001, 2, float("nan")])
def test_q_outside_zero_one_is_refused(q):
    with pytest.raises(PrivacyError) as err:
        PoissonGaussian(q, 1.0, 10)
    assert one_line(err).startswith("q (sampling rate) must lie in (0, 1], got ") or "got NaN" in str(
        err.value
    )


def test_q_equal_to_one_is_accepted():
    assert PoissonGaussian(1.0, 1.0, 1).q == 1.0


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("inf")])
def test_sigma_at_or_below_zero_is_refused(sigma):
    with pytest.raises(PrivacyError) as err:
        PoissonGaussian(0.01, sigma, 10)
    assert one_line(err) == f"sigma (noise) must be a finite number > 0, got {sigma!r}"
    with pytest.raises(PrivacyError) as err:
        Gaussian(sigma)
    assert one_line(err) == f"sigma (noise) must be a finite number > 0, got {sigma!r}"


@pytest.mark.parametrize("steps", [0, -3, 1.5, "10", True])
def test_steps_below_one_or_not_integer_is_refused(steps):
    with pytest.raises(PrivacyError) as err:
        PoissonGaussian(0.01, 1.0, steps)
    assert one_line(err) == f"steps must be an integer >= 1, got {steps!r}"


def test_other_parameters_are_refused_in_one_line():
    with pytest.raises(PrivacyError) as err:
        Laplace(0.0)
    assert one_line(err) == "scale must be a finite number > 0, got 0.0"
    with pytest.raises(PrivacyError) as err:
        Gaussian(1.0, sensitivity=-2.0)
    assert one_line(err) == "sensitivity must be a finite number > 0, got -2.0"
    with pytest.raises(PrivacyError) as err:
        Parallel(Gaussian(1.0), 10, argument="  ")
    assert one_line(err).startswith("Parallel needs argument: the written reason the partitions are disjoint")
    with pytest.raises(PrivacyError) as err:
        mechanism_from_dict({"type": "exponential"})
    assert "mechanism type must be one of" in one_line(err)
    with pytest.raises(PrivacyError) as err:
        RandomizedResponse.from_flip_probability(1.0, 10)
    assert "p (flip probability) must lie in (0, 1)" in one_line(err)


def test_cli_refuses_bad_and_missing_input():
    with pytest.raises(PrivacyError) as err:
        privacy_command(None, q=1.5, sigma=1.0, steps=10, delta=1e-5, target_epsilon=None)
    assert one_line(err) == "q (sampling rate) must lie in (0, 1], got 1.5"
    with pytest.raises(PrivacyError) as err:
        privacy_command(None, q=0.01, sigma=-1.0, steps=10, delta=1e-5, target_epsilon=None)
    assert one_line(err) == "sigma (noise) must be a finite number > 0, got -1.0"
    with pytest.raises(PrivacyError) as err:
        privacy_command(None, q=0.01, sigma=1.0, steps=0, delta=1e-5, target_epsilon=None)
    assert one_line(err) == "steps must be an integer >= 1, got 0"
    with pytest.raises(PrivacyError) as err:
        privacy_command(None, q=0.01, sigma=None, steps=10, delta=1e-5, target_epsilon=-1.0)
    assert one_line(err) == "target-epsilon must be a finite number > 0, got -1.0"
    with pytest.raises(PrivacyError) as err:
        privacy_command(None, q=0.01, sigma=1.0, steps=10, delta=None, target_epsilon=None)
    assert one_line(err).startswith("--delta is required to account")
