"""DP-MEPF: DP-MERF's one release with perceptual features of a network trained on public data.

What would catch it being wrong: a record's embedded vector longer than 1 (the release's sensitivity, checked on
real and on adversarial images), an extractor that sees the sensitive set (its weights must be what public
pretraining left), a fit that charges before refusing for want of a public set, and a job that accepts a spec
naming no public set. The conformance suite (tests/test_conformance.py) runs it like every other synthesiser.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpdistill import data, synthesis
from dpdistill.errors import SpecError
from dpdistill.privacy import PrivacyLedger
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.runner import run_job
from dpdistill.spec import validate_spec

TINY = dict(num_features=64, iterations=3, pretrain_iterations=2, batch_size=40, extractor_width=8,
            extractor_depth=2, extractor_epochs=1, embed_batch_size=256, gen_hidden=32)


@pytest.fixture(scope="module")
def digits():
    return data.get("digits").load_splits()["train"]


@pytest.fixture(scope="module")
def glyphs():
    """A slice of the public glyphs set at digits' size (the extractor's training set)."""
    return data.load("glyphs", "train", image_size=8).subset(torch.arange(2000))


@pytest.fixture(scope="module")
def pretrained(glyphs):
    synth = synthesis.create("dp-mepf", channels=1, image_size=8, num_classes=10, seed=1, **TINY)
    synth.pretrain(glyphs)
    return synth


@pytest.mark.parametrize("weight", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("second_moment", [False, True])
def test_every_record_contributes_at_most_norm_one(digits, glyphs, weight, second_moment):
    """The release's sensitivity: one record's row of the per-class sums has norm 1 (the counts ride beside it
    with b² of the unit budget, as DP-MERF's), on real records and on images built to be extreme."""
    synth = synthesis.create("dp-mepf", channels=1, image_size=8, num_classes=10, seed=2,
                             **{**TINY, "perceptual_weight": weight, "second_moment": second_moment})
    synth.pretrain(glyphs)
    fmap = synth.feature_map()
    extreme = torch.stack([torch.ones(1, 8, 8), torch.zeros(1, 8, 8), (torch.arange(64.0) % 2).view(1, 8, 8),
                           torch.full((1, 8, 8), 1e3)])
    images = torch.cat([digits.images[:40], extreme])
    labels = torch.cat([digits.labels[:40], torch.tensor([0, 3, 7, 9])])
    norms = torch.stack([synth.class_sums(fmap, images[i : i + 1], labels[i : i + 1]).norm()
                         for i in range(len(images))])
    assert float(norms.max()) <= 1 + 1e-5
    assert torch.allclose(norms[:40], torch.ones(40), atol=1e-5)  # real records use the whole unit budget
    # The perceptual part is what the weight says it is.
    if 0 < weight < 1:
        one = synth.class_sums(fmap, images[:1], labels[:1])[labels[0]]
        rff_part = one[: fmap(images[:1]).shape[1]]
        assert math.isclose(float(rff_part.norm()), math.sqrt(1 - weight**2), rel_tol=1e-4)


def test_the_fit_never_touches_the_public_extractor(pretrained, digits):
    """Both the saved weights and the live network the features run through stay what public pretraining made."""
    saved = {k: v.clone() for k, v in pretrained.extractor_state.items()}
    live = {k: v.clone() for k, v in pretrained.perceptual().net.state_dict().items()}
    ledger = PrivacyLedger(None, 2.0, 1e-5, n_records=len(digits))
    pretrained.fit(digits, ledger, epsilon=2.0)
    assert [e["component"] for e in ledger.entries] == ["dp-mepf/embedding"]
    assert all(torch.equal(saved[k], v) for k, v in pretrained.extractor_state.items())
    assert all(torch.equal(live[k], v) for k, v in pretrained.perceptual().net.state_dict().items())
    assert all(torch.equal(saved[k], v) for k, v in live.items())


def test_removing_one_record_moves_the_sums_by_its_own_vector_only(pretrained, digits):
    """Add-or-remove-one on a batch: the sums with and without record i differ by exactly i's vector (no
    coupling between records, e.g. batch statistics), of norm at most 1."""
    fmap = pretrained.feature_map()
    x, y = digits.images[:32], digits.labels[:32]
    full = pretrained.class_sums(fmap, x, y)
    for i in (0, 7, 31):
        keep = torch.arange(32) != i
        diff = full - pretrained.class_sums(fmap, x[keep], y[keep])
        alone = pretrained.class_sums(fmap, x[i : i + 1], y[i : i + 1])
        assert torch.allclose(diff, alone, atol=1e-5)
        assert float(diff.norm()) <= 1 + 1e-5


def test_a_fit_without_a_public_extractor_is_refused_before_the_charge(digits):
    synth = synthesis.create("dp-mepf", channels=1, image_size=8, num_classes=10, seed=0, **TINY)
    ledger = PrivacyLedger(None, 2.0, 1e-5, n_records=len(digits))
    with pytest.raises(SpecError, match="pretrain first"):
        synth.fit(digits, ledger, epsilon=2.0)
    assert ledger.entries == []


def test_the_release_reloads_with_its_extractor(pretrained, digits, tmp_path):
    if not pretrained.fitted:
        pretrained.fit(digits, PrivacyLedger(None, 2.0, 1e-5, n_records=len(digits)), epsilon=2.0)
    again = synthesis.load(pretrained.save(tmp_path / "s.pt"), noise=PrivacyRandomness.secret())
    assert again.release_mmd() == pytest.approx(pretrained.release_mmd(), rel=1e-6)
    a, _ = pretrained.generate(n_per_class=2, seed=4)
    b, _ = again.generate(n_per_class=2, seed=4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["synthesize", "dpgeng"])
def test_jobs_refuse_a_spec_without_a_public_set(kind, tmp_path, monkeypatch):
    if kind == "synthesize":
        doc = {"name": "mepf", "kind": "synthesize", "data": {"name": "digits"}, "privacy": {"epsilon": 1.0},
               "method": {"name": "dp-mepf", **TINY}, "tracking": {"enabled": False}}
        field = "method.pretrain"
    else:
        doc = {"name": "mepf", "kind": "distill", "data": {"name": "digits"}, "privacy": {"epsilon": 1.0},
               "method": {"name": "dpgeng", "ipc": 1, "generator": "dp-mepf", "generator_options": TINY},
               "tracking": {"enabled": False}}
        field = "method.public"
    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read before the spec was refused")

    import dpdistill.pipelines.distill_job as distill_job

    monkeypatch.setattr(distill_job, "load_splits", no_reading)  # both jobs load their splits through it
    with pytest.raises(SpecError, match=f"field '{field}'.*public set"):
        run_job(validate_spec(doc), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("ledger.json"))


def test_a_membership_study_refuses_a_synthesiser_that_needs_a_public_set():
    """Its shadows would each fail in fit (no extractor) after Ray started; the study is refused up front."""
    from dpdistill.runtime.lira_tasks import release_for_spec

    spec = validate_spec({"name": "mepf-mia", "kind": "synthesize", "data": {"name": "digits"},
                          "privacy": {"epsilon": 1.0}, "method": {"name": "dp-mepf", **TINY}})
    with pytest.raises(SpecError, match="dp-mepf needs a public set"):
        release_for_spec(spec, 10, [0.5], [0.5])
