"""DP image synthesisers behind one interface (DPImageBench's non-diffusion methods), found by name.

>>> from dpdistill import synthesis
>>> synth = synthesis.create("dp-merf", channels=1, image_size=28, num_classes=10, seed=0,
...                          noise=ctx.noise)           # the job's PrivacyRandomness (default: a secret one)
>>> report = synth.fit(sensitive, ledger)            # charges the ledger
>>> images, labels = synth.generate(n_per_class=100)

Methods register themselves where they are defined (``@register``); this module imports them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpdistill.errors import SpecError
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.synthesis.base import FitReport, Synthesizer

_METHODS: dict[str, type[Synthesizer]] = {}


def register(cls: type[Synthesizer]) -> type[Synthesizer]:
    """Class decorator: make a Synthesizer findable by its ``name``."""
    key = cls.name.lower()
    if not key:
        raise ValueError(f"{cls.__name__} has no name")
    if key in _METHODS and _METHODS[key] is not cls:
        raise ValueError(f"synthesis method {key!r} is already registered")
    _METHODS[key] = cls
    return cls


def names() -> list[str]:
    """The registered method names."""
    return sorted(_METHODS)


def get(name: str) -> type[Synthesizer]:
    """The Synthesizer class registered as ``name``; SpecError listing the names if unknown."""
    key = str(name).lower()
    if key not in _METHODS:
        raise SpecError(f"unknown synthesis method '{name}'; expected one of: {', '.join(names())}")
    return _METHODS[key]


def make_config(name: str, **options: Any) -> Any:
    """The method's config with ``options`` overriding its defaults (unknown option: SpecError)."""
    cls = get(name)
    fields = {f.name for f in dataclasses.fields(cls.config_type)}
    for key in options:
        if key not in fields:
            raise SpecError(f"method '{name}': unknown option '{key}'; expected one of: {', '.join(sorted(fields))}")
    return cls.config_type(**options)


def create(name: str, config: Any = None, *, channels: int, image_size: int, num_classes: int, seed: int = 0,
           device: str = "cpu", noise: PrivacyRandomness | None = None, **options: Any) -> Synthesizer:
    """A new synthesiser of method ``name`` (``options`` override the config defaults).

    ``seed`` drives the public randomness (weights, features, latents); ``noise`` the privacy noise and private
    sampling (None: a fresh secret source).
    """
    cls = get(name)
    if config is None:
        config = make_config(name, **options)
    elif options:
        config = dataclasses.replace(config, **options)
    return cls(config, channels=channels, image_size=image_size, num_classes=num_classes, seed=seed, device=device,
               noise=noise)


def load(path: Any, device: str = "cpu", noise: PrivacyRandomness | None = None) -> Synthesizer:
    """Load a synthesiser saved with ``Synthesizer.save``."""
    return Synthesizer.load(path, device=device, noise=noise)


# The methods register themselves on import.
from dpdistill.synthesis import dp_gan, dp_kernel, dp_merf, dp_ntk, gs_wgan  # noqa: E402,F401

__all__ = ["FitReport", "Synthesizer", "create", "get", "load", "make_config", "names", "register"]
