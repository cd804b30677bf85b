"""The private distillers' noise is secret: NDPDC, PSG and DP-GenG releases are no function of (spec, data).

Before the fix every noise draw and Poisson mask was seeded from the public seed, so two runs of the same spec
on the same data gave byte-identical releases, and anyone who knew every record but one could rerun the method
on D and on D minus the record and see which one reproduced the release. Each test below failed on that code.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pytest
import torch

from dpdistill import data
from dpdistill.distill.dpgeng import DPGenGConfig, run_dpgeng
from dpdistill.distill.dpgeng.expert import DPSGDPlan, dp_finetune, dpsgd_rate_and_steps, pretrain_expert
from dpdistill.distill.ndpdc import NDPDCConfig, run_ndpdc
from dpdistill.distill.psg import PSGConfig, run_psg
from dpdistill.privacy import PrivacyLedger
from dpdistill.privacy.noise import PrivacyRandomness

MEAN, STD = [0.3053], [0.3760]
NET = {"net_width": 8, "net_depth": 2}
CONFIGS: dict[str, Any] = {
    "ndpdc": (run_ndpdc, NDPDCConfig(ipc=1, iterations=3, batch_real=16, **NET)),
    "psg": (run_psg, PSGConfig(ipc=1, iterations=2, batch_real=8, outer_loop=1, inner_loop=1, **NET)),
    "dpgeng": (run_dpgeng, DPGenGConfig(
        ipc=1, factor=1, generated_per_class=20, extractors=2, extractor_epochs=1, expert_pretrain_epochs=1,
        expert_dp_epochs=0.5, expert_batch=128, iterations=3, batch_real=16,
        generator_options={"iterations": 20, "num_features": 400, "batch_size": 100}, **NET)),
}


@pytest.fixture(scope="module")
def sensitive() -> data.ImageSet:
    return data.load("digits", "train")


def _generated() -> data.ImageSet:
    """A set standing in for DP-GenG's generated one (public digits): the later stages must be secret alone."""
    return data.load("digits", "test").subset(torch.arange(200))


def _release(method: str, real: Any, noise: PrivacyRandomness | None = None, seed: int = 0,
             whole_pipeline: bool = False) -> str:
    """The SHA-256 of the released images' and labels' bytes of one run (the same spec and seed every time).

    DP-GenG runs from a given generated set unless ``whole_pipeline``, so what is tested is that its own stages
    (expert DP-SGD, feature matching) are secret, not only the synthesiser it calls.
    """
    run, cfg = CONFIGS[method]
    ledger = PrivacyLedger(None, 1.0, 1e-4, n_records=len(real))
    kwargs: dict[str, Any] = {"noise": noise} if noise is not None else {}
    if method == "dpgeng" and not whole_pipeline:
        kwargs["generated"] = _generated()
    syn = run(real, cfg, seed=seed, ledger=ledger, mean=MEAN, std=STD, progress=False, **kwargs)
    images, labels = syn.export()
    return hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_two_runs_of_the_same_spec_on_the_same_data_differ(sensitive, method: str) -> None:
    assert _release(method, sensitive) != _release(method, sensitive)


def test_two_whole_dpgeng_runs_differ(sensitive) -> None:
    assert _release("dpgeng", sensitive, whole_pipeline=True) != _release("dpgeng", sensitive, whole_pipeline=True)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_the_reproducible_debugging_source_reproduces_the_release(sensitive, method: str) -> None:
    first = _release(method, sensitive, PrivacyRandomness.reproducible(0))
    assert first == _release(method, sensitive, PrivacyRandomness.reproducible(0))
    # The release follows the noise source, not the seed alone.
    assert first != _release(method, sensitive, PrivacyRandomness.reproducible(1))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_rerunning_on_d_and_d_minus_one_no_longer_tells_which_was_used(sensitive, method: str) -> None:
    """The audit's membership attack: rerun with the public spec on both neighbours, see which one matches."""
    released = _release(method, sensitive)  # the data owner's run on D
    neighbour = sensitive.subset(torch.arange(1, len(sensitive)))  # D minus record 0
    on_d, on_d_minus = _release(method, sensitive), _release(method, neighbour)
    # On the old code `released == on_d` exactly (and != on_d_minus): membership decided with certainty.
    assert released != on_d and released != on_d_minus


class CountingRandomness(PrivacyRandomness):
    """A secret source that counts what is drawn from it, by the label of the (spawned) child drawing it."""

    def __init__(self, counts: Counter | None = None, label: str = "root") -> None:
        super().__init__()
        self.counts: Counter = counts if counts is not None else Counter()
        self.label = label

    def spawn(self, label: str) -> PrivacyRandomness:
        return CountingRandomness(self.counts, label)

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        self.counts[f"{self.label}/generator"] += 1
        return super().generator(device)

    def gaussian(self, shape: Any, std: float, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.counts[f"{self.label}/gaussian"] += 1
        return super().gaussian(shape, std, device, dtype)

    def poisson_mask(self, n: int, q: float) -> torch.Tensor:
        self.counts[f"{self.label}/poisson_mask"] += 1
        return super().poisson_mask(n, q)


def test_every_ndpdc_and_psg_step_draws_its_batches_and_noise_from_the_source(sensitive) -> None:
    classes = sensitive.num_classes
    source = CountingRandomness()
    _release("ndpdc", sensitive, source)
    iterations = CONFIGS["ndpdc"][1].iterations
    # One Poisson mask and one noisy class mean per class and step: nothing from the seed.
    assert source.counts["root/poisson_mask"] == iterations * classes
    assert source.counts["root/gaussian"] == iterations * classes
    source = CountingRandomness()
    _release("psg", sensitive, source)
    cfg = CONFIGS["psg"][1]
    steps = cfg.iterations * cfg.outer_loop
    assert source.counts["root/poisson_mask"] == steps * classes
    # One draw per parameter tensor of the noisy gradient, per class and step.
    assert source.counts["root/gaussian"] > 0 and source.counts["root/gaussian"] % (steps * classes) == 0


def test_dpgeng_hands_the_source_to_every_private_stage(sensitive) -> None:
    source = CountingRandomness()
    _release("dpgeng", sensitive, source, whole_pipeline=True)
    cfg = CONFIGS["dpgeng"][1]
    fm = cfg.iterations * sensitive.num_classes
    assert source.counts["feature_matching/poisson_mask"] == fm and source.counts["feature_matching/gaussian"] == fm
    # The expert's DP-SGD engine, per step: one Poisson mask, one Gaussian draw (all parameters at once) and a
    # generator for the objective; the mask and the draw each take a fresh generator from the source too.
    steps = source.counts["expert/gaussian"]
    assert steps > 0
    assert source.counts["expert/poisson_mask"] == steps and source.counts["expert/generator"] == 3 * steps
    assert source.counts["generator/generator"] >= 1  # the DP-MERF generator's noise (synthesis draws it)
    # Nothing private was drawn from the root itself: each stage has its own child.
    assert not [k for k in source.counts if k.startswith("root/")]


def test_the_experts_dp_sgd_sampling_and_noise_come_from_the_source(sensitive) -> None:
    public = data.load("digits", "test").subset(torch.arange(200))
    net = {"net": "convnet", "width": 8, "depth": 2, "norm": "instance"}
    expert = pretrain_expert(public, net, 1, MEAN, STD, seed=0)
    q, steps = dpsgd_rate_and_steps(len(sensitive), 256, 1.0)
    plan = DPSGDPlan(q, steps, 1.0, 1.0, 256)

    def finetune(noise: PrivacyRandomness) -> torch.Tensor:
        ledger = PrivacyLedger(None, 50.0, 1e-4, n_records=len(sensitive))
        tuned = dp_finetune(expert, sensitive, plan, ledger, MEAN, STD, noise=noise)
        return torch.cat([p.flatten() for p in tuned.parameters()])

    source = CountingRandomness()
    finetune(source)
    # Every DP-SGD step: its Poisson mask and one Gaussian draw over all parameters, from the source.
    assert source.counts["root/poisson_mask"] == steps and source.counts["root/gaussian"] == steps
    assert source.counts["root/generator"] == 3 * steps  # nothing else draws: no other generator is taken
    # Secret: two fine-tunes from the same expert on the same data differ; a reproducible source repeats.
    assert not torch.equal(finetune(PrivacyRandomness.secret()), finetune(PrivacyRandomness.secret()))
    assert torch.equal(finetune(PrivacyRandomness.reproducible(3)), finetune(PrivacyRandomness.reproducible(3)))
    with pytest.raises(Exception, match="noise multiplier"):
        dp_finetune(expert, sensitive, DPSGDPlan(q, steps, 0.0, 1.0, 256), PrivacyLedger(None, 50.0, 1e-4),
                    MEAN, STD)


def test_the_distill_job_passes_its_noise_source_to_the_method(tmp_path) -> None:
    """Through the job: secret by default (two runs differ); privacy.reproducible_noise repeats (NOT PRIVATE)."""
    from dpdistill.runner import run_job
    from dpdistill.spec import validate_spec

    def release(reproducible: bool) -> str:
        doc = {"name": "secret-ndpdc", "kind": "distill", "data": {"name": "digits"},
               "privacy": {"epsilon": 1.0, "reproducible_noise": reproducible},
               "method": {"name": "ndpdc", "ipc": 1, "iterations": 2, "batch_real": 16, **NET},
               "evaluation": {"enabled": False}, "tracking": {"enabled": False}}
        result = run_job(validate_spec(doc, "<test>"), tmp_path / "runs", progress=False)
        art = torch.load(result.run_dir / "artifacts" / "distilled.pt", weights_only=True)
        return hashlib.sha256(art["images"].numpy().tobytes()).hexdigest()

    assert release(False) != release(False)
    assert release(True) == release(True)
