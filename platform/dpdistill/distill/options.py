"""Option groups shared by the distillers' configs (pydantic mixins), so a check lives in one place.

- :class:`CheckedNetworkOptions`: ``dsa_strategy`` must parse and ``net`` must be a registered model; used by
  every matching config (DM, DC and through them NDPDC, PSG, SFDD) and by DP-GenG's.
- :class:`RealPrecisionOptions`: ``real_precision``, the arithmetic of the no-grad real-side forward of the
  feature matchers (DM, NDPDC, DP-GenG): float32, bfloat16 convolutions (faster on CPUs with native bf16), or
  'auto' (bfloat16 where the CPU has AMX tiles).
- :class:`PrivateMatchingOptions`: what every DP matcher adds (NDPDC, PSG, DP-GenG): the per-record clip norm
  C, an optional fixed noise multiplier, and the refusal of batch norm, which mixes records inside a batch so
  that clipping each record's contribution would no longer bound the sensitivity of the noisy sum.

Mixins put first in a config's bases (``class NDPDCConfig(PrivateMatchingOptions, MatchingConfig)``); their
validators run on fields the other base declares (``check_fields=False``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dpdistill import models
from dpdistill.distill.augment import parse_strategy


class CheckedNetworkOptions(BaseModel):
    """Validators for ``dsa_strategy`` and ``net`` (the fields themselves live in each config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("dsa_strategy", check_fields=False)
    @classmethod
    def _known_ops(cls, v: str) -> str:
        try:
            parse_strategy(v)
        except Exception as e:  # SpecError -> pydantic's one-line field error
            raise ValueError(str(e)) from None
        return v

    @field_validator("net", check_fields=False)
    @classmethod
    def _known_net(cls, v: str) -> str:
        if v.lower() not in models.names():
            raise ValueError(f"unknown model {v!r}; expected one of {', '.join(models.names())}")
        return v.lower()


class RealPrecisionOptions(BaseModel):
    """``real_precision``: how the per-iteration real-side features are computed (see
    :func:`dpdistill.distill.embedding.low_precision`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    real_precision: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="arithmetic of the per-iteration real-side forward (no gradient): 'bfloat16' "
        "computes its convolutions in bf16 (DM's real side ~1.5x faster on CPUs with AVX512-BF16, ~1.6x "
        "eager and ~3x compiled with AMX; the features, clipping and noise stay float32); 'auto': bfloat16 on "
        "a CPU with AMX bf16 tiles, float32 elsewhere (logged)")


class PrivateMatchingOptions(BaseModel):
    """Clip norm, optional fixed σ and the per-record-normalisation check of the DP matchers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip: float = Field(1.0, gt=0, description="per-record clip norm C of the matched statistic (embedding, "
                        "feature or gradient): the sensitivity of the noisy per-class sum")
    sigma: float | None = Field(None, gt=0, description="noise multiplier; None: solved to spend the budget")

    @field_validator("net_norm", check_fields=False)
    @classmethod
    def _per_record_norm(cls, v: str) -> str:
        if v == "batch":
            raise ValueError("batch norm mixes records, so per-record clipping would not bound the sensitivity; "
                             "use instance, group, layer or none")
        return v
