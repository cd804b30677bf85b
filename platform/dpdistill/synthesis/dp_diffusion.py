"""DP diffusion synthesisers: DPDM, PDP-Diffusion, DP-LDM and DP-LoRA behind the synthesiser contract.

All four train a class-conditional diffusers ``UNet2DModel`` (:mod:`dpdistill.synthesis.diffusion.unet`) on
the DDPM ε-prediction loss with DP-SGD, and sample with DDIM and classifier-free guidance. They differ in what
they start from, what DP-SGD trains, and (DP-LDM) the space the UNet works in:

- ``dpdm`` (Dockhorn et al., DPDM): from scratch (a seeded random UNet), every parameter, with noise
  multiplicity K — each record's gradient is the mean over K (timestep, noise) draws before clipping, which
  lowers the gradient variance at no privacy cost (``multiplicity``, 1 by default on CPU; the paper uses 32).
- ``pdp-diffusion`` (Ghalebikesabi et al.): non-private pre-training on a PUBLIC set (``pretrain``; e.g.
  ``glyphs`` here, ImageNet-scale weights for a real deployment via ``base_checkpoint``), then DP-SGD
  fine-tuning of every parameter on the sensitive set.
- ``dp-lora`` (Tsai et al.): the same public base, frozen; only LoRA adapters (peft) are trained with DP-SGD,
  and the release is the adapters plus a reference to the public base (its cache key or checkpoint path).
- ``dp-ldm`` (Lyu et al., on Rombach et al.'s latent diffusion): a diffusers ``AutoencoderKL`` pre-trained on the
  PUBLIC set (:mod:`dpdistill.synthesis.diffusion.autoencoder`, cached by its own key) and a latent UNet
  pre-trained on the public set's latents (scaled by a factor computed on those public latents; its cache key
  includes the autoencoder's). DP-SGD then fine-tunes ONLY the latent UNet's class embedding and attention blocks
  (q/k/v/out and their norms) on the sensitive images encoded by the frozen public encoder — a fixed public map
  applied to each record on its own, so each record still contributes one clipped gradient. Samples are DDIM
  latents (x̂_0 clipped to the public latents' range) decoded by the frozen decoder. The release is the fine-tuned parameters plus the cache keys of the
  public autoencoder and base UNet.

Contract: plan → charge → execute. :meth:`plan` solves σ for Poisson-sampled DP-SGD (q = batch_size / n,
``iterations`` steps) against the ledger — no data read — and the driver charges it. :meth:`execute` runs the
schedule through an executor: in process by default (:func:`dpdistill.training.dp_sgd.train_dp_sgd`), or any
callable with the same first six arguments, e.g. Ray Train workers
(:func:`dpdistill.runtime.dp_train.fit_dp_sgd`, chosen by the synthesize job's ``train_workers``). The noise
of every step comes from the synthesiser's privacy source, added once per step whatever the worker count.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dpdistill.errors import PrivacyError, SpecError
from dpdistill.privacy import PoissonGaussian, PrivacyLedger
from dpdistill.privacy.disclosure import ACCOUNTING, PUBLIC
from dpdistill.privacy.plan import Plan, PlannedCharge
from dpdistill.synthesis.base import Callback, FitReport, Synthesizer, calibrate_for_ledger, fit_disclosure


@dataclass
class DiffusionConfig:
    """Options of the diffusion synthesisers (defaults sized for 28×28 grey images on a few CPU cores)."""

    # The UNet (public architecture): channels per resolution, attention per block and in the middle.
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention: list[bool] = field(default_factory=lambda: [False, False, False])
    mid_attention: bool = True
    layers_per_block: int = 1
    norm_num_groups: int = 16
    # DP-SGD on the sensitive set: steps, expected batch (q = batch_size / n), per-record clip C, optimiser.
    iterations: int = 300
    batch_size: int = 256
    clip: float = 1.0
    lr: float = 1e-3
    # constant, or cosine: lr decays towards 0 over the DP-SGD steps (public; training/dp_sgd.py lr_at).
    lr_schedule: str = "constant"
    weight_decay: float = field(default=0.0, metadata={"zero_ok": True})
    multiplicity: int = 1
    max_physical_batch: int = 256
    checkpoint_every: int = field(default=0, metadata={"zero_ok": True})
    # Release the exponential moving average of the DP-SGD iterates instead of the last one (0: the last).
    # Post-processing: free. Warmed up, step t's decay is min(ema_decay, (1 + t) / (10 + t)) (training/dp_sgd.py).
    ema_decay: float = field(default=0.0, metadata={"zero_ok": True})
    # How per-record clipped gradients are computed (speed only; training/per_record.py): auto | hooks | ghost |
    # functorch. The plan records the backend it resolves to (public: a function of the architecture).
    grad_sample_mode: str = "auto"
    # The forward process and classifier-free guidance (label dropped to the null class while training).
    train_timesteps: int = 1000
    label_dropout: float = field(default=0.1, metadata={"zero_ok": True})
    # Sampling: DDIM steps and guidance scale (1: conditional only; > 1 pushes towards the class).
    sample_steps: int = 50
    guidance_scale: float = 2.0
    # DDIM's η: 0 is the deterministic DDIM path, 1 adds DDPM's full posterior noise at each step (the noise comes
    # from the sampler's public seed: generation is post-processing). On this package's small UNets η = 0 leaves
    # grey, speckled backgrounds on many samples that η = 1 washes out: MNIST FID 8-9 against 14, yet ConvNets
    # trained on the cleaner set score a point lower (benchmarks/README.md), so the default stays 0.
    sample_eta: float = field(default=0.0, metadata={"zero_ok": True})
    sample_batch: int = 500


@dataclass
class PublicBaseConfig(DiffusionConfig):
    """The diffusion options plus a public base (pdp-diffusion, dp-lora, dp-ldm). DPDM trains from scratch, so its
    config has none of these fields and a spec that sets one is refused as an unknown key."""

    # Public pre-training (pretrain(public)): steps, learning rate, batch; or a local diffusers UNet directory.
    pretrain_iterations: int = 3000
    pretrain_lr: float = 2e-4
    pretrain_batch: int = 64
    # The seed of public pre-training (its init and batches; part of the cache key). None: this synthesiser's
    # seed. Set it where the synthesiser's own seed differs but the same public base is wanted: DP-GenG builds
    # its generator with a seed derived from the job's, so without this it pre-trains a base of its own.
    pretrain_seed: int | None = field(default=None, metadata={"zero_ok": True})
    base_checkpoint: str = ""


@dataclass
class LoRAConfig(PublicBaseConfig):
    """DP-LoRA: the diffusion options plus the adapters' rank and scale (only they are trained)."""

    lora_rank: int = 4
    lora_alpha: float = 4.0
    lr: float = 2e-3


class DiffusionSynthesizer(Synthesizer):
    """The shared machinery; subclasses choose the start (scratch / public base) and what DP-SGD trains."""

    config_type: ClassVar[type] = DiffusionConfig
    uses_public_base: ClassVar[bool] = False
    # Whether method.base_checkpoint (a local diffusers UNet directory) can replace public pre-training; jobs
    # refuse it up front where not (check_public_start), before any run folder.
    accepts_base_checkpoint: ClassVar[bool] = True
    no_base_checkpoint_because: ClassVar[str] = ""
    runs_dp_sgd: ClassVar[bool] = True
    trains_adapters_only: ClassVar[bool] = False
    dp_sgd_target: ClassVar[str] = "UNet"  # what DP-SGD trains, in the plan's note
    disclosure = fit_disclosure(noise={"sigma": ACCOUNTING, "q": ACCOUNTING},
                                extra={"trainable_parameters": PUBLIC})

    # -- the network ------------------------------------------------------------------------------------

    def unet_config(self) -> Any:
        from dpdistill.synthesis.diffusion.unet import UNetConfig

        c = self.config
        return UNetConfig(image_size=self.image_size, channels=self.channels, num_classes=self.num_classes,
                          block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
                          attention=tuple(c.attention), mid_attention=c.mid_attention,
                          norm_num_groups=c.norm_num_groups)

    def schedule(self) -> Any:
        from dpdistill.synthesis.diffusion.objective import NoiseSchedule

        return NoiseSchedule(train_timesteps=self.config.train_timesteps)

    def build(self) -> nn.Module:
        from dpdistill.synthesis.diffusion.unet import build_unet
        from dpdistill.training.dp_sgd import LR_SCHEDULES

        if self.config.lr_schedule not in LR_SCHEDULES:  # here: the job builds the synthesiser before any read
            raise SpecError(f"field 'method.lr_schedule': expected one of {', '.join(LR_SCHEDULES)}, got "
                            f"'{self.config.lr_schedule}'")
        if isinstance(self.config.sample_eta, bool) or not 0 <= self.config.sample_eta <= 1:
            raise SpecError(f"field 'method.sample_eta': expected DDIM's η in [0, 1] (0: deterministic DDIM, 1: "
                            f"DDPM's posterior noise), got {self.config.sample_eta!r}")
        if not 0 <= self.config.ema_decay < 1:
            raise SpecError(f"field 'method.ema_decay': expected a decay in [0, 1) (0: release the last iterate), "
                            f"got {self.config.ema_decay!r}")
        self.base_ref: dict[str, Any] | None = None  # where the public base came from (pretrain / checkpoint)
        return build_unet(self.unet_config())

    def objective(self, init_state: dict[str, torch.Tensor] | None) -> Any:
        from dpdistill.synthesis.diffusion.lora import LoraSpec
        from dpdistill.synthesis.diffusion.objective import DiffusionObjective

        c = self.config
        lora = LoraSpec(rank=c.lora_rank, alpha=c.lora_alpha) if self.trains_adapters_only else None
        return DiffusionObjective(unet=self.unet_config(), train_timesteps=c.train_timesteps,
                                  label_dropout=c.label_dropout, init_state=init_state, lora=lora,
                                  device=str(self.device), seed=self.seed)

    def _base_state(self) -> dict[str, torch.Tensor]:
        """The weights DP-SGD starts from (CPU copies): the public base, or the seeded random init."""
        net = self.generator_net
        keep = {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if "lora_" not in k}
        if hasattr(net, "peft_config"):  # already adapted: the base tensors sit under ".base_layer."
            keep = {k.replace(".base_layer.", "."): v for k, v in keep.items()}
        return keep

    # -- public pre-training ----------------------------------------------------------------------------

    @property
    def public_seed(self) -> int:
        """The seed public pre-training runs with: ``pretrain_seed``, else this synthesiser's seed."""
        seed = getattr(self.config, "pretrain_seed", None)  # a PublicBaseConfig field; dpdm has no public base
        return self.seed if seed is None else seed

    def _pretrain(self, public: Any, progress: bool) -> None:
        from dpdistill.synthesis.diffusion.pretrain import PretrainConfig, pretrain

        if not self.uses_public_base:
            raise SpecError(f"{self.name}: trains from scratch; public pre-training is pdp-diffusion's / "
                            "dp-lora's start (use one of those)")
        c = self.config
        cfg = PretrainConfig(public_set=str(getattr(public, "name", "public")), steps=c.pretrain_iterations,
                             lr=c.pretrain_lr, batch_size=c.pretrain_batch, label_dropout=c.label_dropout,
                             seed=self.public_seed)
        show = (lambda step, loss: print(f"{self.name} pretrain step {step}: loss {loss:.4f}")) if progress \
            else None
        done = pretrain(self.unet_config(), self.schedule(), cfg, device=str(self.device), public=public,
                        progress=show)
        self.generator_net.load_state_dict(done.state_dict())
        self.base_ref = {"kind": "pretrain", "key": done.key, "public_set": cfg.public_set,
                         "steps": cfg.steps, "trained_now": bool(done.trained)}

    def _load_base_checkpoint(self) -> None:
        from dpdistill.synthesis.diffusion.pretrain import load_checkpoint

        path = self.config.base_checkpoint
        net = load_checkpoint(path, expect=self.unet_config())
        self.generator_net.load_state_dict(net.state_dict())
        self.base_ref = {"kind": "checkpoint", "path": str(path)}
        self.pretrained_on = f"checkpoint {path}"

    # -- plan → charge → execute ------------------------------------------------------------------------

    def plan(self, n_records: int, ledger: PrivacyLedger, target_epsilon: float) -> Plan:
        """Poisson-sampled DP-SGD: q = batch_size / n, ``iterations`` steps, σ solved against the ledger."""
        c = self.config
        if c.batch_size >= n_records:
            raise SpecError(f"{self.name}: batch_size {c.batch_size} must be below the {n_records} sensitive "
                            "records (it is the EXPECTED Poisson batch)")
        if len(c.block_out_channels) != len(c.attention):
            raise SpecError(f"{self.name}: attention needs one true/false per block_out_channels entry")
        q = c.batch_size / n_records
        sigma = calibrate_for_ledger(ledger, lambda s: PoissonGaussian(q, s, c.iterations), target_epsilon, 1.0,
                                     f"{self.name} sigma")
        from dpdistill.training.dp_sgd import resolve_grad_sample_mode

        params = {"sigma": sigma, "q": q, "steps": c.iterations, "clip": c.clip, "n_records": n_records,
                  "lr": c.lr, "lr_schedule": c.lr_schedule, "optimizer": "adam", "weight_decay": c.weight_decay,
                  "multiplicity": c.multiplicity, "ema_decay": c.ema_decay,
                  "checkpoint_every": c.checkpoint_every, "max_physical_batch": c.max_physical_batch,
                  "grad_sample_mode": resolve_grad_sample_mode(self.objective(None), c.grad_sample_mode)}
        note = (f"DP-SGD on the {'LoRA adapters' if self.trains_adapters_only else self.dp_sgd_target}: per-record gradient "
                f"(mean of {c.multiplicity} noise draws) clipped to {c.clip:g}, Poisson rate {q:.4g}")
        plan = Plan(self.name, (PlannedCharge(f"{self.name}/dp-sgd", PoissonGaussian(q, sigma, c.iterations),
                                              note),), params)
        plan.params["plan_id"] = plan.plan_id  # the executor's checkpoints belong to this plan only
        return plan

    def check_plan(self, plan: Plan) -> None:
        """Before the charge: the schedule execute will run is exactly the charged mechanism, and every option
        execute and generate need is valid (a bad option must not cost budget)."""
        from dpdistill.synthesis.diffusion.sampler import ddim_scheduler
        from dpdistill.training.dp_sgd import DPSGDSchedule

        schedule = DPSGDSchedule(**plan.params)
        charged = [c.mechanism for c in plan.charges]
        if charged != [PoissonGaussian(schedule.q, schedule.sigma, schedule.steps)] or schedule.plan_id != plan.plan_id:
            raise PrivacyError(f"{self.name}: the plan's schedule (q={schedule.q:g}, σ={schedule.sigma:g}, "
                               f"T={schedule.steps}) is not what it charges ({'; '.join(m.describe() for m in charged)})")
        objective = self.objective(None)  # validates the UNet, schedule, dropout and LoRA options
        ddim_scheduler(objective.schedule, self.config.sample_steps)
        if getattr(self.config, "base_checkpoint", "") and self.base_ref is None:
            self._load_base_checkpoint()

    def execute(self, plan: Plan, sensitive: Any, executor: Any, progress: bool,
                callback: Callback | None) -> FitReport:
        from dpdistill.training.dp_sgd import DPSGDSchedule, progress_printer, train_dp_sgd

        self.check_plan(plan)
        if self.uses_public_base and self.base_ref is None:
            warnings.warn(f"{self.name}: no public base (neither pretrain nor base_checkpoint): fine-tuning a "
                          "random UNet, i.e. DPDM without its noise multiplicity", stacklevel=2)
        schedule = DPSGDSchedule(**plan.params)
        objective = self.objective(self._base_state())
        inputs = self.training_inputs(sensitive.images)
        if executor is not None:  # e.g. Ray Train workers (the job passes its own progress setting)
            state = executor(objective, None, inputs, sensitive.labels, schedule, self.noise)
        else:
            state = train_dp_sgd(objective, None, inputs, sensitive.labels, schedule, self.noise,
                                 on_step=progress_printer(schedule.steps) if progress else None)
        net = objective.build()
        net.load_state_dict(state)
        self.generator_net = net
        trainable = sum(p.numel() for p in objective.trainable(net))
        return FitReport(self.name, 0.0, 0.0, {"sigma": float(plan.params["sigma"]), "q": float(plan.params["q"])},
                         [], steps=int(plan.params["steps"]), extra={"trainable_parameters": float(trainable)})

    def training_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the objective's rows are made of, one per record: the images themselves (DP-LDM: their latents)."""
        return images

    # -- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, labels: torch.Tensor | None = None, *, n_per_class: int | None = None,
                 seed: int | None = None, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM samples (η = ``sample_eta``) with classifier-free guidance, one per label (post-processing: no
        privacy cost)."""
        from dpdistill.synthesis.diffusion.sampler import sample

        labels = self.generation_labels(labels, n_per_class)
        c = self.config
        images = sample(self.generator_net, self.schedule(), labels, steps=c.sample_steps,
                        guidance_scale=c.guidance_scale, eta=c.sample_eta,
                        seed=self.seed + 1 if seed is None else int(seed), batch_size=batch_size or c.sample_batch,
                        device=self.device, image_size=self.image_size)
        return images, labels

    # -- persistence ------------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        return {"base_ref": dict(self.base_ref) if self.base_ref else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.base_ref = state.get("base_ref")


@dataclass
class DPDMConfig(DiffusionConfig):
    """DPDM: the diffusion options with noise multiplicity on (the paper: 32; 4 keeps a CPU step affordable)."""

    multiplicity: int = 4


class DPDM(DiffusionSynthesizer):
    name = "dpdm"
    config_type = DPDMConfig
    pretrains_on_public = False  # trains from scratch: jobs refuse a public set named for it
    # Its config had the public-base options until they moved to PublicBaseConfig; what they resolved to then.
    retired_options = {"pretrain_iterations": 3000, "pretrain_lr": 2e-4, "pretrain_batch": 64, "pretrain_seed": None,
                       "base_checkpoint": ""}
    paper_neighbouring = "add-or-remove-one"
    privacy_note = ("DP-SGD on the UNet from scratch, Poisson sampling, per-record clip C after averaging the "
                    "record's noise-multiplicity draws; add-or-remove sensitivity C")


class PDPDiffusion(DiffusionSynthesizer):
    name = "pdp-diffusion"
    config_type = PublicBaseConfig
    uses_public_base = True
    paper_neighbouring = "add-or-remove-one"
    privacy_note = ("public pre-training (free), then DP-SGD fine-tuning of every UNet parameter, Poisson "
                    "sampling, per-record clip C; add-or-remove sensitivity C")


class DPLoRA(DiffusionSynthesizer):
    name = "dp-lora"
    config_type = LoRAConfig
    uses_public_base = True
    trains_adapters_only = True
    paper_neighbouring = "add-or-remove-one"
    privacy_note = ("public base frozen; DP-SGD trains only LoRA adapters (peft), Poisson sampling, per-record "
                    "clip C over the adapters; add-or-remove sensitivity C; the release is the adapters")

    def generator_state(self) -> dict[str, torch.Tensor]:
        """The adapters only once fitted (the base is public and named by ``base_ref``); the base before."""
        from dpdistill.synthesis.diffusion.lora import adapter_state

        if not self.fitted:
            return super().generator_state()
        return adapter_state(self.generator_net)

    def transport_state(self) -> dict[str, Any]:
        """For a generation task on any node: the adapted net whole (public base + adapters), not a cache key
        only this machine can resolve. The saved release (:meth:`state`) stays adapters-only."""
        state = self.state()
        if self.fitted:
            state["generator"] = {k: v.detach().cpu() for k, v in self.generator_net.state_dict().items()}
            state["extra"] = {**state["extra"], "base_ref": {"kind": "inline"}}
        return state

    def load_generator_state(self, state: dict[str, torch.Tensor]) -> None:
        from dpdistill.synthesis.diffusion.lora import load_adapter_state

        if (self.base_ref or {}).get("kind") == "inline":  # a transport state: the whole adapted net
            self.generator_net = self.objective(None).build().eval()
            self.generator_net.load_state_dict(state)
            return
        if not any("lora_" in k for k in state):
            self.generator_net.load_state_dict(state)
            return
        base = self._restore_base()
        self.generator_net = self.objective(base).build().eval()
        load_adapter_state(self.generator_net, state)

    def _restore_base(self) -> dict[str, torch.Tensor] | None:
        """The public base the adapters were trained on, from the pre-training cache or the checkpoint."""
        from dpdistill.synthesis.diffusion.pretrain import entry_dir, load_checkpoint

        ref = self.base_ref or {}
        if ref.get("kind") == "checkpoint":
            net = load_checkpoint(ref["path"], expect=self.unet_config())
        elif ref.get("kind") == "pretrain":
            net = load_checkpoint(entry_dir(str(ref["key"])), expect=self.unet_config())
        else:  # adapters on the seeded random init (no public base was used)
            return None
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}



@dataclass
class LDMConfig(PublicBaseConfig):
    """DP-LDM: the diffusion options for the LATENT UNet, plus the public autoencoder's architecture and
    pre-training (``ae_*``). What DP-SGD fine-tunes is fixed: the class embedding and the attention blocks.

    Defaults: a 3-block autoencoder (28×28 → 7×7 latents with 4 channels, 0.28 s per pre-training step of 64
    glyphs on one loaded core: 500 steps in about 2.5 minutes; after 300 steps it reconstructs MNIST test digits
    with MSE 0.005 against their variance 0.088) and a latent UNet of two blocks on 8×8 (the latents padded by
    one) with attention in its 4×4 block and its middle block (2.8 M parameters, 268 k of them fine-tuned; a
    DP-SGD step on 64 records about 0.26 s).
    """

    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    attention: list[bool] = field(default_factory=lambda: [False, True])
    mid_attention: bool = True
    norm_num_groups: int = 16
    # The public autoencoder (AutoencoderKL) and its non-private pre-training on the public set.
    ae_block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    ae_latent_channels: int = 4
    ae_layers_per_block: int = 1
    ae_norm_num_groups: int = 8
    ae_pretrain_iterations: int = 500
    ae_lr: float = 1e-3
    ae_batch: int = 64
    ae_kl_weight: float = field(default=1e-3, metadata={"zero_ok": True})


class DPLDM(DiffusionSynthesizer):
    """DP-LDM: public autoencoder + public latent UNet; DP-SGD on the latent UNet's conditioning and attention."""

    name = "dp-ldm"
    config_type = LDMConfig
    uses_public_base = True
    accepts_base_checkpoint = False
    no_base_checkpoint_because = ("a latent UNet needs the public autoencoder whose latents it was trained on, and "
                                  "a diffusers UNet directory holds no autoencoder")
    paper_neighbouring = "add-or-remove-one"
    privacy_note = ("public autoencoder and latent UNet pre-trained on public data (free); DP-SGD fine-tunes only "
                    "the latent UNet's class embedding and attention blocks on the sensitive images' latents (a "
                    "fixed public encoder applied to each record), Poisson sampling, per-record clip C; "
                    "add-or-remove sensitivity C; the release is those parameters plus references to the public "
                    "autoencoder and base UNet")
    # DP-LDM's fine-tuned subset ("the attention modules and the conditioning embedder"): parameter-name
    # substrings of diffusers' UNet2DModel (``class_embedding.weight``, ``…attentions.N.{group_norm, to_q, to_k,
    # to_v, to_out.0}.*``).
    train_only: ClassVar[tuple[str, ...]] = ("class_embedding", "attentions")
    dp_sgd_target = "latent UNet's class embedding and attention"
    disclosure = fit_disclosure(noise={"sigma": ACCOUNTING, "q": ACCOUNTING},
                                extra={"trainable_parameters": PUBLIC, "latent_scaling_factor": PUBLIC})

    # -- the networks -----------------------------------------------------------------------------------

    def ae_config(self) -> Any:
        from dpdistill.synthesis.diffusion.autoencoder import AutoencoderConfig

        c = self.config
        return AutoencoderConfig(image_size=self.image_size, channels=self.channels,
                                 block_out_channels=tuple(c.ae_block_out_channels),
                                 latent_channels=c.ae_latent_channels, layers_per_block=c.ae_layers_per_block,
                                 norm_num_groups=c.ae_norm_num_groups)

    def unet_config(self) -> Any:
        """The latent UNet: on the autoencoder's latents (their side and channel count), class-conditional."""
        from dpdistill.synthesis.diffusion.unet import UNetConfig

        c, ae = self.config, self.ae_config()
        return UNetConfig(image_size=ae.latent_size, channels=ae.latent_channels, num_classes=self.num_classes,
                          block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
                          attention=tuple(c.attention), mid_attention=c.mid_attention,
                          norm_num_groups=c.norm_num_groups)

    def build(self) -> nn.Module:
        """The latent UNet (returned) and the frozen autoencoder (``self.autoencoder``), both seeded."""
        from dpdistill.synthesis.diffusion.autoencoder import build_autoencoder

        c = self.config
        if c.base_checkpoint:
            raise SpecError(f"{self.name}: base_checkpoint is not supported ({self.no_base_checkpoint_because}); "
                            "pre-train both with method.pretrain")
        if not (c.mid_attention or any(c.attention)):
            raise SpecError(f"{self.name}: fine-tunes the latent UNet's attention blocks; set mid_attention or an "
                            "attention block")
        self.autoencoder = self._frozen(build_autoencoder(self.ae_config()))
        self.ae_ref: dict[str, Any] | None = None  # where the public autoencoder came from
        self.latent_scale = 1.0  # the public latents' scaling factor (1 until pre-training computes it)
        # DDIM clips x̂_0 to ±latent_clip (the sampler says why it must clip): the 99.9th percentile of the PUBLIC
        # scaled latents' |values| once pre-trained (images' [-1, 1] is their range); 3 (unit variance) before.
        self.latent_clip = 3.0
        return super().build()

    def _frozen(self, ae: nn.Module) -> nn.Module:
        for p in ae.parameters():
            p.requires_grad_(False)
        return ae.to(self.device).eval()

    def objective(self, init_state: dict[str, torch.Tensor] | None) -> Any:
        from dpdistill.synthesis.diffusion.objective import DiffusionObjective

        c = self.config
        return DiffusionObjective(unet=self.unet_config(), train_timesteps=c.train_timesteps,
                                  label_dropout=c.label_dropout, init_state=init_state, train_only=self.train_only,
                                  device=str(self.device), seed=self.seed, latent=True)

    def training_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The sensitive images' scaled latents by the frozen PUBLIC encoder (posterior means: each a fixed
        function of its own record), computed once before DP-SGD, so every executor (and every Ray Train
        worker's shard) trains on the same latents. They never leave the fit unnoised."""
        from dpdistill.synthesis.diffusion.autoencoder import encode

        return encode(self.autoencoder, images, self.ae_config(), self.latent_scale)

    # -- public pre-training ----------------------------------------------------------------------------

    def _pretrain(self, public: Any, progress: bool) -> None:
        """The autoencoder on the public images, then the latent UNet on their latents (both cached)."""
        from dpdistill.data.base import ImageSet
        from dpdistill.synthesis.diffusion.autoencoder import (
            AutoencoderTrainConfig,
            encode,
            pretrain_autoencoder,
        )
        from dpdistill.synthesis.diffusion.pretrain import PretrainConfig, pretrain

        c = self.config
        name = str(getattr(public, "name", "public"))

        def show(stage: str) -> Any:
            return (lambda step, loss: print(f"{self.name} {stage} step {step}: loss {loss:.4f}")) if progress \
                else None

        ae_cfg = self.ae_config()
        train_cfg = AutoencoderTrainConfig(public_set=name, steps=c.ae_pretrain_iterations, lr=c.ae_lr,
                                           batch_size=c.ae_batch, kl_weight=c.ae_kl_weight, seed=self.public_seed)
        ae = pretrain_autoencoder(ae_cfg, train_cfg, public, device=str(self.device),
                                  progress=show("autoencoder pretrain"))
        self.autoencoder = self._frozen(ae.load())
        self.latent_scale = float(ae.scaling_factor)  # computed on the PUBLIC latents when the entry was made
        self.ae_ref = {"kind": "pretrain", "key": ae.key, "public_set": name, "steps": train_cfg.steps,
                       "trained_now": bool(ae.trained)}
        latents = ImageSet(encode(self.autoencoder, public.images, ae_cfg, self.latent_scale), public.labels,
                           public.num_classes, f"{name}-latents")
        magnitudes = latents.images.abs().flatten()
        self.latent_clip = float(magnitudes.kthvalue(max(1, int(0.999 * len(magnitudes)))).values)
        cfg = PretrainConfig(public_set=name, steps=c.pretrain_iterations, lr=c.pretrain_lr,
                             batch_size=c.pretrain_batch, label_dropout=c.label_dropout, seed=self.public_seed,
                             autoencoder_key=ae.key)
        done = pretrain(self.unet_config(), self.schedule(), cfg, device=str(self.device), public=latents,
                        progress=show("latent UNet pretrain"))
        self.generator_net.load_state_dict(done.state_dict())
        self.base_ref = {"kind": "pretrain", "key": done.key, "public_set": name, "steps": cfg.steps,
                         "trained_now": bool(done.trained)}

    def execute(self, plan: Any, sensitive: Any, executor: Any, progress: bool,
                callback: Callback | None) -> FitReport:
        report = super().execute(plan, sensitive, executor, progress, callback)
        report.extra["latent_scaling_factor"] = float(self.latent_scale)  # public: from the public set only
        return report

    # -- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, labels: torch.Tensor | None = None, *, n_per_class: int | None = None,
                 seed: int | None = None, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM latents with classifier-free guidance, decoded by the public decoder (post-processing)."""
        from dpdistill.synthesis.diffusion.autoencoder import decode
        from dpdistill.synthesis.diffusion.sampler import sample

        labels = self.generation_labels(labels, n_per_class)
        c, ae = self.config, self.ae_config()
        batch = batch_size or c.sample_batch
        latents = sample(self.generator_net, self.schedule(), labels, steps=c.sample_steps,
                         guidance_scale=c.guidance_scale, eta=c.sample_eta,
                         seed=self.seed + 1 if seed is None else int(seed),
                         batch_size=batch, device=self.device, image_size=ae.latent_size, latent=True,
                         clip_range=self.latent_clip)
        return decode(self.autoencoder, latents, ae, self.latent_scale, batch_size=batch), labels

    # -- persistence ------------------------------------------------------------------------------------

    def trainable_names(self) -> list[str]:
        """The latent UNet's parameters DP-SGD fine-tunes (what a fitted release holds), in module order."""
        chosen = {id(p) for p in self.objective(None).trainable(self.generator_net)}
        return [n for n, p in self.generator_net.named_parameters() if id(p) in chosen]

    def generator_state(self) -> dict[str, torch.Tensor]:
        """The fine-tuned subset only once fitted (the rest is the public base, named by ``base_ref``)."""
        if not self.fitted:
            return super().generator_state()
        keep = set(self.trainable_names())
        return {k: v.detach().cpu().clone() for k, v in self.generator_net.state_dict().items() if k in keep}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "ae_ref": dict(self.ae_ref) if self.ae_ref else None,
                "latent_scale": float(self.latent_scale), "latent_clip": float(self.latent_clip)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """The references (and the public autoencoder they name, from the cache or inline) and the latent scale."""
        from dpdistill.synthesis.diffusion.autoencoder import entry_dir, load_autoencoder

        super().load_extra_state(state)
        self.ae_ref = state.get("ae_ref")
        self.latent_scale = float(state.get("latent_scale", 1.0))
        self.latent_clip = float(state.get("latent_clip", 3.0))
        ref = self.ae_ref or {}
        if ref.get("kind") == "pretrain":
            self.autoencoder = self._frozen(load_autoencoder(entry_dir(str(ref["key"])), expect=self.ae_config()))
        elif ref.get("kind") == "inline":  # a transport state: the autoencoder's weights travel with it
            self.autoencoder.load_state_dict(state["autoencoder_state"])
        # else: the seeded init this synthesiser was built with (no public autoencoder was pre-trained)

    def load_generator_state(self, state: dict[str, torch.Tensor]) -> None:
        from dpdistill.errors import DataError
        from dpdistill.synthesis.diffusion.pretrain import entry_dir, load_checkpoint

        if set(state) == set(self.generator_net.state_dict()):  # the whole UNet (unfitted, or a transport state)
            self.generator_net.load_state_dict(state)
            return
        ref = self.base_ref or {}
        if ref.get("kind") == "pretrain":
            base = load_checkpoint(entry_dir(str(ref["key"])), expect=self.unet_config())
            self.generator_net.load_state_dict(base.state_dict())
        # else: the seeded random init this synthesiser was built with (no public base was used)
        if set(state) != set(self.trainable_names()):
            raise DataError(f"{self.name}: the release holds other tensors than the fine-tuned class embedding "
                            "and attention parameters of this configuration")
        self.generator_net.load_state_dict(state, strict=False)

    def transport_state(self) -> dict[str, Any]:
        """For a generation task on any node: the latent UNet whole and the autoencoder's weights inline, not
        cache keys only this machine can resolve. The saved release (:meth:`state`) keeps the references."""
        state = self.state()
        state["generator"] = {k: v.detach().cpu() for k, v in self.generator_net.state_dict().items()}
        state["extra"] = {**state["extra"], "base_ref": {"kind": "inline"},
                          "ae_ref": {"kind": "inline", "was": state["extra"].get("ae_ref")},
                          "autoencoder_state": {k: v.detach().cpu() for k, v in self.autoencoder.state_dict().items()}}
        return state


__all__ = ["DPDM", "DPLDM", "DPLoRA", "DPDMConfig", "DiffusionConfig", "DiffusionSynthesizer", "LDMConfig",
           "LoRAConfig", "PDPDiffusion"]
