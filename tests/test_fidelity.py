"""Fidelity metrics: FID / IS / precision-recall behave as defined, and every result names its extractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpdistill import models
from dpdistill.errors import DataError, SpecError
from dpdistill.evaluation import extractors
from dpdistill.evaluation.extractors import DomainExtractor, DomainSpec, domain_extractor, get_extractor
from dpdistill.evaluation.fidelity import (
    evaluate_fidelity,
    fid_from_features,
    frechet_distance,
    inception_score,
    precision_recall,
)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # ||Δμ||² + Σ (√a − √b)² for commuting (diagonal) covariances.
    expected = 8.0 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_with_the_gap():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 8, generator=g)
    same = torch.randn(2000, 8, generator=g)
    shifted = same + 1.0
    assert fid_from_features(real, same) < 0.1
    assert fid_from_features(real, shifted) == pytest.approx(8.0, rel=0.1)


def test_inception_score_bounds():
    uniform = torch.full((100, 10), 0.1)
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    confident = torch.eye(10).repeat(10, 1)  # every class equally often, each sample certain
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-3)
    collapsed = torch.zeros(100, 10)
    collapsed[:, 3] = 1.0  # certain, but always the same class
    assert inception_score(collapsed)[0] == pytest.approx(1.0)


def test_precision_recall_identical_disjoint_and_collapsed():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(300, 4, generator=g) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # Mode collapse: all fakes near one real point -> high precision, low recall.
    collapsed = real[:1] + 0.01 * torch.randn(300, 4, generator=g)
    p, r = precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1
    with pytest.raises(DataError):
        precision_recall(real[:3], real[:3], k=3)


def _tiny_extractor() -> DomainExtractor:
    torch.manual_seed(0)
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, depth=2)
    return DomainExtractor(net, DomainSpec(public="digits", image_size=8, width=8, depth=2, epochs=0), 1, 0.5, 0.5)


def test_evaluate_fidelity_names_the_extractor_and_orders_sets():
    from dpdistill import data

    test = data.load("digits", "test").images
    train = data.load("digits", "train").images
    ex = _tiny_extractor()
    good = evaluate_fidelity(test, train, ex, max_samples=300)
    noise = evaluate_fidelity(test, torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)), ex,
                              max_samples=300)
    assert good.extractor == noise.extractor == ex.name and "digits" in ex.name
    assert good.fid < noise.fid
    assert good.precision > noise.precision and good.recall > noise.recall
    assert good.n_real == 300 and set(good.as_metrics()) == {"fid", "fld", "is_mean", "is_std", "precision",
                                                         "recall"}


def test_domain_extractor_is_trained_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path))
    spec = DomainSpec(public="digits", image_size=8, width=8, depth=2, epochs=1)
    first = domain_extractor(spec)
    cached = tmp_path / "extractors" / f"{spec.name}.pt"
    assert cached.is_file()
    x = torch.rand(5, 1, 8, 8)
    # The second call loads the cached weights: identical features, no training.
    monkeypatch.setattr("dpdistill.evaluation.training.train_classifier",
                        lambda *a, **k: pytest.fail("retrained despite the cache"))
    second = domain_extractor(spec)
    assert second.name == first.name == "convnet-digits-w8d2-8px-e1-s0"
    assert torch.equal(first.features_and_probs(x)[0], second.features_and_probs(x)[0])


def test_domain_extractor_refuses_a_set_that_needs_a_root():
    with pytest.raises(SpecError, match="public set"):
        domain_extractor(DomainSpec(public="mnist"), cache=False)


def test_inception_extractor_loads_a_local_weights_file(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "inception.pt"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    ex = get_extractor("inception-v3", inception_weights=str(path))
    assert ex.name.startswith("inception-v3:") and len(ex.name) == len("inception-v3:") + 12
    from dpdistill.evaluation.training import thread_limit

    with thread_limit(None):
        feats, probs = ex.features_and_probs(torch.rand(2, 1, 28, 28))
    assert feats.shape == (2, 2048) and probs.shape == (2, 1000)
    assert torch.allclose(probs.sum(1), torch.ones(2, dtype=probs.dtype))


def test_inception_extractor_errors():
    with pytest.raises(DataError, match="not found"):
        extractors.InceptionExtractor("/nonexistent/inception.pt")
    with pytest.raises(SpecError, match="weights file"):
        get_extractor("inception-v3")
    with pytest.raises(SpecError, match="expected 'inception-v3' or 'domain'"):
        get_extractor("clip")
