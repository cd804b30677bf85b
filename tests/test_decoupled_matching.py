"""Decoupled DP matching (``matching: decoupled``, NDPDC and DP-GenG): one charged release, then free iterations.

- The ledger holds ONE feature-matching release whatever the iteration count (per-iteration: one step per
  iteration), and the privacy source draws one Gaussian per class, no Poisson mask.
- One record moves a class's clipped bank sum by at most C, a huge one included: the whole concatenated vector
  over the bank is clipped once (clipping per network would let it move the sum by √K·C), projected or not;
  DP-GenG's projection is learned on its generated set, and one that reduces nothing is refused before any charge.
- The release noise has std σC for the solved σ, drawn through the guarded path.
- After the release, the optimisation never reads the sensitive images again (a spy on the data set).
- A real job through the runner completes within its ε.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import conformance_suite as suite
from dpdistill import data, models
from dpdistill.distill.augment import make_dsa
from dpdistill.distill.dpgeng import DPGenGConfig, run_dpgeng
from dpdistill.distill.ndpdc import NDPDCConfig, run_ndpdc
from dpdistill.distill.private_matching import (
    MatchingBank,
    charge_decoupled,
    decoupled_mechanism,
    release_targets,
)
from dpdistill.distill.synthetic import private_normalizer
from dpdistill.errors import SpecError
from dpdistill.privacy import PrivacyLedger, epsilon
from dpdistill.privacy.noise import REPRODUCIBLE, PrivacyRandomness
from dpdistill.runner import run_job
from dpdistill.spec import validate_spec

MEAN, STD = [0.3053], [0.3760]
DELTA = 1e-5
TINY_NDPDC = dict(ipc=1, net_width=8, net_depth=2, batch_real=16, bank_size=3, augmentations=2, clip=0.8)
TINY_DPGENG = dict(ipc=1, factor=1, generated_per_class=20, extractors=2, extractor_epochs=1, net_width=8,
                   net_depth=2, expert_guidance=False, batch_real=16, augmentations=2)


class CountingNoise(PrivacyRandomness):
    """A reproducible (NOT PRIVATE, test-only) privacy source that logs every Gaussian draw and Poisson mask."""

    def __init__(self, seed: int = 11) -> None:
        super().__init__(REPRODUCIBLE, seed)
        self.draws: list[tuple[tuple[int, ...], float]] = []
        self.masks = 0

    def gaussian(self, shape: Any, std: float, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.draws.append((tuple(shape), float(std)))
        return super().gaussian(shape, std, device, dtype)

    def poisson_mask(self, n: int, q: float) -> torch.Tensor:
        self.masks += 1
        return super().poisson_mask(n, q)


@pytest.fixture(scope="module")
def digits() -> data.ImageSet:
    return data.load("digits", "train")


@pytest.fixture(scope="module")
def public() -> data.ImageSet:
    """Stands in for DP-GenG's generated set (no cost on the ledger): 200 images of the digits test split."""
    return data.load("digits", "test").subset(torch.arange(200))


def _entries(ledger: PrivacyLedger) -> list[tuple[str, dict[str, Any], str]]:
    return [(e["component"], e["mechanism"], e["note"]) for e in ledger.entries]


def _ndpdc(real: Any, iterations: int, matching: str, **extra: Any) -> tuple[Any, PrivacyLedger, CountingNoise]:
    ledger = PrivacyLedger(None, 1.0, DELTA)
    noise = CountingNoise()
    cfg = NDPDCConfig(**{**TINY_NDPDC, "iterations": iterations, "matching": matching})
    syn = run_ndpdc(real, cfg, seed=0, ledger=ledger, noise=noise, mean=MEAN, std=STD, progress=False, **extra)
    return syn, ledger, noise


# ------------------------------------------------------------------------------------------------ the ledger


def test_ndpdc_decoupled_charges_one_release_whatever_the_iteration_count(digits) -> None:
    few_syn, few, few_noise = _ndpdc(digits, 5, "decoupled")
    many_syn, many, many_noise = _ndpdc(digits, 50, "decoupled")
    assert _entries(few) == _entries(many)  # 5 or 50 iterations: the same single release
    ((component, mech, note),) = _entries(few)
    assert component == "ndpdc/feature_matching" and mech["type"] == "parallel" and mech["partitions"] == 10
    assert mech["mechanism"]["type"] == "gaussian" and mech["mechanism"]["count"] == 1
    assert "class sizes" in note and "3 networks" in note
    assert few.spent_epsilon() == pytest.approx(1.0, rel=0.01) == many.spent_epsilon()
    # One noise draw per class, no private sampling, however many steps follow.
    assert len(few_noise.draws) == len(many_noise.draws) == digits.num_classes
    assert few_noise.masks == many_noise.masks == 0
    assert few_syn.sigma == many_syn.sigma
    # What the conformance suite reads off the ledger entry (releases, noise std) is what was drawn.
    assert suite.gaussian_releases(mech) == len(few_noise.draws)
    assert suite.noise_std_rule(mech) == ("exact", pytest.approx(few_syn.sigma * TINY_NDPDC["clip"]))
    assert [std for _, std in few_noise.draws] == pytest.approx([few_syn.sigma * TINY_NDPDC["clip"]] * 10)
    # Per-iteration, by contrast, charges (and draws) once per iteration: the comparison can fail.
    _, per5, per_noise = _ndpdc(digits, 5, "per-iteration")
    ((_, per_mech, _),) = _entries(per5)
    assert per_mech["mechanism"]["steps"] == 5 and len(per_noise.draws) == 5 * digits.num_classes
    _, per7, _ = _ndpdc(digits, 7, "per-iteration")
    assert _entries(per5) != _entries(per7)


def test_dpgeng_decoupled_charges_one_release_over_its_extractor_bank(digits, public) -> None:
    ledgers, reports = [], []
    for iterations in (2, 9):
        ledger = PrivacyLedger(None, 2.0, 1e-4)
        cfg = DPGenGConfig(**{**TINY_DPGENG, "iterations": iterations, "matching": "decoupled"})
        syn = run_dpgeng(digits, cfg, seed=0, ledger=ledger, mean=MEAN, std=STD, progress=False, generated=public)
        ledgers.append(ledger)
        reports.append(syn.report)
    assert _entries(ledgers[0]) == _entries(ledgers[1])
    ((component, mech, note),) = _entries(ledgers[0])
    assert component == "dpgeng/feature_matching" and mech["mechanism"]["type"] == "gaussian"
    assert "2 networks" in note and "2 augmentations" in note
    assert ledgers[0].spent_epsilon() == pytest.approx(2.0, rel=0.01)
    assert reports[0]["sigma"]["feature_matching"] == reports[1]["sigma"]["feature_matching"]
    assert reports[1]["stages"][-1] == "distill"


def test_dpgeng_decoupled_projection_is_learned_on_generated_data_and_checked_before_any_charge(digits,
                                                                                               public) -> None:
    ledger = PrivacyLedger(None, 2.0, 1e-4)
    cfg = DPGenGConfig(**{**TINY_DPGENG, "iterations": 3, "matching": "decoupled", "projection_dim": 6})
    run_dpgeng(digits, cfg, seed=0, ledger=ledger, mean=MEAN, std=STD, progress=False, generated=public)
    ((component, mech, note),) = _entries(ledger)
    assert "projected onto 6 directions learned on the DP-generated set" in note
    assert ledger.spent_epsilon() == pytest.approx(2.0, rel=0.01)
    # 2 extractors of width 8, depth 2 on 8x8 images: 2 x 32 features; 64 would not reduce anything.
    ledger = PrivacyLedger(None, 2.0, 1e-4)
    with pytest.raises(SpecError, match="projection_dim"):
        run_dpgeng(digits, cfg.model_copy(update={"projection_dim": 64}), seed=0, ledger=ledger, progress=False,
                   generated=public)
    assert ledger.entries == []


# ------------------------------------------------------------------------------------------------ sensitivity


@pytest.mark.parametrize("clip, projected", [(0.3, False), (2.0, False), (0.3, True)])
def test_one_record_moves_the_class_sum_of_the_bank_by_at_most_c(digits, public, clip: float,
                                                                 projected: bool) -> None:
    """The query a decoupled release noises: Σ clip_C(concatenated bank features); add/remove one record."""
    torch.manual_seed(0)
    # No normalisation layer: the embedding grows with the input, so the outlier's features are huge.
    nets = [models.get("convnet", channels=1, num_classes=10, image_size=8, width=16, depth=2, norm="none")
            for _ in range(4)]
    normalize = private_normalizer(MEAN, STD, 1, "cpu")
    bank = MatchingBank(nets, normalize, make_dsa("color_crop_cutout_flip_scale_rotate"), 3,
                        torch.Generator().manual_seed(1))
    if projected:  # a subspace learned on public images: the clip applies to the projection
        bank.fit_projection(public.images, 10)
        assert bank.features(digits.images[:5]).shape == (5, 10)
        assert torch.allclose(bank.projection.T @ bank.projection, torch.eye(10), atol=1e-4)
    x = digits.images[digits.per_class_indices()[5][:30]]
    huge = 1000 * torch.ones(1, 1, 8, 8)
    # chunk=7: removing a record shifts the chunk boundaries of all later records, which must not matter.
    base = bank.clipped_sum(x, clip, chunk=7)
    for neighbour in (x[1:], torch.cat([x[:12], x[13:]]), torch.cat([x, huge]), torch.cat([huge, x])):
        moved = (bank.clipped_sum(neighbour, clip, chunk=7) - base).norm()
        assert float(moved) <= clip * (1 + 1e-5)
    # The outlier is far outside the ball under every network: clipping each network's block on its own would
    # let it move the sum by ~√4·C = 2C, and no clipping by far more, so the bound above can fail.
    with torch.no_grad():
        feats = bank.features(huge)
    if not projected:
        blocks = feats.split([n.feature_dim for n in nets], dim=1)
        assert all(float(b.norm()) > 10 * clip for b in blocks)
    assert float(feats.norm()) > 10 * clip
    added = (bank.clipped_sum(torch.cat([x, huge]), clip, chunk=7) - base).norm()
    assert float(added) == pytest.approx(clip, rel=1e-4)  # clipped to exactly C, not √K·C


# ------------------------------------------------------------------------------------------------ the noise


def test_the_release_draws_std_sigma_c_once_per_class_through_the_privacy_source(digits) -> None:
    nets = [models.get("convnet", channels=1, num_classes=10, image_size=8, width=64, depth=2) for _ in range(3)]
    normalize = private_normalizer(MEAN, STD, 1, "cpu")
    bank = MatchingBank(nets, normalize, make_dsa("crop_flip"), 2, torch.Generator().manual_seed(2))
    clip = 0.5
    ledger = PrivacyLedger(None, 1.0, DELTA)
    sigma = charge_decoupled(ledger, "test/matching", digits.num_classes, None, clip, len(nets), 2)
    # The σ the one solver returned is the one charged, and it spends the budget.
    assert ledger.entries[0]["mechanism"] == decoupled_mechanism(sigma, clip, 10).to_dict()
    assert epsilon(decoupled_mechanism(sigma, clip, 10), DELTA) == pytest.approx(1.0, rel=0.01)
    noise = CountingNoise()
    released = release_targets(bank, digits, clip, sigma, noise)
    dim = sum(n.feature_dim for n in nets)
    assert released.shape == (10, dim)
    assert noise.draws == [((dim,), pytest.approx(sigma * clip))] * 10 and noise.masks == 0
    # The released means minus the noiseless ones, times the (public) class size, is the noise: std σC.
    counts = digits.class_counts().float()
    exact = torch.stack([bank.clipped_sum(digits.images[idx], clip) for idx in digits.per_class_indices()])
    residual = released * counts.unsqueeze(1) - exact
    assert float(residual.std()) == pytest.approx(sigma * clip, rel=0.1)


# ------------------------------------------------------------------------------------------------ the data


class SpyImageSet(data.ImageSet):
    """An ImageSet that counts how often its images are read."""

    reads = 0

    def __getattribute__(self, name: str) -> Any:
        if name == "images":
            type(self).reads += 1
        return super().__getattribute__(name)


@pytest.mark.parametrize("method", ["ndpdc", "dpgeng"])
def test_after_the_release_the_loop_never_reads_the_sensitive_images(digits, public, method: str) -> None:
    spy = SpyImageSet(digits.images, digits.labels, digits.num_classes, "digits-spy")
    seen: list[int] = []

    def callback(it: int, loss: float) -> None:
        seen.append(SpyImageSet.reads)

    if method == "ndpdc":
        _ndpdc(spy, 6, "decoupled", callback=callback)
    else:  # with the DP expert's guidance too: its DP-SGD reads the split, before the loop
        cfg = DPGenGConfig(**{**TINY_DPGENG, "iterations": 6, "matching": "decoupled", "expert_guidance": True,
                              "expert_pretrain_epochs": 1, "expert_dp_epochs": 0.5, "expert_batch": 128})
        run_dpgeng(spy, cfg, seed=0, ledger=PrivacyLedger(None, 2.0, 1e-4), mean=MEAN, std=STD, progress=False,
                   generated=public, callback=callback)
    # The release read them before the first step; no step reads them again (a loop that recomputed a
    # statistic of the real images, noisy or not, would, and the set of counts would grow).
    assert seen[0] > 0 and len(seen) == 6 and len(set(seen)) == 1


# ------------------------------------------------------------------------------------------------ the runner


def test_a_decoupled_ndpdc_job_completes_within_its_epsilon(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = validate_spec({
        "name": "decoupled-ndpdc", "kind": "distill", "data": {"name": "digits"},
        "method": {"name": "ndpdc", **TINY_NDPDC, "iterations": 20, "matching": "decoupled"},
        "privacy": {"epsilon": 1.0},
        "evaluation": {"seeds": 1, "epochs": 2, "parallel": False, "model_options": {"width": 8}},
    }, "<test>")
    result = run_job(spec, tmp_path / "runs", progress=False)
    assert result.status == "completed"
    ledger = PrivacyLedger.load(result.run_dir / "ledger.json")
    ((component, mech, _),) = _entries(ledger)
    assert component == "ndpdc/feature_matching" and mech["mechanism"]["type"] == "gaussian"
    assert ledger.spent_epsilon() <= 1.0 * (1 + 1e-6)
    assert ledger.spent_epsilon() == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("method", ["ndpdc", "dpgeng-decoupled", "dpgeng-per-iteration"])
def test_an_empty_class_is_refused_before_anything_is_charged(digits, public, method: str) -> None:
    """Without class 9 there is nothing to match it against: refused with an empty ledger (the release, and
    DP-GenG's expert charge before it, used to be paid first)."""
    from dpdistill.errors import DataError

    without_9 = digits.subset((digits.labels != 9).nonzero().flatten())
    assert without_9.num_classes == 10
    ledger = PrivacyLedger(None, 2.0, 1e-4)
    with pytest.raises(DataError, match="class 9 has no records"):
        if method == "ndpdc":
            cfg = NDPDCConfig(**{**TINY_NDPDC, "iterations": 3, "matching": "decoupled"})
            run_ndpdc(without_9, cfg, seed=0, ledger=ledger, noise=CountingNoise(), mean=MEAN, std=STD,
                      progress=False)
        else:
            matching = method.removeprefix("dpgeng-")
            cfg = DPGenGConfig(**{**TINY_DPGENG, "iterations": 3, "matching": matching})
            run_dpgeng(without_9, cfg, seed=0, ledger=ledger, mean=MEAN, std=STD, progress=False,
                       generated=public)
    assert ledger.entries == []


def test_options_a_configuration_ignores_are_named_for_sweeps() -> None:
    """A sweep must not search an option the configuration ignores (its trials would be identical)."""
    per = NDPDCConfig(**{**TINY_NDPDC, "matching": "per-iteration"}).overridden_options()
    assert {"bank_size", "augmentations"} <= set(per) and "batch_real" not in per
    dec = NDPDCConfig(**{**TINY_NDPDC, "matching": "decoupled"}).overridden_options()
    assert "batch_real" in dec and "bank_size" not in dec
    no_dsa = NDPDCConfig(**{**TINY_NDPDC, "matching": "decoupled", "dsa_strategy": "none"}).overridden_options()
    assert "augmentations" in no_dsa
    gen = DPGenGConfig(**{**TINY_DPGENG, "matching": "decoupled", "dsa_strategy": "none"}).overridden_options()
    assert {"augmentations", "batch_real"} <= set(gen) and "projection_dim" not in gen
    # Without feature matching, none of the matching options shapes the run (expert guidance alone remains).
    off = DPGenGConfig(**{**TINY_DPGENG, "feature_matching": False}).overridden_options()
    assert {"matching", "batch_real", "real_precision", "clip", "sigma", "projection_dim", "dsa_strategy"} <= set(off)
    assert not {"lr_img", "eg_weight", "iterations"} & set(off)


# ------------------------------------------------------------------------------------------ DP-GenG's 'auto' rules


def test_the_noise_ratio_is_the_norm_of_one_steps_noise_on_a_class_mean_in_units_of_c() -> None:
    """σ·√d/B against a measured draw: the noise a per-iteration step adds to a class's released mean (what
    :func:`noisy_mean` adds to a zero sum), its norm divided by C."""
    from dpdistill.distill.private_matching import matching_noise_ratio
    from dpdistill.privacy.dp_ops import noisy_mean

    assert matching_noise_ratio(2.0, 64, 16) == pytest.approx(1.0)
    sigma, dim, batch, clip = 3.0, 4096, 48.0, 0.7
    noise = PrivacyRandomness.reproducible(5)
    norms = [float(noisy_mean(torch.zeros(dim), clip, sigma, batch, noise).norm()) / clip for _ in range(20)]
    assert sum(norms) / len(norms) == pytest.approx(matching_noise_ratio(sigma, dim, batch), rel=0.02)
    with pytest.raises(ValueError, match="batch"):
        matching_noise_ratio(1.0, 8, 0)


@pytest.mark.parametrize(("matching", "sigma", "expected"), [
    ("auto", 0.5, "per-iteration"),   # ratio 0.5·√32/16 ≈ 0.18: the steps carry signal
    ("auto", 8.0, "decoupled"),       # ratio 8·√32/16 ≈ 2.8: each step's targets would be mostly noise
    ("per-iteration", 8.0, "per-iteration"),  # an explicit choice is kept, with a warning
])
def test_auto_matching_releases_once_only_when_per_iteration_steps_would_be_noise(digits, public, matching: str,
                                                                                  sigma: float, expected: str) -> None:
    ledger = PrivacyLedger(None, 50.0, 1e-4)
    cfg = DPGenGConfig(**{**TINY_DPGENG, "iterations": 3, "matching": matching, "sigma": sigma})
    syn = run_dpgeng(digits, cfg, seed=0, ledger=ledger, mean=MEAN, std=STD, progress=False, generated=public,
                     noise=CountingNoise())
    rep = syn.report
    assert rep["matching"] == expected
    # The ratio from the plan: σ, the extractors' feature width (8 channels x 2 x 2 on 8x8 digits), batch 16.
    assert rep["matching_noise_ratio"] == pytest.approx(sigma * 32**0.5 / 16)
    ((component, mech, _),) = _entries(ledger)
    assert component == "dpgeng/feature_matching"
    assert ('"poisson_gaussian"' in json.dumps(mech)) == (expected == "per-iteration")
    assert ('"gaussian"' in json.dumps(mech)) == (expected == "decoupled")
    warned = [w for w in rep["warnings"] if "noise dominated" in w]
    assert len(warned) == (1 if matching == "per-iteration" else 0)


def test_factor_auto_resolves_from_the_image_size_and_is_checked_at_its_largest() -> None:
    cfg = DPGenGConfig(ipc=1, generated_per_class=20)
    assert cfg.factor == "auto" and cfg.factor_for(8) == 1 and cfg.factor_for(16) == 2 and cfg.factor_for(28) == 2
    assert DPGenGConfig(ipc=1, factor=3, generated_per_class=20).factor_for(8) == 3
    # ipc 10 x 2² = 40 images per class needed if 'auto' resolves to 2: refused before anything runs.
    with pytest.raises(ValueError, match="factor 'auto' can resolve to 2"):
        DPGenGConfig(ipc=10, generated_per_class=20)


def test_factor_auto_runs_without_multi_formation_on_8x8_digits(digits, public) -> None:
    cfg = DPGenGConfig(**{**{k: v for k, v in TINY_DPGENG.items() if k != "factor"}, "iterations": 1})
    syn = run_dpgeng(digits, cfg, seed=0, ledger=PrivacyLedger(None, 2.0, 1e-4), mean=MEAN, std=STD,
                     progress=False, generated=public)
    assert syn.report["factor"] == 1 and syn.factor == 1
    images, labels = syn.export()
    assert tuple(images.shape[1:]) == (1, 8, 8) and len(labels) == 10  # ipc 1, decoded 1:1


def test_auto_solves_the_decoupled_sigma_afresh_when_it_switches(digits, public) -> None:
    """σ unset: the ratio is computed from the per-iteration plan's σ, but the decoupled release it switches to
    is charged at ITS OWN solved σ (a single Gaussian at ε 0.5), never the per-iteration one."""
    eps = 0.5
    ledger = PrivacyLedger(None, eps, 1e-4)
    cfg = DPGenGConfig(**{**TINY_DPGENG, "iterations": 50})  # 50 steps at ε 0.5: ratio about 2 on digits
    syn = run_dpgeng(digits, cfg, seed=0, ledger=ledger, mean=MEAN, std=STD, progress=False, generated=public,
                     noise=CountingNoise())
    rep = syn.report
    assert rep["matching"] == "decoupled" and rep["matching_noise_ratio"] >= 1
    ((_, mech, _),) = _entries(ledger)
    assert '"poisson_gaussian"' not in json.dumps(mech)
    alone = charge_decoupled(PrivacyLedger(None, eps, 1e-4), "x", digits.num_classes, None, cfg.clip, 2, 2)
    assert rep["sigma"]["feature_matching"] == pytest.approx(alone)
    # The per-iteration plan's σ (50 subsampled steps: 5.6 here, against the single release's 5.9), kept apart.
    assert rep["sigma"]["feature_matching_plan"] != pytest.approx(alone, rel=0.02)
    assert rep["matching_noise_ratio"] == pytest.approx(rep["sigma"]["feature_matching_plan"] * 32**0.5 / 16)
    assert ledger.spent_epsilon() == pytest.approx(eps, rel=0.01)


# A DP-MERF generator small enough for a test: DP-GenG fits it here, so 'auto' can move the matching's share.
TINY_GENERATOR = dict(generator="dp-merf", generator_options={"iterations": 5, "num_features": 100})


@pytest.mark.parametrize(("eps", "iterations", "expected"), [
    (1.0, 50, "none"),            # ~130 records a class, 50 steps at ε ~0.4: each step mostly noise
    (200.0, 2, "per-iteration"),  # two steps at a huge ε: the steps carry signal
])
def test_auto_decides_before_the_generator_and_gives_a_noise_bound_matching_share_to_it(
        digits, eps: float, iterations: int, expected: str) -> None:
    """The ratio 'auto' decides on before anything is charged equals the one the run would see at (e); at or
    above 1 no matching runs and the generator is charged for the rest of the budget (the ledger shows it: no
    feature-matching entry, the generator's ε alone above (1 - share_expert)·ε, the total at ε); below 1 it
    is the per-iteration run as before."""
    from dpdistill.distill.dpgeng.pipeline import planned_matching_ratio

    cfg = DPGenGConfig(**{**TINY_DPGENG, **TINY_GENERATOR, "iterations": iterations, "expert_guidance": True,
                          "expert_pretrain_epochs": 1, "expert_dp_epochs": 0.2})
    ledger = PrivacyLedger(None, eps, DELTA)
    planned = planned_matching_ratio(digits, cfg, eps, PrivacyLedger(None, eps, DELTA), torch.device("cpu"), 0)
    syn = run_dpgeng(digits, cfg, seed=0, ledger=ledger, mean=MEAN, std=STD, progress=False, noise=CountingNoise())
    rep = syn.report
    assert rep["matching"] == expected
    assert rep["matching_noise_ratio"] == pytest.approx(planned)
    components = [c for c, _, _ in _entries(ledger)]
    if expected == "none":
        assert planned >= 1 and components == ["dpgeng/generator", "dpgeng/expert"]
        (gen,) = [e for e in ledger.breakdown() if e["component"] == "dpgeng/generator"]
        assert gen["epsilon_alone"] > (1 - cfg.share_expert) * eps
        assert rep["share_generator"] == pytest.approx(gen["epsilon_alone"] / eps, rel=0.01)
        assert ledger.spent_epsilon() == pytest.approx(eps, rel=0.01)  # the matching's share is not left unspent
    else:
        assert planned < 1 and components == ["dpgeng/generator", "dpgeng/expert", "dpgeng/feature_matching"]
        assert "share_generator" not in rep
        # Without the up-front decision the run reaches the same ratio at (e): the plan replicated the charges.
        again = run_dpgeng(digits, cfg.model_copy(update={"matching": "per-iteration"}), seed=0,
                           ledger=PrivacyLedger(None, eps, DELTA), mean=MEAN, std=STD, progress=False,
                           noise=CountingNoise())
        assert again.report["matching_noise_ratio"] == pytest.approx(planned)
    assert ledger.spent_epsilon() <= eps * 1.001
