"""DP-GenG's stages one by one: DP-Init, extractors, the DP-SGD expert (charged first), expert guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpdistill import data
from dpdistill.distill.dpgeng.expert import DPSGDPlan, dp_finetune, dpsgd_rate_and_steps, pretrain_expert
from dpdistill.distill.dpgeng.extractors import train_extractors
from dpdistill.distill.dpgeng.guidance import ExpertGuidance
from dpdistill.distill.dpgeng.init_kmeans import confident_subset, dp_init, nearest_distinct
from dpdistill.distill.synthetic import Normalizer, SyntheticSet
from dpdistill.errors import DataError
from dpdistill.privacy import PrivacyLedger

MEAN, STD = [0.3053], [0.3760]
NET = {"net": "convnet", "width": 8, "depth": 2}


@pytest.fixture(scope="module")
def public() -> data.ImageSet:
    """Stands in for the DP-generated set: the digits test split, never the sensitive training split."""
    return data.load("digits", "test")


@pytest.fixture(scope="module")
def sensitive() -> data.ImageSet:
    return data.load("digits", "train")


def test_nearest_distinct_never_picks_a_row_twice() -> None:
    feats = np.array([[0.0], [0.1], [5.0], [10.0]])
    centroids = np.array([[0.05], [0.04], [9.0]])
    picks = nearest_distinct(feats, centroids)
    assert len(set(picks)) == 3 and picks[2] == 3 and set(picks[:2]) == {0, 1}


def test_dp_init_picks_generated_images_per_class(public) -> None:
    syn = dp_init(public, ipc=3, factor=1, embed=None, seed=0)
    images, labels = syn.export()
    assert labels.bincount().tolist() == [3] * 10
    flat = public.images.flatten(1)
    for img, lab in zip(images, labels, strict=True):
        match = (flat - img.flatten()).abs().amax(dim=1) < 1e-6
        assert match.any() and bool((public.labels[match] == lab).all())  # a generated image of its own class
    packed = dp_init(public, ipc=2, factor=2, embed=None, seed=0)
    assert packed.images.shape == (20, 1, 8, 8) and len(packed) == 80 and packed.factor == 2
    with pytest.raises(DataError, match="generated_per_class"):
        dp_init(public.subset(torch.arange(30)), ipc=10, factor=2)


def test_confident_subset_drops_each_classs_least_confident_images(public) -> None:
    # A stand-in classifier whose confidence in the own label is the image's mean brightness.
    def classify(x: torch.Tensor) -> torch.Tensor:
        own = x.flatten(1).mean(dim=1, keepdim=True)
        return own.expand(-1, 10)

    kept = confident_subset(public, classify, drop=0.25)
    before, after = public.class_counts(), kept.class_counts()
    assert after.tolist() == [int(np.ceil(0.75 * n)) for n in before.tolist()]
    brightness = public.images.flatten(1).mean(dim=1)
    kept_b = kept.images.flatten(1).mean(dim=1)
    for c in range(10):
        mine, theirs = brightness[public.labels == c], kept_b[kept.labels == c]
        # Exactly the brightest of the class remain, the dimmest quarter is gone.
        assert torch.equal(theirs.sort().values, mine.sort(descending=True).values[:len(theirs)].sort().values)
    assert confident_subset(public, classify, drop=0.0) is public


def test_init_filter_must_leave_enough_candidates() -> None:
    from dpdistill import distill
    from dpdistill.errors import SpecError

    record = distill.get("dpgeng")
    record.make_config(ipc=10, factor=2, generated_per_class=50, init_filter=0.2)  # 40 left: exactly enough
    with pytest.raises(SpecError, match="init_filter"):
        record.make_config(ipc=10, factor=2, generated_per_class=50, init_filter=0.3)


def test_extractors_are_frozen_and_distinct(public) -> None:
    nets = train_extractors(public, 2, 1, NET, MEAN, STD, seed=0)
    assert len(nets) == 2 and not any(p.requires_grad for n in nets for p in n.parameters())
    assert not torch.allclose(nets[0].classifier.weight, nets[1].classifier.weight)


class _OrderLedger(PrivacyLedger):
    """Records whether a charge happened before the network was first trained."""

    def charge(self, component, mechanism, note=""):  # noqa: ANN001, ANN201
        self.charged_at_step = _OrderLedger.steps
        return super().charge(component, mechanism, note)


def test_dp_finetune_charges_its_whole_plan_before_the_first_step(public, sensitive, monkeypatch) -> None:
    expert = pretrain_expert(public, NET, 1, MEAN, STD, seed=0)
    q, steps = dpsgd_rate_and_steps(len(sensitive), 128, 1.0)
    assert q == pytest.approx(1 / 11) and steps == 11
    plan = DPSGDPlan(q, steps, 1.2, 1.0, 128)
    _OrderLedger.steps = 0
    from torch.optim import SGD

    original = SGD.step

    def counting_step(self, *a, **k):  # noqa: ANN001, ANN202
        _OrderLedger.steps += 1
        return original(self, *a, **k)

    monkeypatch.setattr(SGD, "step", counting_step)
    ledger = _OrderLedger(None, 10.0, 1e-4, n_records=len(sensitive))
    tuned = dp_finetune(expert, sensitive, plan, ledger, MEAN, STD)
    assert ledger.charged_at_step == 0 and _OrderLedger.steps == steps
    (entry,) = ledger.entries
    assert entry["component"] == "dpgeng/expert"
    assert entry["mechanism"] == {"type": "poisson_gaussian", "q": q, "sigma": 1.2, "steps": steps}
    assert not any(p.requires_grad for p in tuned.parameters())
    assert not torch.allclose(tuned.classifier.weight, expert.classifier.weight)  # it did train


def test_expert_guidance_loss_reaches_the_images(public) -> None:
    expert = pretrain_expert(public, NET, 2, MEAN, STD, seed=0).eval()
    for p in expert.parameters():
        p.requires_grad_(False)
    guide = ExpertGuidance(expert, public, Normalizer(MEAN, STD), refs=4, ce_weight=0.5)
    assert torch.allclose(guide.probs.sum(1), torch.ones(len(public)), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 3])
    targets = guide.reference_targets(labels, g)
    assert targets.shape == (3, 10) and torch.allclose(targets.sum(1), torch.ones(3), atol=1e-5)
    syn = SyntheticSet.from_noise(10, 1, (1, 8, 8), g)
    loss = guide.loss(syn, g)
    loss.backward()
    assert float(loss.detach()) > 0 and syn.images.grad is not None and float(syn.images.grad.abs().sum()) > 0
