"""GS-WGAN (Chen, Orekondy & Fritz, NeurIPS 2020): gradient-sanitised generator updates from an ensemble of
discriminators, each trained (non-privately) on its own disjoint subset of the sensitive data.

Setup. Every record is assigned to one of K subsets by an independent uniform draw (adding or removing a record
moves no other record). The draw is SECRET (``self.noise``), as is the choice of j below: they are the
subsampling the accounting amplifies by, and an adversary who could recompute them from the spec's seed would
know exactly which steps read a given record. Discriminator j is pretrained with WGAN-GP on subset j only and
keeps its OWN weights and optimiser state (:class:`DiscriminatorBank`): loading one shared checkpoint
into every discriminator would couple the subsets and void the argument below.

Step. Pick j uniformly (secretly); train D_j for ``critic_iterations`` WGAN-GP steps on batches of subset j; then draw
B generated images, and sanitise the gradient of the generator loss w.r.t. each generated image: clip each
row to norm C, add N(0, σ²C²) to every entry. The generator's parameter gradient is post-processing of that
B × d matrix. Discriminators are never released, saved or logged, and neither is anything computed through
them (a generator loss scored by critics trained on real data without noise is an uncharged release).

Accounting. A record influences a step only when its subset is picked (probability 1/K); then D_j may be
arbitrarily different, so each of the B clipped rows may move by up to 2C: the matrix has L2 sensitivity
2C·√B and noise std σC, a Gaussian with noise multiplier σ / (2√B). The run is charged once as
PoissonGaussian(1/K, σ / (2√B), steps). The paper composes B·steps releases, each subsampled at 1/K on
its own (noise multiplier σ/2); that treats the B rows of one step as independently sampled, which they are
not (all use the same D_j), so it under-counts: we account per step and calibrate σ for it, which makes the
noise per row larger than the paper's for the same ε. Like the paper, we rely on the discriminators being
the only path from the data to the release and on the subset choice being the subsampling.

Privacy notion: paper replace-one (per-row sensitivity 2C); the 2C bound also holds under add-or-remove
(D_j can change arbitrarily either way), so the ledger records add-or-remove-one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpdistill.errors import DataError
from dpdistill.privacy import PoissonGaussian, PrivacyLedger, calibrate_sigma
from dpdistill.privacy.disclosure import ACCOUNTING
from dpdistill.synthesis.base import Callback, FitReport, calibrate_for_ledger, fit_disclosure
from dpdistill.synthesis.dp_gan import _GAN
from dpdistill.synthesis.dp_merf import _bar


@dataclass
class GSWGANConfig:
    """GS-WGAN options; defaults suit MNIST-scale data on a CPU (the paper uses K = 1000 on a GPU)."""

    num_discriminators: int = 100  # K: subsampling rate 1/K
    iterations: int = 2000  # generator steps (each a sanitised release)
    batch_size: int = 32  # B: generated rows per step, and real records per critic batch
    critic_iterations: int = 5  # WGAN-GP steps of D_j per generator step
    pretrain_d_iterations: int = 100  # non-private warm-up of each discriminator on its own subset
    clip: float = 1.0  # C: per-row clipping bound of the upstream gradient
    gp_weight: float = 10.0
    lr_d: float = 1e-4
    lr_g: float = 1e-4
    z_dim: int = 10
    gen_width: int = 16
    gen_hidden: int = 256
    critic_width: int = 32
    pretrain_iterations: int = 1000  # generator warm-up on PUBLIC data (pretrain only)


class DiscriminatorBank:
    """K discriminators, each with its own weights and optimiser state, trained on its own subset only."""

    def __init__(self, make: Any, k: int, lr: float) -> None:
        self.make, self.k, self.lr = make, k, lr
        self.module: nn.Module = make(0)
        self.states: list[dict[str, torch.Tensor]] = []
        self.opt_states: list[dict[str, Any]] = []
        for j in range(k):
            net = make(j)  # seed j: independent initialisations
            self.states.append(copy.deepcopy(net.state_dict()))
            self.opt_states.append(self._optimizer(net).state_dict())

    def _optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(net.parameters(), lr=self.lr, betas=(0.5, 0.9))

    def load(self, j: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Discriminator j with ITS weights and optimiser state (one shared module, reloaded per use)."""
        self.module.load_state_dict(self.states[j])
        opt = self._optimizer(self.module)
        opt.load_state_dict(self.opt_states[j])
        return self.module, opt

    def store(self, j: int, opt: torch.optim.Optimizer) -> None:
        """Keep discriminator j's updated weights and optimiser state."""
        self.states[j] = copy.deepcopy(self.module.state_dict())
        self.opt_states[j] = copy.deepcopy(opt.state_dict())


def assign_subsets(n: int, k: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Disjoint subsets by an independent uniform draw per record (removing a record moves no other).

    ``generator`` must come from the privacy source (``synth.noise.generator()``): the assignment is secret.
    """
    which = torch.randint(0, k, (n,), generator=generator)
    return [(which == j).nonzero().flatten() for j in range(k)]


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor,
                     g: torch.Generator) -> torch.Tensor:
    """WGAN-GP: (||∇ D(x̂)|| − 1)² on random interpolates of real and fake images."""
    eps = torch.rand(len(real), 1, 1, 1, generator=g).to(real.device)
    mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad = torch.autograd.grad(critic(mix, y).sum(), mix, create_graph=True)[0]
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


class GSWGAN(_GAN):
    """GS-WGAN: sanitised upstream gradients from K subset discriminators."""

    name = "gs-wgan"
    config_type = GSWGANConfig
    paper_neighbouring = "replace-one"
    privacy_note = ("paper: per-row sensitivity 2C, B·steps releases subsampled at 1/K; here: one release per "
                    "step, sensitivity 2C·sqrt(B), PoissonGaussian(1/K, σ/(2·sqrt(B)), steps)")
    # Nothing but the accounting: every loss here runs through discriminators trained without noise.
    disclosure = fit_disclosure(noise={"sigma_row": ACCOUNTING, "noise_multiplier": ACCOUNTING, "q": ACCOUNTING})

    bank: DiscriminatorBank | None = None
    subsets: list[torch.Tensor] | None = None

    def _critic_step(self, critic: nn.Module, opt: torch.optim.Optimizer, data: Any, subset: torch.Tensor,
                     g: torch.Generator) -> float:
        c = self.config
        pick = subset[torch.randint(0, len(subset), (min(c.batch_size, len(subset)),), generator=g)]
        real, y = data.images[pick].to(self.device), data.labels[pick].to(self.device)
        z = torch.randn(len(pick), self.generator_net.z_dim, generator=g).to(self.device)
        with torch.no_grad():
            fake = self.generator_net(z, y)
        loss = critic(fake, y).mean() - critic(real, y).mean() + c.gp_weight * gradient_penalty(
            critic, real, fake, y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def pretrain_discriminators(self, data: Any, g: torch.Generator) -> DiscriminatorBank:
        """Assign subsets and warm up every discriminator on its own subset (non-private, never released).

        ``g`` is a private generator (``self.noise.generator()``): it draws the subset assignment and the
        records each critic step reads.
        """
        c = self.config
        k = int(c.num_discriminators)
        if len(data) < 2 * k:
            raise DataError(f"{self.name}: {len(data)} records for num_discriminators={k}; need >= 2 per subset")
        self.subsets = assign_subsets(len(data), k, g)
        bank = DiscriminatorBank(lambda j: self.make_critic(self.seed * 1009 + j), k, c.lr_d)
        for j in range(k):
            if len(self.subsets[j]) == 0:
                continue
            critic, opt = bank.load(j)
            for _ in range(int(c.pretrain_d_iterations)):
                self._critic_step(critic, opt, data, self.subsets[j], g)
            bank.store(j, opt)
        self.bank = bank
        return bank

    def _fit(self, sensitive: Any, ledger: PrivacyLedger, target_epsilon: float, progress: bool,
             callback: Callback | None) -> FitReport:
        c = self.config
        k, steps, b = int(c.num_discriminators), int(c.iterations), int(c.batch_size)
        q = 1.0 / k
        scale = 2.0 * math.sqrt(b)  # sensitivity 2C·sqrt(B) over noise std σC: multiplier σ / scale
        guess = calibrate_sigma(target_epsilon, ledger.delta, q, steps) if not ledger.entries else 1.0
        mult = calibrate_for_ledger(ledger, lambda s: PoissonGaussian(q, s, steps), target_epsilon, guess)
        sigma_row = mult * scale
        ledger.charge(f"{self.name}/sanitised-generator", PoissonGaussian(q, mult, steps),
                      note=f"K={k} subset discriminators, B={b} rows clipped to {c.clip}, row noise σ={sigma_row:.4g}")
        # Private: subset assignment, which discriminator, which real records a critic step reads.
        private_g = self.noise.generator()
        # Public: the generator's latents and labels (data-independent, reproducible from the seed).
        latent_g = torch.Generator().manual_seed(self.seed * 29 + 13)
        try:
            self.pretrain_discriminators(sensitive, private_g)
            gen = self.generator_net
            gen.train()
            opt_g = torch.optim.Adam(gen.parameters(), lr=c.lr_g, betas=(0.5, 0.9))
            assert self.bank is not None and self.subsets is not None
            bar = _bar(progress, f"{self.name} fit", steps)
            for _ in range(steps):
                j = int(self.noise.integers(k))
                critic, opt = self.bank.load(j)
                if len(self.subsets[j]):
                    for _ in range(int(c.critic_iterations)):
                        self._critic_step(critic, opt, sensitive, self.subsets[j], private_g)
                self.bank.store(j, opt)
                z = torch.randn(b, gen.z_dim, generator=latent_g).to(self.device)
                y = torch.randint(0, self.num_classes, (b,), generator=latent_g).to(self.device)
                fake = gen(z, y)
                fake.register_hook(self._sanitiser(sigma_row))
                for p in critic.parameters():
                    p.requires_grad_(False)
                loss = -critic(fake, y).sum()
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_g.step()
                for p in critic.parameters():
                    p.requires_grad_(True)
                # No loss is logged: it is a score of critics trained on real records without noise.
                if bar is not None:
                    bar.advance(bar.task_ids[0])
            if bar is not None:
                bar.stop()
        finally:
            # Trained on sensitive data without noise: never kept past fit.
            self.bank = None
            self.subsets = None
        return FitReport(self.name, 0.0, ledger.delta, {"sigma_row": sigma_row, "noise_multiplier": mult, "q": q},
                         [], steps=steps)

    def _sanitiser(self, sigma_row: float) -> Any:
        """The gradient hook on the generated images: clip every row to C, add secret N(0, (σ_row·C)²)."""
        clip = float(self.config.clip)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            rows = grad.flatten(1)
            factor = (clip / rows.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            noisy = self.noise.add_gaussian(rows * factor[:, None], sigma_row * clip)
            # Mean over the B rows: post-processing of the sanitised matrix.
            return (noisy / len(rows)).view_as(grad)

        return hook

    def _pretrain(self, public: Any, progress: bool) -> None:
        """Warm up the generator with a plain WGAN-GP on PUBLIC data (one discriminator, discarded)."""
        c = self.config
        g = torch.Generator().manual_seed(self.seed * 31 + 17)
        critic = self.make_critic(self.seed * 37 + 1)
        opt_d = torch.optim.Adam(critic.parameters(), lr=c.lr_d, betas=(0.5, 0.9))
        gen = self.generator_net
        gen.train()
        opt_g = torch.optim.Adam(gen.parameters(), lr=c.lr_g, betas=(0.5, 0.9))
        everyone = torch.arange(len(public))
        for _ in range(int(c.pretrain_iterations)):
            for _ in range(int(c.critic_iterations)):
                self._critic_step(critic, opt_d, public, everyone, g)
            z = torch.randn(c.batch_size, gen.z_dim, generator=g).to(self.device)
            y = torch.randint(0, self.num_classes, (c.batch_size,), generator=g).to(self.device)
            loss = -critic(gen(z, y), y).mean()
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        gen.eval()
