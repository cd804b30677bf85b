"""Job kinds: each kind is a pipeline with a ``prepare`` step (all input checks, no side effects) and an
``execute`` step (the stages, run inside a run folder). Kinds are named in :mod:`~dpdistill.pipelines.registry`
and imported when a job of that kind runs, so the CLI and spec loading stay fast."""

from __future__ import annotations

from typing import Any, Protocol

from dpdistill.errors import SpecError
from dpdistill.pipelines import registry


class Pipeline(Protocol):
    """What the runner needs of a job kind."""

    kind: str

    def method_config(self, method: str, source: str) -> Any:
        """The config type of ``method`` (dataclass or pydantic model), or None; SpecError if unknown."""

    def prepare(self, spec: Any) -> Any:
        """Validate everything that can be wrong with the input (data present, privacy parameters) and load
        what the job needs. Must not create files: a failure here leaves no run folder."""

    def execute(self, ctx: Any, prepared: Any) -> dict[str, Any]:
        """Run the stages; return the summary (see runner.RunResult)."""


def get_pipeline(kind: str, source: str = "<spec>") -> Pipeline:
    """The pipeline for a job kind (SpecError listing the kinds if unknown)."""
    return registry.get(kind, source)()


def method_config_type(kind: str, method: str, source: str = "<spec>") -> Any:
    """The config type registered for ``method`` under job ``kind`` (used by spec validation)."""
    return get_pipeline(kind, source).method_config(method, source)


def check_evaluation_model(spec: Any, channels: int, num_classes: int, image_size: int) -> None:
    """Build the evaluation model once in ``prepare``, so a bad ``evaluation.model_options`` value (one the
    factory checks: a zero width, an unknown norm) is refused before the run folder exists, not after the release.
    """
    import torch

    from dpdistill import models

    if not spec.evaluation.enabled:
        return
    try:
        with torch.random.fork_rng(devices=[]):  # building draws weights: keep the caller's RNG
            models.get(spec.evaluation.model, channels=channels, num_classes=num_classes, image_size=image_size,
                       **dict(spec.evaluation.model_options))
    except SpecError as e:
        raise SpecError(f"field 'evaluation.model_options': {e}") from None
    except (TypeError, ValueError) as e:
        raise SpecError(f"field 'evaluation.model_options': model '{spec.evaluation.model}': {e}") from None


def check_generator(config: Any, seed: int, channels: int, num_classes: int, image_size: int) -> None:
    """Build a method's nested synthesiser (``generator`` + ``generator_options``, e.g. DP-GenG's) once in
    ``prepare``, so a value its constructor refuses fails before any budget is spent, not after."""
    import torch

    from dpdistill import synthesis
    from dpdistill.spec import check_generator_options

    generator = getattr(config, "generator", None)
    options = dict(getattr(config, "generator_options", None) or {})
    if generator is None:
        return
    check_generator_options(generator, options, "<spec>")
    try:
        with torch.random.fork_rng(devices=[]):
            synthesis.create(generator, channels=channels, image_size=image_size, num_classes=num_classes,
                             seed=seed, **options)
    except SpecError as e:
        raise SpecError(f"field 'method.generator_options': {e}") from None
    except (TypeError, ValueError) as e:
        raise SpecError(f"field 'method.generator_options': generator '{generator}': {e}") from None


def check_generator_public(config: Any) -> None:
    """Match a nested generator with ``method.public``: refuse none named for one that needs a public set
    (``Synthesizer.needs_public``: DP-MEPF's extractor) or fine-tunes a public base (pdp-diffusion, dp-lora,
    dp-ldm, unless ``generator_options.base_checkpoint`` names one), and one named for a generator without public
    pre-training (dpdm). Reads no data, so it runs before the splits are loaded."""
    from dpdistill import synthesis

    generator = getattr(config, "generator", None)
    if generator is None:
        return
    check_public_start(synthesis.get(generator), getattr(config, "public", None),
                       (getattr(config, "generator_options", None) or {}).get("base_checkpoint"),
                       f"generator '{generator}'", "method.public", "method.generator_options.base_checkpoint")


def check_public_start(cls: Any, public: str | None, base_checkpoint: str | None, who: str, public_field: str,
                       checkpoint_field: str) -> None:
    """A synthesiser's public start against what the spec names for it: a public set (``public_field``) for one
    that needs it (DP-MEPF's extractor) or fine-tunes a public base (pdp-diffusion, dp-lora, dp-ldm; or a local
    checkpoint in ``checkpoint_field``), not both, and none for one without public pre-training (dpdm). Shared by a
    synthesize job's method and a distill job's nested generator; reads no data."""
    if cls.needs_public and not public:
        raise SpecError(f"field '{public_field}': {who} trains its feature extractor on a public set; name one "
                        "(e.g. glyphs)")
    takes_checkpoint = getattr(cls, "accepts_base_checkpoint", False)
    if getattr(cls, "uses_public_base", False) and not public and not base_checkpoint:
        raise SpecError(f"field '{public_field}': {who} fine-tunes a public base; name a public set to pre-train on "
                        "(e.g. glyphs)" + (f" or a local diffusers checkpoint in {checkpoint_field}"
                                           if takes_checkpoint else ""))
    if base_checkpoint and not takes_checkpoint:
        raise SpecError(f"field '{checkpoint_field}': {who} cannot start from a base checkpoint"
                        + (f" ({cls.no_base_checkpoint_because})" if getattr(cls, "no_base_checkpoint_because", "")
                           else "") + f"; pre-train with {public_field}")
    if public and base_checkpoint:
        raise SpecError(f"field '{checkpoint_field}': {who} cannot take both a base checkpoint and {public_field} "
                        "(choose one public base)")
    if public and not cls.pretrains_on_public:
        raise SpecError(f"field '{public_field}': {who} trains from scratch and has no public pre-training; "
                        "pdp-diffusion, dp-lora and dp-ldm start from a public base")


def check_public_source(name: str | None, spec: Any, field: str) -> None:
    """Refuse a "public" data option that names the sensitive dataset itself (SpecError, before any data is read).

    Pretraining, tuning, initialisation and extractor training on a public set cost no privacy only because the set
    is public; pointed at the job's own sensitive dataset they would read its records without noise or charge.
    """
    if not name:
        return
    from dpdistill import data

    try:
        public = data.get(name).info.name
    except SpecError:
        return  # an unknown name is reported by the code that loads it, with the list of known sets
    if public == data.get(spec.data.name).info.name:
        raise SpecError(f"field '{field}': '{name}' is the sensitive dataset itself ({spec.data.name}); a public "
                        "set must be another one (e.g. glyphs)")

