"""DP-Kernel (Jiang et al., NeurIPS 2023, "functional Rényi DP"): a generator trained on a noisy MMD loss
between Poisson-sampled sensitive batches and generated batches.

Each step samples every sensitive record independently with probability q, forms the batch's per-class
kernel-feature sums ``Σ [a·phi(x) ⊗ e_y, b·e_y]`` (unit norm per record, random Fourier features of a
Gaussian kernel, so the RKHS noise of the paper becomes Gaussian noise on the features) and adds
N(0, σ²) to them. The loss ||noisy sensitive embedding − generated embedding||² is the MMD² plus a noise
term; the sensitive data enter only through the noisy sums. The whole run is ONE charge,
PoissonGaussian(q, σ, steps), made before the first step.

No noise, no step: the noise and the Poisson samples come from the synthesiser's secret
:class:`~dpdistill.privacy.noise.PrivacyRandomness` (``self.noise``), whose ``gaussian`` raises when it cannot
draw; nothing here catches that error, so a failed draw stops the fit instead of training on the clean loss.

Normalisation: sums are divided by the expected batch size q·n (n, the split size, is public, as in DP-SGD).
Class proportions come from the running mean of the noisy batch counts (post-processing).

What is logged: the noisy MMD loss every 50 steps (``fit_noisy_mmd``: computed from the noisy sums and
generated images only, post-processing of the charged releases). Nothing computed from a batch's exact sums.

Privacy notion: the paper's batch-mean embedding has replace-one sensitivity 2/B; here the batch sum has
add-or-remove sensitivity 1 with Poisson sampling (DPImageBench Appendix A's conversion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpdistill.errors import SpecError
from dpdistill.privacy import PoissonGaussian, PrivacyLedger, calibrate_sigma
from dpdistill.privacy.disclosure import ACCOUNTING, CHARGED
from dpdistill.synthesis.base import (
    Callback,
    FitReport,
    Synthesizer,
    calibrate_for_ledger,
    fit_disclosure,
    public_poisson_batches,
)
from dpdistill.synthesis.dp_merf import _bar
from dpdistill.synthesis.features import RandomFourierFeatures
from dpdistill.synthesis.generators import ConvCondGenerator


@dataclass
class DPKernelConfig:
    """DP-Kernel options; defaults suit MNIST-scale data."""

    num_features: int = 4000  # random Fourier features
    bandwidth: float | None = None  # None: 6·sqrt(d / 784), as DP-MERF
    count_weight: float = 0.1
    iterations: int = 1000  # noisy steps (each one a Poisson-sampled release)
    batch_size: int = 500  # expected sensitive records per step (q = batch_size / n)
    gen_batch_size: int = 200
    z_dim: int = 10
    gen_width: int = 16
    gen_hidden: int = 256
    lr: float = 1e-3
    pretrain_iterations: int = 500


class DPKernel(Synthesizer):
    """DP-Kernel: noisy kernel-MMD loss on Poisson-sampled batches, one charge for the whole run."""

    name = "dp-kernel"
    config_type = DPKernelConfig
    paper_neighbouring = "replace-one"
    privacy_note = ("paper: batch mean embedding, replace-one sensitivity 2/B; here: Poisson-sampled batch "
                    "sums, add-or-remove sensitivity 1, PoissonGaussian(q, σ, steps)")
    disclosure = fit_disclosure(noise={"sigma": ACCOUNTING, "q": ACCOUNTING}, stepped={"fit_noisy_mmd": CHARGED})

    def build(self) -> nn.Module:
        c = self.config
        return ConvCondGenerator(c.z_dim, self.num_classes, self.channels, self.image_size, c.gen_width,
                                 c.gen_hidden)

    def _features(self) -> RandomFourierFeatures:
        c = self.config
        d = self.channels * self.image_size * self.image_size
        bw = float(c.bandwidth) if c.bandwidth is not None else 6.0 * math.sqrt(d / 784.0)
        return RandomFourierFeatures(d, c.num_features, bw, seed=self.seed + 303).to(self.device)

    def _sums(self, fmap: RandomFourierFeatures, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phi = fmap(x)
        k = self.num_classes
        sums = torch.zeros(k, phi.shape[1], dtype=phi.dtype, device=phi.device).index_add(0, y, phi)
        return sums, torch.bincount(y, minlength=k).to(phi.dtype)

    def _fit(self, sensitive: Any, ledger: PrivacyLedger, target_epsilon: float, progress: bool,
             callback: Callback | None) -> FitReport:
        c = self.config
        if not 0 < c.count_weight < 1:
            raise SpecError(f"{self.name}: count_weight must lie in (0, 1), got {c.count_weight}")
        n = len(sensitive)
        q = min(1.0, c.batch_size / n)
        steps = int(c.iterations)
        guess = calibrate_sigma(target_epsilon, ledger.delta, q, steps) if not ledger.entries else 1.0
        sigma = calibrate_for_ledger(ledger, lambda s: PoissonGaussian(q, s, steps), target_epsilon, guess)
        ledger.charge(f"{self.name}/noisy-mmd", PoissonGaussian(q, sigma, steps),
                      note="per-step Poisson-sampled per-class RFF sums + counts, unit norm per record")
        self._train(sensitive, q, steps, sigma, progress, callback, "fit")
        return FitReport(self.name, 0.0, ledger.delta, {"sigma": sigma, "q": q}, [], steps=steps)

    def _pretrain(self, public: Any, progress: bool) -> None:
        c = self.config
        self._train(public, min(1.0, c.batch_size / len(public)), int(c.pretrain_iterations), None, progress,
                    None, "pretrain")

    def _train(self, data: Any, q: float, steps: int, sigma: float | None, progress: bool,
               callback: Callback | None, stage: str) -> None:
        """The training loop; ``sigma=None`` (public pretraining only) skips the noise."""
        c = self.config
        fmap = self._features()
        k = self.num_classes
        b = c.count_weight
        a = math.sqrt(1.0 - b * b)
        expected = q * len(data)
        net = self.generator_net
        net.train()
        per_class = max(1, c.gen_batch_size // k)
        y_gen = torch.arange(k, device=self.device).repeat_interleave(per_class)
        opt = torch.optim.Adam(net.parameters(), lr=c.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        if sigma is None:  # public pretraining: the sampling is public, reproducible from the seed
            batches = public_poisson_batches(len(data), q, steps, self.seed * 13 + 5)
        else:  # sensitive: which records each step reads is private randomness
            batches = self.noise.poisson_batches(len(data), q, steps)
        latent_g = torch.Generator().manual_seed(self.seed * 11 + 3)
        count_mean = torch.zeros(k, device=self.device)
        bar = _bar(progress, f"{self.name} {stage}", steps)
        for t, idx in enumerate(batches):
            with torch.no_grad():
                sums, counts = self._sums(fmap, data.images[idx].to(self.device), data.labels[idx].to(self.device))
                sums, counts = a * sums, b * counts
                if sigma is not None:
                    sums = self.noise.add_gaussian(sums, sigma)
                    counts = self.noise.add_gaussian(counts, sigma)
                count_mean += (counts / b - count_mean) / (t + 1)
                weights = count_mean.clamp_min(1e-3) / count_mean.clamp_min(1e-3).sum()
                target = sums / (a * expected)
            z = torch.randn(len(y_gen), net.z_dim, generator=latent_g).to(self.device)
            gen_sums, _ = self._sums(fmap, net(z, y_gen), y_gen)
            loss = (target - weights[:, None] * gen_sums / per_class).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if callback is not None and t % 50 == 0:
                callback(t, {f"{stage}_noisy_mmd": float(loss.detach())})
            if bar is not None:
                bar.advance(bar.task_ids[0])
        if bar is not None:
            bar.stop()
        net.eval()
