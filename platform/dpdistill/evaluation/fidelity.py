"""Fidelity of a synthetic set against real images: FID, FLD, Inception Score and k-NN precision / recall.

All of them are computed on features from one extractor (:mod:`dpdistill.evaluation.extractors`), whose name is
part of the result: numbers from different extractors are not comparable, so reports always print it.

- FID (Heusel et al., 2017): ||μ_r − μ_g||² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½) over the feature Gaussians.
- FLD (Jiralerspong et al., 2023): the per-dimension negative log-likelihood of held-out real features under a
  kernel density (isotropic Gaussian mixture) centred at the generated features, minus that of a baseline mixture
  centred at real features, times 100; see :func:`fld_parts` for the exact protocol and how it departs from the
  paper's (here it uses the real test split only, so it does NOT measure memorisation of the sensitive records).
- IS (Salimans et al., 2016): exp E_x KL(p(y|x) || p(y)) over ``splits`` chunks of the synthetic set, mean
  and std; computed on the extractor's own classes (ImageNet's for Inception, the public set's for the
  domain extractor).
- Precision / recall (Kynkäänniemi et al., 2019): the real (generated) manifold is the union of balls around
  each real (generated) feature reaching its k-th nearest neighbour; precision is the share of generated
  samples inside the real manifold, recall the share of real samples inside the generated one.

The real images used here are the REAL TEST split in the job (never the sensitive training records).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dpdistill.errors import DataError
from dpdistill.evaluation.extractors import Extractor
from dpdistill.evaluation.training import thread_limit


@dataclass
class FidelityResult:
    """Fidelity numbers and the extractor they were computed with."""

    fid: float
    fld: float
    inception_score: float
    inception_score_std: float
    precision: float
    recall: float
    extractor: str
    n_real: int
    n_fake: int
    k: int

    def as_metrics(self) -> dict[str, float]:
        """Flat metrics (the extractor name goes to tags / the summary, being a string)."""
        return {"fid": self.fid, "fld": self.fld, "is_mean": self.inception_score, "is_std": self.inception_score_std,
                "precision": self.precision, "recall": self.recall}

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product (few samples): regularise as pytorch-fid does.
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets [N, F]."""
    r, f = real.double().numpy(), fake.double().numpy()
    return frechet_distance(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS mean and std over ``splits`` chunks of class probabilities [N, K]."""
    probs = probs.double().clamp_min(1e-12)
    scores = []
    for chunk in torch.chunk(probs, max(1, min(splits, len(probs)))):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.log() - marginal.log())).sum(1).mean()
        scores.append(math.exp(float(kl)))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


def _kth_radii(feats: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row to its k-th nearest OTHER row."""
    radii = []
    for start in range(0, len(feats), chunk):
        d = torch.cdist(feats[start : start + chunk], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Share of ``points`` inside at least one ball (centre, radius)."""
    inside = 0
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start : start + chunk], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / max(1, len(points))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds) of fake features against real ones."""
    if min(len(real), len(fake)) <= k:
        raise DataError(f"precision/recall with k={k} needs more than {k} real and generated samples")
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _kth_radii(real, k))
    recall = _coverage(real, fake, _kth_radii(fake, k))
    return precision, recall


# ----------------------------------------------------------------------------------------------------------- FLD
# Constants of the reference code (github.com/marcojira/fld, fld/MoG.py and fld/metrics/FLD.py).
FLD_EPOCHS = 50  # passes over the bandwidth-fitting set (one Adam step per batch)
FLD_LR = 0.5  # Adam's learning rate on the log-variances
FLD_BATCH = 10_000  # fitting rows per step: below this, each epoch is one full-batch step
FLD_GEN_SIZE = 10_000  # at most this many generated features become mixture components
FLD_ORIGIN_SHRINK = (1.0 - 0.1) ** 2  # the fit's extra "origin" component sees distances shrunk by (1 - 0.1)²
FLD_LOG_VAR_RANGE = (-40.0, 20.0)  # log-variances are clamped after each step (identical points give 0 distance)
_LOG_2PI = math.log(2.0 * math.pi)


def _sq_dists(x: torch.Tensor, centres: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Squared Euclidean distances [len(x), len(centres)], computed ``chunk`` rows at a time."""
    out = torch.empty(len(x), len(centres), dtype=x.dtype)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = torch.cdist(x[start : start + chunk], centres).square_()
    return out


def _component_terms(log_var: torch.Tensor, dim: int, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) with log(w_j N(x | c_j, σ_j² I)) = scale_j ||x − c_j||² + bias_j, w_j = 1 / n_components."""
    scale = -0.5 * torch.exp(-log_var)
    bias = -0.5 * dim * (log_var + _LOG_2PI) - math.log(n_components)
    return scale, bias


def mixture_log_likelihood(x: torch.Tensor, centres: torch.Tensor, log_var: torch.Tensor,
                           chunk: int = 4096) -> torch.Tensor:
    """log p(x) of each row of ``x`` under the equal-weight mixture of N(centres_j, exp(log_var_j) I)."""
    scale, bias = _component_terms(log_var, centres.shape[1], len(centres))
    out = torch.empty(len(x), dtype=x.dtype)
    for start in range(0, len(x), chunk):
        comp = torch.addcmul(bias, _sq_dists(x[start : start + chunk], centres, chunk), scale)
        out[start : start + chunk] = torch.logsumexp(comp, dim=1)
    return out


def fit_log_variances(centres: torch.Tensor, x: torch.Tensor, *, epochs: int = FLD_EPOCHS, lr: float = FLD_LR,
                      batch_size: int = FLD_BATCH, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-component log-variances of a kernel density at ``centres`` that maximise the likelihood of ``x``.

    The reference's procedure (fld/MoG.py ``MoG.fit``): each log-variance starts at log((d²_min + 1e-3) / dim),
    d²_min the squared distance from its centre to the nearest row of ``x``; then ``epochs`` passes of Adam
    (``lr``, default betas) over batches of ``batch_size`` shuffled rows minimise −mean log-likelihood / dim,
    the log-variances clamped to [-40, 20] after each step. During the fit the mixture carries one more
    component of weight 1 (the others share weight 1), centred at the mean of ``x``, whose own fitted
    log-variance (starting at 0) sees squared distances times (1 − 0.1)²: it gives every row some likelihood,
    so an outlier does not blow up its nearest component's variance. The gradient is the closed form (not
    autograd), over distances computed once: a few passes over a [len(x), len(centres)] matrix per step.
    """
    n, dim = x.shape
    m = len(centres)
    order = torch.randperm(n, generator=generator)
    x = x[order]
    dists = _sq_dists(x, centres)  # cached, as the reference does below 250k rows
    origin = FLD_ORIGIN_SHRINK * (x - x.mean(0, keepdim=True)).square().sum(1)
    log_var = ((dists.amin(0) + 1e-3) / dim).log()
    origin_log_var = torch.zeros((), dtype=x.dtype)
    params = [log_var, origin_log_var]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    for _ in range(epochs):
        for start in range(0, n, batch_size):
            d_b, o_b = dists[start : start + batch_size], origin[start : start + batch_size]
            b = len(d_b)
            scale, bias = _component_terms(log_var, dim, m)
            comp = torch.addcmul(bias, d_b, scale)  # log w_j N(x_i | c_j), [b, m]
            o_ll = -0.5 * o_b * torch.exp(-origin_log_var) - 0.5 * dim * (origin_log_var + _LOG_2PI)
            top = torch.maximum(comp.amax(1), o_ll)
            comp.sub_(top[:, None]).exp_()
            o_e = torch.exp(o_ll - top)
            inv_z = 1.0 / (comp.sum(1) + o_e)  # responsibilities are comp[i, j] * inv_z[i]
            resp_sum = inv_z @ comp
            resp_dist = inv_z @ comp.mul_(d_b)
            # loss = −(1 / (b dim)) Σ_i log Σ_j exp(comp_ij); d comp_ij / d log_var_j = ½ d_ij e^{−s_j} − ½ dim
            grad = -(0.5 * torch.exp(-log_var) * resp_dist - 0.5 * dim * resp_sum) / (b * dim)
            r_o = o_e * inv_z
            grad_o = -(0.5 * torch.exp(-origin_log_var) * (r_o * o_b).sum() - 0.5 * dim * r_o.sum()) / (b * dim)
            step += 1
            for p, g, (m1, m2) in zip(params, (grad, grad_o), moments, strict=True):
                m1.mul_(beta1).add_(g, alpha=1 - beta1)
                m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (m2 / (1 - beta2**step)).sqrt_().add_(eps)
                p.sub_(lr * (m1 / (1 - beta1**step)) / denom)
            log_var.clamp_(*FLD_LOG_VAR_RANGE)
    return log_var


@dataclass
class FLDParts:
    """FLD and everything it was computed from: the split, the components and their fitted log-variances."""

    fld: float  # 100 × (nll − baseline_nll): lower is better, ≈ 0 for a sample as good as held-out real data
    nll: float  # mean per-dimension NLL of the scored half under the mixture at the generated features
    baseline_nll: float  # the same under the mixture at real features (the reference's baseline)
    fit_index: torch.Tensor  # rows of ``real`` that fit the bandwidths
    scored_index: torch.Tensor  # rows of ``real`` that are scored (disjoint from fit_index)
    gen_index: torch.Tensor  # rows of ``fake`` that are the generated mixture's centres
    baseline_centre_index: torch.Tensor  # rows of ``real`` (in fit_index) that are the baseline's centres
    baseline_fit_index: torch.Tensor  # rows of ``real`` (the rest of fit_index) that fit the baseline
    kept_dims: torch.Tensor  # bool [F]: the feature dimensions not constant on the scored half
    mean: torch.Tensor  # the scored half's per-dimension mean and std (kept dimensions) ...
    std: torch.Tensor  # ... which standardise every feature set, as in the reference
    log_var: torch.Tensor  # fitted log-variance of each generated centre
    baseline_log_var: torch.Tensor  # fitted log-variance of each baseline centre


def fld_parts(real: torch.Tensor, fake: torch.Tensor, *, seed: int = 0, epochs: int = FLD_EPOCHS,
              gen_size: int = FLD_GEN_SIZE) -> FLDParts:
    """Feature likelihood divergence of ``fake`` features [M, F] against ``real`` features [N >= 4, F].

    The reference's test FLD (fld/metrics/FLD.py, ``FLD(eval_feat="test")``) with its roles filled from the
    real TEST split only. ``real`` is split in two disjoint halves by ``seed`` (a public seed): the first
    ⌊N/2⌋ rows of a seeded permutation play the reference's "train" set (they fit the bandwidths), the rest
    its "test" set (they are scored). Then, as the reference does:

    1. every set is standardised by the scored half's per-dimension mean and (unbiased) std;
    2. a kernel density centred at the generated features has its per-component variances fitted to the
       fitting half (:func:`fit_log_variances`), and the scored half's mean negative log-likelihood per
       dimension, nll = −mean_x log p(x) / F, is taken;
    3. the baseline: a kernel density centred at ``size`` random rows of the fitting half, size = min(number of
       generated centres, half the fitting half), fitted to the other rows of the fitting half, scores the
       scored half the same way (baseline_nll);
    4. FLD = 100 × (nll − baseline_nll). Lower is better; about 0 means the generated set describes held-out
       real data as well as real data does; the reference warns above 1000 ("likely memorized").

    Two departures from the reference, both where it would give a meaningless number: generated features are
    capped at min(10 000, ⌊N/4⌋) centres (a seeded subset), so that the generated and baseline mixtures have
    equally many components — the reference caps at 10 000 only, which equals the baseline's count in its
    standard settings (train set ≥ 2 × 10 000) but would hand the generated mixture more components than the
    baseline on a test split this small; and dimensions constant on the scored half are dropped (the reference
    divides by their zero std), F then being the number of kept dimensions.

    PRIVACY: the reference's "train" set is the generator's training set, which is how FLD detects
    memorisation (copies of training records get collapsing variances and a very high FLD). In dpdistill that
    set is the SENSITIVE data, and nothing computed from it without noise may be released, so this FLD never
    reads it: it measures fit and generalisation against held-out real data, NOT memorisation of the sensitive
    records (copies of them look like an honest sample here). Copies of the fitting half are still caught, and
    copies of the scored half are rewarded (as copies of the reference's test set are).
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DataError(f"FLD: expected real [N, F] and fake [M, F] features, got {tuple(real.shape)} and "
                        f"{tuple(fake.shape)}")
    if len(real) < 4 or len(fake) < 1:
        raise DataError(f"FLD needs at least 4 real and 1 generated feature rows, got {len(real)} and {len(fake)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(real), generator=g)
    fit_index, scored_index = perm[: len(real) // 2], perm[len(real) // 2 :]
    n_centres = min(len(fake), gen_size, len(fit_index) // 2)
    gen_index = torch.randperm(len(fake), generator=g)[:n_centres]
    shuffled_fit = fit_index[torch.randperm(len(fit_index), generator=g)]
    baseline_centre_index, baseline_fit_index = shuffled_fit[:n_centres], shuffled_fit[n_centres:]

    scored = real[scored_index]
    std = scored.std(0)
    kept = std > 0
    if not bool(kept.any()):
        raise DataError("FLD: every feature dimension is constant on the scored real half")
    mean, std = scored.mean(0)[kept], std[kept]

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x[:, kept] - mean) / std

    fit, scored, gen = norm(real[fit_index]), norm(scored), norm(fake[gen_index])
    dim = fit.shape[1]
    log_var = fit_log_variances(gen, fit, epochs=epochs, generator=g)
    nll = float(-mixture_log_likelihood(scored, gen, log_var).mean()) / dim
    base_centres = norm(real[baseline_centre_index])
    baseline_log_var = fit_log_variances(base_centres, norm(real[baseline_fit_index]), epochs=epochs, generator=g)
    baseline_nll = float(-mixture_log_likelihood(scored, base_centres, baseline_log_var).mean()) / dim
    return FLDParts(fld=100.0 * (nll - baseline_nll), nll=nll, baseline_nll=baseline_nll, fit_index=fit_index,
                    scored_index=scored_index, gen_index=gen_index, baseline_centre_index=baseline_centre_index,
                    baseline_fit_index=baseline_fit_index, kept_dims=kept, mean=mean, std=std, log_var=log_var,
                    baseline_log_var=baseline_log_var)


def fld_from_features(real: torch.Tensor, fake: torch.Tensor, *, seed: int = 0) -> float:
    """FLD of ``fake`` features against ``real`` ones (see :func:`fld_parts`)."""
    return fld_parts(real, fake, seed=seed).fld


def evaluate_fidelity(real_images: torch.Tensor, fake_images: torch.Tensor, extractor: Extractor, *, k: int = 3,
                      max_samples: int = 10_000, seed: int = 0, is_splits: int = 10) -> FidelityResult:
    """FID, FLD, IS and precision/recall of ``fake_images`` against ``real_images`` with ``extractor``.

    At most ``max_samples`` of each are used (a seeded random subset), since precision/recall and FLD are
    quadratic. ``seed`` (public) also draws FLD's split of the real images into a bandwidth-fitting and a scored
    half (:func:`fld_parts`); ``real_images`` must be held-out real data, never the sensitive training records.
    """
    for what, x in (("real_images", real_images), ("fake_images", fake_images)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or len(x) < 2:
            raise DataError(f"evaluate_fidelity: {what} must be a tensor [N >= 2, C, H, W] in [0, 1]")
    g = torch.Generator().manual_seed(seed)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x if len(x) <= max_samples else x[torch.randperm(len(x), generator=g)[:max_samples]]

    real_images, fake_images = pick(real_images), pick(fake_images)
    with thread_limit(None):  # 1 thread on a busy machine: spin-waiting OpenMP threads are far slower
        real_f, _ = extractor.features_and_probs(real_images)
        fake_f, fake_p = extractor.features_and_probs(fake_images)
        is_mean, is_std = inception_score(fake_p, is_splits)
        precision, recall = precision_recall(real_f.float(), fake_f.float(), k)
        fld = fld_from_features(real_f.float(), fake_f.float(), seed=seed)
    return FidelityResult(
        fid=fid_from_features(real_f, fake_f), fld=fld, inception_score=is_mean, inception_score_std=is_std,
        precision=precision, recall=recall, extractor=extractor.name, n_real=len(real_images),
        n_fake=len(fake_images), k=k,
    )
