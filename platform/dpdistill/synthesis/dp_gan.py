"""DP-GAN (Xie et al., 2018, as DPImageBench runs it): a conditional GAN whose discriminator is trained with
DP-SGD (opacus per-sample clipping and noise, Poisson sampling); the generator only ever sees the
discriminator, so its training is post-processing.

Discriminator step: Poisson-sample the sensitive set (rate q, every record independently, exactly what
PoissonGaussian(q, σ, steps) accounts), append a FIXED number (the expected batch size) of generated images
with uniform labels, and let opacus clip every row's gradient to ``max_grad_norm`` and add
N(0, σ²·max_grad_norm²). Adding or removing one record adds or removes one real row only, so the
sensitivity is ``max_grad_norm``; the generated rows' count must not depend on the sample size for that to
hold. The whole run is charged once, before the first step.

What is logged: the generator loss (``fit_g_loss`` every 50 steps, ``final_g_loss``), which scores generated
images with the DP-SGD discriminator: post-processing of the charged run. The discriminator's own loss is a
function of the real Poisson batch WITHOUT noise (opacus noises the gradient, not the loss), so it is never
logged.

Privacy notion: add-or-remove-one with Poisson sampling, the paper's and opacus' own; no conversion.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

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
from dpdistill.synthesis.generators import ConvCondCritic, ConvCondGenerator


@dataclass
class DPGANConfig:
    """DP-GAN options; defaults suit MNIST-scale data."""

    iterations: int = 2000  # DP-SGD discriminator steps (one generator step after each)
    batch_size: int = 256  # expected sensitive records per step (q = batch_size / n)
    max_grad_norm: float = 1.0
    lr_d: float = 2e-4
    lr_g: float = 2e-4
    z_dim: int = 10
    gen_width: int = 16
    gen_hidden: int = 256
    critic_width: int = 32
    pretrain_iterations: int = 1000


class _GAN(Synthesizer):
    """Conditional generator + critic shared by the GAN methods."""

    def build(self) -> nn.Module:
        c = self.config
        return ConvCondGenerator(c.z_dim, self.num_classes, self.channels, self.image_size, c.gen_width,
                                 c.gen_hidden)

    def make_critic(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ConvCondCritic(self.num_classes, self.channels, self.image_size, self.config.critic_width).to(
                self.device)

    def _latent(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.generator_net.z_dim, generator=g).to(self.device)
        y = torch.randint(0, self.num_classes, (n,), generator=g).to(self.device)
        return z, y


class DPGAN(_GAN):
    """DP-GAN: DP-SGD discriminator (opacus), generator by post-processing."""

    name = "dp-gan"
    config_type = DPGANConfig
    paper_neighbouring = "add-or-remove-one"
    privacy_note = "DP-SGD on the discriminator, Poisson sampling, add-or-remove sensitivity max_grad_norm"
    disclosure = fit_disclosure(noise={"sigma": ACCOUNTING, "q": ACCOUNTING}, extra={"final_g_loss": CHARGED},
                                stepped={"fit_g_loss": CHARGED})

    def _fit(self, sensitive: Any, ledger: PrivacyLedger, target_epsilon: float, progress: bool,
             callback: Callback | None) -> FitReport:
        c = self.config
        n = len(sensitive)
        q = min(1.0, c.batch_size / n)
        steps = int(c.iterations)
        guess = calibrate_sigma(target_epsilon, ledger.delta, q, steps) if not ledger.entries else 1.0
        sigma = calibrate_for_ledger(ledger, lambda s: PoissonGaussian(q, s, steps), target_epsilon, guess)
        ledger.charge(f"{self.name}/discriminator-dpsgd", PoissonGaussian(q, sigma, steps),
                      note=f"opacus DP-SGD, Poisson sampling, clip {c.max_grad_norm}")
        g_loss = self._train(sensitive, q, steps, sigma, progress, callback, "fit")
        return FitReport(self.name, 0.0, ledger.delta, {"sigma": sigma, "q": q}, [], steps=steps,
                         extra={"final_g_loss": g_loss})

    def _pretrain(self, public: Any, progress: bool) -> None:
        c = self.config
        self._train(public, min(1.0, c.batch_size / len(public)), int(c.pretrain_iterations), None, progress,
                    None, "pretrain")

    def _train(self, data: Any, q: float, steps: int, sigma: float | None, progress: bool,
               callback: Callback | None, stage: str) -> float:
        """GAN training, returning the last generator loss; with ``sigma`` the discriminator is trained by
        opacus DP-SGD, without it (public pretraining only) by plain Adam.

        Only the generator loss is reported: it scores generated images with the DP discriminator
        (post-processing). The discriminator's loss is computed on the real Poisson batch without noise, so it
        is never logged or returned.
        """
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        from dpdistill.privacy.opacus_noise import draw_noise_from

        c = self.config
        gen = self.generator_net
        gen.train()
        critic = self.make_critic(self.seed * 17 + (1 if stage == "fit" else 2))
        fake_n = max(1, round(q * len(data)))
        opt_g = torch.optim.Adam(gen.parameters(), lr=c.lr_g, betas=(0.5, 0.999))
        if sigma is not None:
            critic = GradSampleModule(critic, loss_reduction="sum")
            opt_d: Any = draw_noise_from(DPOptimizer(
                torch.optim.Adam(critic.parameters(), lr=c.lr_d, betas=(0.5, 0.999)),
                noise_multiplier=sigma, max_grad_norm=c.max_grad_norm, expected_batch_size=fake_n,
                loss_reduction="mean", generator=self.noise.generator(self.device),
            ), self.noise)  # the noise through the privacy source's guarded gaussian(), never opacus' own
        else:
            opt_d = torch.optim.Adam(critic.parameters(), lr=c.lr_d, betas=(0.5, 0.999))
        if sigma is None:  # public pretraining: the sampling is public, reproducible from the seed
            batches = public_poisson_batches(len(data), q, steps, self.seed * 19 + 7)
        else:  # sensitive: the Poisson sample PoissonGaussian accounts, from the secret source
            batches = self.noise.poisson_batches(len(data), q, steps)
        latent_g = torch.Generator().manual_seed(self.seed * 23 + 11)
        g_loss = float("nan")
        bar = _bar(progress, f"{self.name} {stage}", steps)
        for t, idx in enumerate(batches):
            # Discriminator: one DP-SGD step on real rows + a fixed number of generated rows.
            z, fy = self._latent(fake_n, latent_g)
            with torch.no_grad():
                fake = gen(z, fy)
            # The step is taken even when the Poisson sample is empty (noise on the generated rows only):
            # skipping it would make "no update" an output that only an empty sample can produce, which the
            # subsampled-Gaussian accounting does not cover.
            x = torch.cat([data.images[idx].to(self.device), fake])
            y = torch.cat([data.labels[idx].to(self.device), fy])
            target = torch.cat([torch.ones(len(idx)), torch.zeros(fake_n)]).to(self.device)
            opt_d.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(critic(x, y), target, reduction="sum")
            with warnings.catch_warnings():
                # The inputs need no gradient; opacus' full backward hooks say so on every step.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            opt_d.step()
            # Generator: post-processing of the (DP) discriminator; its hooks must not record anything.
            if sigma is not None:
                critic.disable_hooks()
            z, fy = self._latent(fake_n, latent_g)
            out = critic(gen(z, fy), fy)
            lossg = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
            opt_g.zero_grad(set_to_none=True)
            lossg.backward()
            opt_g.step()
            opt_d.zero_grad(set_to_none=True)
            if sigma is not None:
                critic.enable_hooks()
            g_loss = float(lossg.detach())
            if callback is not None and t % 50 == 0:
                callback(t, {f"{stage}_g_loss": g_loss})
            if bar is not None:
                bar.advance(bar.task_ids[0])
        if bar is not None:
            bar.stop()
        gen.eval()
        return g_loss
