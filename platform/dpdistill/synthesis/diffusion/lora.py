"""LoRA adapters (peft) on the UNet, for dp-lora: only the adapters are trained with DP-SGD and released.

``apply_lora`` uses ``peft.inject_adapter_in_model``, which replaces each targeted ``nn.Linear`` / ``nn.Conv2d``
in place by a peft LoRA layer whose trainable parts (``lora_A``, ``lora_B``) are themselves plain ``nn.Linear``
/ ``nn.Conv2d`` modules: opacus' per-sample-gradient hooks attach to them like to any other layer, and each runs
once per forward. (``get_peft_model`` would wrap the UNet in a PeftModel whose forward signature is a language
model's; diffusers' ``add_adapter`` exists only on its PeftAdapterMixin models, which UNet2DModel is not.) The
base weights are frozen. The release of dp-lora is :func:`adapter_state` plus a reference to the public base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dpdistill.errors import SpecError

ADAPTER_NAME = "default"
# Attention projections and the ResNets' 3×3 convolutions and time-embedding projections of diffusers' UNet2D.
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (public): rank r, scaling alpha (the update is (alpha / r)·B·A), target modules.

    ``target_modules`` are module-name suffixes as peft matches them (``"to_q"`` matches every ``…to_q``).
    """

    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.rank < 1 or self.alpha <= 0 or not self.target_modules:
            raise SpecError("lora: rank >= 1, alpha > 0 and at least one target module")

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules)}


def apply_lora(net: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject LoRA adapters into ``net`` in place (returns it); every non-adapter parameter is frozen.

    The adapters' A matrices draw their initialisation from the global torch RNG (B starts at zero, so the
    adapted net equals the base): seed around the call for a reproducible build.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                        lora_dropout=0.0, bias="none", init_lora_weights=True)
    try:
        inject_adapter_in_model(config, net, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: none of the target modules exist in the net
        raise SpecError(f"lora: {err}") from None
    for name, p in net.named_parameters():
        p.requires_grad_(is_adapter(name))
    return net


def is_adapter(name: str) -> bool:
    """Whether the parameter / state key ``name`` belongs to a LoRA adapter."""
    return "lora_" in name


def adapter_state(net: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only (detached CPU copies), keyed by their names in ``net``: dp-lora's release."""
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if is_adapter(k)}


def load_adapter_state(net: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Load adapter tensors saved by :func:`adapter_state` into a net with the same adapters (in place).

    Refuses a state that holds anything but adapters, or that does not cover every adapter of ``net``.
    """
    own = {k for k in net.state_dict() if is_adapter(k)}
    if not own:
        raise SpecError("lora: the network has no adapters; apply_lora(net, spec) with the release's spec first")
    extra = [k for k in state if not is_adapter(k)]
    if extra:
        raise SpecError(f"lora: the adapter state holds non-adapter tensors (e.g. {extra[0]})")
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise SpecError(f"lora: the adapter state does not match the network's adapters (missing "
                        f"{missing[:2]}, unexpected {unexpected[:2]})")
    with torch.no_grad():
        net.load_state_dict(state, strict=False)
    return net
