"""DP image synthesisers behind one interface (DPImageBench's non-diffusion methods), found by name.

>>> from dpdistill import synthesis
>>> synth = synthesis.create("dp-merf", channels=1, image_size=28, num_classes=10, seed=0,
...                          noise=ctx.noise)           # the job's PrivacyRandomness (default: a secret one)
>>> report = synth.fit(sensitive, ledger)            # charges the ledger
>>> images, labels = synth.generate(n_per_class=100)

Methods are named in :mod:`~dpdistill.synthesis.registry` ("module:Class") and imported when first asked for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpdistill.errors import SpecError
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.synthesis.base import FitReport, Synthesizer
from dpdistill.synthesis.registry import get, names, register


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


__all__ = ["FitReport", "Synthesizer", "create", "get", "load", "make_config", "names", "register"]
