"""Dataset distillation: matching losses, DSA, multi-formation, and distillers found by name.

>>> from dpdistill import distill
>>> method = distill.get("dm")
>>> syn = method.run(real_imageset, method.config(ipc=10, iterations=300), seed=0)
>>> images, labels = syn.export()

Every distiller is ``run(real, cfg, seed=..., *, progress=..., callback=..., **kw) -> SyntheticSet``; private
ones also take ``ledger=`` and ``noise=`` (a :class:`~dpdistill.privacy.noise.PrivacyRandomness`; None: a
fresh secret source), from which every noise draw and private sampling decision comes; ``seed`` drives only
data-independent randomness. Each method registers itself in the module that defines it, a private one with
its ``DISCLOSURE`` (what each key it makes the job log is, in the kinds of :mod:`dpdistill.privacy.disclosure`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from dpdistill.errors import SpecError
from dpdistill.privacy.disclosure import KINDS


@dataclass(frozen=True)
class Distiller:
    """A registered distillation method: its name, config type, run function, whether it is DP, its disclosure."""

    name: str
    run: Callable[..., Any]
    config: type | None
    private: bool = False
    description: str = ""
    # key (or fnmatch pattern) -> kind, for every key the method makes a distill job log (beside the job's own).
    disclosure: Mapping[str, str] = field(default_factory=dict)
    # config -> why a run with it is not covered by its ε (a choice made on sensitive data without charge), or
    # None. The runner stamps such a run NOT PRIVATE everywhere, like the reproducible-noise debugging mode.
    unaccounted: Callable[[Any], str | None] | None = None

    def make_config(self, **options: Any) -> Any:
        """The method's config from keyword options; invalid options raise a one-line SpecError."""
        if self.config is None:
            if options:
                raise SpecError(f"method '{self.name}' takes no options, got {', '.join(sorted(options))}")
            return None
        try:
            return self.config(**options)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ())) or "?"
            raise SpecError(f"method '{self.name}': field '{loc}': {first.get('msg')} "
                            f"(got {first.get('input')!r})") from None


_REGISTRY: dict[str, Distiller] = {}


def register(
    name: str,
    run: Callable[..., Any],
    config: type | None = None,
    *,
    private: bool = False,
    description: str = "",
    disclosure: Mapping[str, str] | None = None,
    unaccounted: Callable[[Any], str | None] | None = None,
) -> Distiller:
    """Make ``run`` findable as ``distill.get(name)``; ``config`` is a pydantic model or dataclass type.

    A private method must declare ``disclosure`` (possibly empty): the kind of every key it makes the job log.
    """
    key = name.lower()
    if private and disclosure is None:
        raise ValueError(f"distill.register({name!r}): a private method must declare its disclosure")
    bad = {k: v for k, v in (disclosure or {}).items() if v not in KINDS}
    if bad:
        raise ValueError(f"distill.register({name!r}): unknown disclosure kinds {bad}")
    if config is not None and not (isinstance(config, type) and (issubclass(config, BaseModel)
                                                                  or hasattr(config, "__dataclass_fields__"))):
        raise TypeError(f"distill.register({name!r}): config must be a pydantic model or dataclass type")
    existing = _REGISTRY.get(key)
    if existing is not None and existing.run.__qualname__ != run.__qualname__:
        raise ValueError(f"distillation method {name!r} is already registered")
    record = Distiller(key, run, config, private, description, dict(disclosure or {}), unaccounted)
    _REGISTRY[key] = record
    return record


def names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Distiller:
    """The method registered as ``name``; an unknown name is a SpecError listing the known ones."""
    record = _REGISTRY.get(str(name).lower())
    if record is None:
        raise SpecError(f"method.name: unknown distillation method '{name}'; expected one of: {', '.join(names())}")
    return record


# The methods register themselves on import; they need `register` above, hence the late imports.
from dpdistill.distill import dc, dm, dpgeng, ndpdc, psg  # noqa: E402
from dpdistill.distill.augment import DSA, DSAParams  # noqa: E402
from dpdistill.distill.dc import DCConfig, gradient_match_step, run_dc  # noqa: E402
from dpdistill.distill.dm import DMConfig, run_dm  # noqa: E402
from dpdistill.distill.dpgeng import DPGenGConfig, run_dpgeng  # noqa: E402
from dpdistill.distill.ndpdc import NDPDCConfig, run_ndpdc  # noqa: E402
from dpdistill.distill.psg import PSGConfig, run_psg  # noqa: E402
from dpdistill.distill.synthetic import SyntheticSet  # noqa: E402

__all__ = [
    "DCConfig",
    "DMConfig",
    "DPGenGConfig",
    "DSA",
    "DSAParams",
    "Distiller",
    "NDPDCConfig",
    "PSGConfig",
    "SyntheticSet",
    "dc",
    "dm",
    "dpgeng",
    "get",
    "gradient_match_step",
    "names",
    "ndpdc",
    "psg",
    "register",
    "run_dc",
    "run_dm",
    "run_dpgeng",
    "run_ndpdc",
    "run_psg",
]
