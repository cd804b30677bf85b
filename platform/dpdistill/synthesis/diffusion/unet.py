"""The class-conditional UNet of the DP diffusion synthesisers: its public architecture and how to build it.

The network is diffusers' ``UNet2DModel`` with a class embedding of ``num_classes + 1`` rows: the last index is
the null label that classifier-free guidance trains (label dropout) and samples with. Only layers opacus has
per-sample-gradient rules for appear (Conv2d, Linear, GroupNorm, Embedding; attention is diffusers' ``Attention``
made of GroupNorm + Linear projections), there is no BatchNorm, and every module runs once per forward.

Cost (one thread of this project's 2-core machine, under a load of about 3, so an upper bound): the default
(block_out_channels (32, 64, 64), one ResNet per block, attention in the middle block at 7×7) has 1,063,905
parameters; a DP-SGD step on 64 records takes about 2.1 s with K = 1 and 8.9 s with K = 4 (opacus per-sample
gradients), a non-private step 0.5 s; DDIM with 50 steps and guidance about 0.35 s per image (half that with
guidance_scale 1). (16, 32, 32) with norm_num_groups 8 has 268,017 parameters: 0.46 s / 3.1 s / 0.19 s and
0.11 s per image.

Opacus caveat (found by this package's tests): diffusers' attention returns a channels-last view, and opacus
1.6's Conv2d per-sample rule (``unfold2d`` via ``as_strided``) assumes a contiguous input, so every conv after an
attention block got WRONG per-sample gradients (their sum did not even equal the batch gradient). Every Conv2d
of a built UNet therefore makes its input contiguous first (:func:`contiguous_conv_inputs`, a forward pre-hook:
opacus' activation capture then sees the contiguous tensor). Same values, one copy per conv.

Image size. The down path halves the resolution ``len(block_out_channels) - 1`` times (stride-2 convs) and the
up path doubles it back by nearest interpolation, so the network's ``sample_size`` must be divisible by
``2 ** (len(block_out_channels) - 1)``. ``sample_size`` defaults to the smallest such size ≥ ``image_size``:
28×28 with three blocks needs none (28 → 14 → 7 → 14 → 28); with four blocks it is 32. When it differs,
:func:`to_model` pads the image symmetrically by edge replication (MNIST-like borders are black, so this is
black padding there, and neutral elsewhere) and :func:`from_model` crops the centre back to ``image_size``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dpdistill.errors import SpecError


@dataclass(frozen=True)
class UNetConfig:
    """Public architecture of the denoiser (no data in it): what the cache key and the release describe.

    ``attention[i]`` puts self-attention after every ResNet of down block i and of its mirrored up block;
    ``mid_attention`` adds the middle block's attention at the lowest resolution.
    """

    image_size: int = 28
    channels: int = 1
    num_classes: int = 10
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, False, False)
    mid_attention: bool = True
    norm_num_groups: int = 16
    attention_head_dim: int = 8
    sample_size: int | None = None  # None: the smallest valid size >= image_size

    def __post_init__(self) -> None:
        # Tuples even when a spec / JSON gave lists: the config is hashed into cache keys and must stay frozen.
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "attention", tuple(bool(a) for a in self.attention))
        if not self.block_out_channels:
            raise SpecError("unet.block_out_channels must name at least one block")
        if len(self.attention) != len(self.block_out_channels):
            raise SpecError(f"unet.attention has {len(self.attention)} entries for {len(self.block_out_channels)} "
                            "blocks; give one true/false per block")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise SpecError(f"unet.block_out_channels {c} is not divisible by norm_num_groups "
                                f"{self.norm_num_groups}")
        if self.image_size < 4 or self.channels < 1 or self.num_classes < 1 or self.layers_per_block < 1:
            raise SpecError("unet: image_size >= 4, channels >= 1, num_classes >= 1 and layers_per_block >= 1")
        if self.sample_size is not None:
            if self.sample_size < self.image_size or self.sample_size % self.size_multiple:
                raise SpecError(f"unet.sample_size {self.sample_size} must be >= image_size {self.image_size} "
                                f"and divisible by {self.size_multiple} (2 ** number of downsamplings)")

    @property
    def size_multiple(self) -> int:
        """What the network's input side must be divisible by."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def model_size(self) -> int:
        """The side the network actually sees (``sample_size``, or the derived default)."""
        if self.sample_size is not None:
            return self.sample_size
        m = self.size_multiple
        return -(-self.image_size // m) * m

    @property
    def null_label(self) -> int:
        """The class-embedding index of "no label" (classifier-free guidance)."""
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (lists for tuples)."""
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["attention"] = list(self.attention)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        try:
            return cls(**d)
        except TypeError as err:
            raise SpecError(f"unet: {err}") from None


def diffusers_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """The ``UNet2DModel(**kwargs)`` that realises ``cfg``."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return dict(
        sample_size=cfg.model_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        add_attention=cfg.mid_attention,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
        num_class_embeds=cfg.num_classes + 1,
        dropout=0.0,
    )


def build_unet(cfg: UNetConfig, seed: int | None = None) -> Any:
    """A fresh ``UNet2DModel`` for ``cfg``; with ``seed``, initialised from it without touching the global RNG."""
    from diffusers import UNet2DModel

    if seed is None:
        return contiguous_conv_inputs(UNet2DModel(**diffusers_kwargs(cfg)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return contiguous_conv_inputs(UNet2DModel(**diffusers_kwargs(cfg)))


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)


def contiguous_conv_inputs(net: nn.Module) -> nn.Module:
    """Make every Conv2d of ``net`` take a contiguous input (idempotent; call again after adding LoRA layers).

    Needed for correct opacus per-sample gradients after diffusers' attention (see the module docstring).
    """
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and not getattr(module, "_dpdistill_contiguous", False):
            module.register_forward_pre_hook(_contiguous_input)
            module._dpdistill_contiguous = True
    return net


def unet_config_of(net: Any, image_size: int | None = None) -> UNetConfig:
    """The :class:`UNetConfig` a ``UNet2DModel`` was built from (e.g. a local checkpoint made by this code).

    Raises SpecError when the network is not one :func:`build_unet` can make (other block types, no null label).
    """
    c = net.config
    downs = tuple(c.down_block_types)
    if any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in downs):
        raise SpecError(f"unet: down blocks {downs} are not DownBlock2D / AttnDownBlock2D")
    attention = tuple(b == "AttnDownBlock2D" for b in downs)
    expected_up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    if tuple(c.up_block_types) != expected_up or c.num_class_embeds is None or c.num_class_embeds < 2:
        raise SpecError("unet: the checkpoint's up blocks do not mirror its down blocks, or it has no class "
                        "embedding with a null label")
    sample = int(c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0])
    head = c.attention_head_dim if c.attention_head_dim is not None else 8
    cfg = UNetConfig(image_size=int(image_size or sample), channels=int(c.in_channels),
                     num_classes=int(c.num_class_embeds) - 1, block_out_channels=tuple(c.block_out_channels),
                     layers_per_block=int(c.layers_per_block), attention=attention,
                     mid_attention=bool(c.add_attention), norm_num_groups=int(c.norm_num_groups),
                     attention_head_dim=int(head))
    if cfg.model_size != sample:  # keep the default (None) when it gives the same size: equal configs, equal keys
        cfg = replace(cfg, sample_size=sample)
    if diffusers_kwargs(cfg) != {k: _plain(c.get(k)) for k in diffusers_kwargs(cfg)}:
        raise SpecError("unet: the checkpoint's configuration has options this code does not build")
    return cfg


def _plain(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def parameter_count(net: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def to_model(images: Tensor, cfg: UNetConfig) -> Tensor:
    """Images [N, C, image_size, image_size] in [0, 1] → the network's input space: [-1, 1], padded to size."""
    return pad_to_model(images * 2.0 - 1.0, cfg)


def pad_to_model(x: Tensor, cfg: UNetConfig) -> Tensor:
    """Pad [N, C, image_size, image_size] symmetrically by edge replication to the network's side (values kept:
    the input space of a latent UNet, whose inputs are autoencoder latents, not images)."""
    pad = cfg.model_size - x.shape[-1]
    if pad:
        lo = pad // 2
        x = F.pad(x, (lo, pad - lo, lo, pad - lo), mode="replicate")
    return x


def from_model(x: Tensor, cfg: UNetConfig) -> Tensor:
    """Inverse of :func:`to_model`: centre crop to ``image_size`` and map [-1, 1] → [0, 1] (clamped)."""
    pad = x.shape[-1] - cfg.image_size
    if pad:
        lo = pad // 2
        x = x[..., lo:lo + cfg.image_size, lo:lo + cfg.image_size]
    return ((x + 1.0) / 2.0).clamp_(0.0, 1.0)
