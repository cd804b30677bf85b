"""The plan → charge → execute contract (privacy/plan.py, Synthesizer.fit): the driver charges the whole plan
before the method touches a sensitive record, a plan the budget cannot pay records nothing, a resumed fit does
not charge its plan twice, and a plan survives the trip to a worker as data."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from dpdistill import data
from dpdistill.errors import BudgetExceeded, PrivacyError, SpecError
from dpdistill.privacy import Gaussian, PoissonGaussian, PrivacyLedger
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.privacy.plan import Plan, PlannedCharge
from dpdistill.synthesis import registry
from dpdistill.synthesis.base import check_config


def _plan(sigma: float = 2.0) -> Plan:
    return Plan("toy", (PlannedCharge("toy/a", Gaussian(sigma, 1.0)),
                        PlannedCharge("toy/b", PoissonGaussian(0.01, sigma, 100))), {"sigma": sigma, "steps": 100})


def test_a_plan_that_does_not_fit_records_nothing() -> None:
    ledger = PrivacyLedger(None, 1.0, 1e-5)
    with pytest.raises(BudgetExceeded):
        _plan(sigma=0.5).charge(ledger)  # the first part alone might fit; the whole plan does not
    assert ledger.entries == []
    total = _plan(sigma=8.0).charge(PrivacyLedger(None, 1.0, 1e-5))
    assert 0 < total <= 1.0


def test_already_charged_recognises_exactly_this_plan() -> None:
    ledger = PrivacyLedger(None, 10.0, 1e-5)
    plan = _plan(4.0)
    assert not plan.already_charged(ledger)
    plan.charge(ledger)
    assert plan.already_charged(ledger)
    assert not _plan(4.5).already_charged(ledger)  # another σ is another plan
    # Through DP-GenG's ComponentLedger, which books the charges under its own component name.
    from dpdistill.distill.dpgeng.pipeline import ComponentLedger

    inner = PrivacyLedger(None, 10.0, 1e-5)
    wrapped = ComponentLedger(inner, "dpgeng/generator")
    other = _plan(4.0)
    other.charge(wrapped)
    assert {e["component"] for e in inner.entries} == {"dpgeng/generator"}
    assert other.already_charged(wrapped) and other.already_charged(inner)


def test_plan_round_trips_as_data_with_a_stable_fingerprint() -> None:
    plan = _plan(3.0)
    back = Plan.from_dict(plan.to_dict())
    assert back == plan and back.fingerprint() == plan.fingerprint()
    with pytest.raises(Exception, match="plain JSON"):
        Plan("toy", plan.charges, {"tensor": torch.zeros(1)})


def test_fit_charges_the_plan_before_execute_reads_the_sensitive_set() -> None:
    digits = data.load("digits", split="train")
    cls = registry.get("dp-merf")
    synth = cls(cls.config_type(iterations=5, num_features=200), channels=1, image_size=digits.images.shape[-1],
                num_classes=10, seed=0, noise=PrivacyRandomness.reproducible(1))
    ledger = PrivacyLedger(None, 2.0, 1e-5)
    seen: list[int] = []
    original = synth.execute

    def execute(plan, sensitive, executor, progress, callback):  # noqa: ANN001, ANN202 - test spy
        seen.append(len(ledger.entries))  # what the ledger held when the method first saw the data
        return original(plan, sensitive, executor, progress, callback)

    synth.execute = execute  # type: ignore[method-assign]
    report = synth.fit(digits, ledger)
    assert seen == [1], "execute ran before the plan was on the ledger"
    assert [e["mechanism"] for e in ledger.entries] == [m.to_dict() for m in synth.last_plan.mechanisms]
    assert report.epsilon == pytest.approx(ledger.spent_epsilon()) and report.epsilon <= 2.0
    # A second fit on the same ledger plans against what is left (a new plan, one new charge); the composed
    # total still keeps to the budget.
    first = synth.last_plan
    assert first.already_charged(ledger)
    synth.fit(digits, ledger)
    assert len(ledger.entries) == 2 and synth.last_plan != first
    assert ledger.spent_epsilon() <= 2.0 * 1.001
    # Executing a charged plan again would release a second noised result for one charge: refused, even as a
    # copy that went through JSON, and nothing is charged or released.
    released = synth.released["means"].clone()
    with pytest.raises(PrivacyError, match="already on this ledger"):
        synth.fit(digits, ledger, plan=Plan.from_dict(first.to_dict()))
    assert len(ledger.entries) == 2 and torch.equal(synth.released["means"], released)
    # A plan made elsewhere (not on this ledger) is charged once, then run.
    fresh = PrivacyLedger(None, 2.0, 1e-5)
    synth.fit(digits, fresh, plan=first)
    assert [e["mechanism"] for e in fresh.entries] == [m.to_dict() for m in first.mechanisms]


def test_a_plan_whose_params_differ_from_its_charges_is_refused_before_the_charge() -> None:
    digits = data.load("digits", split="train")
    synth = registry.get("dp-merf")(registry.get("dp-merf").config_type(iterations=2, num_features=100),
                                    channels=1, image_size=digits.image_size, num_classes=10, seed=0)
    honest = synth.plan(len(digits), PrivacyLedger(None, 2.0, 1e-5), 2.0)
    forged = Plan(honest.method, honest.charges, {**honest.params, "sigma": honest.params["sigma"] / 10})
    ledger = PrivacyLedger(None, 2.0, 1e-5)
    with pytest.raises(PrivacyError, match="charges"):
        synth.fit(digits, ledger, plan=forged)
    assert ledger.entries == [] and not synth.fitted


def test_two_plans_with_the_same_numbers_are_two_plans() -> None:
    a, b = _plan(3.0), _plan(3.0)
    assert a.plan_id != b.plan_id and a.fingerprint() != b.fingerprint()
    ledger = PrivacyLedger(None, 10.0, 1e-5)
    a.charge(ledger)
    assert a.already_charged(ledger) and not b.already_charged(ledger)


def test_check_config_allows_zero_only_where_the_field_says_so() -> None:
    @dataclasses.dataclass
    class Config:
        lr: float = 1e-3
        weight_decay: float = dataclasses.field(default=0.0, metadata={"zero_ok": True})

    check_config(Config())
    with pytest.raises(SpecError, match="'lr' must be > 0"):
        check_config(Config(lr=0.0))
    with pytest.raises(SpecError, match="'weight_decay' must be >= 0"):
        check_config(Config(weight_decay=-1.0))


@pytest.mark.parametrize(("name", "option", "value", "message"), [
    ("dp-mepf", "grid", 2.5, "'grid' must be an integer, got 2.5"),
    ("dp-merf", "num_features", "5e3", "'num_features' must be an integer, got '5e3'"),  # YAML 1.1: a string
    ("dp-merf", "iterations", True, "'iterations' must be an integer, got True"),
    ("dp-merf", "iterations", 3.0, "'iterations' must be an integer, got 3.0"),  # a dataclass keeps the float
    ("dp-merf", "lr", "0.01", "'lr' must be a number, got '0.01'"),
    ("dp-merf", "bandwidth", "wide", "'bandwidth' must be a number, got 'wide'"),  # float | None
    ("dp-mepf", "second_moment", 1, "'second_moment' must be true or false, got 1"),
])
def test_check_config_refuses_a_value_of_the_wrong_type(name, option, value, message) -> None:
    """A method option of the wrong type is one line naming it, before anything is built or read: a float in an
    integer field would otherwise crash deep in torch (a 2.5 pooling grid), a string pass the positivity check."""
    from dpdistill import synthesis

    with pytest.raises(SpecError, match=re.escape(message)):
        check_config(synthesis.make_config(name, **{option: value}))
    check_config(synthesis.make_config(name))  # the defaults pass


def test_every_registered_method_config_declares_types_check_config_can_read() -> None:
    """check_config reads each option's declared type through spec.type_hints: a config whose annotations did
    not resolve would lose its type checks, so each registered method's must resolve, field by field."""
    from dpdistill import synthesis
    from dpdistill.spec import scalar_types, type_hints
    from dpdistill.synthesis import registry

    names = registry.names()
    assert len(names) >= 10
    typed = 0
    for name in names:
        config = synthesis.make_config(name)
        hints = type_hints(type(config))
        assert {f.name for f in dataclasses.fields(config)} <= set(hints), name
        typed += sum(scalar_types(hints[f.name]) is not None for f in dataclasses.fields(config))
        check_config(config)
    assert typed > 10 * len(names)  # scalar options are the rule, so the checks are not vacuous
