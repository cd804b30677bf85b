"""Every synthesiser fits and generates on digits in seconds, spends exactly its budget, and its noise is real."""

from __future__ import annotations

import warnings

import pytest
import torch

from dpdistill import data, synthesis
from dpdistill.errors import PrivacyError
from dpdistill.privacy import PrivacyLedger

# Tiny configurations: seconds each on 2 cores with 8x8 digits.
TINY: dict[str, dict] = {
    "dp-merf": {"num_features": 400, "iterations": 40, "batch_size": 100},
    "dp-ntk": {"ntk_width": 32, "iterations": 40, "batch_size": 100, "embed_batch_size": 256},
    "dp-kernel": {"num_features": 400, "iterations": 40, "batch_size": 100, "gen_batch_size": 100},
    "dp-gan": {"iterations": 20, "batch_size": 64},
    "gs-wgan": {"num_discriminators": 4, "iterations": 10, "batch_size": 16, "critic_iterations": 2,
                "pretrain_d_iterations": 5},
}


@pytest.fixture(scope="module")
def digits() -> data.ImageSet:
    return data.load("digits", "train")


@pytest.fixture(scope="module")
def digits_test() -> data.ImageSet:
    return data.load("digits", "test")


def make(name: str, seed: int = 0, **overrides) -> synthesis.Synthesizer:
    return synthesis.create(name, channels=1, image_size=8, num_classes=10, seed=seed,
                            **{**TINY[name], **overrides})


def ledger_for(train: data.ImageSet, eps: float) -> PrivacyLedger:
    return PrivacyLedger(None, eps, 1e-5, n_records=len(train))


_FITTED: dict[str, tuple] = {}


def fitted(name: str, train: data.ImageSet) -> tuple:
    """(synthesiser, ledger, report) fitted once per module at ε = 3 with seed 0 (fits are the slow part)."""
    if name not in _FITTED:
        synth = make(name)
        ledger = ledger_for(train, 3.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = synth.fit(train, ledger)
        _FITTED[name] = (synth, ledger, report)
    return _FITTED[name]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus' backward-hook notice
        yield


def test_all_five_methods_are_registered():
    assert set(TINY) <= set(synthesis.names())


@pytest.mark.parametrize("name", sorted(TINY))
def test_fit_generate_spends_target_and_round_trips(name, digits, tmp_path):
    synth, ledger, report = fitted(name, digits)
    # The ledger total is the target within 1 %, and the report agrees with the ledger.
    assert abs(ledger.spent_epsilon() - 3.0) / 3.0 < 0.01
    assert report.epsilon == pytest.approx(ledger.spent_epsilon())
    assert len(report.mechanisms) == len(ledger.entries) >= 1
    assert report.replace_one[0] == pytest.approx(2 * report.epsilon)
    # Generated label counts are as asked, images in [0, 1].
    images, labels = synth.generate(n_per_class=7)
    assert images.shape == (70, 1, 8, 8)
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 7))
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    wanted = torch.tensor([3, 3, 3, 1, 9])
    x, y = synth.generate(labels=wanted)
    assert torch.equal(y, wanted) and x.shape[0] == 5
    # save / load round-trips: same method, config and outputs.
    path = synth.save(tmp_path / f"{name}.pt")
    again = synthesis.load(path)
    assert type(again) is type(synth) and again.config == synth.config
    assert torch.equal(again.generate(n_per_class=7, seed=5)[0], synth.generate(n_per_class=7, seed=5)[0])
    assert again.report is not None and again.report.epsilon == pytest.approx(report.epsilon)


@pytest.mark.parametrize("name", sorted(TINY))
def test_different_seeds_give_different_outputs(name, digits):
    other = make(name, seed=1)
    other.fit(digits, ledger_for(digits, 3.0))
    first = fitted(name, digits)[0].generate(n_per_class=3, seed=0)[0]
    assert not torch.allclose(first, other.generate(n_per_class=3, seed=0)[0])


def test_fit_composes_with_earlier_charges(digits):
    from dpdistill.privacy import Gaussian

    ledger = ledger_for(digits, 4.0)
    ledger.charge("earlier-query", Gaussian(3.0, 1.0))
    before = ledger.spent_epsilon()
    make("dp-merf").fit(digits, ledger)
    assert ledger.spent_epsilon() > before
    assert abs(ledger.spent_epsilon() - 4.0) / 4.0 < 0.01
    assert [e["component"] for e in ledger.entries] == ["earlier-query", "dp-merf/embedding"]


def test_fit_refuses_a_spent_ledger(digits):
    ledger = ledger_for(digits, 1.0)
    synth = make("dp-merf")
    synth.fit(digits, ledger, epsilon=0.8)
    entries = len(ledger.entries)
    with pytest.raises(PrivacyError, match="leaves nothing to spend"):
        make("dp-merf").fit(digits, ledger, epsilon=0.5)  # already at 0.8: a lower total cannot be reached
    with pytest.raises(PrivacyError, match="must lie in"):
        make("dp-merf").fit(digits, ledger, epsilon=2.0)  # above the ledger's budget
    assert len(ledger.entries) == entries


def _accuracy(synth: synthesis.Synthesizer, test: data.ImageSet) -> float:
    from dpdistill.evaluation.utility import evaluate_utility

    images, labels = synth.generate(n_per_class=40, seed=0)
    result = evaluate_utility(images, labels, test.images, test.labels, num_classes=10,
                              model_kwargs={"width": 16, "depth": 2}, seeds=(0,), epochs=10, batch_size=64,
                              progress=False)
    return result.mean


@pytest.mark.parametrize("name", ["dp-merf", "dp-ntk", "dp-kernel"])
def test_huge_noise_drives_utility_to_chance(name, digits, digits_test):
    opts = {"iterations": 120, "lr": 1e-2}  # enough for > 60 % on digits without noise
    good = make(name, **opts)
    good.fit(digits, ledger_for(digits, 50.0))
    noisy = make(name, **opts)
    noisy.fit(digits, ledger_for(digits, 1e-3))  # σ in the thousands
    acc_good, acc_noisy = _accuracy(good, digits_test), _accuracy(noisy, digits_test)
    assert acc_good > 0.5
    assert acc_noisy < 0.3


def test_merf_release_carries_the_calibrated_noise(digits):
    """The released means differ from the exact ones by noise of the calibrated size (σ / (a·count))."""
    synth = make("dp-merf")
    ledger = ledger_for(digits, 1.0)
    report = synth.fit(digits, ledger)
    fmap = synth.feature_map()
    exact = synth.class_sums(fmap, digits.images, digits.labels)
    counts = torch.bincount(digits.labels, minlength=10).float()
    b = synth.config.count_weight
    a = (1 - b * b) ** 0.5
    released = synth.released["means"] * synth.released["counts"][:, None] * a  # back to noisy sums
    residual = released - a * exact
    assert residual.std().item() == pytest.approx(report.noise["sigma"], rel=0.1)
    assert not torch.allclose(synth.released["counts"], counts)
