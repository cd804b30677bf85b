"""Non-private pre-training of the UNet on a PUBLIC image set, cached; and loading a user's local checkpoint.

Pre-training reads only a registered public set (``glyphs`` by default: digits rendered from matplotlib's fonts,
see ``data/glyphs.py``), so it costs no privacy. It minimises the same ε-prediction loss as DP fine-tuning
(``objective.DiffusionObjective.losses``, one row per image) with Adam, a constant learning rate and gradient
norm clipping at 1, on batches drawn by a generator seeded with ``seed``; the saved weights are an exponential
moving average of the iterates (``ema_decay``, with a diffusers-like warm-up: the decay is at most
(1 + step) / (10 + step)), which samples markedly better than the last iterate of a short run. When the public set has as many
classes as the UNet (glyph digits and MNIST: 0-9) it trains class-conditionally with label dropout; otherwise
every label is the null label (unconditional pre-training; the class rows are learned in fine-tuning).
A LATENT UNet (DP-LDM) is pre-trained the same way on the public set's autoencoder latents (``public`` holds them,
``autoencoder_key`` names the public autoencoder that made them and enters the cache key).

Cache. The key is the SHA-256 of: the public set's name and the SHA-256 of its images and labels as loaded,
the UNet config, the noise schedule, steps, lr, batch size, label dropout, seed and :data:`ALGORITHM_VERSION`.
The result is a diffusers ``save_pretrained`` directory ``<cache_root>/diffusion-pretrain/<key[:32]>`` (root
default: ``$DPDISTILL_CACHE``, else ``~/.cache/dpdistill``, as the fidelity extractors use), with
``dpdistill_pretrain.json`` beside it (the key's inputs and the loss curve). A call with the same key loads it
instead of training. The directory is written under a temporary name and renamed, so a killed run leaves no
half-written entry; a lock file per key makes concurrent callers of the same key train it once (the others wait
and load it).

Checkpoints. :func:`load_checkpoint` opens a user's local diffusers UNet directory; nothing is ever downloaded
(anything that is not an existing directory, e.g. a hub id, is refused).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpdistill.data.base import ImageSet
from dpdistill.errors import DataError, SpecError

# The cache directory machinery is shared with the synthesisers' own pre-training cache (synthesis/cache.py).
from dpdistill.synthesis.cache import cached_entry, content_hash, default_cache_root
from dpdistill.synthesis.diffusion.objective import DiffusionObjective, NoiseSchedule
from dpdistill.synthesis.diffusion.unet import UNetConfig, contiguous_conv_inputs

# Bump when the training algorithm below changes what a given key produces (old cache entries then miss).
ALGORITHM_VERSION = "diffusion-pretrain-1"
META_FILE = "dpdistill_pretrain.json"


def entry_dir(key: str, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Where the pre-trained UNet of cache key ``key`` lives (a release's reference to its public base)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "diffusion-pretrain" / key[:32]


@dataclass(frozen=True)
class PretrainConfig:
    """What pre-training does (public): the set, its length and optimiser, and the seed of its batches/init."""

    public_set: str = "glyphs"
    steps: int = 2000
    # Measured on glyphs with the default UNet, batch 64, 400 steps: lr 1e-3 gave clear class-conditional
    # digits (loss 0.042, samples' nearest-glyph distance 8.0), 2e-4 still noisy ones (0.053, 11.9).
    lr: float = 1e-3
    batch_size: int = 64
    label_dropout: float = 0.1
    seed: int = 0
    ema_decay: float = 0.999  # 0: keep the last iterate
    # DP-LDM: the cache key of the public autoencoder whose latents ``public`` holds ("" for pixel space). Only
    # keyed when set, so the keys of pixel-space entries are unchanged.
    autoencoder_key: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1 or not 0 <= self.label_dropout <= 1:
            raise SpecError("pretrain: steps >= 1, lr > 0, batch_size >= 1 and label_dropout in [0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise SpecError(f"pretrain: ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class Pretrained:
    """A cached pre-trained UNet: its directory, cache key, whether this call trained it, and its loss curve."""

    path: Path
    key: str
    trained: bool
    losses: list[float] = field(default_factory=list)
    conditional: bool = True

    def load(self, device: str | torch.device = "cpu") -> Any:
        """The UNet2DModel (eval mode, on ``device``)."""
        return load_checkpoint(self.path).to(device)

    def state_dict(self) -> dict[str, Tensor]:
        """CPU tensors of the base UNet: what ``DiffusionObjective(init_state=...)`` takes."""
        return {k: v.detach().cpu().clone() for k, v in load_checkpoint(self.path).state_dict().items()}


def cache_key(unet: UNetConfig, schedule: NoiseSchedule, cfg: PretrainConfig, data_hash: str) -> tuple[str, dict]:
    """(hex key, the JSON document hashed): everything that determines the pre-trained weights."""
    doc = {"algorithm": ALGORITHM_VERSION, "public_set": cfg.public_set, "public_sha256": data_hash,
           "unet": unet.to_dict(), "schedule": schedule.to_dict(), "steps": cfg.steps, "lr": cfg.lr,
           "batch_size": cfg.batch_size, "label_dropout": cfg.label_dropout, "seed": cfg.seed,
           "ema_decay": cfg.ema_decay}
    if cfg.autoencoder_key:
        doc["autoencoder_key"] = cfg.autoencoder_key
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), doc


def load_public(name: str, unet: UNetConfig) -> ImageSet:
    """The train split of public set ``name`` at the UNet's image size and channel count."""
    from dpdistill.data import registry

    data = registry.load(name, "train", image_size=unet.image_size)
    if data.image_size != unet.image_size:
        raise DataError(f"pretrain: public set '{name}' loads at {data.image_size}px, the UNet expects "
                        f"{unet.image_size}px")
    if data.channels != unet.channels:
        if data.channels == 1:  # grey public set, colour model: the same glyph in every channel
            data = ImageSet(data.images.repeat(1, unet.channels, 1, 1), data.labels, data.num_classes,
                            data.name, data.class_names)
        elif unet.channels == 1:
            data = ImageSet(data.images.mean(1, keepdim=True), data.labels, data.num_classes, data.name,
                            data.class_names)
        else:
            raise DataError(f"pretrain: public set '{name}' has {data.channels} channels, the UNet "
                            f"{unet.channels}")
    return data


def pretrain(unet: UNetConfig, schedule: NoiseSchedule | None = None, cfg: PretrainConfig | None = None, *,
             cache_root: str | os.PathLike[str] | None = None, device: str = "cpu",
             public: ImageSet | None = None, progress: Callable[[int, float], None] | None = None) -> Pretrained:
    """Pre-train the UNet on ``cfg.public_set`` (or load it from the cache when this exact run was done).

    ``public`` overrides loading the registered set (it must be public data; its content is hashed into the key
    under the name ``cfg.public_set``). ``progress(step, loss)`` is called every 100 steps while training.
    """
    schedule = schedule or NoiseSchedule()
    cfg = cfg or PretrainConfig()
    if cfg.autoencoder_key and public is None:
        raise SpecError("pretrain: a latent UNet is pre-trained on the latents passed as public=")
    data = public if public is not None else load_public(cfg.public_set, unet)
    key, doc = cache_key(unet, schedule, cfg, content_hash(data))
    conditional = data.num_classes == unet.num_classes

    def make(tmp: Path) -> Pretrained:
        net, losses = _train(unet, schedule, cfg, data, conditional, device, progress)
        net.to("cpu").save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps({"key": key, "inputs": doc, "conditional": conditional,
                                                  "losses": losses}, indent=1))
        return Pretrained(entry_dir(key, cache_root), key, True, losses, conditional)

    return cached_entry(entry_dir(key, cache_root), key, _cached, make)


def _cached(target: Path, key: str) -> Pretrained | None:
    """The cache entry at ``target`` when it holds ``key``, else None."""
    meta_path = target / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return Pretrained(target, key, False, list(meta.get("losses", [])), bool(meta.get("conditional")))
    return None


def _train(unet: UNetConfig, schedule: NoiseSchedule, cfg: PretrainConfig, data: ImageSet, conditional: bool,
           device: str, progress: Callable[[int, float], None] | None) -> tuple[Any, list[float]]:
    """The pre-training loop: (trained UNet2DModel, mean loss of every step)."""
    objective = DiffusionObjective(unet=unet, train_timesteps=schedule.train_timesteps,
                                   beta_schedule=schedule.beta_schedule, beta_start=schedule.beta_start,
                                   beta_end=schedule.beta_end, label_dropout=cfg.label_dropout, device=device,
                                   seed=cfg.seed, latent=bool(cfg.autoencoder_key))
    net = objective.build()
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    # Public data, public seed: these generators may be plain seeded ones (nothing private is sampled).
    batches = torch.Generator().manual_seed(cfg.seed)
    draws = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    labels = data.labels if conditional else torch.full_like(data.labels, unet.null_label)
    n, order, pos = len(data), torch.empty(0, dtype=torch.long), 0
    losses: list[float] = []
    params = list(net.parameters())
    ema = [p.detach().clone() for p in params]
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):  # a new shuffled epoch (the ragged tail is dropped)
            order, pos = torch.randperm(n, generator=batches), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        loss = objective.losses(net, data.images[idx], labels[idx], 1, draws).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if cfg.ema_decay > 0:
            with torch.no_grad():
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                for e, p in zip(ema, params, strict=True):
                    e.lerp_(p.detach(), 1.0 - decay)
        losses.append(float(loss.detach()))
        if progress is not None and (step + 1) % 100 == 0:
            progress(step + 1, sum(losses[-100:]) / len(losses[-100:]))
    if cfg.ema_decay > 0:
        with torch.no_grad():
            for p, e in zip(params, ema, strict=True):
                p.copy_(e)
    return net.eval(), losses


def load_checkpoint(path: str | os.PathLike[str], expect: UNetConfig | None = None) -> Any:
    """A user's local diffusers UNet2DModel directory (``save_pretrained`` layout), in eval mode.

    Refuses, with a one-line DataError, anything that is not an existing local directory (hub ids included:
    nothing is downloaded), a directory without a UNet2DModel, and — when ``expect`` is given — a network
    whose sample size, channels or class count (``num_classes`` + the null label) differ from it.
    """
    from diffusers import UNet2DModel

    where = Path(os.fspath(path)).expanduser()
    if not where.is_dir():
        raise DataError(f"diffusion checkpoint '{path}' is not an existing local directory (nothing is downloaded; "
                        "hub ids are refused)")
    if not (where / "config.json").is_file():
        raise DataError(f"diffusion checkpoint '{where}' has no config.json (expected a diffusers save_pretrained "
                        "directory of a UNet2DModel)")
    try:
        net = UNet2DModel.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as err:
        raise DataError(f"diffusion checkpoint '{where}' could not be loaded as a UNet2DModel: {err}") from None
    if expect is not None:
        c = net.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        if int(size) != expect.model_size or int(c.in_channels) != expect.channels:
            raise DataError(f"diffusion checkpoint '{where}' is {size}px with {c.in_channels} channels; the job "
                            f"needs {expect.model_size}px with {expect.channels} channels")
        if c.num_class_embeds != expect.num_classes + 1:
            raise DataError(f"diffusion checkpoint '{where}' has {c.num_class_embeds} class embeddings; the job "
                            f"needs {expect.num_classes + 1} ({expect.num_classes} classes + the null label)")
    return contiguous_conv_inputs(net).eval()
