"""The MasaCtrl engine: one loaded checkpoint, composed of a backbone, a solver and the sampler.

:class:`MasaCtrlEngine` is the public face of :mod:`masactrl_core` and a thin one. It loads a
checkpoint and builds three parts that each hold one concern:

* the **backbone** of the checkpoint's family (:mod:`masactrl_core.backbones`: ``sd``,
  ``sdxl``, ``sd3``, ``flux``), picked by :func:`detect_family` from ``model_index.json``
  (or, for a single file, from its keys): prompt encoding, the denoiser call, the attention
  blocks in execution order, latent encoding and decoding, condition-model fit, and which
  pipeline class loads it;
* the **solver** the backbone's scheduler config calls for (:mod:`masactrl_core.solvers`: DDIM
  with eta 0 for ε and v, flow-matching Euler for SD3 and FLUX, each with its exact inverse
  step);
* the **MasaCtrl sampler** (:mod:`masactrl_core.sampler`), which knows neither: rows, guidance,
  controlled steps and blocks, masks, layout conditions, anchoring, sequences, previews and
  statistics.

Every public call goes to the sampler; the attributes callers read (``family``, ``block_count``,
``native_size``, ``unet``, ``scheduler``, ...) come from the part that measures them. The run's
value types (:class:`ControlConfig`, :class:`InvertedImage`, ...) live in
:mod:`masactrl_core.runs` and are re-exported here.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import torch

# From their modules: mypy reads diffusers' top-level names as its no-torch placeholders.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from masactrl_core.backbones import Backbone, Conditioning, backbone_class, detect_family
from masactrl_core.conditions import Condition, ConditionModel, load_condition_model
from masactrl_core.errors import ModelLoadError
from masactrl_core.lora import LoraAdapters
from masactrl_core.masks import ManualMasks, MaskConfig, WordMasks
from masactrl_core.runs import (
    CancelCheck,
    ControlConfig,
    EngineOptions,
    ImageCallback,
    InvertedImage,
    MasaCtrlResult,
    ProgressCallback,
    RunStats,
    SequenceResult,
)
from masactrl_core.sampler import MasaCtrlSampler
from masactrl_core.single_file import is_single_file, load_single_file_pipeline
from masactrl_core.solvers import PREDICTION_TYPES, Solver
from masactrl_core.sources import locate_model
from masactrl_core.vocabulary import Vocabulary
from masactrl_core.weights import refuse_pickle_only, safetensors_only

if TYPE_CHECKING:
    from masactrl_core.attention import MutualSelfAttentionProcessor
    from masactrl_core.previews import LatentsCallback

logger = logging.getLogger(__name__)

# A checkpoint folder may declare its own default control, e.g. {"start_step": 4, "start_layer":
# 10}: a small UNet whose blocks sit at other depths than SD's says where "the decoder's later
# blocks" are, instead of the depth rule guessing. masactrl_jobs.catalog reads the same file.
CONTROL_DECLARATION = "masactrl.json"


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _device_and_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    resolved = torch.device(device) if device is not None else _default_device()
    if dtype is None:
        dtype = torch.float16 if resolved.type in ("cuda", "mps") else torch.float32
    return resolved, dtype


def _place(pipeline: DiffusionPipeline, device: torch.device, offload: bool) -> None:
    """Put the pipeline on ``device``: whole, or with ``offload`` each component only while it
    runs (diffusers' model CPU offload: a text encoder, the denoiser, the VAE move to the device
    when called and back to the CPU when the next one is), for models larger than the GPU
    holds at once (FLUX.1 [dev] beside its T5 encoder). The backbone then computes on the
    pipeline's execution device."""
    if offload:
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.to(device)


def _declaration(folder: str | os.PathLike[str]) -> tuple[str, dict[str, Any]] | None:
    """The path and content of a checkpoint folder's ``masactrl.json``, if it has one."""
    path = os.path.join(folder, CONTROL_DECLARATION)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} must be a JSON object ({error})") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must be a JSON object")
    return path, data


def declared_control(folder: str | os.PathLike[str]) -> ControlConfig | None:
    """The default control a checkpoint folder declares in ``masactrl.json``, if it has one."""
    declaration = _declaration(folder)
    if declaration is None:
        return None
    path, data = declaration
    if "start_step" not in data and "start_layer" not in data:
        return None  # the file declares other things (a vocabulary) only
    try:
        return ControlConfig(
            start_step=int(data["start_step"]), start_layer=int(data["start_layer"])
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"{path} must be JSON with integer start_step and start_layer ({error})"
        ) from error


def declared_vocabulary(folder: str | os.PathLike[str]) -> Vocabulary | None:
    """The words a checkpoint folder declares it knows (``masactrl.json``'s ``vocabulary``),
    if it declares them (see :mod:`masactrl_core.vocabulary`)."""
    declaration = _declaration(folder)
    if declaration is None or "vocabulary" not in declaration[1]:
        return None
    path, data = declaration
    words = data["vocabulary"]
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise ModelLoadError(f"{path}: vocabulary must be a list of words")
    return Vocabulary.of(words)


class MasaCtrlEngine:
    """Loads a checkpoint once; each call runs one synthesis or edit with its own settings."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        *,
        family: str = "sd",
        model_name: str = "",
        options: EngineOptions | None = None,
        default_control: ControlConfig | None = None,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.model_name = model_name
        # The words the checkpoint declares it knows; None: it declares none (no warnings).
        self.vocabulary = vocabulary
        self.backbone: Backbone = backbone_class(family).from_pipeline(pipeline)
        self.solver: Solver = self.backbone.make_solver()
        block_count = self.backbone.block_count
        declared_layer = None if default_control is None else default_control.start_layer
        if declared_layer is not None and declared_layer >= block_count:
            raise ModelLoadError(
                f"{model_name or 'the model'} declares start_layer {declared_layer},"
                f" but the model has {block_count} self-attention blocks"
            )
        self.sampler = MasaCtrlSampler(
            self.backbone,
            self.solver,
            options or EngineOptions(),
            default_control or self.backbone.default_control(),
        )
        # LoRA adapters, loaded once each and active only inside ``loras.activated(...)``.
        self.loras = LoraAdapters(pipeline)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        options: EngineOptions | None = None,
        *,
        allow_pickle: bool = False,
        offload: bool = False,
    ) -> MasaCtrlEngine:
        """Load a hub id, a local diffusers folder (of a registered family) or a checkpoint
        file (:meth:`from_single_file` with its defaults).

        ``offload`` keeps each component on ``device`` only while it runs (model CPU offload,
        see :func:`_place`): slower, for a GPU that cannot hold the whole model.

        Weights are read from safetensors files only unless ``allow_pickle`` (see
        ``masactrl_core.weights``): a folder whose component holds only a pickle is refused with
        that file's name.
        """
        model = str(model)
        if is_single_file(model):
            return cls.from_single_file(
                model,
                device=device,
                dtype=dtype,
                options=options,
                allow_pickle=allow_pickle,
                offload=offload,
            )
        device, dtype = _device_and_dtype(device, dtype)
        # Refuses a missing path, or a hub id that cannot be had, before diffusers retries.
        cached_only = locate_model(model).cached_only
        try:
            # diffusers annotates the (config, unused kwargs) pair of return_unused_kwargs=True.
            config: dict[str, Any] = DiffusionPipeline.load_config(  # type: ignore[assignment]
                model, local_files_only=cached_only
            )
        except Exception as error:  # hub or file errors: one sentence for the caller
            raise ModelLoadError(f"cannot load model {model}: {error}") from error
        family = detect_family(config)
        backbone = backbone_class(family)
        backbone.check_config(config, model)
        if os.path.isdir(model) and not allow_pickle:
            refuse_pickle_only(model, f"model {model}")
        try:
            pipeline = backbone.pipeline_class().from_pretrained(
                model,
                dtype=dtype,
                local_files_only=cached_only,
                **backbone.load_arguments(),
                **safetensors_only(allow_pickle),
            )
        except Exception as error:
            raise ModelLoadError(f"cannot load model {model}: {error}") from error
        _place(pipeline, device, offload)
        # diffusers leaves set_progress_bar_config unannotated.
        pipeline.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
        logger.info("loaded %s (%s) on %s as %s", model, family, device, dtype)
        local = os.path.isdir(model)
        return cls(
            pipeline,
            family=family,
            model_name=model,
            options=options,
            default_control=declared_control(model) if local else None,
            vocabulary=declared_vocabulary(model) if local else None,
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike[str],
        *,
        config: str | None = None,
        family: str | None = None,
        prediction_type: str | None = None,
        allow_pickle: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        options: EngineOptions | None = None,
        offload: bool = False,
    ) -> MasaCtrlEngine:
        """Load one checkpoint file in an original layout: SD, SDXL, or a FLUX.1 or SD3 transformer
        whose other components come from ``config`` (see ``masactrl_core.single_file``).

        ``config``: a diffusers config folder (offline) or hub id, else the family's reference
        config from the Hugging Face cache; ``family``: the declared family, checked against the
        file; ``prediction_type``: declared, else detected; ``allow_pickle``: accept ``.ckpt``.
        """
        device, dtype = _device_and_dtype(device, dtype)
        # A prediction type is a DDIM setting (SD and SDXL files): refuse a bad one before loading.
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(
                f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}"
            )
        pipeline, info = load_single_file_pipeline(
            path,
            dtype=dtype,
            config=config,
            family=family,
            prediction_type=prediction_type,
            allow_pickle=allow_pickle,
        )
        _place(pipeline, device, offload)
        pipeline.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
        logger.info("loaded %s (%s) on %s as %s", path, info.generation, device, dtype)
        return cls(pipeline, family=info.family, model_name=str(path), options=options)

    def prompt_warnings(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        """A sentence for each ``(field, prompt)`` that uses words outside the vocabulary the
        checkpoint declares; none when it declares none (:mod:`masactrl_core.vocabulary`)."""
        if self.vocabulary is None:
            return []
        return self.vocabulary.warnings(prompts)

    def load_condition_model(self, path_or_id: str | os.PathLike[str]) -> ConditionModel:
        """Load a ControlNet or T2I-Adapter for this model, on its device and in its dtype.

        The class comes from the model's config. A model made for another family or with other
        shapes is refused here, before any run. Loading is slow: callers keep the result.
        """
        name = str(path_or_id)
        locate_model(name, "condition model", marker="config.json")
        condition = load_condition_model(name, device=self.device, dtype=self.dtype)
        self.backbone.check_condition(condition)
        return condition

    # -- what the parts measure ------------------------------------------------------------

    @property
    def family(self) -> str:
        return self.backbone.family

    @property
    def unet(self) -> Any:
        """The denoiser (a ``UNet2DConditionModel`` for today's families)."""
        return self.backbone.denoiser

    @unet.setter
    def unet(self, denoiser: Any) -> None:
        self.backbone.denoiser = denoiser

    @property
    def vae(self) -> Any:
        return self.backbone.vae

    @property
    def scheduler(self) -> Any:
        return self.solver.scheduler

    @property
    def prediction_type(self) -> str:
        return self.solver.prediction_type

    @prediction_type.setter
    def prediction_type(self, value: str) -> None:
        self.solver.prediction_type = value

    @property
    def layer_names(self) -> list[str]:
        return self.backbone.layer_names

    @property
    def block_count(self) -> int:
        return self.backbone.block_count

    @property
    def block_levels(self) -> list[int]:
        return self.backbone.block_levels

    @block_levels.setter
    def block_levels(self, levels: list[int]) -> None:
        self.backbone.block_levels = levels

    @property
    def vae_scale_factor(self) -> int:
        return self.backbone.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.backbone.size_multiple

    @property
    def native_size(self) -> tuple[int, int]:
        return self.backbone.native_size

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """Whether an empty negative prompt is zeros (an SDXL checkpoint's declaration)."""
        return bool(getattr(self.backbone, "force_zeros_for_empty_prompt", False))

    @force_zeros_for_empty_prompt.setter
    def force_zeros_for_empty_prompt(self, value: bool) -> None:
        if not hasattr(self.backbone, "force_zeros_for_empty_prompt"):
            raise AttributeError(f"the {self.family} family has no force_zeros_for_empty_prompt")
        # Declared by the SDXL backbone, which reads it on every run.
        self.backbone.force_zeros_for_empty_prompt = value

    @property
    def options(self) -> EngineOptions:
        return self.sampler.options

    @property
    def default_control(self) -> ControlConfig:
        return self.sampler.default_control

    @property
    def processor_class(self) -> type[MutualSelfAttentionProcessor]:
        return self.sampler.processor_class

    @processor_class.setter
    def processor_class(self, processor: type[MutualSelfAttentionProcessor]) -> None:
        self.sampler.processor_class = processor

    @property
    def cross_processor_class(self) -> type:
        return self.sampler.cross_processor_class

    @cross_processor_class.setter
    def cross_processor_class(self, processor: type) -> None:
        self.sampler.cross_processor_class = processor

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    def block_grid(self, block: int, width: int, height: int) -> tuple[int, int]:
        """The (h, w) token grid of transformer block ``block`` for an image of this size."""
        return self.backbone.block_grid(block, width, height)

    def initial_noise(self, seed: int, width: int, height: int) -> torch.Tensor:
        """The seed contract: float32 CPU noise, then moved to the device and dtype."""
        return self.sampler.initial_noise(seed, width, height)

    def describe(self) -> dict[str, Any]:
        """What a run record should say about the model."""
        schedule = self.solver.describe()
        return {
            "model": self.model_name,
            "family": self.family,
            "prediction_type": schedule.pop("prediction_type"),
            **schedule,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "block_count": self.block_count,
            "native_size": list(self.native_size),
            "size_multiple": self.size_multiple,
            "default_control": asdict(self.default_control),
            "loras": self.loras.active,
        }

    # -- public calls (the sampler's) ------------------------------------------------------

    def synthesize(
        self,
        source_prompt: str,
        target_prompts: Sequence[str],
        *,
        seed: int,
        steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        control: ControlConfig | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        masks: MaskConfig | None = None,
        condition: Condition | None = None,
        on_latents: LatentsCallback | None = None,
    ) -> MasaCtrlResult:
        """The source image and one consistent image per target prompt, from the same noise.

        ``condition`` guides the layout of the targets (and of the source, with its
        ``source_image``) with a ControlNet or T2I-Adapter. ``on_latents(step, total, x0)``
        gets every denoising step's predicted clean latents, one row per image (live previews,
        see :mod:`masactrl_core.previews`).
        """
        return self.sampler.synthesize(
            source_prompt,
            target_prompts,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            control=control,
            progress=progress,
            should_cancel=should_cancel,
            masks=masks,
            condition=condition,
            on_latents=on_latents,
        )

    def invert(
        self,
        image: Image.Image,
        *,
        source_prompt: str = "",
        negative_prompt: str = "",
        steps: int = 50,
        width: int | None = None,
        height: int | None = None,
        inversion_guidance_scale: float = 1.0,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        stats: RunStats | None = None,
    ) -> InvertedImage:
        """Deterministic inversion of a real image to x_T: the solver's steps, inverted exactly."""
        return self.sampler.invert(
            image,
            source_prompt=source_prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            width=width,
            height=height,
            inversion_guidance_scale=inversion_guidance_scale,
            progress=progress,
            should_cancel=should_cancel,
            stats=stats,
        )

    def invert_latents(
        self,
        latents: torch.Tensor,
        *,
        source_prompt: str = "",
        negative_prompt: str = "",
        steps: int = 50,
        inversion_guidance_scale: float = 1.0,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        stats: RunStats | None = None,
    ) -> InvertedImage:
        """Inversion of clean latents (the backbone's encoding of an image, shape (1, C, h, w))."""
        return self.sampler.invert_latents(
            latents,
            source_prompt=source_prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            inversion_guidance_scale=inversion_guidance_scale,
            progress=progress,
            should_cancel=should_cancel,
            stats=stats,
        )

    def edit(
        self,
        image: Image.Image | None,
        target_prompts: Sequence[str],
        *,
        source_prompt: str = "",
        seed: int = 0,
        steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        control: ControlConfig | None = None,
        inversion_guidance_scale: float = 1.0,
        inverted: InvertedImage | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        masks: MaskConfig | None = None,
        condition: Condition | None = None,
        anchor_source: bool = False,
        on_latents: LatentsCallback | None = None,
    ) -> MasaCtrlResult:
        """Real-image editing: invert ``image``, then denoise [source, targets] with control.

        ``seed`` is recorded only: inversion and sampling (DDIM with eta 0) are deterministic.
        ``image`` may be ``None`` when a cached ``inverted`` is given. ``condition`` guides the
        targets' layout (never the source's). ``anchor_source`` resets the source latent to the
        inversion trajectory at every step, so targets read the photo's own keys and values
        (the inversion must have its trajectory).
        """
        return self.sampler.edit(
            image,
            target_prompts,
            source_prompt=source_prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            control=control,
            inversion_guidance_scale=inversion_guidance_scale,
            inverted=inverted,
            progress=progress,
            should_cancel=should_cancel,
            masks=masks,
            condition=condition,
            anchor_source=anchor_source,
            on_latents=on_latents,
        )

    def sequence(
        self,
        source_prompt: str,
        target_prompts: str | Sequence[str],
        condition: Condition,
        *,
        image: Image.Image | None = None,
        inverted: InvertedImage | None = None,
        anchor_source: bool = False,
        seed: int = 0,
        steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        control: ControlConfig | None = None,
        inversion_guidance_scale: float = 1.0,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        on_frame: ImageCallback | None = None,
        on_latents: LatentsCallback | None = None,
    ) -> SequenceResult:
        """Frames that keep one source's content while following a series of layouts.

        ``condition.images`` holds the K condition frames in order; ``target_prompts`` is one
        prompt for every frame or one per frame. The source is synthesized from
        ``source_prompt`` and ``seed``, or, with ``image`` (or a cached ``inverted``), is that
        photo inverted, as in :meth:`edit`. Frame k is exactly the target of a single-target
        run with condition frame k from the same initial noise: this is that run with K
        targets, whose one source branch per step serves every frame (chunks of
        ``options.max_batch`` rows read its cached keys and values). ``on_frame(k, image)`` is
        called as frame k is decoded; ``on_latents`` gets each step's predicted clean latents
        ([source, frames]), as in :meth:`synthesize`.
        """
        return self.sampler.sequence(
            source_prompt,
            target_prompts,
            condition,
            image=image,
            inverted=inverted,
            anchor_source=anchor_source,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            control=control,
            inversion_guidance_scale=inversion_guidance_scale,
            progress=progress,
            should_cancel=should_cancel,
            on_frame=on_frame,
            on_latents=on_latents,
        )

    # -- aliases kept for tests that build references from the engine's pieces -------------

    def _conditioning(
        self, prompts: Sequence[str], negative_prompt: str, size: tuple[int, int]
    ) -> tuple[Conditioning, Conditioning]:
        return self.backbone.conditioning(prompts, negative_prompt, size)

    def _image_size(self, latents: torch.Tensor) -> tuple[int, int]:
        return self.backbone.image_size(latents)

    def _encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        return self.backbone.encode_image(image, width, height)

    def _resolve_control(
        self, control: ControlConfig | None, steps: int
    ) -> tuple[frozenset[int], frozenset[int]]:
        return self.sampler._resolve_control(control, steps)

    def _prepare_masks(
        self,
        config: MaskConfig | None,
        source_prompt: str,
        target_prompts: list[str],
        width: int,
        height: int,
        controlled: tuple[frozenset[int], frozenset[int]],
    ) -> ManualMasks | WordMasks | None:
        return self.sampler._prepare_masks(
            config, source_prompt, target_prompts, width, height, controlled
        )


def with_options(engine: MasaCtrlEngine, **changes: Any) -> MasaCtrlEngine:
    """A view of ``engine`` with other optimization switches (shares the loaded weights).

    The view has its own backbone, solver and sampler objects (over the same modules), so
    attributes set on it (a reference processor class, block levels) leave ``engine`` as it was.
    """
    view = copy.copy(engine)
    view.backbone = copy.copy(engine.backbone)
    view.solver = copy.copy(engine.solver)
    view.sampler = engine.sampler.rebind(
        view.backbone, view.solver, replace(engine.options, **changes)
    )
    return view


__all__ = [
    "CONTROL_DECLARATION",
    "Condition",
    "ConditionModel",
    "ControlConfig",
    "EngineOptions",
    "InvertedImage",
    "MaskConfig",
    "MasaCtrlEngine",
    "MasaCtrlResult",
    "RunStats",
    "SequenceResult",
    "declared_control",
    "declared_vocabulary",
    "detect_family",
    "with_options",
]
