"""DDIM generation with classifier-free guidance from a trained class-conditional UNet (post-processing).

Generation reads only the released network, so it charges nothing and may use a public seed. Each denoising
step runs the conditional and the null-label passes as one batch of 2B and combines them as
ε = ε(x, ∅) + w·(ε(x, y) − ε(x, ∅)) (w = ``guidance_scale``; w = 1 is the plain conditional model and skips the
null pass). Timesteps use diffusers' "trailing" spacing, so the first step starts at t = T-1 (pure noise) even
with few steps. All noise is drawn on the CPU from one generator seeded with ``seed`` (the initial noise of all
N images up front, then any η > 0 step noise batch by batch): the same seed, labels and batch size give the same
images on any device. A latent UNet (DP-LDM: ``latent=True``) returns latents, for the autoencoder to decode, and
clips the predicted x̂_0 to ±``clip_range`` (its latents have unit variance, not the range [-1, 1]; the caller
knows their public range). Some x̂_0 clipping is needed at the start: with the cosine schedule ᾱ_{T-1} ≈ 2e-9, so
x̂_0 = (x − √(1−ᾱ)·ε̂)/√ᾱ magnifies any ε̂ error by ~2e4 (unclipped DDIM latents of a pre-trained latent UNet had
std ~3000 here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dpdistill.errors import SpecError
from dpdistill.synthesis.diffusion.objective import NoiseSchedule


def ddim_scheduler(schedule: NoiseSchedule | dict[str, Any], steps: int) -> Any:
    """A diffusers ``DDIMScheduler`` for ``schedule`` (or explicit DDIM kwargs) with ``steps`` timesteps set."""
    from diffusers import DDIMScheduler

    kwargs = schedule.scheduler_kwargs() if isinstance(schedule, NoiseSchedule) else dict(schedule)
    kwargs.setdefault("timestep_spacing", "trailing")
    scheduler = DDIMScheduler(**kwargs)
    if not 1 <= steps <= scheduler.config.num_train_timesteps:
        raise SpecError(f"sampler: steps must be in [1, {scheduler.config.num_train_timesteps}], got {steps}")
    scheduler.set_timesteps(steps)
    return scheduler


def sample(net: nn.Module, schedule: NoiseSchedule | dict[str, Any], labels: Tensor | list[int], *,
           steps: int = 50, guidance_scale: float = 2.0, eta: float = 0.0, seed: int = 0, batch_size: int = 500,
           device: str | torch.device = "cpu", image_size: int | None = None, latent: bool = False,
           clip_range: float | None = None) -> Tensor:
    """Generate one image per label: float32 [N, C, image_size, image_size] in [0, 1] on the CPU.

    ``net`` is the class-conditional UNet2DModel (LoRA-adapted or not) whose last class index is the null
    label; ``image_size`` (default: the net's sample size) is the original size the padded output is
    centre-cropped back to (see ``unet``). The net is used in eval mode and left in the mode it came in.
    ``latent``: the net denoises autoencoder latents: the cropped latents are returned as they are (float32,
    CPU), not mapped to [0, 1]. ``clip_range``: clip x̂_0 to ±clip_range at each step (default: the schedule's
    own setting, [-1, 1], for images; no clipping for latents).
    """
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    cfg = net.config
    null = int(cfg.num_class_embeds) - 1
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= null):
        raise SpecError(f"sampler: labels must be in [0, {null - 1}] (index {null} is the null label)")
    if guidance_scale < 0 or eta < 0 or batch_size < 1:
        raise SpecError("sampler: guidance_scale >= 0, eta >= 0 and batch_size >= 1")
    side = int(cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0])
    out_size = int(image_size or side)
    if out_size > side:
        raise SpecError(f"sampler: image_size {out_size} exceeds the network's sample size {side}")
    channels = int(cfg.in_channels)
    device = torch.device(device)
    if latent or clip_range is not None:
        schedule = {**(schedule.scheduler_kwargs() if isinstance(schedule, NoiseSchedule) else dict(schedule)),
                    "clip_sample": clip_range is not None}
        if clip_range is not None:
            if not clip_range > 0:
                raise SpecError(f"sampler: clip_range must be > 0, got {clip_range}")
            schedule["clip_sample_range"] = float(clip_range)
    scheduler = ddim_scheduler(schedule, steps)
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((len(labels), channels, side, side), generator=generator)
    lo = (side - out_size) // 2
    outputs = []
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(labels), batch_size):
                y = labels[start:start + batch_size].to(device)
                x = noise[start:start + batch_size].to(device)
                guided = guidance_scale != 1.0
                y_in = torch.cat([y, torch.full_like(y, null)]) if guided else y
                for t in scheduler.timesteps:
                    x_in = torch.cat([x, x]) if guided else x
                    eps = net(x_in, t.to(device), class_labels=y_in).sample
                    if guided:
                        cond, uncond = eps.chunk(2)
                        eps = uncond + guidance_scale * (cond - uncond)
                    var_noise = torch.randn(x.shape, generator=generator).to(device) if eta > 0 else None
                    x = scheduler.step(eps, t, x, eta=eta, variance_noise=var_noise).prev_sample
                x = x[..., lo:lo + out_size, lo:lo + out_size]
                outputs.append(x.float().cpu() if latent else ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu())
    finally:
        net.train(was_training)
    if not outputs:
        return torch.empty((0, channels, out_size, out_size))
    return torch.cat(outputs)
