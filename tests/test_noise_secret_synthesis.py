"""The synthesisers' privacy noise is secret: the seed-subtraction attack fails, two fits of the same config and
seed release different noise, the reproducible debugging mode repeats exactly, and a run in that mode is
stamped NOT PRIVATE everywhere (metrics.json, ledger.json, the MLflow tag, the CLI's first line).

On the code before the fix (commit 0ef24be and earlier) the noise was ``torch.Generator().manual_seed(seed *
1_000_003 + 7919 * salt + 17)``: the attack below recovered DP-MERF's per-class counts as exact integers and
its feature sums to float precision, and two fits with one seed gave byte-identical releases.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dpdistill import data, synthesis
from dpdistill.privacy import PrivacyLedger, PrivacyRandomness

TINY: dict[str, dict[str, Any]] = {
    "dp-merf": {"num_features": 200, "iterations": 5, "batch_size": 50},
    "dp-ntk": {"ntk_width": 16, "iterations": 5, "batch_size": 50, "embed_batch_size": 512},
    "dp-kernel": {"num_features": 200, "iterations": 5, "batch_size": 100, "gen_batch_size": 50},
    "dp-gan": {"iterations": 5, "batch_size": 32, "critic_width": 8, "gen_width": 8, "gen_hidden": 32},
    "gs-wgan": {"num_discriminators": 3, "iterations": 5, "batch_size": 8, "critic_iterations": 1,
                "pretrain_d_iterations": 2, "critic_width": 8, "gen_width": 8, "gen_hidden": 32},
}


@pytest.fixture(scope="module")
def digits() -> data.ImageSet:
    return data.load("digits", "train")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus' backward-hook notice
        yield


def fit(name: str, train: data.ImageSet, eps: float = 2.0, seed: int = 0, **kwargs: Any) -> synthesis.Synthesizer:
    synth = synthesis.create(name, channels=1, image_size=8, num_classes=10, seed=seed, **TINY[name], **kwargs)
    synth.fit(train, PrivacyLedger(None, eps, 1e-5, n_records=len(train)))
    return synth


def release(synth: synthesis.Synthesizer) -> torch.Tensor:
    """Everything the fit released, flat: the generator's weights and any released statistics."""
    parts = [p.detach().flatten() for p in synth.generator_net.state_dict().values()]
    for value in (getattr(synth, "released", None) or {}).values():
        parts.append(value.flatten())
    return torch.cat([p.float() for p in parts])


# -- the seed-subtraction attack -------------------------------------------------------------------------


def test_seed_subtraction_attack_on_dp_merf_recovers_nothing(digits, tmp_path):
    """Regenerate DP-MERF's noise from the public seed the old way and subtract it from the saved release.

    Old code: the recovered counts were the exact per-class counts (integers) and the sums exact. Now the
    attacker's guess is independent of the real noise, so what is left is real noise minus guessed noise:
    std √2·σ on the (a-scaled) sums and √2·σ / b on the counts, σ being the calibrated std (sensitivity 1).
    """
    seed = 7
    synth = synthesis.create("dp-merf", channels=1, image_size=8, num_classes=10, seed=seed, num_features=200,
                             iterations=1, batch_size=50)
    synth.fit(digits, PrivacyLedger(None, 1.0, 1e-5, n_records=len(digits)))
    path = synth.save(tmp_path / "merf.pt")

    # The attacker: the saved artifact and the public seed (written in spec.yaml and synthesizer.pt).
    loaded = synthesis.load(path)
    assert loaded.seed == seed
    sigma = loaded.report.noise["sigma"]
    assert 1.0 < sigma < 20.0  # ε ≈ 1 with sensitivity 1
    b = loaded.config.count_weight
    a = math.sqrt(1 - b * b)
    means, counts_hat = loaded.released["means"], loaded.released["counts"]
    noisy_sums, noisy_counts = means * a * counts_hat[:, None], counts_hat * b
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * 1 + 17)  # salt 1: the old _release
    guess_sums = torch.randn(tuple(noisy_sums.shape), generator=g) * sigma
    guess_counts = torch.randn(tuple(noisy_counts.shape), generator=g) * sigma
    recovered_counts = (noisy_counts - guess_counts) / b
    recovered_sums = noisy_sums - guess_sums

    # The auditor's ground truth (the feature map is public: it depends on the seed only).
    true_counts = torch.bincount(digits.labels, minlength=10).float()
    true_sums = a * loaded.class_sums(loaded.feature_map(), digits.images, digits.labels)
    unclamped = counts_hat > 1.0  # a count clamped at 1 no longer gives back its noisy sum

    # Not integers, and nowhere near the true counts.
    off_integer = (recovered_counts - recovered_counts.round()).abs()
    assert int((off_integer < 0.01).sum()) <= 3
    assert float((recovered_counts - true_counts).abs().max()) > 5.0
    # The residual is two independent noises of std σ: std √2·σ, within 15 % over 10 × 200 entries.
    residual = (recovered_sums - true_sums)[unclamped]
    assert residual.std().item() == pytest.approx(math.sqrt(2) * sigma, rel=0.15)
    count_residual = (recovered_counts - true_counts)[unclamped]
    assert 0.3 < count_residual.std().item() / (math.sqrt(2) * sigma / b) < 3.0  # 10 samples only


# -- secret by default, reproducible on request ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_two_fits_with_one_seed_release_different_noise(name, digits):
    first, second = fit(name, digits), fit(name, digits)
    assert not torch.allclose(release(first), release(second))
    # The public randomness is still the seed's: same initial weights and features on both.
    fresh = [synthesis.create(name, channels=1, image_size=8, num_classes=10, seed=0, **TINY[name])
             for _ in range(2)]
    assert torch.equal(release(fresh[0]), release(fresh[1]))


@pytest.mark.parametrize("name", sorted(TINY))
def test_reproducible_debugging_mode_repeats_exactly(name, digits):
    first = fit(name, digits, noise=PrivacyRandomness.reproducible(0))
    second = fit(name, digits, noise=PrivacyRandomness.reproducible(0))
    assert torch.equal(release(first), release(second))
    other = fit(name, digits, noise=PrivacyRandomness.reproducible(1))
    assert not torch.allclose(release(first), release(other))


def test_default_source_is_secret(tmp_path):
    synth = synthesis.create("dp-merf", channels=1, image_size=8, num_classes=10)
    assert synth.noise.private
    assert synthesis.load(synth.save(tmp_path / "s.pt")).noise.private  # nothing about the noise is saved


# -- privacy.reproducible_noise through the job ----------------------------------------------------------


def job_doc(tmp_path: Path, reproducible: bool, tracking: bool = False) -> dict[str, Any]:
    return {
        "name": "secret-noise", "kind": "synthesize", "seed": 5, "data": {"name": "digits"},
        "privacy": {"epsilon": 2.0, "reproducible_noise": reproducible},
        "method": {"name": "dp-merf", **TINY["dp-merf"], "n_per_class": 5, "fidelity": False},
        "evaluation": {"enabled": False},
        "tracking": {"enabled": tracking, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }


def synthetic(run_dir: Path) -> np.ndarray:
    return np.load(run_dir / "artifacts" / "synthetic.npz")["images"]


def test_reproducible_noise_run_is_stamped_not_private_and_repeats(tmp_path):
    import mlflow
    from typer.testing import CliRunner

    from dpdistill.cli import app
    from dpdistill.runner import run_job
    from dpdistill.spec import validate_spec

    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job_doc(tmp_path, True, tracking=True)))
    cli = CliRunner().invoke(app, ["run", str(spec_path), "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    assert cli.exit_code == 0, cli.output
    first_line = next(line for line in cli.stdout.splitlines() if line.strip())
    assert first_line.startswith("NOT PRIVATE")
    (run_dir,) = (tmp_path / "runs" / "secret-noise").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["not_private"] == 1.0
    assert json.loads((run_dir / "ledger.json").read_text())["noise"] == "reproducible"
    status = json.loads((run_dir / "status.json").read_text())
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(status["mlflow_run_id"])
    assert run.data.tags["dpdistill.privacy"] == "NOT PRIVATE"

    # The job hands its source (ctx.noise) to the synthesiser: the debugging mode repeats byte for byte ...
    again = run_job(validate_spec(job_doc(tmp_path, True)), tmp_path / "again", progress=False)
    assert np.array_equal(synthetic(run_dir), synthetic(again.run_dir))
    # ... and two private runs of the same spec do not.
    private = [run_job(validate_spec(job_doc(tmp_path, False)), tmp_path / f"private{i}", progress=False)
               for i in range(2)]
    assert not np.array_equal(synthetic(private[0].run_dir), synthetic(private[1].run_dir))
    for result in private:
        assert "not_private" not in result.metrics
        assert json.loads((result.run_dir / "ledger.json").read_text())["noise"] == "secret"
