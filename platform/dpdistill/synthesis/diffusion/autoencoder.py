"""DP-LDM's public autoencoder: a small diffusers ``AutoencoderKL``, pre-trained non-privately and cached.

Latent diffusion (Rombach et al.) runs the diffusion model on the latents of an autoencoder instead of on pixels;
DP-LDM (Lyu et al.) trains that autoencoder and the latent UNet on PUBLIC data and fine-tunes only part of the UNet
with DP-SGD on the sensitive set. This module is the autoencoder stage; the latent UNet is pre-trained by
:mod:`~dpdistill.synthesis.diffusion.pretrain` on the latents this autoencoder makes of the public set.

Architecture (public, :class:`AutoencoderConfig`): ``len(block_out_channels)`` encoder blocks halve the image
``len - 1`` times (28×28 → 14×14 → 7×7 with three blocks), to ``latent_channels`` channels. The image is mapped to
[-1, 1] and, when its side is not a multiple of the downsampling factor, padded by edge replication (as the UNet
does, see ``unet``); decoding crops the centre back.

Pre-training (:func:`pretrain_autoencoder`) minimises the per-pixel MSE of the reconstruction of a posterior
sample plus ``kl_weight`` × the posterior's KL to N(0, I) per latent element (a light KL keeps the latent space
regular for the diffusion model, as LDM's KL-regularised autoencoders do; no perceptual or adversarial loss at this
size), with Adam, gradient-norm clipping at 1 and batches and posterior draws from generators seeded with ``seed``
(public data, public randomness).

Latent scale. After training, the public set is encoded (posterior MEANS: encoding is then a fixed, deterministic
map) and the scaling factor is 1 / std of those latents, so the diffusion model sees latents of unit variance
(Stable Diffusion's ``scaling_factor``, here computed rather than hard-coded). It is computed from the public set
only and stored with the cache entry: nothing about it depends on the sensitive set.

Cache: as the UNet pre-training's (``pretrain``): the key is the SHA-256 of the public set's name and content
hash, the autoencoder config, steps, lr, batch, KL weight, seed and :data:`ALGORITHM_VERSION`; the entry is a
diffusers ``save_pretrained`` directory ``<cache_root>/diffusion-autoencoder/<key[:32]>`` with
``dpdistill_autoencoder.json`` (the key's inputs, the loss curve, the scaling factor), written under a temporary
name and renamed, one process per key at a time (a lock file per key).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpdistill.data.base import ImageSet
from dpdistill.errors import DataError, SpecError
from dpdistill.synthesis.cache import cached_entry, content_hash, default_cache_root
from dpdistill.synthesis.diffusion.unet import from_model, pad_to_model

# Bump when the training algorithm below changes what a given key produces (old cache entries then miss).
ALGORITHM_VERSION = "diffusion-autoencoder-1"
META_FILE = "dpdistill_autoencoder.json"


@dataclass(frozen=True)
class AutoencoderConfig:
    """Public architecture of the autoencoder (no data in it): what its cache key and a release describe."""

    image_size: int = 28
    channels: int = 1
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise SpecError("autoencoder: block_out_channels must name at least one block")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise SpecError(f"autoencoder: block_out_channels {c} is not divisible by norm_num_groups "
                                f"{self.norm_num_groups}")
        if self.image_size < 2 or self.channels < 1 or self.latent_channels < 1 or self.layers_per_block < 1:
            raise SpecError("autoencoder: image_size >= 2, channels >= 1, latent_channels >= 1 and "
                            "layers_per_block >= 1")
        if self.latent_size < 1:
            raise SpecError(f"autoencoder: {len(self.block_out_channels)} blocks downsample a {self.image_size}px "
                            "image to nothing; use fewer blocks")

    @property
    def factor(self) -> int:
        """The downsampling factor image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def model_size(self) -> int:
        """The side the encoder sees: the smallest multiple of :attr:`factor` >= ``image_size``."""
        return -(-self.image_size // self.factor) * self.factor

    @property
    def latent_size(self) -> int:
        """The side of a latent."""
        return self.model_size // self.factor

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


def diffusers_kwargs(cfg: AutoencoderConfig) -> dict[str, Any]:
    """The ``AutoencoderKL(**kwargs)`` that realises ``cfg``."""
    n = len(cfg.block_out_channels)
    return dict(in_channels=cfg.channels, out_channels=cfg.channels, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.block_out_channels,
                layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                norm_num_groups=cfg.norm_num_groups, sample_size=cfg.model_size,
                mid_block_add_attention=cfg.mid_attention)


def build_autoencoder(cfg: AutoencoderConfig) -> Any:
    """A fresh ``AutoencoderKL`` for ``cfg`` (initialised from the global torch RNG: seed around the call)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**diffusers_kwargs(cfg))


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    """What autoencoder pre-training does (public): the set, its length and optimiser, the KL weight, the seed."""

    public_set: str = "glyphs"
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 64
    kl_weight: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1 or self.kl_weight < 0:
            raise SpecError("autoencoder pretrain: steps >= 1, lr > 0, batch_size >= 1 and kl_weight >= 0")


@dataclass
class PretrainedAutoencoder:
    """A cached pre-trained autoencoder: directory, key, whether this call trained it, losses, latent scale."""

    path: Path
    key: str
    trained: bool
    scaling_factor: float
    losses: list[float] = field(default_factory=list)

    def load(self, device: str | torch.device = "cpu") -> Any:
        """The AutoencoderKL (eval mode, on ``device``)."""
        return load_autoencoder(self.path).to(device)


def entry_dir(key: str, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Where the pre-trained autoencoder of cache key ``key`` lives (a release's reference to it)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "diffusion-autoencoder" / key[:32]


def cache_key(ae: AutoencoderConfig, cfg: AutoencoderTrainConfig, data_hash: str) -> tuple[str, dict]:
    """(hex key, the JSON document hashed): everything that determines the pre-trained autoencoder."""
    doc = {"algorithm": ALGORITHM_VERSION, "public_set": cfg.public_set, "public_sha256": data_hash,
           "autoencoder": ae.to_dict(), "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
           "kl_weight": cfg.kl_weight, "seed": cfg.seed}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), doc


def to_input(images: Tensor, cfg: AutoencoderConfig) -> Tensor:
    """Images in [0, 1] → the encoder's input: [-1, 1], padded by edge replication to ``cfg.model_size`` (the
    UNet's input mapping: both read only the config's sides)."""
    return pad_to_model(images * 2.0 - 1.0, cfg)


def from_output(x: Tensor, cfg: AutoencoderConfig) -> Tensor:
    """The decoder's output → images in [0, 1] at ``cfg.image_size`` (centre crop, clamped; the UNet's inverse)."""
    return from_model(x.float(), cfg)


@torch.no_grad()
def encode(ae: nn.Module, images: Tensor, cfg: AutoencoderConfig, scaling_factor: float,
           batch_size: int = 512) -> Tensor:
    """Scaled latents (posterior means × ``scaling_factor``) of ``images``, float32 on the CPU.

    A fixed, deterministic map applied to each image on its own (no sampling, eval mode, nothing mixes records):
    DP-LDM applies it to every sensitive record before DP-SGD, so each record still contributes one clipped
    gradient.
    """
    device = next(ae.parameters()).device
    was_training = ae.training
    ae.eval()
    try:
        out = [ae.encode(to_input(images[s:s + batch_size].to(device), cfg)).latent_dist.mean.float().cpu()
               for s in range(0, len(images), batch_size)]
    finally:
        ae.train(was_training)
    if not out:
        return torch.empty((0, cfg.latent_channels, cfg.latent_size, cfg.latent_size))
    return torch.cat(out) * float(scaling_factor)


@torch.no_grad()
def decode(ae: nn.Module, latents: Tensor, cfg: AutoencoderConfig, scaling_factor: float,
           batch_size: int = 512) -> Tensor:
    """Images in [0, 1] (float32, CPU) from scaled latents (the inverse map of :func:`encode`)."""
    device = next(ae.parameters()).device
    was_training = ae.training
    ae.eval()
    try:
        out = [from_output(ae.decode(latents[s:s + batch_size].to(device) / float(scaling_factor)).sample, cfg).cpu()
               for s in range(0, len(latents), batch_size)]
    finally:
        ae.train(was_training)
    if not out:
        return torch.empty((0, cfg.channels, cfg.image_size, cfg.image_size))
    return torch.cat(out)


def latent_scaling_factor(ae: nn.Module, public: ImageSet, cfg: AutoencoderConfig) -> float:
    """1 / std of the PUBLIC set's unscaled latents (posterior means): the diffusion model then sees unit variance."""
    std = float(encode(ae, public.images, cfg, 1.0).std())
    if not std > 0:
        raise DataError("autoencoder: the public set's latents are constant; cannot scale them")
    return 1.0 / std


def pretrain_autoencoder(ae: AutoencoderConfig, cfg: AutoencoderTrainConfig, public: ImageSet, *,
                         cache_root: str | os.PathLike[str] | None = None, device: str = "cpu",
                         progress: Callable[[int, float], None] | None = None) -> PretrainedAutoencoder:
    """Pre-train the autoencoder on the PUBLIC set ``public`` (named ``cfg.public_set``), or load it from the cache.

    ``progress(step, loss)`` is called every 100 steps while training.
    """
    if tuple(public.images.shape[1:]) != (ae.channels, ae.image_size, ae.image_size):
        raise DataError(f"autoencoder pretrain: public images are {tuple(public.images.shape[1:])}, the "
                        f"autoencoder expects {(ae.channels, ae.image_size, ae.image_size)}")
    key, doc = cache_key(ae, cfg, content_hash(public))

    def make(tmp: Path) -> PretrainedAutoencoder:
        net, losses = _train(ae, cfg, public, device, progress)
        scale = latent_scaling_factor(net, public, ae)
        net.to("cpu").save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps({"key": key, "inputs": doc, "scaling_factor": scale,
                                                  "losses": losses}, indent=1))
        return PretrainedAutoencoder(entry_dir(key, cache_root), key, True, scale, losses)

    # Made once per key, under the key's lock, published by an atomic rename (as the UNet's pre-training).
    return cached_entry(entry_dir(key, cache_root), key, _cached, make)


def _cached(target: Path, key: str) -> PretrainedAutoencoder | None:
    meta_path = target / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return PretrainedAutoencoder(target, key, False, float(meta["scaling_factor"]),
                                         list(meta.get("losses", [])))
    return None


def _train(ae: AutoencoderConfig, cfg: AutoencoderTrainConfig, data: ImageSet, device: str,
           progress: Callable[[int, float], None] | None) -> tuple[Any, list[float]]:
    """The pre-training loop: (trained AutoencoderKL in eval mode, loss of every step)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_autoencoder(ae).to(device)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    # Public data, public seed: plain seeded generators (nothing private is sampled).
    batches = torch.Generator().manual_seed(cfg.seed)
    draws = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    n, order, pos = len(data), torch.empty(0, dtype=torch.long), 0
    latent_numel = ae.latent_channels * ae.latent_size ** 2
    losses: list[float] = []
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):  # a new shuffled epoch (the ragged tail is dropped)
            order, pos = torch.randperm(n, generator=batches), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        x = to_input(data.images[idx].to(device), ae)
        posterior = net.encode(x).latent_dist
        recon = net.decode(posterior.sample(generator=draws)).sample
        loss = (recon - x).pow(2).mean() + cfg.kl_weight * posterior.kl().mean() / latent_numel
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None and (step + 1) % 100 == 0:
            progress(step + 1, sum(losses[-100:]) / len(losses[-100:]))
    return net.eval(), losses


def load_autoencoder(path: str | os.PathLike[str], expect: AutoencoderConfig | None = None) -> Any:
    """A local diffusers ``AutoencoderKL`` directory (eval mode); nothing is downloaded.

    With ``expect``, refuses one whose architecture differs from it (a release names the config it was made with).
    """
    from diffusers import AutoencoderKL

    where = Path(os.fspath(path)).expanduser()
    if not (where / "config.json").is_file():
        raise DataError(f"autoencoder checkpoint '{where}' is not a local diffusers AutoencoderKL directory "
                        "(nothing is downloaded)")
    try:
        net = AutoencoderKL.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as err:
        raise DataError(f"autoencoder checkpoint '{where}' could not be loaded as an AutoencoderKL: {err}") from None
    if expect is not None:
        want = diffusers_kwargs(expect)
        got = {k: net.config.get(k) for k in want}
        got = {k: tuple(v) if isinstance(v, list) else v for k, v in got.items()}
        if got != want:
            raise DataError(f"autoencoder checkpoint '{where}' has another architecture than the release's")
    return net.eval()
