"""DP-MERF (Harder et al., AISTATS 2021): one noisy release of a kernel mean embedding, then a generator
trained to match it.

Release. Every record (x, y) contributes ``[a·phi(x) ⊗ e_y, b·e_y]`` with ||phi(x)|| = 1 (random Fourier
features of a Gaussian kernel) and a² + b² = 1, so its contribution has norm exactly 1: the per-class sums
and per-class counts are released together by ONE Gaussian mechanism of L2 sensitivity 1 under
add-or-remove-one. The counts ride along (b = ``count_weight``, 0.1 by default: 0.5 % of the feature signal)
so that no separate, uncharged label query is needed to turn sums into means.

Privacy notion: the paper releases the mean embedding with replace-one sensitivity 2/n; here the sum is
released with add-or-remove sensitivity 1 (DPImageBench Appendix A's conversion for sums) and divided by
the noisy counts, which is post-processing.

Kernel bandwidth: fixed in the config (never a median heuristic on the sensitive data: that would be an
uncharged query). The default, 6 for 28×28 images in [0, 1] (scaled by sqrt(d/784) for other sizes), was
chosen on the public glyphs set, not on MNIST.

What is logged: the matching loss every 50 steps (``fit_mmd``, against the noisy release: post-processing of a
charged statistic) and, after the fit, ``release_mmd``: the distance between the released means and the
generator's embedding on the latents of ``generate(seed=seed)``, recomputable from the saved synthesiser alone
(:meth:`MeanEmbeddingSynthesizer.release_mmd`). Nothing computed from the exact (noiseless) sums is kept.

Generation draws balanced labels (``generate(n_per_class=...)``); the noisy class proportions are kept as
``class_weights`` for callers that want the sensitive label distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpdistill.errors import PrivacyError, SpecError
from dpdistill.privacy import Gaussian, PrivacyLedger, calibrate_gaussian
from dpdistill.privacy.disclosure import ACCOUNTING, CHARGED, RELEASED
from dpdistill.privacy.plan import Plan, PlannedCharge
from dpdistill.synthesis.base import Callback, FitReport, Synthesizer, calibrate_for_ledger, fit_disclosure
from dpdistill.synthesis.features import RandomFourierFeatures, labelled_feature_sum
from dpdistill.synthesis.generators import ConvCondGenerator


@dataclass
class DPMERFConfig:
    """DP-MERF options; defaults suit MNIST-scale data (28×28, 10 classes, 60k records)."""

    num_features: int = 10_000  # random Fourier features D (cos + sin pairs)
    bandwidth: float | None = None  # Gaussian kernel length scale; None: 6·sqrt(d / 784)
    count_weight: float = 0.1  # share b of each record's unit norm spent on its class count
    z_dim: int = 10
    gen_width: int = 16
    gen_hidden: int = 256
    iterations: int = 1000  # generator steps
    batch_size: int = 200  # generated images per step (balanced over classes)
    lr: float = 1e-3
    pretrain_iterations: int = 1000  # generator steps on the public embedding (pretrain only)
    embed_batch_size: int = 2000  # records per batch when summing features (memory only)


# DP-MERF's and DP-NTK's logged keys: σ (accounting), the matching loss against the noisy release (charged,
# post-processing), and the release's own distance to its generator (recomputable from synthesizer.pt).
MEAN_EMBEDDING_DISCLOSURE = fit_disclosure(noise={"sigma": ACCOUNTING}, extra={"release_mmd": RELEASED},
                                           stepped={"fit_mmd": CHARGED})


class MeanEmbeddingSynthesizer(Synthesizer):
    """Shared machinery of DP-MERF and DP-NTK: release noisy per-class feature sums once, then match them."""

    # _pretrain: public feature means and seeded generator steps (DP-MEPF: its seeded extractor first).
    pretrain_cacheable = True

    released: dict[str, torch.Tensor] | None = None

    # -- features (subclasses) ---------------------------------------------------------------------------

    def feature_map(self) -> Any:
        raise NotImplementedError

    def class_sums(self, fmap: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ phi(x_i) ⊗ e_{y_i} as [num_classes, D] (each phi of unit norm)."""
        raise NotImplementedError

    # -- the release -------------------------------------------------------------------------------------

    def build(self) -> nn.Module:
        c = self.config
        return ConvCondGenerator(c.z_dim, self.num_classes, self.channels, self.image_size, c.gen_width,
                                 c.gen_hidden)

    def _sums_and_counts(self, fmap: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.num_classes
        sums = labelled_feature_sum(lambda x, y: self.class_sums(fmap, x, y), data.images, data.labels,
                                    self.config.embed_batch_size, self.device)
        counts = torch.bincount(data.labels, minlength=k).to(sums.dtype).to(self.device)
        return sums, counts

    def _release(self, sums: torch.Tensor, counts: torch.Tensor, sigma: float) -> dict[str, torch.Tensor]:
        b = self.config.count_weight
        a = math.sqrt(1.0 - b * b)
        # Secret noise (self.noise): a seeded draw would let anyone holding the spec subtract it.
        noisy_sums = self.noise.add_gaussian(a * sums, sigma)
        noisy_counts = self.noise.add_gaussian(b * counts, sigma)
        counts_hat = (noisy_counts / b).clamp_min(1.0)
        means = noisy_sums / (a * counts_hat[:, None])
        return {"means": means.cpu(), "counts": counts_hat.cpu(),
                "class_weights": (counts_hat / counts_hat.sum()).cpu()}

    def plan(self, n_records: int, ledger: PrivacyLedger, target_epsilon: float) -> Plan:
        """One Gaussian release of the per-class feature sums and counts, σ solved against the ledger."""
        c = self.config
        if not 0 < c.count_weight < 1:
            raise SpecError(f"{self.name}: count_weight must lie in (0, 1), got {c.count_weight}")
        guess = calibrate_gaussian(target_epsilon, ledger.delta) if not ledger.entries else 1.0
        sigma = calibrate_for_ledger(ledger, lambda s: Gaussian(s, 1.0), target_epsilon, guess)
        return Plan(self.name, (PlannedCharge(
            f"{self.name}/embedding", Gaussian(sigma, 1.0),
            "per-class feature sums + counts, one record contributes a unit-norm vector"),), {"sigma": sigma})

    def check_plan(self, plan: Plan) -> None:
        """The σ execute adds is the σ charged (one Gaussian of sensitivity 1)."""
        charged = [c.mechanism for c in plan.charges]
        if charged != [Gaussian(float(plan.params["sigma"]), 1.0)]:
            raise PrivacyError(f"{self.name}: the plan runs σ={plan.params['sigma']!r} but charges "
                               f"{'; '.join(m.describe() for m in charged)}")

    def execute(self, plan: Plan, sensitive: Any, executor: Any, progress: bool,
                callback: Callback | None) -> FitReport:
        self.check_plan(plan)
        sigma = float(plan.params["sigma"])
        fmap = self.feature_map()
        sums, counts = self._sums_and_counts(fmap, sensitive)
        self.released = self._release(sums, counts, sigma)
        del sums, counts
        c = self.config
        self._train_generator(fmap, self.released["means"].to(self.device), c.iterations, progress, callback,
                              "fit")
        return FitReport(self.name, 0.0, 0.0, {"sigma": sigma}, [], steps=c.iterations,
                         extra={"release_mmd": self.release_mmd()})

    @torch.no_grad()
    def release_mmd(self) -> float:
        """Σ_k ||released mean_k − mean phi(G(z, k))||², the generator against the release it was fitted to.

        A function of the released artifact only (generator weights, released means, the seed's feature map
        and the latents of ``generate(seed=self.seed)``, ``batch_size // num_classes`` per class), so it can
        be logged and anyone can recompute it from synthesizer.pt.
        """
        if self.released is None:
            raise SpecError(f"{self.name}: nothing released yet (fit first)")
        per_class = max(1, self.config.batch_size // self.num_classes)
        images, labels = self.generate(n_per_class=per_class, seed=self.seed)
        fmap = self.feature_map()
        means = self.class_sums(fmap, images.to(self.device), labels.to(self.device)) / per_class
        return float((means.cpu() - self.released["means"]).pow(2).sum())

    def _pretrain(self, public: Any, progress: bool) -> None:
        fmap = self.feature_map()
        sums, counts = self._sums_and_counts(fmap, public)
        means = sums / counts.clamp_min(1.0)[:, None]
        self._train_generator(fmap, means, self.config.pretrain_iterations, progress, None, "pretrain")

    def _train_generator(self, fmap: Any, target: torch.Tensor, iterations: int, progress: bool,
                         callback: Callback | None, stage: str) -> list[float]:
        """Adam on sum_k ||target_k - mean_{G(z, k)} phi||², balanced labels, cosine learning rate."""
        c = self.config
        k = self.num_classes
        net = self.generator_net
        net.train()
        per_class = max(1, c.batch_size // k)
        y = torch.arange(k, device=self.device).repeat_interleave(per_class)
        opt = torch.optim.Adam(net.parameters(), lr=c.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iterations))
        g = torch.Generator().manual_seed(self.seed * 7 + (1 if stage == "fit" else 2))
        losses: list[float] = []
        bar = _bar(progress, f"{self.name} {stage}", iterations)
        for it in range(iterations):
            z = torch.randn(len(y), net.z_dim, generator=g).to(self.device)
            means = self.class_sums(fmap, net(z, y), y) / per_class
            loss = (means - target).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if callback is not None and it % 50 == 0:
                callback(it, {f"{stage}_mmd": losses[-1]})
            if bar is not None:
                bar.advance(bar.task_ids[0])
        if bar is not None:
            bar.stop()
        net.eval()
        return losses

    def extra_state(self) -> dict[str, Any]:
        return {"released": self.released}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.released = state.get("released")


def _bar(progress: bool, what: str, total: int) -> Any:
    """A rich progress bar on a terminal, else None."""
    if not progress:
        return None
    import sys

    from rich.console import Console
    from rich.progress import Progress

    if not Console(file=sys.stdout).is_terminal:
        return None
    bar = Progress(transient=True)
    bar.add_task(what, total=total)
    bar.start()
    return bar


class DPMERF(MeanEmbeddingSynthesizer):
    """DP-MERF: random-Fourier-feature mean embedding, one Gaussian release, generator matched to it."""

    name = "dp-merf"
    config_type = DPMERFConfig
    paper_neighbouring = "replace-one"
    privacy_note = ("paper: mean embedding, replace-one sensitivity 2/n; here: per-class sums and counts, "
                    "add-or-remove sensitivity 1, one Gaussian release")
    disclosure = MEAN_EMBEDDING_DISCLOSURE

    def bandwidth(self) -> float:
        c = self.config
        d = self.channels * self.image_size * self.image_size
        return float(c.bandwidth) if c.bandwidth is not None else 6.0 * math.sqrt(d / 784.0)

    def feature_map(self) -> RandomFourierFeatures:
        d = self.channels * self.image_size * self.image_size
        # The frequencies depend on the seed only (public randomness, rebuilt identically on load).
        return RandomFourierFeatures(d, self.config.num_features, self.bandwidth(), seed=self.seed + 101).to(
            self.device)

    def class_sums(self, fmap: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        phi = fmap(x)
        return torch.zeros(self.num_classes, phi.shape[1], dtype=phi.dtype, device=phi.device).index_add(0, y, phi)
