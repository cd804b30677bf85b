"""DP-GenG's privacy-budget allocation (stage g): fixed or utility-driven ε shares for the generator and expert.

Fixed shares: a component with share s is calibrated so that its own mechanism alone is (s·ε, δ)-DP
(:func:`~dpdistill.privacy.dp_ops.sigma_for_share`); the last sensitive stage, feature matching, is the *free*
component whose σ is solved so that everything already charged plus it composes to the job's ε on the ledger
(:func:`~dpdistill.privacy.dp_ops.solve_free_sigma`, the platform's one σ solver, which NDPDC and PSG use
alike). Because ε composes sub-additively, the free component gets more than (1 − Σ s)·ε alone, and the
ledger's total lands on the target (within the solver's 0.3 %, never above).

The generator goes first, so its share is what the ledger holds after it (Synthesizer.fit spends up to a
composed total); the expert's σ is calibrated for its share alone; feature matching takes the rest.

Utility-driven shares (:func:`utility_allocation`, the paper's tuning) replace the two fixed shares by the
smallest ones that keep the generator's FID within a ratio of its full-budget FID and the expert's accuracy
within a ratio of its full-budget accuracy; they are measured with scratch ledgers on tuning data the spec
names (a public set, or explicitly the sensitive split, which the tuning then reads unaccounted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpdistill.privacy import Mechanism
from dpdistill.privacy import noise as privacy_noise
from dpdistill.privacy.dp_ops import sigma_for_share
from dpdistill.privacy.noise import PrivacyRandomness

# ------------------------------------------------------------------------------ utility-driven allocation


@dataclass
class UtilityAllocation:
    """The shares a utility-driven tuning chose, and what it measured on the way (a DP-GenG report entry)."""

    share_generator: float
    share_expert: float
    tuned_on: str  # the tuning data's name; "sensitive" means the tuning read the sensitive split (unaccounted)
    fid_full: float
    fid_target: float
    generator_fid: dict[float, float] = field(default_factory=dict)  # share -> FID (random-ConvNet features)
    acc_full: float = float("nan")
    acc_target: float = float("nan")
    expert_accuracy: dict[float, float] = field(default_factory=dict)  # share -> held-out accuracy


def smallest_share(measure: Callable[[float], float], good: Callable[[float], bool], lo: float, hi: float,
                   steps: int) -> float:
    """Bisection for the smallest share in [lo, hi] whose measured utility is ``good`` (hi if none is).

    Utility is assumed to grow with the share (more budget, less noise); ``steps`` halvings of [lo, hi].
    """
    if not good(measure(hi)):
        return hi
    if good(measure(lo)):
        return lo
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if good(measure(mid)):
            hi = mid
        else:
            lo = mid
    return hi


class UtilityProbe:
    """One candidate share's utility, measured with scratch ledgers on tuning data (never the job's ledger).

    :meth:`generator_fid`: the FID (features of a fixed, randomly initialised ConvNet: data-independent) of the
    set the generator makes at share·ε; :meth:`expert_accuracy`: the held-out accuracy of the DP-SGD fine-tuned
    expert at share·ε. The serial bisection (:func:`utility_allocation`) and the parallel Tune grid
    (:mod:`dpdistill.runtime.allocation_sweep`) measure through this one class, so they measure alike. The
    scratch fits draw their noise and sampling from ``noise`` (None: a fresh secret source), never from ``seed``.
    """

    def __init__(self, tune: Any, held_out: Any, cfg: Any, epsilon: float, delta: float, mean: Sequence[float],
                 std: Sequence[float], seed: int, device: str | torch.device = "cpu", *,
                 noise: PrivacyRandomness | None = None) -> None:
        from dpdistill.distill.dpgeng.expert import dpsgd_rate_and_steps
        from dpdistill.distill.dpgeng.extractors import build_network

        self.tune, self.held_out, self.cfg = tune, held_out, cfg
        self.epsilon, self.delta, self.seed = epsilon, delta, seed
        self.mean, self.std = list(mean), list(std)
        self.device = torch.device(device)
        self.noise = privacy_noise.resolve(noise)
        self._m = torch.as_tensor(self.mean).view(1, -1, 1, 1)
        self._s = torch.as_tensor(self.std).view(1, -1, 1, 1)
        self._probe = build_network(cfg.net_spec(), tune, seed + 11, self.device).eval()
        self._real_feats: torch.Tensor | None = None
        self.q, self.n_steps = dpsgd_rate_and_steps(len(tune), cfg.expert_batch, max(cfg.expert_dp_epochs, 1e-9))

    @torch.no_grad()
    def _feats(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._probe.embed(((images[i:i + 1024] - self._m) / self._s).to(self.device)).cpu()
                          for i in range(0, len(images), 1024)])

    def generator_fid(self, share: float) -> tuple[float, Any]:
        """(FID of the generator's set at share·ε against the held-out set, that generated set)."""
        from dpdistill.distill.dpgeng.pipeline import generate_stage
        from dpdistill.evaluation.fidelity import fid_from_features
        from dpdistill.privacy import PrivacyLedger

        if self._real_feats is None:
            self._real_feats = self._feats(self.held_out.images)
        scratch = PrivacyLedger(None, self.epsilon, self.delta)
        gen, _ = generate_stage(self.tune, self.cfg, scratch, min(self.epsilon, share * self.epsilon), self.seed,
                                self.device, False, self.noise.spawn("generator"))
        return fid_from_features(self._real_feats, self._feats(gen.images)), gen

    def pretrained_expert(self, generated: Any) -> Any:
        """The expert pretrained on a generated set (DP output), before its DP-SGD fine-tuning."""
        from dpdistill.distill.dpgeng.expert import pretrain_expert

        return pretrain_expert(generated, self.cfg.net_spec(), self.cfg.expert_pretrain_epochs, self.mean, self.std,
                               self.seed + 4, self.device)

    def _expert_mechanism(self, sigma: float) -> Mechanism:
        from dpdistill.distill.dpgeng.expert import DPSGDPlan

        return DPSGDPlan(self.q, self.n_steps, sigma, self.cfg.expert_clip, self.cfg.expert_batch).mechanism()

    def expert_accuracy(self, expert0: Any, share: float) -> float:
        """Held-out accuracy of ``expert0`` DP-SGD fine-tuned on the tuning set at share·ε."""
        from dpdistill.distill.dpgeng.expert import DPSGDPlan, dp_finetune
        from dpdistill.evaluation.training import accuracy
        from dpdistill.privacy import PrivacyLedger

        cfg = self.cfg
        sigma = sigma_for_share(self._expert_mechanism, share * self.epsilon, self.delta)
        scratch = PrivacyLedger(None, self.epsilon, self.delta)
        plan = DPSGDPlan(self.q, self.n_steps, sigma, cfg.expert_clip, cfg.expert_batch)
        net = dp_finetune(expert0, self.tune, plan, scratch, self.mean, self.std, cfg.expert_lr, self.device,
                          noise=self.noise.spawn("expert"))
        return accuracy(net, self.held_out.images, self.held_out.labels, mean=self.mean, std=self.std,
                        device=self.device)


def share_bounds(cfg: Any) -> tuple[float, float]:
    """The interval a utility-driven share is searched in (feature matching keeps at least 5 %)."""
    return 0.05, cfg.utility_max_total - 0.05


def cap_shares(cfg: Any, share_g: float, share_e: float) -> tuple[float, float]:
    """Scale both shares down alike when together they exceed ``utility_max_total`` (feature matching's part)."""
    total = share_g + share_e
    if total > cfg.utility_max_total:
        share_g, share_e = (x * cfg.utility_max_total / total for x in (share_g, share_e))
    return float(share_g), float(share_e)


def utility_allocation(
    tune: Any,
    held_out: Any,
    tuned_on: str,
    cfg: Any,
    epsilon: float,
    delta: float,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    device: str | torch.device = "cpu",
    *,
    noise: PrivacyRandomness | None = None,
) -> UtilityAllocation:
    """The paper's utility-driven shares, tuned on ``tune`` (fits) and ``held_out`` (scores) with scratch ledgers.

    Generator: the smallest share whose generated set's FID is at most ``cfg.utility_fid_ratio`` x the FID at the
    full budget. Expert: the smallest share whose DP-SGD fine-tuned expert reaches ``cfg.utility_acc_ratio`` x the
    held-out accuracy at the full budget. Both found by bisection (:func:`smallest_share`) over
    :class:`UtilityProbe` measurements; capped at ``cfg.utility_max_total`` together, so feature matching keeps
    the rest; its σ_F is then solved from what the job's ledger leaves
    (:func:`~dpdistill.privacy.dp_ops.solve_free_sigma`).

    Every fit here is charged to a throwaway in-memory ledger, NOT to the job's: when ``tune`` is the sensitive
    split (``tuned_on == "sensitive"``) the chosen shares depend on sensitive data without being accounted,
    as in the paper's own tuning; the report and the ledger notes say so.
    """
    probe = UtilityProbe(tune, held_out, cfg, epsilon, delta, mean, std, seed, device, noise=noise)
    lo, hi = share_bounds(cfg)
    steps = cfg.utility_steps
    generated_at: dict[float, Any] = {}

    def fid(share: float) -> float:
        value, generated_at[share] = probe.generator_fid(share)
        out.generator_fid[round(share, 4)] = value
        return value

    out = UtilityAllocation(cfg.share_generator, cfg.share_expert, tuned_on, float("nan"), float("nan"))
    out.fid_full = fid(1.0)
    out.fid_target = cfg.utility_fid_ratio * out.fid_full
    share_g = smallest_share(fid, lambda v: v <= out.fid_target, lo, hi, steps)
    generated = generated_at.get(share_g) or generated_at[1.0]
    expert0 = probe.pretrained_expert(generated)

    def acc(share: float) -> float:
        out.expert_accuracy[round(share, 4)] = probe.expert_accuracy(expert0, share)
        return out.expert_accuracy[round(share, 4)]

    share_e = cfg.share_expert
    if cfg.expert_guidance and cfg.expert_dp_epochs > 0:
        out.acc_full = acc(1.0)
        out.acc_target = cfg.utility_acc_ratio * out.acc_full
        share_e = smallest_share(acc, lambda v: v >= out.acc_target, lo, hi, steps)
    out.share_generator, out.share_expert = cap_shares(cfg, share_g, share_e)
    return out
