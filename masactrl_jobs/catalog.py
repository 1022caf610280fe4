"""The model catalog: which models the service offers and what the gateway needs to validate.

Gateway and workers read the same catalog (``MASACTRL_CATALOG_FILE`` or inline
``MASACTRL_CATALOG`` JSON), so the gateway checks sizes and control ranges without loading a model.
JSON shape::

    {"default": "sd15",
     "models": [{"name": "sd15", "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                 "family": "sd"}, ...]}

``models`` may also be an object keyed by name. The model's shape (``block_count``,
``native_width``/``native_height``, ``size_multiple``) is measured by its workers from the loaded
checkpoint (``masactrl_jobs.shape``); an entry may declare it, and a worker whose model measures
otherwise refuses to start. Until a worker has reported, the gateway assumes what the entry
declares, else the family's reference shape. The default control is a rule over the block count
(start step 4, start layer at 10/16 of the depth; FLUX.1 declares its own, from its first
single-stream block) unless declared: by the entry (``default_start_step``,
``default_start_layer``) or by a local checkpoint folder's ``masactrl.json``
(``{"start_step": 4, "start_layer": 10}``, as the engine reads it). Once a worker has loaded the
model, an undeclared default is the one its engine reports.

A model may list the layout condition models (ControlNets, T2I-Adapters) its workers may load,
by name; requests pick one by that name, never by an arbitrary source::

    "conditions": {"canny": {"source": "lllyasviel/sd-controlnet-canny",
                             "kind": "controlnet", "family": "sd"}}

A condition's family must be its model's (an SD 1.5 ControlNet cannot steer SDXL); ``family``
may be omitted and then is the model's. The ``sd3`` and ``flux`` families take no conditions
(``masactrl_jobs.shape.FAMILY_FEATURES``): an entry that lists some is refused.

A ``source`` may be one checkpoint file in the original single-file layout (``.safetensors``),
as community models circulate. Its components' configuration comes from ``config`` (a local
diffusers config folder: loading is then offline; or a hub id), else from the family's reference
repository in the Hugging Face cache. ``prediction_type`` declares ``epsilon`` or
``v_prediction`` where the file does not say (SD 2.x). Pickle files (``.ckpt``, ...) can run code
while they load and are refused unless ``allow_pickle`` is true::

    {"name": "anything", "source": "/models/anything-v4.5.safetensors", "family": "sd",
     "config": "/models/configs/sd15"}

A model may list LoRA adapters (a ``.safetensors`` file, a folder holding one, or a hub id) with
the weight a request gets when it names none; a request activates up to ``MAX_LORAS`` (4) of
them by name::

    "loras": {"watercolor": {"source": "/models/loras/watercolor.safetensors", "weight": 0.8}}

``preview_vae`` names a tiny autoencoder (diffusers' ``AutoencoderTiny``: ``madebyollin/taesd``
for SD 1.x/2.x, ``madebyollin/taesdxl`` for SDXL) that decodes live previews; without it the
workers use the model's own VAE, less often.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from masactrl_jobs.schema import LORA_WEIGHT_LIMIT
from masactrl_jobs.shape import (
    DEFAULT_START_STEP,
    FAMILY_FEATURES,
    FAMILY_REFERENCE_CONTROL,
    FAMILY_REFERENCE_SHAPES,
    SHAPE_FIELDS,
    Family,
    FamilyFeatures,
    ModelShape,
    PredictionType,
    default_start_layer,
)

ConditionKind = Literal["controlnet", "t2i_adapter"]

# How a source names one checkpoint file rather than a folder or hub id; the pickle suffixes are
# refused unless the entry allows them (masactrl_core.single_file applies the same rule on load).
SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
# Entry fields an operator may declare about the model or its control, checked against the model.
_DECLARABLE = frozenset((*SHAPE_FIELDS, "default_start_step", "default_start_layer", "max_pixels"))
# Entry fields the validator computes; never taken from the catalog's text.
_COMPUTED = frozenset(("declared", "measured"))
# A checkpoint folder's own default control (the engine reads the same file).
CONTROL_DECLARATION = "masactrl.json"


class CatalogError(ValueError):
    """The catalog is malformed; the message says where."""


class UnknownModel(KeyError):
    """A model name that the catalog does not list."""

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.available = available

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; available: {', '.join(self.available)}"


class ConditionEntry(BaseModel):
    """A ControlNet or T2I-Adapter a model's workers may load (on first use, then kept warm)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="Hub id or local folder.")
    kind: ConditionKind
    # Filled in from the model entry when omitted.
    family: Family


class _UnknownOption(KeyError):
    """A name (of a condition model, an adapter) that a catalog model does not list."""

    what = "option"

    def __init__(self, name: str, model: str, available: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.model = model
        self.available = available

    def __str__(self) -> str:
        offered = ", ".join(self.available) if self.available else "none"
        return f"{self.model} has no {self.what} {self.name!r}; available: {offered}"


class UnknownCondition(_UnknownOption):
    """A condition model name that a catalog model does not list."""

    what = "condition model"


class LoraEntry(BaseModel):
    """A LoRA adapter a model's workers may load (once, on first use) and activate per job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description=".safetensors file, folder or hub id.")
    weight: float = Field(
        default=1.0,
        ge=-LORA_WEIGHT_LIMIT,
        le=LORA_WEIGHT_LIMIT,
        description="The weight a request gets when it names none.",
    )
    # Pickle weights (a .bin file, or a folder holding only one) can run code while they load.
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _safe_format(self) -> LoraEntry:
        if self.source.lower().endswith(PICKLE_SUFFIXES) and not self.allow_pickle:
            raise ValueError(
                f"{self.source} is a pickle file, which can run arbitrary code when loaded; "
                "convert it to .safetensors, or set allow_pickle: true if you trust it"
            )
        return self


class UnknownLora(_UnknownOption):
    """A LoRA adapter name that a catalog model does not list."""

    what = "LoRA adapter"


def _default_max_pixels(width: Any, height: Any) -> Any:
    # Twice the native side: enough for upscaled edits, bounded for the GPU. (Any: the raw
    # catalog values are checked by the fields after this runs.)
    return 4 * width * height


def is_single_file(source: str) -> bool:
    """Whether ``source`` names one checkpoint file (by its suffix)."""
    return source.lower().endswith(SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES)


class ModelEntry(BaseModel):
    """One model the service can run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The name is part of the Celery queue name (masactrl.<name>) and of cache keys.
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    source: str = Field(min_length=1, description="Hub id, local folder or s3:// prefix.")
    family: Family
    native_width: int = Field(gt=0)
    native_height: int = Field(gt=0)
    block_count: int = Field(gt=0)
    default_start_step: int = Field(ge=0)
    default_start_layer: int = Field(ge=0)
    size_multiple: int = Field(gt=0)
    max_pixels: int = Field(gt=0)
    conditions: dict[str, ConditionEntry] = Field(default_factory=dict)
    loras: dict[str, LoraEntry] = Field(default_factory=dict)
    # Single-file sources only: where their configuration comes from, and how to read them.
    config: str | None = Field(default=None, min_length=1)
    prediction_type: PredictionType | None = None
    allow_pickle: bool = False
    # Live previews decode each step's predicted image with this AutoencoderTiny (TAESD for SD
    # models, TAESDXL for SDXL); without one, with the model's own VAE, less often.
    preview_vae: str | None = Field(
        default=None, min_length=1, description="Hub id or local folder of an AutoencoderTiny."
    )

    # Which of the shape and default-control fields the operator (or the checkpoint's
    # masactrl.json) wrote; the others are rules or assumptions. Computed from the input.
    declared: frozenset[str] = Field(default=frozenset(), exclude=True, repr=False)
    # What a worker measured from the loaded model, once one has (see :meth:`with_shape`).
    measured: ModelShape | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        family = data.get("family")
        if family not in FAMILY_REFERENCE_SHAPES:
            # Said here, once: otherwise every family-derived field would also report "missing".
            known = " or ".join(repr(name) for name in FAMILY_REFERENCE_SHAPES)
            if family is None:
                raise ValueError(f"family is required ({known})")
            raise ValueError(f"family {family!r} is not {known}")
        given = {k: v for k, v in data.items() if v is not None and k not in _COMPUTED}
        filled = {**FAMILY_REFERENCE_SHAPES[family], **given}
        filled["declared"] = frozenset(given) & _DECLARABLE
        filled["measured"] = None
        if not {"block_count", "default_start_layer"} & set(given):
            # The family's own rule on its reference checkpoint (FLUX.1: the single-stream
            # blocks); an entry that declares another depth gets the depth rule until measured.
            filled = {**FAMILY_REFERENCE_CONTROL.get(family, {}), **filled}
        filled.setdefault("default_start_step", DEFAULT_START_STEP)
        block_count = filled["block_count"]
        if "default_start_layer" not in filled and isinstance(block_count, int) and block_count > 0:
            filled["default_start_layer"] = default_start_layer(block_count)
        if "max_pixels" not in filled:
            filled["max_pixels"] = _default_max_pixels(
                filled["native_width"], filled["native_height"]
            )
        conditions = filled.get("conditions")
        if isinstance(conditions, dict):
            filled["conditions"] = {
                name: {"family": family, **condition} if isinstance(condition, dict) else condition
                for name, condition in conditions.items()
            }
        return filled

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        if self.default_start_layer >= self.block_count:
            raise ValueError(
                f"default_start_layer {self.default_start_layer} must be below block_count "
                f"{self.block_count}"
            )
        for side, value in (
            ("native_width", self.native_width),
            ("native_height", self.native_height),
        ):
            if value % self.size_multiple:
                raise ValueError(f"{side} {value} is not a multiple of {self.size_multiple}")
        if self.native_width * self.native_height > self.max_pixels:
            raise ValueError("max_pixels is smaller than the native size")
        if not self.single_file:
            for name in ("config", "prediction_type"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies only to a single-file source (.safetensors)")
        elif self.prediction_type is not None and self.family in ("flux", "sd3"):
            raise ValueError(
                f"prediction_type applies only to sd and sdxl single files; {self.family} "
                "models are flow-matching transformers"
            )
        elif self.source.lower().endswith(PICKLE_SUFFIXES) and not self.allow_pickle:
            raise ValueError(
                f"{self.source} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors, or set allow_pickle: true if you trust it"
            )
        for name in self.loras:
            if not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(
                    f"LoRA name {name!r} must be lowercase letters, digits, '_', '.' or '-'"
                )
        if self.conditions and not self.features.layout_conditions:
            raise ValueError(
                f"conditions: {self.name} is {self.family}, and {self.features.unavailable}"
            )
        for name, condition in self.conditions.items():
            if not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(
                    f"condition name {name!r} must be lowercase letters, digits, '_', '.' or '-'"
                )
            if condition.family != self.family:
                raise ValueError(
                    f"condition {name!r} is made for {condition.family} models, but "
                    f"{self.name} is {self.family}"
                )
        return self

    def shape_conflicts(self, shape: ModelShape) -> list[str]:
        """Sentences for each declared value that the loaded model contradicts (empty if none)."""
        conflicts = []
        if shape.family != self.family:
            conflicts.append(
                f"{self.name} is declared {self.family}, but its checkpoint is {shape.family}"
            )
        for name, measured in shape.values().items():
            declared = getattr(self, name)
            if name in self.declared and declared != measured:
                conflicts.append(
                    f"{self.name} declares {name} {declared}, but the model measures {measured}"
                )
        if "default_start_layer" in self.declared and self.default_start_layer >= shape.block_count:
            conflicts.append(
                f"{self.name} declares default_start_layer {self.default_start_layer}, but the "
                f"model has {shape.block_count} self-attention blocks"
            )
        declared_prediction = self.prediction_type
        if declared_prediction is not None and shape.prediction_type not in (
            None,
            declared_prediction,
        ):
            conflicts.append(
                f"{self.name} declares prediction_type {declared_prediction}, but the model "
                f"predicts {shape.prediction_type}"
            )
        return conflicts

    def with_shape(self, shape: ModelShape) -> ModelEntry:
        """This entry with the shape its model measures: undeclared sizes and the default start
        layer follow the model; declared values stay (:meth:`shape_conflicts` says if they
        contradict it)."""
        update: dict[str, Any] = {
            name: value for name, value in shape.values().items() if name not in self.declared
        }
        # The engine's own default where it reported one (a family's rule, e.g. FLUX.1's
        # single-stream blocks), else the depth rule.
        if "default_start_layer" not in self.declared:
            update["default_start_layer"] = (
                default_start_layer(shape.block_count)
                if shape.default_start_layer is None
                else shape.default_start_layer
            )
        if "default_start_step" not in self.declared and shape.default_start_step is not None:
            update["default_start_step"] = shape.default_start_step
        if "max_pixels" not in self.declared:
            width = update.get("native_width", self.native_width)
            height = update.get("native_height", self.native_height)
            update["max_pixels"] = _default_max_pixels(width, height)
        update["measured"] = shape
        return self.model_copy(update=update)

    def condition(self, name: str) -> ConditionEntry:
        """The condition model called ``name``; :class:`UnknownCondition` if this model lacks it."""
        try:
            return self.conditions[name]
        except KeyError:
            raise UnknownCondition(name, self.name, sorted(self.conditions)) from None

    def lora(self, name: str) -> LoraEntry:
        """The LoRA adapter called ``name``; :class:`UnknownLora` if this model lacks it."""
        try:
            return self.loras[name]
        except KeyError:
            raise UnknownLora(name, self.name, sorted(self.loras)) from None

    @property
    def features(self) -> FamilyFeatures:
        """What the engine offers on this model's family (layout conditions, sequences, ...)."""
        return FAMILY_FEATURES[self.family]

    @property
    def single_file(self) -> bool:
        """Whether the source is one checkpoint file rather than a folder or hub id."""
        return is_single_file(self.source)

    @property
    def native_size(self) -> tuple[int, int]:
        return (self.native_width, self.native_height)

    @property
    def default_control(self) -> dict[str, int]:
        """The MasaCtrl control defaults the gateway fills in and /v1/models shows."""
        return {"start_step": self.default_start_step, "start_layer": self.default_start_layer}


class Catalog(BaseModel):
    """The models on offer and which one requests get when they name none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelEntry] = Field(min_length=1)
    default: str

    @model_validator(mode="before")
    @classmethod
    def _models_by_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            models = [
                {"name": name, **entry} if isinstance(entry, dict) else entry
                for name, entry in data["models"].items()
            ]
            data = {**data, "models": models}
        return data

    @model_validator(mode="after")
    def _check_names(self) -> Catalog:
        names = [entry.name for entry in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        if self.default not in names:
            raise ValueError(
                f"default {self.default!r} is not one of the models ({', '.join(names)})"
            )
        return self

    def names(self) -> list[str]:
        return [entry.name for entry in self.models]

    def get(self, name: str | None = None) -> ModelEntry:
        """The entry called ``name`` (or the default); :class:`UnknownModel` if absent."""
        wanted = self.default if name is None else name
        for entry in self.models:
            if entry.name == wanted:
                return entry
        raise UnknownModel(wanted, self.names())

    @property
    def default_entry(self) -> ModelEntry:
        return self.get(self.default)

    def __contains__(self, name: object) -> bool:
        return any(entry.name == name for entry in self.models)


def default_catalog() -> Catalog:
    """The catalog used when none is configured: SD 1.5 (default) and SDXL base."""
    return Catalog(
        default="sd15",
        models=[
            ModelEntry.model_validate(
                {
                    "name": "sd15",
                    "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                    "family": "sd",
                }
            ),
            ModelEntry.model_validate(
                {
                    "name": "sdxl",
                    "source": "stabilityai/stable-diffusion-xl-base-1.0",
                    "family": "sdxl",
                }
            ),
        ],
    )


def tiny_model_entry(source: str, name: str = "tiny") -> dict[str, Any]:
    """The catalog entry of a checkpoint written by ``masactrl tiny-model`` (SD family).

    Its VAE halves the size and its UNet downsamples three times, so sides are multiples of 16
    around a native 64x64. Kept here, torch-free, for the local stack, benchmarks and tests.
    """
    return {
        "name": name,
        "source": source,
        "family": "sd",
        "native_width": 64,
        "native_height": 64,
        "size_multiple": 16,
    }


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        path = ""
        for part in error.get("loc", ()):
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def parse_catalog(text: str, *, origin: str = "catalog") -> Catalog:
    """Parse and validate catalog JSON; :class:`CatalogError` names ``origin`` and the problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{origin} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    return catalog_from_data(data, origin=origin)


def catalog_from_data(data: Any, *, origin: str = "catalog") -> Catalog:
    """Validate already-parsed catalog data."""
    if not isinstance(data, dict):
        raise CatalogError(f"{origin} must be a JSON object with 'models' and 'default'")
    try:
        return Catalog.model_validate(_with_declared_controls(data, origin))
    except ValidationError as exc:
        raise CatalogError(f"{origin} is invalid: {_describe(exc)}") from None


def _with_declared_controls(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """``data`` with each local checkpoint's declared default control filled in where omitted."""
    models = data.get("models")
    entries = list(models.values()) if isinstance(models, dict) else models
    if not isinstance(entries, list):
        return data
    filled = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("source"), str):
            entry = {**_declared_control(entry["source"], origin), **entry}
        filled.append(entry)
    if isinstance(models, dict):
        return {**data, "models": dict(zip(models, filled, strict=True))}
    return {**data, "models": filled}


def checkpoint_entry(name: str, source: str, family: Family) -> ModelEntry:
    """An entry for one checkpoint outside any catalog (``masactrl synthesize --model``): no
    declared shape, the default control its folder's ``masactrl.json`` declares, if any.

    Give it the shape the loaded model measures with :meth:`ModelEntry.with_shape`.
    """
    data = {**_declared_control(source, source), "name": name, "source": source, "family": family}
    try:
        return ModelEntry.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(f"{source}: {_describe(exc)}") from None


def _declared_control(source: str, origin: str) -> dict[str, int]:
    path = Path(source) / CONTROL_DECLARATION
    if not path.is_file():
        return {}
    try:
        declared = json.loads(path.read_text(encoding="utf-8"))
        if "start_step" not in declared and "start_layer" not in declared:
            return {}  # the file declares other things (a vocabulary) only
        return {
            "default_start_step": int(declared["start_step"]),
            "default_start_layer": int(declared["start_layer"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CatalogError(
            f"{origin}: {path} must be JSON with integer start_step and start_layer ({exc})"
        ) from None


class CatalogSettings(Protocol):
    """Where a process's settings say the catalog is (``CommonSettings`` has both)."""

    @property
    def catalog_file(self) -> Path | None: ...

    @property
    def catalog(self) -> str | None: ...


def load_catalog(settings: CatalogSettings) -> Catalog:
    """The catalog from ``MASACTRL_CATALOG_FILE``, ``MASACTRL_CATALOG`` or the built-in default.

    Each process calls this once at start-up (gateway lifespan, worker CLI), so a bad catalog
    stops it with one sentence before it serves anything.
    """
    if settings.catalog_file is not None:
        path = settings.catalog_file
        origin = f"MASACTRL_CATALOG_FILE ({path})"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CatalogError(f"{origin} does not exist") from None
        except OSError as exc:
            raise CatalogError(f"{origin} cannot be read: {exc.strerror or exc}") from None
        return parse_catalog(text, origin=origin)
    if settings.catalog is not None and settings.catalog.strip():
        return parse_catalog(settings.catalog, origin="MASACTRL_CATALOG")
    return default_catalog()
