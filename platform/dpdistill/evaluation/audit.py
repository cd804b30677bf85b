"""Empirical privacy audit: run a product mechanism thousands of times with and without a worst-case canary
and turn the best distinguishing attack into a Clopper–Pearson lower bound on ε, beside the claimed ε.

What is audited, each through the product's OWN code path (nothing here re-implements a release):

- ``dp-merf``: :meth:`MeanEmbeddingSynthesizer._release` of a small DP-MERF synthesiser (64 random Fourier
  features, 4×4 images, 2 classes), on the per-class sums and counts its own ``_sums_and_counts`` computes
  for D and for D ∪ {canary}. The canary is an all-ones image among near-zero ones (kernel ≈ 0 to all of them).
  Claimed: PLD ε of ``Gaussian(σ, 1)``, the charge ``_fit`` makes.
- ``dp-ntk``: the same release of a small DP-NTK synthesiser (NTK features of a width-8 random network).
- ``feature-matching``: DP feature matching's per-class release (privacy/dp_ops.py):
  :class:`PoissonClassSampler` (Poisson sampling at q = B / n_c), :func:`clipped_sum`, :func:`noisy_mean`.
  Features are the flattened images (the identity embedding); the canary alone has a non-zero coordinate 0,
  so its clipped vector (norm C) is orthogonal to every other record's. Claimed: PLD ε of one
  ``PoissonGaussian(q, σ)`` step with q the larger of the two worlds' rates.
- ``dp-sgd``: one step of opacus' ``DPOptimizer`` (per-sample clipping to C, noise σC from the privacy
  source's generator, as the DP-SGD expert and DP-GAN use it) on a linear model whose per-sample gradient is
  the record itself; full batch (no sampling). Claimed: PLD ε of ``Gaussian(σC, C)``.
- ``localdp``: SFDD's :meth:`LocalDP.privatise`; the canary moves the client's update from +C·e₀ to −C·e₀ (the
  worst case of its 2C sensitivity). Claimed: PLD ε of ``LocalDP.mechanism()``.

The attack. Every mechanism is Gaussian noise on a query; the canary shifts the query by its own contribution
v, so the likelihood-ratio (Neyman–Pearson optimal) test thresholds the projection ⟨output, v⟩. The adversary
knows D, the canary and everything public, including the seed: with ``noise="public-seed"`` (the bug issue 19
fixed: noise derived from the public ``spec.seed``) trial i runs both worlds with
``PrivacyRandomness.reproducible(seed + i)`` and the adversary subtracts its own rerun of M(D) under that seed
before projecting, so it sees the canary's contribution exactly. With ``noise="secret"`` (the product's
mode) each run gets a fresh secret source and the adversary has nothing to subtract. ``noise_scale`` < 1
releases with that fraction of the calibrated noise while still claiming the calibrated ε (a broken mechanism).

The bound and its statistics: :mod:`dpdistill.evaluation.audit_stats`. A lower bound above the claimed ε means
the mechanism is not (claimed ε, δ)-DP with confidence 1 − α (up to the threshold-selection caveat noted
there); a bound below it proves nothing beyond "this attack did not find a violation".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dpdistill.errors import SpecError
from dpdistill.evaluation.audit_stats import epsilon_lower_bound
from dpdistill.privacy import Gaussian, PoissonGaussian, calibrate_gaussian, calibrate_sigma
from dpdistill.privacy import epsilon as account_epsilon
from dpdistill.privacy.noise import PrivacyRandomness

MECHANISMS = ("dp-merf", "dp-ntk", "feature-matching", "dp-sgd", "localdp")
NOISE_MODES = ("secret", "public-seed")

# A release: (world, source) -> the released vector; world 0 is D, world 1 is D ∪ {canary}.
Release = Callable[[int, PrivacyRandomness], torch.Tensor]


@dataclass(frozen=True)
class AuditSetup:
    """One mechanism ready to audit: its release, the canary's direction and the ε the product claims."""

    release: Release
    direction: torch.Tensor  # the canary's contribution (the projection the attack uses)
    claimed_epsilon: float
    sigma: float  # the calibrated noise parameter (as the mechanism's own code takes it)
    description: str


@dataclass(frozen=True)
class AuditResult:
    """An audit's outcome: claimed ε (PLD) beside the empirical lower bound and how it was obtained."""

    mechanism: str
    description: str
    target_epsilon: float
    claimed_epsilon: float
    epsilon_lower_bound: float
    delta: float
    alpha: float
    trials: int  # runs per world
    tpr: float
    fpr: float
    threshold: float
    rule: str
    sigma: float
    noise: str
    noise_scale: float
    select_fraction: float
    seconds: float

    @property
    def violated(self) -> bool:
        """True when the audit proves (at confidence 1 − α) that the claimed ε does not hold."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "violated": self.violated}


def _check_common(target_epsilon: float, delta: float, noise_scale: float) -> None:
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise SpecError(f"audit: epsilon must be a finite number > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise SpecError(f"audit: delta must lie in (0, 1), got {delta}")
    if not (noise_scale > 0 and math.isfinite(noise_scale)):
        raise SpecError(f"audit: noise_scale must be a finite number > 0, got {noise_scale}")


# -- the mechanisms ------------------------------------------------------------------------------------------

def _mean_embedding(name: str, target_epsilon: float, delta: float, noise_scale: float, seed: int) -> AuditSetup:
    from dpdistill.data.base import ImageSet
    from dpdistill.synthesis.dp_merf import DPMERF, DPMERFConfig
    from dpdistill.synthesis.dp_ntk import DPNTK, DPNTKConfig

    shape = {"channels": 1, "image_size": 4, "num_classes": 2, "seed": seed}
    if name == "dp-merf":
        synth: Any = DPMERF(DPMERFConfig(num_features=64, bandwidth=1.0, gen_width=2, gen_hidden=8), **shape)
        features = "64 random Fourier features"
    else:
        synth = DPNTK(DPNTKConfig(ntk_width=8, gen_width=2, gen_hidden=8), **shape)
        features = "NTK features of a width-8 network"
    g = torch.Generator().manual_seed(seed)
    n = 40
    images = torch.rand(n, 1, 4, 4, generator=g) * 0.1
    labels = torch.arange(n) % 2
    canary = torch.ones(1, 1, 4, 4)
    fmap = synth.feature_map()
    worlds = []
    for imgs, labs in ((images, labels), (torch.cat([images, canary]), torch.cat([labels, torch.tensor([0])]))):
        worlds.append(synth._sums_and_counts(fmap, ImageSet(imgs, labs, 2, "audit")))
    sigma = calibrate_gaussian(target_epsilon, delta)
    b = synth.config.count_weight
    a = math.sqrt(1.0 - b * b)

    def release(world: int, source: PrivacyRandomness) -> torch.Tensor:
        synth.noise = source
        sums, counts = worlds[world]
        out = synth._release(sums, counts, sigma * noise_scale)
        # Undo the released post-processing (means = noisy sums / (a · counts)) to the Gaussian release itself;
        # where a noisy count was clamped to 1 the sums are still exact, only that count's noise is lost.
        noisy_sums = out["means"] * a * out["counts"][:, None]
        return torch.cat([noisy_sums.flatten(), b * out["counts"]])

    # The canary's contribution as the product's own sums see it: [a·phi(canary) ⊗ e_0, b·e_0], norm 1.
    direction = torch.cat([(a * (worlds[1][0] - worlds[0][0])).flatten(), b * (worlds[1][1] - worlds[0][1])])
    claimed = account_epsilon(Gaussian(sigma, 1.0), delta)
    return AuditSetup(release, direction, claimed, sigma,
                      f"{name} embedding release (MeanEmbeddingSynthesizer._release), {features}, "
                      "unit sensitivity")


def _dp_merf(target_epsilon: float, delta: float, noise_scale: float, seed: int) -> AuditSetup:
    return _mean_embedding("dp-merf", target_epsilon, delta, noise_scale, seed)


def _dp_ntk(target_epsilon: float, delta: float, noise_scale: float, seed: int) -> AuditSetup:
    return _mean_embedding("dp-ntk", target_epsilon, delta, noise_scale, seed)


def _feature_matching(target_epsilon: float, delta: float, noise_scale: float, seed: int) -> AuditSetup:
    from dpdistill.data.base import ImageSet
    from dpdistill.privacy.dp_ops import PoissonClassSampler, clipped_sum, noisy_mean

    g = torch.Generator().manual_seed(seed)
    per_class, batch, clip = 50, 25, 1.0
    images = torch.rand(2 * per_class, 1, 4, 4, generator=g)
    images.view(len(images), -1)[:, 0] = 0.0  # nobody but the canary has any weight on coordinate 0
    labels = torch.arange(2 * per_class) % 2
    canary = torch.zeros(1, 1, 4, 4)
    canary.view(-1)[0] = 5.0  # clipped to norm C: the largest contribution one record can make
    samplers = [PoissonClassSampler(ImageSet(images, labels, 2, "audit"), batch),
                PoissonClassSampler(ImageSet(torch.cat([images, canary]), torch.cat([labels, torch.tensor([0])]),
                                             2, "audit"), batch)]
    q = max(s.max_rate for s in samplers)
    sigma = calibrate_sigma(target_epsilon, delta, q, 1)

    def release(world: int, source: PrivacyRandomness) -> torch.Tensor:
        sampler = samplers[world]
        total = clipped_sum(sampler.sample(0, source).flatten(1), clip)
        expected = sampler.expected_size(0)
        # Multiplying by the (public) expected batch size turns the released mean back into the noisy sum.
        return noisy_mean(total, clip, sigma * noise_scale, expected, source) * expected

    direction = torch.zeros(16)
    direction[0] = clip
    claimed = account_epsilon(PoissonGaussian(q, sigma, 1), delta)
    return AuditSetup(release, direction, claimed, sigma,
                      f"DP feature matching per-class noisy mean (PoissonClassSampler q={q:.3g}, clipped_sum, "
                      "noisy_mean)")


def _dp_sgd(target_epsilon: float, delta: float, noise_scale: float, seed: int) -> AuditSetup:
    import warnings

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    g = torch.Generator().manual_seed(seed)
    n, d, clip = 32, 16, 1.0
    x = torch.rand(n, d, generator=g)
    x[:, 0] = 0.0
    canary = torch.zeros(1, d)
    canary[0, 0] = 5.0
    data = [x, torch.cat([x, canary])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GradSampleModule(torch.nn.Linear(d, 1, bias=False))
    sigma = calibrate_gaussian(target_epsilon, delta)  # noise multiplier: std σC on sensitivity C

    def release(world: int, source: PrivacyRandomness) -> torch.Tensor:
        with torch.no_grad():
            model._module.weight.zero_()
        optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma * noise_scale,
                                max_grad_norm=clip, expected_batch_size=n, loss_reduction="sum",
                                generator=source.generator())
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # opacus' full-backward-hook notice (the inputs need no gradient)
            # The loss is linear in the weights, so each record's gradient is the record itself (then clipped).
            model(data[world]).sum().backward()
        optimizer.step()
        return -model._module.weight.detach().flatten().clone()  # = clipped gradient sum + noise (lr 1)

    direction = torch.zeros(d)
    direction[0] = clip
    claimed = account_epsilon(Gaussian(sigma * clip, clip), delta)
    return AuditSetup(release, direction, claimed, sigma,
                      "one DP-SGD step: opacus DPOptimizer, per-sample clipping, full batch")


def _localdp(target_epsilon: float, delta: float, noise_scale: float, seed: int) -> AuditSetup:
    from dpdistill.federated.defences import LocalDP

    d, clip = 16, 1.0
    # Noise std σC on sensitivity 2C: the multiplier over the sensitivity is σ/2.
    sigma = 2.0 * calibrate_gaussian(target_epsilon, delta)
    defence = LocalDP(sigma * noise_scale, clip)
    updates = [torch.zeros(d), torch.zeros(d)]
    updates[0][0], updates[1][0] = 3.0, -3.0  # both clipped to the C-ball's opposite poles

    def release(world: int, source: PrivacyRandomness) -> torch.Tensor:
        return defence.privatise(updates[world], source)

    direction = torch.zeros(d)
    direction[0] = -2.0 * clip
    claimed = account_epsilon(LocalDP(sigma, clip).mechanism(), delta)
    return AuditSetup(release, direction, claimed, sigma,
                      "SFDD LocalDP.privatise, update moved across the C-ball (sensitivity 2C)")


_SETUPS: dict[str, Callable[[float, float, float, int], AuditSetup]] = {
    "dp-merf": _dp_merf,
    "dp-ntk": _dp_ntk,
    "feature-matching": _feature_matching,
    "dp-sgd": _dp_sgd,
    "localdp": _localdp,
}


# -- the audit -----------------------------------------------------------------------------------------------

def attack_scores(setup: AuditSetup, trials: int, noise: str = "secret", seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Projection scores of ``trials`` runs per world: (without the canary, with it).

    With ``noise="public-seed"`` trial i uses ``PrivacyRandomness.reproducible(seed + i)`` in both worlds and
    the adversary, who knows that seed, subtracts its own rerun of M(D) before projecting.
    """
    if noise not in NOISE_MODES:
        raise SpecError(f"audit: noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
    v = setup.direction.flatten().double()
    scores = np.empty((2, int(trials)))
    for i in range(int(trials)):
        if noise == "public-seed":
            reference = setup.release(0, PrivacyRandomness.reproducible(seed + i)).flatten().double()
        else:
            reference = torch.zeros_like(v)  # a secret source leaves the adversary nothing to subtract
        for world in (0, 1):
            source = (PrivacyRandomness.reproducible(seed + i) if noise == "public-seed"
                      else PrivacyRandomness.secret())
            out = setup.release(world, source).flatten().double()
            scores[world, i] = float((out - reference) @ v)
    return scores[0], scores[1]


def audit_mechanism(mechanism: str, *, epsilon: float, delta: float = 1e-5, trials: int = 2000,
                    alpha: float = 0.05, noise: str = "secret", noise_scale: float = 1.0,
                    seed: int = 0, select_fraction: float = 0.5) -> AuditResult:
    """Audit one product mechanism calibrated to (``epsilon``, ``delta``): claimed ε beside the lower bound.

    ``trials`` runs per world; ``select_fraction`` of them choose the attack threshold and the rest bound ε
    (see :func:`~dpdistill.evaluation.audit_stats.epsilon_lower_bound`).
    """
    if mechanism not in _SETUPS:
        raise SpecError(f"audit: mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")
    if trials < 1:
        raise SpecError(f"audit: trials must be positive, got {trials}")
    _check_common(epsilon, delta, noise_scale)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        setup = _SETUPS[mechanism](float(epsilon), float(delta), float(noise_scale), int(seed))
        out, inn = attack_scores(setup, trials, noise, seed)
    bound = epsilon_lower_bound(out, inn, delta, alpha, select_fraction)
    return AuditResult(mechanism=mechanism, description=setup.description, target_epsilon=float(epsilon),
                       claimed_epsilon=float(setup.claimed_epsilon), epsilon_lower_bound=bound.epsilon,
                       delta=float(delta), alpha=float(alpha), trials=int(trials), tpr=bound.tpr, fpr=bound.fpr,
                       threshold=bound.threshold, rule=bound.rule, sigma=float(setup.sigma), noise=noise,
                       noise_scale=float(noise_scale),
                       select_fraction=float(select_fraction), seconds=time.perf_counter() - start)
