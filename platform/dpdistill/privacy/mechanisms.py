"""The mechanisms a ledger can be charged with: small frozen records, hashable, JSON round-trippable.

A mechanism here is a description, not an implementation: it says what noise a release used, so the
accountants in :mod:`dpdistill.privacy.analysis` can bound its privacy loss. All parameters are validated at
construction and refused with :class:`~dpdistill.errors.PrivacyError`.

Neighbouring relation: sensitivities are stated for the relation being accounted, add-or-remove-one by
default (one record's largest effect on the query when it is added or removed: for a sum of per-record
contributions clipped to norm C that is C).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dp_accounting import dp_event

from dpdistill.errors import PrivacyError
from dpdistill.privacy.defaults import (
    validate_epsilon,
    validate_positive,
    validate_q,
    validate_sigma,
    validate_steps,
)


def _g(x: float) -> str:
    return f"{x:.4g}"


class Mechanism:
    """Base of every mechanism: ``to_dict``, ``describe`` and ``to_dp_event``."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :func:`mechanism_from_dict` reverses it."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short human description, e.g. ``PoissonGaussian(q=0.01, σ=1, T=10)``."""
        raise NotImplementedError

    def to_dp_event(self) -> dp_event.DpEvent:
        """The equivalent dp-accounting event."""
        raise NotImplementedError

    def leaves(self) -> tuple[Mechanism, ...]:
        """The elementary mechanisms composed sequentially (parallel groups count once)."""
        return (self,)


@dataclass(frozen=True)
class PoissonGaussian(Mechanism):
    """DP-SGD-style steps: each step samples every record with probability q and adds N(0, (σC)²) to a sum
    of per-record contributions clipped to norm C. ``sigma`` is the noise multiplier (noise std / C)."""

    q: float
    sigma: float
    steps: int = 1
    kind: ClassVar[str] = "poisson_gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "q", validate_q(self.q))
        object.__setattr__(self, "sigma", validate_sigma(self.sigma))
        object.__setattr__(self, "steps", validate_steps(self.steps))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "q": self.q, "sigma": self.sigma, "steps": self.steps}

    def describe(self) -> str:
        return f"PoissonGaussian(q={_g(self.q)}, σ={_g(self.sigma)}, T={self.steps})"

    def to_dp_event(self) -> dp_event.DpEvent:
        step = dp_event.PoissonSampledDpEvent(self.q, dp_event.GaussianDpEvent(self.sigma))
        return dp_event.SelfComposedDpEvent(step, self.steps)


@dataclass(frozen=True)
class Gaussian(Mechanism):
    """``count`` independent releases of a query plus N(0, sigma²); ``sigma`` is the noise std (not a
    multiplier) and ``sensitivity`` the query's L2 sensitivity."""

    sigma: float
    sensitivity: float = 1.0
    count: int = 1
    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", validate_sigma(self.sigma))
        object.__setattr__(self, "sensitivity", validate_positive(self.sensitivity, "sensitivity"))
        object.__setattr__(self, "count", validate_steps(self.count, "count"))

    @property
    def noise_multiplier(self) -> float:
        """Noise std over sensitivity."""
        return self.sigma / self.sensitivity

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "sigma": self.sigma, "sensitivity": self.sensitivity, "count": self.count}

    def describe(self) -> str:
        times = f", ×{self.count}" if self.count > 1 else ""
        return f"Gaussian(σ={_g(self.sigma)}, Δ₂={_g(self.sensitivity)}{times})"

    def to_dp_event(self) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(self.noise_multiplier), self.count)


@dataclass(frozen=True)
class Laplace(Mechanism):
    """``count`` independent releases of a query plus Laplace(0, scale) noise per coordinate;
    ``sensitivity`` is the query's L1 sensitivity."""

    scale: float
    sensitivity: float = 1.0
    count: int = 1
    kind: ClassVar[str] = "laplace"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", validate_positive(self.scale, "scale"))
        object.__setattr__(self, "sensitivity", validate_positive(self.sensitivity, "sensitivity"))
        object.__setattr__(self, "count", validate_steps(self.count, "count"))

    @property
    def noise_multiplier(self) -> float:
        """Scale over sensitivity (each release is then (1 / noise_multiplier)-DP)."""
        return self.scale / self.sensitivity

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "scale": self.scale, "sensitivity": self.sensitivity, "count": self.count}

    def describe(self) -> str:
        times = f", ×{self.count}" if self.count > 1 else ""
        return f"Laplace(b={_g(self.scale)}, Δ₁={_g(self.sensitivity)}{times})"

    def to_dp_event(self) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(self.noise_multiplier), self.count)


@dataclass(frozen=True)
class RandomizedResponse(Mechanism):
    """``count`` label-level releases, each pure ε-DP (e.g. k-ary randomised response on a label).

    The accountants treat each release as the worst case of all ε-DP mechanisms (binary randomised
    response with privacy loss ±ε), so the figure holds for any mechanism whose ε is stated for the
    ledger's neighbouring relation. For k-ary randomised response that keeps the true label with
    probability 1 − p + p/k, build it with :meth:`from_flip_probability`.
    """

    epsilon: float
    count: int = 1
    kind: ClassVar[str] = "randomized_response"

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", validate_epsilon(self.epsilon))
        object.__setattr__(self, "count", validate_steps(self.count, "count"))

    @classmethod
    def from_flip_probability(cls, p: float, num_classes: int, count: int = 1) -> RandomizedResponse:
        """k-ary randomised response that replaces the label by a uniform one with probability p in (0, 1]."""
        k = validate_steps(num_classes, "num_classes")
        if k < 2:
            raise PrivacyError(f"num_classes must be >= 2 for randomised response, got {num_classes!r}")
        if not 0 < p < 1:
            # p = 1 outputs a uniform label whatever the input: that release needs no charge at all.
            raise PrivacyError(f"p (flip probability) must lie in (0, 1), got {p!r}")
        return cls(math.log((1 - p + p / k) / (p / k)), count)

    @property
    def flip_probability(self) -> float:
        """The binary randomised response noise parameter p with loss ±ε: p = 2 / (1 + e^ε)."""
        return 2.0 / (1.0 + math.exp(self.epsilon))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "epsilon": self.epsilon, "count": self.count}

    def describe(self) -> str:
        times = f", ×{self.count}" if self.count > 1 else ""
        return f"RandomizedResponse(ε={_g(self.epsilon)}{times})"

    def to_dp_event(self) -> dp_event.DpEvent:
        # dp-accounting's own RR accountants accept this event only under replace-one; dpdistill accounts it
        # as a generic ε-DP release (see analysis/pld.py), which holds under either relation.
        rr = dp_event.RandomizedResponseDpEvent(noise_parameter=self.flip_probability, num_buckets=2)
        return dp_event.SelfComposedDpEvent(rr, self.count)


@dataclass(frozen=True)
class ReportNoisyMax(Mechanism):
    """``count`` releases of the index of the largest of ``candidates`` scores, each pure ``epsilon``-DP.

    Report-noisy-max with Laplace noise (Dwork & Roth, Claim 3.9): every score gets independent Laplace noise
    of scale 1/ε and only the argmax is released (never the noisy scores). That is ε-DP when one record moves
    every score by at most 1 and all in the same direction (monotone scores, such as counts of correctly
    classified records: adding a record raises each count by 0 or 1); otherwise the scale must be 2/ε
    (:meth:`laplace_scale`). Accounted like :class:`RandomizedResponse`: as the worst case of all ε-DP
    mechanisms (privacy loss ±ε), valid under either relation.
    """

    epsilon: float
    candidates: int = 2
    count: int = 1
    kind: ClassVar[str] = "report_noisy_max"

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", validate_epsilon(self.epsilon))
        object.__setattr__(self, "candidates", validate_steps(self.candidates, "candidates"))
        object.__setattr__(self, "count", validate_steps(self.count, "count"))

    def laplace_scale(self, sensitivity: float = 1.0, monotone: bool = True) -> float:
        """The Laplace scale per score for this ε: Δ/ε for monotone scores, 2Δ/ε otherwise."""
        return (1.0 if monotone else 2.0) * validate_positive(sensitivity, "sensitivity") / self.epsilon

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "epsilon": self.epsilon, "candidates": self.candidates, "count": self.count}

    def describe(self) -> str:
        times = f", ×{self.count}" if self.count > 1 else ""
        return f"ReportNoisyMax(ε={_g(self.epsilon)}, k={self.candidates}{times})"

    def to_dp_event(self) -> dp_event.DpEvent:
        # The generic ε-DP dominating pair, written as binary randomised response with loss ±ε (the pure-DP
        # accountants in analysis/ use ``epsilon`` directly; see RandomizedResponse.to_dp_event).
        rr = dp_event.RandomizedResponseDpEvent(noise_parameter=2.0 / (1.0 + math.exp(self.epsilon)), num_buckets=2)
        return dp_event.SelfComposedDpEvent(rr, self.count)


@dataclass(frozen=True)
class Composed(Mechanism):
    """Heterogeneous sequential composition: every part sees the same records."""

    parts: tuple[Mechanism, ...]
    kind: ClassVar[str] = "composed"

    def __post_init__(self) -> None:
        parts = tuple(self.parts) if not isinstance(self.parts, Mechanism) else (self.parts,)
        if not parts:
            raise PrivacyError("Composed needs at least one mechanism in parts")
        for p in parts:
            if not isinstance(p, Mechanism):
                raise PrivacyError(f"Composed parts must be mechanisms, got {type(p).__name__}")
        object.__setattr__(self, "parts", parts)

    def leaves(self) -> tuple[Mechanism, ...]:
        return tuple(leaf for p in self.parts for leaf in p.leaves())

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "parts": [p.to_dict() for p in self.parts]}

    def describe(self) -> str:
        return " ∘ ".join(p.describe() for p in self.parts)

    def to_dp_event(self) -> dp_event.DpEvent:
        return dp_event.ComposedDpEvent([p.to_dp_event() for p in self.parts])


@dataclass(frozen=True)
class Parallel(Mechanism):
    """The same mechanism run once on each of ``partitions`` disjoint parts of the data.

    Under add-or-remove-one, adding or removing one record changes exactly one partition (the one that
    holds it; records are never in two), and the runs on the other partitions see identical inputs. So the
    whole costs what one run on one partition costs, however many partitions there are. ``argument`` is
    the written reason the partitions are disjoint (e.g. "per-class partitions of the training split: a
    record has one label"); it is stored in the ledger next to the charge. Under replace-one the argument
    fails (a replaced record may move between partitions), and the accountants refuse it.
    """

    mechanism: Mechanism
    partitions: int
    argument: str = field(default="")
    kind: ClassVar[str] = "parallel"

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, Mechanism):
            raise PrivacyError(f"Parallel mechanism must be a mechanism, got {type(self.mechanism).__name__}")
        object.__setattr__(self, "partitions", validate_steps(self.partitions, "partitions"))
        if not isinstance(self.argument, str) or not self.argument.strip():
            raise PrivacyError(
                "Parallel needs argument: the written reason the partitions are disjoint "
                "(e.g. 'per-class partitions of the training split: each record has one label')"
            )
        object.__setattr__(self, "argument", " ".join(self.argument.split()))

    def leaves(self) -> tuple[Mechanism, ...]:
        # One record reaches one partition: only one copy of the mechanism touches it.
        return self.mechanism.leaves()

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "mechanism": self.mechanism.to_dict(),
            "partitions": self.partitions,
            "argument": self.argument,
        }

    def describe(self) -> str:
        return f"Parallel×{self.partitions}[{self.mechanism.describe()}]"

    def to_dp_event(self) -> dp_event.DpEvent:
        return self.mechanism.to_dp_event()


_TYPES: dict[str, type[Mechanism]] = {
    cls.kind: cls
    for cls in (PoissonGaussian, Gaussian, Laplace, RandomizedResponse, ReportNoisyMax, Composed, Parallel)
}


def mechanism_from_dict(d: dict[str, Any]) -> Mechanism:
    """Rebuild a mechanism from :meth:`Mechanism.to_dict` output (validating it again)."""
    if not isinstance(d, dict) or d.get("type") not in _TYPES:
        kinds = ", ".join(sorted(_TYPES))
        got = d.get("type") if isinstance(d, dict) else type(d).__name__
        raise PrivacyError(f"mechanism type must be one of {kinds}, got {got!r}")
    kind = d["type"]
    fields = {k: v for k, v in d.items() if k != "type"}
    try:
        if kind == "composed":
            return Composed(tuple(mechanism_from_dict(p) for p in fields["parts"]))
        if kind == "parallel":
            return Parallel(
                mechanism_from_dict(fields["mechanism"]), fields["partitions"], fields["argument"]
            )
        return _TYPES[kind](**fields)
    except (KeyError, TypeError) as err:
        raise PrivacyError(f"mechanism {kind!r}: bad fields {sorted(fields)} ({err})") from None
