"""Name -> model factory registry, with one-line SpecErrors for unknown names, options and values."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from dpdistill.errors import SpecError

Factory = Callable[..., nn.Module]

_FACTORIES: dict[str, Factory] = {}

# The positional shape arguments every factory takes; everything else is a model option.
_SHAPE_ARGS = ("channels", "num_classes", "image_size")

# DC-style names ("convnet_d4", "ConvNetD4", "convnet-w64") resolve to a registered name plus options.
_ALIASES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"^convnet[_-]?d(\d+)$"), "convnet", "depth"),
    (re.compile(r"^convnet[_-]?w(\d+)$"), "convnet", "width"),
]


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator that makes ``factory(channels, num_classes, image_size, **options)`` findable by ``name``."""
    key = name.lower()

    def decorator(factory: Factory) -> Factory:
        if key in _FACTORIES and _FACTORIES[key] is not factory:
            raise ValueError(f"model {name!r} is already registered")
        _FACTORIES[key] = factory
        return factory

    return decorator


def names() -> list[str]:
    """The registered model names (aliases such as ``convnet_d4`` are accepted by :func:`get` too)."""
    return sorted(_FACTORIES)


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
    key = name.lower()
    if key in _FACTORIES:
        return key, {}
    for pattern, target, option in _ALIASES:
        match = pattern.match(key)
        if match and target in _FACTORIES:
            return target, {option: int(match.group(1))}
    raise SpecError(
        f"model {name!r}: unknown model; expected one of {', '.join(names())} (or convnet_d<N>/convnet_w<N>)"
    )


def options(name: str) -> list[str]:
    """The keyword options model ``name`` accepts beyond channels / num_classes / image_size."""
    key, _ = _resolve(name)
    params = inspect.signature(_FACTORIES[key]).parameters
    return [p for p in params if p not in _SHAPE_ARGS and params[p].kind is not inspect.Parameter.VAR_KEYWORD]


def _check_positive_int(name: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"model {name!r}: {field} must be a positive integer, got {value!r}")
    return value


def get(name: str, *, channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build model ``name`` for ``channels`` x ``image_size`` x ``image_size`` inputs and ``num_classes`` logits."""
    if not isinstance(name, str):
        raise SpecError(f"model name must be a string, got {name!r}")
    key, alias_kwargs = _resolve(name)
    allowed = options(name)
    for option in kwargs:
        if option not in allowed:
            raise SpecError(
                f"model {name!r}: unknown option {option!r}; expected one of {', '.join(allowed)}"
            )
    _check_positive_int(name, "channels", channels)
    _check_positive_int(name, "num_classes", num_classes)
    _check_positive_int(name, "image_size", image_size)
    merged = {**alias_kwargs, **kwargs}
    return _FACTORIES[key](channels, num_classes, image_size, **merged)


def choice(model: str, option: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Validate a string option for a model constructor, raising a one-line SpecError if it is not allowed."""
    if not isinstance(value, str) or value.lower() not in allowed:
        raise SpecError(
            f"model {model!r}: option {option!r} must be one of {', '.join(allowed)}, got {value!r}"
        )
    return value.lower()


def positive_int(model: str, option: str, value: Any) -> int:
    """Validate a positive integer option for a model constructor."""
    return _check_positive_int(model, f"option {option!r}", value)


def mixes_records(net: nn.Module) -> bool:
    """Whether a forward of ``net`` couples the records of a batch (batch norm using batch statistics), so that
    splitting a batch into chunks would change its outputs."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in net.modules())
