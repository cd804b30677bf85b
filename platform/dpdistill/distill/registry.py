"""The distillation method registry: method name -> "module:run function", imported only when asked for.

Naming a method in ``_METHODS`` makes it findable; this module imports no method module, so listing the names
(spec validation, the CLI) stays cheap. The method module describes itself when imported, with a
:func:`register` call next to its code (config type, privacy, disclosure); :func:`get` imports the module named
here and returns that record. A method defined at run time (a toy one in a test) is one :func:`register` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from dpdistill.errors import SpecError
from dpdistill.privacy.disclosure import KINDS

# name -> "module:attr" of the method's run function; importing the module registers its record.
_METHODS: dict[str, str] = {
    "dc": "dpdistill.distill.dc:run_dc",
    "dm": "dpdistill.distill.dm:run_dm",
    "dpgeng": "dpdistill.distill.dpgeng.pipeline:run_dpgeng",
    "ndpdc": "dpdistill.distill.ndpdc:run_ndpdc",
    "psg": "dpdistill.distill.psg:run_psg",
}


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


# name -> the record its module registered on import (or a test registered directly).
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
    """Describe method ``name`` (``distill.get(name)`` returns the record); ``config`` is a pydantic model or
    dataclass type.

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
    if existing is not None and (existing.run.__module__, existing.run.__qualname__) != (run.__module__,
                                                                                         run.__qualname__):
        raise ValueError(f"distillation method {name!r} is already registered")
    declared = _METHODS.get(key)
    if declared is not None and declared != f"{run.__module__}:{run.__qualname__}":
        raise ValueError(f"distill.register({name!r}): the registry names {declared} for this method, not "
                         f"{run.__module__}:{run.__qualname__}")
    record = Distiller(key, run, config, private, description, dict(disclosure or {}), unaccounted)
    _REGISTRY[key] = record
    return record


def names() -> list[str]:
    """The method names, sorted (no method module is imported)."""
    return sorted(set(_METHODS) | set(_REGISTRY))


def get(name: str) -> Distiller:
    """The method registered as ``name`` (its module imported now); an unknown name is a SpecError listing the
    known ones."""
    key = str(name).lower()
    if key not in _REGISTRY and key in _METHODS:
        module, _, attr = _METHODS[key].partition(":")
        run = getattr(importlib.import_module(module), attr)
        if key not in _REGISTRY or _REGISTRY[key].run is not run:
            raise ValueError(f"distillation method {key!r}: importing {module} did not register {attr}")
    record = _REGISTRY.get(key)
    if record is None:
        raise SpecError(f"method.name: unknown distillation method '{name}'; expected one of: {', '.join(names())}")
    return record
