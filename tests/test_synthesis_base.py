"""The Synthesizer interface: registry, configs, argument checks, privacy notions, pretraining, persistence."""

from __future__ import annotations

import pytest
import torch

from dpdistill import data, synthesis
from dpdistill.errors import DataError, PrivacyError, SpecError
from dpdistill.privacy import ADD_OR_REMOVE_ONE, REPLACE_ONE, PrivacyLedger
from dpdistill.synthesis.features import RandomFourierFeatures


def tiny(**kw) -> synthesis.Synthesizer:
    return synthesis.create("dp-merf", channels=1, image_size=8, num_classes=10, seed=0, num_features=200,
                            iterations=10, batch_size=50, **kw)


def test_registry_lists_and_refuses_by_name():
    assert {"dp-merf", "dp-ntk", "dp-kernel", "dp-gan", "gs-wgan"} <= set(synthesis.names())
    assert synthesis.get("DP-MERF") is synthesis.get("dp-merf")
    with pytest.raises(SpecError, match="unknown synthesis method 'nope'.*dp-gan.*dp-merf"):
        synthesis.get("nope")
    with pytest.raises(SpecError, match="unknown option 'widht'"):
        synthesis.make_config("dp-merf", widht=3)
    with pytest.raises(SpecError, match="'iterations' must be > 0"):
        synthesis.create("dp-merf", channels=1, image_size=8, num_classes=10, iterations=0)


@pytest.mark.parametrize("name", ["dp-merf", "dp-ntk", "dp-kernel", "dp-gan", "gs-wgan"])
def test_every_method_declares_its_privacy_notion(name):
    cls = synthesis.get(name)
    assert cls.paper_neighbouring in (ADD_OR_REMOVE_ONE, REPLACE_ONE)
    assert cls.privacy_note  # says how the paper's notion was converted
    synth = synthesis.create(name, channels=1, image_size=8, num_classes=10)
    images, labels = synth.generate(n_per_class=2)  # an unfitted generator still has the right shape
    assert images.shape == (20, 1, 8, 8) and labels.tolist() == [k for k in range(10) for _ in range(2)]


def test_generate_arguments_are_checked():
    synth = tiny()
    with pytest.raises(SpecError, match="exactly one"):
        synth.generate()
    with pytest.raises(SpecError, match="exactly one"):
        synth.generate(torch.tensor([1]), n_per_class=2)
    with pytest.raises(SpecError, match="n_per_class"):
        synth.generate(n_per_class=0)
    with pytest.raises(SpecError, match="labels must lie"):
        synth.generate(torch.tensor([10]))
    a = synth.generate(n_per_class=2, seed=3)[0]
    assert torch.equal(a, synth.generate(n_per_class=2, seed=3)[0])
    assert not torch.equal(a, synth.generate(n_per_class=2, seed=4)[0])


def test_fit_checks_its_inputs():
    digits = data.load("digits", "train")
    synth = tiny()
    with pytest.raises(PrivacyError, match="PrivacyLedger"):
        synth.fit(digits, None)
    wrong = synthesis.create("dp-merf", channels=1, image_size=28, num_classes=10)
    with pytest.raises(DataError, match=r"built for \(1, 28, 28\)"):
        wrong.fit(digits, PrivacyLedger(None, 1.0, 1e-5, n_records=len(digits)))


def test_pretrain_uses_public_data_and_costs_nothing():
    public = data.load("digits", "test")  # stands in for a public set with the same label space
    synth = tiny(pretrain_iterations=5)
    before = [p.detach().clone() for p in synth.generator_net.parameters()]
    synth.pretrain(public)
    assert synth.pretrained_on == public.name
    assert any(not torch.equal(a, b) for a, b in zip(before, synth.generator_net.parameters(), strict=True))
    letters = data.ImageSet(public.images[:40], torch.arange(40) % 20, 20, "letters")
    with pytest.raises(DataError, match="classes"):
        synth.pretrain(letters)


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(DataError, match="no saved synthesiser"):
        synthesis.load(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(DataError, match="not a dpdistill synthesiser"):
        synthesis.load(tmp_path / "x.pt")


def test_random_fourier_features_have_unit_norm_and_estimate_the_kernel():
    rff = RandomFourierFeatures(5, 20_000, bandwidth=2.0, seed=0)
    x = torch.randn(6, 5)
    phi = rff(x)
    assert torch.allclose(phi.norm(dim=1), torch.ones(6), atol=1e-5)
    exact = torch.exp(-torch.cdist(x, x).pow(2) / (2 * 2.0**2))
    assert torch.allclose(phi @ phi.T, exact, atol=0.03)
