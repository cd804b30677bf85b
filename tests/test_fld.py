"""FLD (feature likelihood divergence): the reference's protocol on the real test split, checked independently.

The likelihood, the normalisation and the bandwidth fit are recomputed by plain numpy loops (the fit's gradient
by finite differences, not the closed form the code uses); the behaviour tests show what FLD orders and what,
under dpdistill's privacy split, it cannot see.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpdistill.errors import DataError
from dpdistill.evaluation.fidelity import FLD_EPOCHS, evaluate_fidelity, fld_from_features, fld_parts


def _np_nll(points: np.ndarray, centres: np.ndarray, log_var: np.ndarray) -> float:
    """Mean per-dimension NLL of ``points`` under the equal-weight isotropic mixture, one point at a time."""
    dim = points.shape[1]
    total = 0.0
    for x in points:
        p = 0.0
        for c, s in zip(centres, log_var, strict=True):
            var = math.exp(s)
            p += math.exp(-float(((x - c) ** 2).sum()) / (2 * var)) / (2 * math.pi * var) ** (dim / 2)
        total += -math.log(p / len(centres))
    return total / len(points) / dim


def _np_fit_loss(params: np.ndarray, centres: np.ndarray, x: np.ndarray) -> float:
    """The reference's fit loss: −mean log(Σ_j N(x|c_j, e^{s_j}) / m + N_origin(x)) / dim, params = (s, s_origin)."""
    dim, m = x.shape[1], len(centres)
    mean = x.mean(0)
    total = 0.0
    for xi in x:
        p = 0.0
        for c, s in zip(centres, params[:m], strict=True):
            p += math.exp(-((xi - c) ** 2).sum() / (2 * math.exp(s)) - dim / 2 * (s + math.log(2 * math.pi))) / m
        so = params[m]
        p += math.exp(-0.81 * ((xi - mean) ** 2).sum() / (2 * math.exp(so)) - dim / 2 * (so + math.log(2 * math.pi)))
        total += math.log(p)
    return -total / len(x) / dim


def _np_fit(centres: np.ndarray, x: np.ndarray, epochs: int = FLD_EPOCHS, lr: float = 0.5) -> np.ndarray:
    """Full-batch Adam on the fit loss with a central finite-difference gradient, as the reference steps it."""
    dim = x.shape[1]
    nearest = np.array([min(((xi - c) ** 2).sum() for xi in x) for c in centres])
    params = np.append(np.log((nearest + 1e-3) / dim), 0.0)
    m1, m2 = np.zeros_like(params), np.zeros_like(params)
    h = 1e-6
    for t in range(1, epochs + 1):
        grad = np.zeros_like(params)
        for k in range(len(params)):
            up, down = params.copy(), params.copy()
            up[k] += h
            down[k] -= h
            grad[k] = (_np_fit_loss(up, centres, x) - _np_fit_loss(down, centres, x)) / (2 * h)
        m1 = 0.9 * m1 + 0.1 * grad
        m2 = 0.999 * m2 + 0.001 * grad**2
        params = params - lr * (m1 / (1 - 0.9**t)) / (np.sqrt(m2 / (1 - 0.999**t)) + 1e-8)
        params[:-1] = np.clip(params[:-1], -40.0, 20.0)
    return params[:-1]


def test_fld_matches_an_independent_numpy_computation_on_a_tiny_case():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(14, 2)) * [1.0, 3.0] + [2.0, -1.0]
    fake = rng.normal(size=(6, 2)) * [1.5, 2.0] + [2.5, 0.0]
    parts = fld_parts(torch.from_numpy(real), torch.from_numpy(fake), seed=3)
    fit_i, scored_i = parts.fit_index.numpy(), parts.scored_index.numpy()
    assert len(fit_i) == 7 and len(scored_i) == 7 and len(parts.gen_index) == 3  # min(6 fakes, 7 // 2)

    scored = real[scored_i]
    mean, std = scored.mean(0), scored.std(0, ddof=1)  # the scored half standardises everything

    def norm(a: np.ndarray) -> np.ndarray:
        return (a - mean) / std

    gen = norm(fake[parts.gen_index.numpy()])
    base_c, base_fit = norm(real[parts.baseline_centre_index.numpy()]), norm(real[parts.baseline_fit_index.numpy()])
    # The bandwidth fit: the reference's steps, with a gradient the code does not share.
    np.testing.assert_allclose(parts.log_var.numpy(), _np_fit(gen, norm(real[fit_i])), atol=1e-5)
    np.testing.assert_allclose(parts.baseline_log_var.numpy(), _np_fit(base_c, base_fit), atol=1e-5)
    # The score, with the fitted variances: per-dimension NLL of the scored half, minus the baseline's, × 100.
    nll = _np_nll(norm(scored), gen, parts.log_var.numpy())
    baseline = _np_nll(norm(scored), base_c, parts.baseline_log_var.numpy())
    assert parts.nll == pytest.approx(nll, rel=1e-9)
    assert parts.baseline_nll == pytest.approx(baseline, rel=1e-9)
    assert parts.fld == pytest.approx(100 * (nll - baseline), rel=1e-9)


def test_the_split_is_disjoint_public_and_seeded():
    real, fake = torch.randn(41, 3), torch.randn(30, 3)
    a, b = fld_parts(real, fake, seed=5, epochs=2), fld_parts(real, fake, seed=5, epochs=2)
    assert torch.equal(a.fit_index, b.fit_index) and a.fld == b.fld  # a fixed seed: a reproducible number
    fit, scored = set(a.fit_index.tolist()), set(a.scored_index.tolist())
    assert not fit & scored and fit | scored == set(range(41)) and len(fit) == 20
    # The baseline's centres and fitting rows partition the fitting half.
    base = a.baseline_centre_index.tolist() + a.baseline_fit_index.tolist()
    assert sorted(base) == sorted(fit) and len(a.baseline_centre_index) == len(a.gen_index) == 10
    assert not torch.equal(fld_parts(real, fake, seed=6, epochs=2).fit_index, a.fit_index)


def test_constant_dimensions_are_dropped_and_small_sets_refused():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(60, 4, generator=g), torch.randn(40, 4, generator=g) + 0.3
    pad = lambda x: torch.cat([x, torch.full((len(x), 1), 7.0)], 1)  # noqa: E731
    # A dimension constant on the real data would divide by a zero std; without it, the same number.
    assert fld_from_features(pad(real), pad(fake)) == pytest.approx(fld_from_features(real, fake), rel=1e-6)
    assert pad(real).shape[1] == 5 and fld_parts(pad(real), pad(fake)).kept_dims.tolist() == [True] * 4 + [False]
    with pytest.raises(DataError, match="at least 4 real"):
        fld_from_features(real[:3], fake)
    with pytest.raises(DataError, match="features"):
        fld_from_features(real, fake[:, :3])


def _modes(n: int, g: torch.Generator, modes: int = 4, dim: int = 8) -> torch.Tensor:
    """A mixture of ``modes`` well-separated Gaussians in ``dim`` dimensions (a stand-in for class features)."""
    centres = torch.eye(modes, dim) * 6.0
    return centres[torch.randint(modes, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def test_fld_orders_honest_shifted_and_mode_dropped_samples():
    g = torch.Generator().manual_seed(1)
    real, honest = _modes(1200, g), _modes(600, g)
    shifted = honest + 1.0
    dropped = _modes(2400, g)
    dropped = dropped[dropped[:, 0] > 3.0][:600]  # one mode of four: collapsed
    scores = {name: fld_from_features(real, x) for name, x in
              (("honest", honest), ("shifted", shifted), ("dropped", dropped))}
    assert abs(scores["honest"]) < 5.0  # about the baseline: as good as real data
    assert scores["shifted"] > scores["honest"] + 10.0
    assert scores["dropped"] > scores["honest"] + 10.0


def test_what_fld_sees_of_copies_under_the_privacy_split():
    g = torch.Generator().manual_seed(2)
    real, honest, other_real = _modes(1200, g), _modes(600, g), _modes(600, g)
    parts = fld_parts(real, honest)
    honest_fld = parts.fld
    # Copies of the bandwidth-fitting half: each centre sits on a fitting row, its variance collapses and the
    # scored half gets almost no likelihood (the paper's memorisation signal, aimed here at public test data).
    copy_fit = fld_from_features(real, real[parts.fit_index])
    assert copy_fit > 1000.0 and copy_fit > 100 * abs(honest_fld)
    # Copies of the scored half are rewarded, as copies of the reference's test set are.
    assert fld_from_features(real, real[parts.scored_index]) < honest_fld - 10.0
    # Copies of records FLD never sees (the sensitive training set, here another real sample) look honest:
    # this FLD does not measure memorisation of the sensitive records.
    assert abs(fld_from_features(real, other_real) - honest_fld) < 5.0


def test_evaluate_fidelity_reports_fld_on_digits():
    from dpdistill import data, models
    from dpdistill.evaluation.extractors import DomainExtractor, DomainSpec

    torch.manual_seed(0)
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, depth=2)
    ex = DomainExtractor(net, DomainSpec(public="digits", image_size=8, width=8, depth=2, epochs=0), 1, 0.5, 0.5)
    test, train = data.load("digits", "test").images, data.load("digits", "train").images
    good = evaluate_fidelity(test, train, ex, max_samples=300)
    noise = evaluate_fidelity(test, torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)), ex,
                              max_samples=300)
    assert math.isfinite(good.fld) and good.as_metrics()["fld"] == good.fld and good.as_dict()["fld"] == good.fld
    assert good.fld < noise.fld
