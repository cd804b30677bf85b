"""Typed job specs: load a YAML file, apply ``--set a.b=c`` overrides, validate, resolve defaults.

A spec is a short YAML document; everything it does not say comes from the defaults in code. Unknown keys,
wrong types and out-of-range values are :class:`~dpdistill.errors.SpecError` with one line naming the file and
the field. Method-specific options (``method:`` block) are validated against the config type that the method
registered, and the option blocks nested in the spec (``evaluation.model_options`` against the model factory's
signature, ``method.generator`` against the synthesis registry and ``method.generator_options`` against that
synthesiser's config) are checked too, so a typo anywhere is caught before any work starts. Scalars are typed
strictly: a boolean or a string is never read as a number (YAML's ``ipc: true`` is an error, not 1).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dpdistill.errors import SpecError
from dpdistill.pipelines import registry as job_kinds

# The kinds registered in dpdistill.pipelines.registry (named there, not imported: loading a spec stays cheap).
JOB_KINDS = tuple(job_kinds.names())


# --------------------------------------------------------------------------------------------- strict scalars


def scalar_types(annotation: Any) -> set[Any] | None:
    """The scalar types (int, float, bool, str, None) an annotation admits; None when it is not only scalars.

    Used to refuse the coercions pydantic's lax mode would make silently (True -> 1, "3" -> 3). Containers,
    models and ``Any`` return None: they are left to the annotation's own validation.
    """
    if annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return scalar_types(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        out: set[Any] = set()
        for arg in typing.get_args(annotation):
            part = scalar_types(arg)
            if part is None:
                return None
            out |= part
        return out
    if origin is Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if annotation in (int, float, bool, str, type(None), None):
        return {type(None) if annotation is None else annotation}
    return None


def coercion_error(annotation: Any, value: Any) -> str | None:
    """Why ``value`` may not fill a field of type ``annotation`` without a lossy coercion (None: it may).

    A boolean is never a number, a string never a number, and a float never an integer unless it is whole
    (YAML writes ``3.0`` for 3; 2.5 is refused rather than truncated).
    """
    allowed = scalar_types(annotation)
    if allowed is None:
        return None
    numbers = allowed & {int, float}
    if isinstance(value, bool):
        if bool in allowed or not numbers:
            return None
        return f"expected {'an integer' if float not in numbers else 'a number'}, not a boolean"
    if isinstance(value, str) and numbers and str not in allowed:
        return f"expected {'an integer' if float not in numbers else 'a number'}, not a string"
    if isinstance(value, float) and numbers == {int} and not value.is_integer():
        return "expected an integer, got a number with a fractional part"
    return None


def check_strict_options(options: dict[str, Any], hints: dict[str, Any], source: str, block: str) -> None:
    """Refuse any option whose value a lax validation would coerce (see :func:`coercion_error`)."""
    for key, value in options.items():
        if key in hints:
            problem = coercion_error(hints[key], value)
            if problem:
                raise SpecError(f"{source}: field '{block}.{key}': {problem} (got {value!r})")


def type_hints(config_type: Any) -> dict[str, Any]:
    """Field name -> annotation of a pydantic model, dataclass or function (empty when it cannot be resolved)."""
    if isinstance(config_type, type) and issubclass(config_type, BaseModel):
        return {k: f.annotation for k, f in config_type.model_fields.items()}
    try:
        return typing.get_type_hints(config_type)
    except Exception:  # noqa: BLE001 - unresolvable annotations: pydantic still validates the values
        return {}


class StrictModel(BaseModel):
    """Base of every spec block: unknown keys are errors, assignment is validated, scalars are strict."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_lossy_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax pydantic reads `seeds: true` as 1 and `epochs: "3"` as 3; a spec means what it says or is refused.
        field = cls.model_fields.get(info.field_name or "")
        problem = coercion_error(field.annotation, value) if field is not None else None
        if problem:
            raise ValueError(problem)
        return value


class DataSpec(StrictModel):
    """Which sensitive dataset the job reads and how."""

    name: str = "digits"
    root: str | None = Field(default=None, description="dataset root folder; default: $DPDISTILL_DATA")
    download: bool = False
    image_size: int | None = Field(default=None, ge=4, le=512)
    val_seed: int = Field(default=0, ge=0)
    train_limit: int | None = Field(
        default=None, ge=10, description="use only the first N records of the (shuffled) training split"
    )


class PrivacySpec(StrictModel):
    """The job's total (epsilon, delta) budget; epsilon null means the job is not private.

    ``owner_budget`` adds a budget that spans runs: the data owner's total ε over every run on the same sensitive
    records, kept in a persistent store (see :mod:`dpdistill.privacy.owner_budget`); null: each run's budget
    stands alone ("budget per run").
    """

    epsilon: float | None = Field(default=None, gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    reproducible_noise: bool = Field(
        default=False,
        description=("DEBUGGING ONLY: derive the privacy noise from spec.seed so a run repeats byte for byte; "
                     "the release is then NOT PRIVATE and every report says so"),
    )
    owner_budget: float | None = Field(
        default=None, gt=0,
        description=("the data owner's total ε over every run on this data (charged in the budget store; a run "
                     "that would exceed it is refused before it starts); null: the budget is per run"),
    )
    owner_delta: float | None = Field(
        default=None, gt=0, lt=1,
        description="δ of the owner's total; default 1/(2N) for the N training and validation records",
    )
    budget_store: str | None = Field(
        default=None, description="folder of the owner budget store; default $DPDISTILL_BUDGETS, else <runs>/budgets",
    )

    @model_validator(mode="after")
    def _owner_budget_needs_a_private_run(self) -> PrivacySpec:
        if self.owner_budget is None:
            return self
        if self.epsilon is None:
            raise ValueError("owner_budget needs epsilon: a run reserves its own budget from the owner's total")
        if self.reproducible_noise:
            raise ValueError("owner_budget cannot be charged by a run with reproducible_noise: its release is NOT "
                             "PRIVATE, so no ε of the owner's would describe it")
        if self.epsilon > self.owner_budget:
            raise ValueError(f"epsilon {self.epsilon:g} exceeds owner_budget {self.owner_budget:g}: one run cannot "
                             "spend more than the owner's total")
        return self


class RaySpec(StrictModel):
    """Where Ray work runs: a local cluster (default) or an existing one at ``address``."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, le=4096)
    auth_token_path: str | None = Field(default=None, description="file holding the cluster's auth token")


class ResourcesSpec(StrictModel):
    """What the job's heavy work needs on a Ray cluster: a submitted job's driver, which runs the stages, is
    placed by Ray on a node that has these free (on KubeRay a worker: the head offers none), and a GPU request
    makes the autoscaler bring up a GPU worker."""

    cpus: float = Field(default=1, ge=0, le=4096, description="CPUs reserved for the job's driver")
    gpus: float = Field(default=0, ge=0, le=64, description="GPUs reserved for the job's driver")
    memory_gb: float | None = Field(default=None, gt=0, description="memory reserved for the job's driver (GiB)")


class TrackingSpec(StrictModel):
    """MLflow tracking: default ``sqlite:///<runs-dir>/mlflow.db``, or $MLFLOW_TRACKING_URI."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = Field(default="dpdistill", min_length=1)
    log_nonprivate_images: bool = Field(
        default=False,
        description=("copy a NON-PRIVATE method's images (DM / DC distilled sets, computed from real training images "
                     "without noise, real records when iterations is 0) to MLflow; off: they stay in the run folder"),
    )


# The augmentation names evaluation.augment accepts; each is one that evaluation.training.resolve_augment knows
# (kept here so loading a spec does not import torch).
EVAL_AUGMENTATIONS: tuple[str, ...] = ("dsa-lite", "dsa")


class EvaluationSpec(StrictModel):
    """Utility protocol: train fresh models on the released set, test on the real test split.

    ``selection`` picks the evaluation model's epochs / learning rate among the ``selection_epochs`` ×
    ``selection_lrs`` candidates (:mod:`dpdistill.evaluation.selection`): ``none`` trains ``epochs`` at ``lr``;
    ``synv`` chooses on a held-out tenth of the released set (free); ``noisy-senv`` chooses on the sensitive
    validation split by report-noisy-max, charged ``selection_epsilon`` out of the job's ``privacy.epsilon``.
    ``models`` evaluates the release with several architectures in one run; ``model`` stays the primary one
    (``acc_mean``), the only one given ``model_options`` and the only one the selection tunes.
    """

    enabled: bool = True
    model: str = "convnet"
    model_options: dict[str, Any] = Field(default_factory=dict)
    models: list[str] | None = Field(
        default=None, min_length=1, max_length=8,
        description=("evaluate the release with each of these models (e.g. [convnet, resnet18, lenet5, mlp]), one "
                     "row each (acc_mean_<model>); must include 'model', the primary one; the others use their "
                     "default options and evaluation.epochs / lr"),
    )
    selection: Literal["none", "synv", "noisy-senv"] = Field(
        default="none",
        description=("choose the primary model's epochs / lr among the candidates: none (epochs, lr), synv (on a "
                     "held-out 10 % of the released set, free) or noisy-senv (on the sensitive validation split "
                     "by report-noisy-max, charged selection_epsilon out of privacy.epsilon)"),
    )
    selection_epochs: list[int] = Field(default_factory=lambda: [100, 300], min_length=1, max_length=6,
                                        description="candidate epochs for evaluation.selection")
    selection_lrs: list[float] = Field(default_factory=lambda: [0.01], min_length=1, max_length=4,
                                       description="candidate learning rates for evaluation.selection")
    selection_epsilon: float | None = Field(
        default=None, gt=0, le=100,
        description="noisy-senv: the ε of the noisy choice, charged to the run's ledger (part of privacy.epsilon)",
    )
    seeds: int = Field(default=3, ge=1, le=50)
    epochs: int = Field(default=300, ge=1, le=100_000)
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=0.01, gt=0, le=10)
    augment: bool | str = Field(
        default=False,
        description=("augmentation while training the evaluation models: false (none), true or 'dsa-lite' (shifted crop "
                     "+ rotation), 'dsa' (DC/DM reference: the full DSA strategy per image on normalised images)"),
    )
    validation: bool = Field(
        default=True, description="also score the models on the validation split (val_acc_*; for sweeps)"
    )
    parallel: bool = Field(default=True, description="train the seeds' models as parallel Ray tasks")

    @field_validator("augment", mode="before")
    @classmethod
    def _known_augmentation(cls, value: Any) -> Any:
        # One clear message instead of pydantic's per-member union errors.
        if isinstance(value, bool) or value in EVAL_AUGMENTATIONS:
            return value
        raise ValueError("expected true, false, " + " or ".join(repr(n) for n in EVAL_AUGMENTATIONS))

    @field_validator("selection_epochs")
    @classmethod
    def _positive_epochs(cls, value: list[int]) -> list[int]:
        if any(e < 1 or e > 100_000 for e in value) or len(set(value)) != len(value):
            raise ValueError("expected distinct epoch counts in [1, 100000]")
        return value

    @field_validator("selection_lrs")
    @classmethod
    def _positive_lrs(cls, value: list[float]) -> list[float]:
        if any(not 0 < lr <= 10 for lr in value) or len(set(value)) != len(value):
            raise ValueError("expected distinct learning rates in (0, 10]")
        return value

    @model_validator(mode="after")
    def _selection_and_models(self) -> EvaluationSpec:
        if self.selection == "noisy-senv":
            if self.selection_epsilon is None:
                raise ValueError("evaluation.selection 'noisy-senv' needs evaluation.selection_epsilon (the ε of "
                                 "the noisy choice, charged out of privacy.epsilon)")
            if len(self.selection_epochs) * len(self.selection_lrs) < 2:
                raise ValueError("evaluation.selection 'noisy-senv' needs at least two candidates "
                                 "(selection_epochs × selection_lrs)")
        elif self.selection_epsilon is not None:
            raise ValueError(f"evaluation.selection_epsilon is only spent by selection 'noisy-senv', "
                             f"not {self.selection!r}; remove it")
        if self.models is not None:
            if len(set(self.models)) != len(self.models):
                raise ValueError("evaluation.models: each model once")
            if self.model not in self.models:
                raise ValueError(f"evaluation.models must include evaluation.model ({self.model!r}), the "
                                 "primary model reported as acc_mean")
        return self

    def augmentation(self) -> str | None:
        """The named augmentation for :func:`~dpdistill.evaluation.utility.evaluate_utility` (None: none)."""
        if self.augment is True:
            return "dsa-lite"
        return self.augment or None


class MethodSpec(StrictModel):
    """The method block: ``name`` plus that method's own options (validated against its config type)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(min_length=1)

    def options(self) -> dict[str, Any]:
        """The method-specific options, without ``name``."""
        return dict(self.model_extra or {})


class JobSpec(StrictModel):
    """A complete job: what to run, on which data, under which budget, where to log."""

    name: str = Field(min_length=1, max_length=100)
    kind: Literal[JOB_KINDS]  # type: ignore[valid-type]
    description: str = ""
    seed: int = Field(default=0, ge=0)
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1, le=1024, description=(
        "torch intra-op threads for the whole job, in-process and in every evaluation Ray task (each reserves "
        "that many CPUs); unset: the free cores, which depend on the machine's load, so figures may differ in "
        "the last digits between runs"))
    compile: bool = Field(default=False, description=(
        "torch.compile the CPU hot loops (evaluation models', extractors' and the expert's training steps; the "
        "matchers' embeddings): ~20-40 % faster steps on small ConvNets after a one-off compile per shape, which "
        "torch caches on disk for later runs; results move by float rounding only; falls back to eager, with a "
        "warning, where the machine cannot compile"))
    data: DataSpec = Field(default_factory=DataSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    method: MethodSpec
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("expected letters, digits, '_', '.', '-' (it names the run folder)")
        return v

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", v):
            raise ValueError("expected cpu, cuda, cuda:N, mps or auto")
        return v

    def to_yaml(self) -> str:
        """The fully resolved spec as YAML (defaults filled in), as written to the run folder."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat_params(self) -> dict[str, str]:
        """Flattened ``a.b.c -> value`` view of the spec, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = str(value)[:500]

        walk("", self.model_dump(mode="json"))
        return out


# --------------------------------------------------------------------------------------------- loading


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def _expected_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The keys a spec block accepts, found by walking the model along ``loc`` (minus the bad key)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None or part not in current.model_fields:
            return []
        ann = current.model_fields[part].annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(current.model_fields) if current is not None else []


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = JobSpec,
                            block: str = "") -> str:
    """Turn pydantic's first error into one line naming the file and the field.

    ``block``: the spec block that ``model`` validates (e.g. "method"), prefixed to the field; a check across a
    block's fields (empty loc) then names the block, and its input (the whole block) is not echoed.
    """
    first = err.errors()[0]
    loc = ((block,) if block else ()) + tuple(first.get("loc", ()))
    field = _format_loc(loc) or "<top level>"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        keys = _expected_keys(model, loc[1:] if block else loc)
        hint = f"; expected one of: {', '.join(keys)}" if keys else ""
        return f"{source}: unknown key '{field}'{hint}"
    if kind == "missing":
        return f"{source}: missing required field '{field}'"
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else "invalid value"
    got = first.get("input")
    got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
    return f"{source}: field '{field}': {msg}{got_s}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set a.b=c`` override; the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise SpecError(f"--set '{text}': expected KEY=VALUE, e.g. --set privacy.epsilon=1.0")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise SpecError(f"--set '{text}': expected a dotted key like method.ipc, got '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``doc`` with each ``a.b=c`` override applied (creating blocks as needed)."""
    import copy

    out = copy.deepcopy(doc)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise SpecError(f"--set '{text}': '{p}' is a value, not a block")
            node = nxt
        node[parts[-1]] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a spec file into a mapping, with one-line errors for every way that can fail."""
    if not path.exists():
        raise SpecError(f"{path}: spec file not found")
    if path.is_dir():
        raise SpecError(f"{path}: is a folder; expected a YAML spec file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text; expected a YAML spec file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}{where}: YAML syntax error: {problem}") from None
    if doc is None:
        raise SpecError(f"{path}: empty spec; expected a mapping with at least 'name', 'kind' and 'method'")
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    return doc


def validate_method_options(spec: JobSpec, source: str) -> dict[str, Any]:
    """Check the ``method:`` block against the registered method's config; return the resolved options."""
    from dpdistill.pipelines import method_config_type

    config_type = method_config_type(spec.kind, spec.method.name, source)
    options = spec.method.options()
    if config_type is None:
        return options
    if dataclasses.is_dataclass(config_type):
        fields = {f.name for f in dataclasses.fields(config_type)}
        for key in options:
            if key not in fields:
                raise SpecError(
                    f"{source}: unknown key 'method.{key}' for method '{spec.method.name}'; "
                    f"expected one of: name, {', '.join(sorted(fields))}"
                )
        check_strict_options(options, type_hints(config_type), source, "method")
        try:
            cfg = TypeAdapter(config_type).validate_python(options)
        except ValidationError as e:
            raise SpecError(format_validation_error(e, source, None, block="method")) from None
        except (ValueError, TypeError) as e:
            raise SpecError(f"{source}: method '{spec.method.name}': {e}") from None
        return dataclasses.asdict(cfg)
    if isinstance(config_type, type) and issubclass(config_type, BaseModel):
        fields = set(config_type.model_fields)
        for key in options:
            if key not in fields:
                raise SpecError(
                    f"{source}: unknown key 'method.{key}' for method '{spec.method.name}'; "
                    f"expected one of: name, {', '.join(sorted(fields))}"
                )
        check_strict_options(options, type_hints(config_type), source, "method")
        try:
            return config_type.model_validate(options).model_dump(mode="json")
        except ValidationError as e:
            raise SpecError(format_validation_error(e, source, config_type, block="method")) from None
    return options


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Load, override and validate a job spec; the method options come back resolved in ``spec.method``."""
    path = Path(path)
    doc = apply_overrides(read_yaml(path), overrides or [])
    return validate_spec(doc, str(path))


def load_run_spec(path: str | Path) -> JobSpec:
    """A run folder's resolved spec.yaml, which an earlier version may have written: options a synthesiser has
    since retired (``Synthesizer.retired_options``) are dropped where they hold the value that version resolved
    them to (they did nothing there), then the spec is validated as :func:`load_spec` does. Any other value of a
    retired option stays and is refused as an unknown key."""
    path = Path(path)
    return validate_spec(drop_retired_options(read_yaml(path)), str(path))


def drop_retired_options(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without the retired options of its synthesiser (``method``) or nested generator
    (``method.generator_options``) that hold their retired value."""
    from dpdistill.synthesis import registry as synthesis

    method = doc.get("method")
    if not isinstance(method, dict):
        return doc
    for block, name in ((method, method.get("name")), (method.get("generator_options"), method.get("generator"))):
        if isinstance(block, dict) and isinstance(name, str) and name.lower() in synthesis.names():
            for key in synthesis.get(name).retired(block):
                del block[key]
    return doc


def validate_spec(doc: dict[str, Any], source: str = "<spec>") -> JobSpec:
    """Validate a spec mapping (already overridden) into a fully resolved :class:`JobSpec`."""
    try:
        spec = JobSpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source)) from None
    resolved = validate_method_options(spec, source)
    spec.method = MethodSpec(name=spec.method.name, **resolved)
    check_nested_options(spec, source)
    return spec


def check_model_options(model: str, options: dict[str, Any], source: str, block: str) -> None:
    """Check a model's options (e.g. ``evaluation.model_options``) against its factory's signature and types.

    An unknown model name is left to the caller (the pipeline names the field); the values a factory checks
    itself (ranges, choices) are checked by building the model once in the pipeline's ``prepare``.
    """
    from dpdistill import models
    from dpdistill.models import registry

    if not isinstance(options, dict):
        raise SpecError(f"{source}: field '{block}': expected a mapping of option: value")
    try:
        allowed = models.options(model)
        key, _ = registry._resolve(model)
    except SpecError:
        return
    for option in options:
        if option not in allowed:
            raise SpecError(f"{source}: unknown key '{block}.{option}' for model '{model}'; expected one of: "
                            f"{', '.join(allowed) or '(none)'}")
    hints = type_hints(registry._FACTORIES[key])
    check_strict_options(options, hints, source, block)
    for option, value in options.items():
        if option in hints:
            try:
                TypeAdapter(hints[option]).validate_python(value)
            except ValidationError as e:
                raise SpecError(format_validation_error(e, source, None, block=f"{block}.{option}")) from None


def check_generator_options(generator: Any, options: Any, source: str, block: str = "method") -> None:
    """Check a nested synthesiser (DP-GenG's ``method.generator``) and its ``generator_options`` up front."""
    from dpdistill.synthesis import registry as synthesis

    if not isinstance(generator, str) or generator.lower() not in synthesis.names():
        raise SpecError(f"{source}: field '{block}.generator': unknown synthesis method {generator!r}; expected "
                        f"one of: {', '.join(synthesis.names())}")
    if not isinstance(options, dict):
        raise SpecError(f"{source}: field '{block}.generator_options': expected a mapping of option: value")
    config_type = synthesis.get(generator).config_type
    fields = sorted(f.name for f in dataclasses.fields(config_type))
    for key in options:
        if key not in fields:
            raise SpecError(f"{source}: unknown key '{block}.generator_options.{key}' for generator "
                            f"'{generator}'; expected one of: {', '.join(fields)}")
    check_strict_options(options, type_hints(config_type), source, f"{block}.generator_options")
    try:
        TypeAdapter(config_type).validate_python(options)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source, None, block=f"{block}.generator_options")) from None
    except (ValueError, TypeError) as e:
        raise SpecError(f"{source}: field '{block}.generator_options': {e}") from None


def check_nested_options(spec: JobSpec, source: str = "<spec>") -> None:
    """Check every option block nested in the spec, so none of them first fails after the budget is spent."""
    check_model_options(spec.evaluation.model, spec.evaluation.model_options, source, "evaluation.model_options")
    options = spec.method.options()
    if "generator" in options or "generator_options" in options:
        check_generator_options(options.get("generator"), options.get("generator_options") or {}, source)
