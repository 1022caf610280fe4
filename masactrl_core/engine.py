"""The MasaCtrl engine: DDIM inversion plus mutual self-attention control on SD-family UNets.

Families: ``sd`` (SD1.x/2.x-shaped: one CLIP text encoder) and ``sdxl`` (two text encoders, a
pooled embedding and added time ids). Sampling is DDIM with eta 0 under the checkpoint's
``prediction_type`` (epsilon or v_prediction) and timestep spacing; inversion is the exact
algebraic inverse of each sampling step for the model output it gets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

# From their modules: mypy reads diffusers' top-level names as its no-torch placeholders.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from PIL import Image, ImageOps

from masactrl_core.attention import (
    BatchLayout,
    CrossAttentionMapProcessor,
    MutualAttentionState,
    MutualSelfAttentionProcessor,
    block_levels,
    cross_attention_name,
    install_processors,
    self_attention_layers,
)
from masactrl_core.conditions import (
    Condition,
    ConditionModel,
    ConditionRun,
    PreparedCondition,
    check_compatible,
    load_condition_model,
    prepare_condition,
)
from masactrl_core.errors import InvalidInput, JobCancelled, ModelLoadError
from masactrl_core.lora import LoraAdapters
from masactrl_core.masks import ManualMasks, MaskConfig, WordMasks, word_positions
from masactrl_core.previews import LatentsCallback
from masactrl_core.single_file import is_single_file, load_single_file_pipeline

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
CancelCheck = Callable[[], bool]
# Called with (index, image) as each image of a run is decoded.
ImageCallback = Callable[[int, Image.Image], None]

MAX_TARGETS = 8
# The fallback control of callers that pass none (the service and the CLI always pass one,
# resolved from the model catalog by masactrl_jobs.control): the MasaCtrl paper's start step 4,
# and its start layer 10 of SD's 16 blocks kept at the same depth of any other UNet (44 of SDXL's
# 70). A rule of the UNet's shape, not a table of families, so it cannot drift from the catalog's.
PAPER_START_STEP = 4
PAPER_START_DEPTH = 10 / 16
PREDICTION_TYPES = ("epsilon", "v_prediction")
# A checkpoint folder may declare its own default control, e.g. {"start_step": 4, "start_layer":
# 10}: a small UNet whose blocks sit at other depths than SD's says where "the decoder's later
# blocks" are, instead of the depth rule guessing. masactrl_jobs.catalog reads the same file.
CONTROL_DECLARATION = "masactrl.json"


@dataclass(frozen=True)
class ControlConfig:
    """Where mutual self-attention applies: denoising steps and transformer blocks.

    Blocks are numbered 0..L-1 in execution order (down, mid, up); step 0 is the noisiest.
    ``steps`` / ``layers`` lists override the ``start_step`` / ``start_layer`` ranges.
    ``start_step == steps`` (or ``steps=[]``) disables the control. ``start_layer=None`` is the
    model's default (``engine.default_control``): a depth, not SD 1.5's block 10.
    """

    start_step: int = PAPER_START_STEP
    start_layer: int | None = None
    layers: Sequence[int] | None = None
    steps: Sequence[int] | None = None

    def resolve(self, num_steps: int, block_count: int) -> tuple[frozenset[int], frozenset[int]]:
        """The controlled steps and layers, checked against this run and model."""
        if self.steps is None:
            if not 0 <= self.start_step <= num_steps:
                raise InvalidInput(
                    f"start_step must be between 0 and {num_steps} (the number of steps), "
                    f"got {self.start_step}"
                )
            steps = frozenset(range(self.start_step, num_steps))
        else:
            bad = [s for s in self.steps if not 0 <= s < num_steps]
            if bad:
                raise InvalidInput(
                    f"control steps must be between 0 and {num_steps - 1}, got {bad}"
                )
            steps = frozenset(self.steps)
        if self.layers is None:
            if self.start_layer is None:
                return steps, frozenset(range(paper_start_layer(block_count), block_count))
            if not 0 <= self.start_layer < block_count:
                raise InvalidInput(
                    f"start_layer must be between 0 and {block_count - 1} "
                    f"(this model has {block_count} transformer blocks), got {self.start_layer}"
                )
            layers = frozenset(range(self.start_layer, block_count))
        else:
            bad = [layer for layer in self.layers if not 0 <= layer < block_count]
            if bad:
                raise InvalidInput(
                    f"control layers must be between 0 and {block_count - 1} "
                    f"(this model has {block_count} transformer blocks), got {bad}"
                )
            layers = frozenset(self.layers)
        return steps, layers


@dataclass(frozen=True)
class EngineOptions:
    """Switches for the optimizations; each gives the same images as the plain path."""

    share_source_branch: bool = True
    skip_redundant_guidance: bool = True
    max_batch: int = 16
    # Longest sequence a call accepts; memory is bounded by max_batch, time grows with frames.
    max_sequence_frames: int = 120

    def __post_init__(self) -> None:
        if self.max_batch < 2:
            raise ValueError("max_batch must be at least 2 (a source and a target)")
        if self.max_sequence_frames < 1:
            raise ValueError("max_sequence_frames must be at least 1")


@dataclass
class RunStats:
    unet_image_evals: int = 0
    # ControlNet row evaluations, or T2I-Adapter image encodings (once per distinct image).
    condition_evals: int = 0
    inversion_seconds: float = 0.0
    denoise_seconds: float = 0.0
    peak_memory_bytes: int | None = None


@dataclass
class InvertedImage:
    """x_T of a real image after DDIM inversion, with what it depends on.

    ``trajectory`` (float32, shape (steps + 1, C, h, w)) holds the latents after each inversion
    step: ``trajectory[0]`` is the clean image, ``trajectory[steps]`` is x_T. Anchored editing
    resets the source to ``trajectory[steps - i]`` at denoising step ``i``. Inversions made
    before it existed, or stored without it, have ``None``.
    """

    latents: torch.Tensor
    steps: int
    width: int
    height: int
    source_prompt: str
    trajectory: torch.Tensor | None = None

    @property
    def has_trajectory(self) -> bool:
        return self.trajectory is not None

    def without_trajectory(self) -> InvertedImage:
        """The same inversion without its trajectory: a smaller cache entry, no anchoring."""
        return replace(self, trajectory=None)

    def to_safetensors_bytes(self) -> bytes:
        from safetensors.torch import save

        metadata = {
            "steps": str(self.steps),
            "width": str(self.width),
            "height": str(self.height),
            "source_prompt": self.source_prompt,
            # Readable without loading the tensors, so a cache can tell the two kinds apart.
            "trajectory": "true" if self.has_trajectory else "false",
        }
        tensors = {"latents": self.latents.detach().float().cpu().contiguous()}
        if self.trajectory is not None:
            tensors["trajectory"] = self.trajectory.detach().float().cpu().contiguous()
        return save(tensors, metadata)

    @classmethod
    def from_safetensors_bytes(cls, data: bytes) -> InvertedImage:
        from safetensors.torch import load

        tensors = load(data)
        # The format is an 8-byte length, then a JSON header holding our string metadata.
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
        return cls(
            latents=tensors["latents"],
            steps=int(metadata["steps"]),
            width=int(metadata["width"]),
            height=int(metadata["height"]),
            source_prompt=metadata["source_prompt"],
            trajectory=tensors.get("trajectory"),
        )


@dataclass
class MasaCtrlResult:
    source: Image.Image
    targets: list[Image.Image]
    stats: RunStats
    inverted: InvertedImage | None = None
    latents: torch.Tensor | None = None  # final [source, targets] latents, before decoding
    # With masks: the masks used, by name ("source_region_K", "target_I_region_K"), image-sized.
    masks: dict[str, Image.Image] | None = None


@dataclass
class SequenceResult:
    """A sequence's source image and one frame per condition frame, in the frames' order."""

    source: Image.Image
    frames: list[Image.Image]
    stats: RunStats
    inverted: InvertedImage | None = None
    latents: torch.Tensor | None = None  # final [source, frames] latents, before decoding


@dataclass
class _Conditioning:
    """Text conditioning for a set of UNet rows (prompt embeddings plus any added conditioning)."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, index: torch.Tensor | list[int]) -> _Conditioning:
        return _Conditioning(self.embeds[index], {k: v[index] for k, v in self.added.items()})

    @staticmethod
    def cat(parts: Sequence[_Conditioning]) -> _Conditioning:
        return _Conditioning(
            torch.cat([p.embeds for p in parts]),
            {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added},
        )

    def same_as(self, other: _Conditioning) -> bool:
        return torch.equal(self.embeds, other.embeds) and all(
            torch.equal(v, other.added[k]) for k, v in self.added.items()
        )


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


def paper_start_layer(block_count: int) -> int:
    """The paper's start layer 10 of SD 1.5's 16 blocks, kept at the same depth of this model."""
    return min(round(block_count * PAPER_START_DEPTH), block_count - 1)


def detect_family(config: dict[str, Any]) -> str:
    """``sdxl`` for checkpoints with SDXL's second text encoder or pipeline class, else ``sd``."""
    class_name = config.get("_class_name", "")
    return "sdxl" if "text_encoder_2" in config or "XL" in class_name else "sd"


def declared_control(folder: str | os.PathLike[str]) -> ControlConfig | None:
    """The default control a checkpoint folder declares in ``masactrl.json``, if it has one."""
    path = os.path.join(folder, CONTROL_DECLARATION)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        return ControlConfig(
            start_step=int(data["start_step"]), start_layer=int(data["start_layer"])
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"{path} must be JSON with integer start_step and start_layer ({error})"
        ) from error


def _looks_like_local_path(model: str) -> bool:
    # "owner/name" is a hub id; anything rooted, relative or deeper is a folder.
    windows_separator = os.sep != "/" and os.sep in model
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or windows_separator


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
    ) -> None:
        self.pipeline = pipeline
        self.unet: UNet2DConditionModel = pipeline.unet
        self.vae = pipeline.vae
        self.family = family
        self.model_name = model_name
        self.options = options or EngineOptions()
        # DDIM with eta 0 and no clipping: inversion must be the exact inverse of each step.
        self.scheduler = DDIMScheduler.from_config(
            pipeline.scheduler.config, clip_sample=False, thresholding=False
        )
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(
                f"prediction_type {self.prediction_type!r} is not supported; expected one of "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        # SDXL checkpoints may encode an empty negative prompt as zeros, not as the text "".
        self.force_zeros_for_empty_prompt = family == "sdxl" and bool(
            getattr(pipeline.config, "force_zeros_for_empty_prompt", False)
        )
        # The fp16 SDXL VAE overflows; diffusers' SDXL pipeline upcasts it when its config says so.
        if (
            family == "sdxl"
            and self.vae.dtype == torch.float16
            and getattr(self.vae.config, "force_upcast", False)
        ):
            self.vae.to(torch.float32)
        self.layer_names = self_attention_layers(self.unet)
        self.block_count = len(self.layer_names)
        self.block_levels = block_levels(self.unet, self.layer_names)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        downsamplers = sum(
            1 for block in self.unet.down_blocks if getattr(block, "downsamplers", None)
        )
        self.size_multiple = self.vae_scale_factor * 2**downsamplers
        sample_size = self.unet.config.sample_size
        native = sample_size if isinstance(sample_size, int) else sample_size[0]
        self.native_size = (native * self.vae_scale_factor, native * self.vae_scale_factor)
        declared_layer = None if default_control is None else default_control.start_layer
        if declared_layer is not None and declared_layer >= self.block_count:
            raise ModelLoadError(
                f"{model_name or 'the model'} declares start_layer {declared_layer},"
                f" but its UNet has {self.block_count} self-attention blocks"
            )
        self.default_control = default_control or ControlConfig(
            start_step=PAPER_START_STEP, start_layer=paper_start_layer(self.block_count)
        )
        # LoRA adapters, loaded once each and active only inside ``loras.activated(...)``.
        self.loras = LoraAdapters(pipeline)
        self.processor_class: type[MutualSelfAttentionProcessor] = MutualSelfAttentionProcessor
        # Installed on the cross-attention of the blocks automatic masks read.
        self.cross_processor_class: type = CrossAttentionMapProcessor
        self._lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        options: EngineOptions | None = None,
    ) -> MasaCtrlEngine:
        """Load a hub id, a local diffusers folder (SD1.x/2.x- or SDXL-shaped) or a checkpoint
        file (:meth:`from_single_file` with its defaults)."""
        model = str(model)
        if is_single_file(model):
            return cls.from_single_file(model, device=device, dtype=dtype, options=options)
        device, dtype = _device_and_dtype(device, dtype)
        if not os.path.exists(model) and _looks_like_local_path(model):
            raise ModelLoadError(f"model folder {model} does not exist")
        if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ModelLoadError(f"{model} is not a diffusers checkpoint (no model_index.json)")
        try:
            # diffusers annotates the (config, unused kwargs) pair of return_unused_kwargs=True.
            config: dict[str, Any] = DiffusionPipeline.load_config(model)  # type: ignore[assignment]
        except Exception as error:  # hub or file errors: one sentence for the caller
            raise ModelLoadError(f"cannot load model {model}: {error}") from error
        family = detect_family(config)
        loader: type[DiffusionPipeline]
        extra: dict[str, object]
        if family == "sdxl":
            if not (config.get("text_encoder") or [None])[0]:
                raise ModelLoadError(
                    f"{model} has no first text encoder (an SDXL refiner?); MasaCtrl needs a "
                    "base checkpoint"
                )
            from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
                StableDiffusionXLPipeline,
            )

            loader, extra = StableDiffusionXLPipeline, {"add_watermarker": False}
        else:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
                StableDiffusionPipeline,
            )

            loader = StableDiffusionPipeline
            extra = {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipeline = loader.from_pretrained(model, dtype=dtype, **extra)
        except Exception as error:
            raise ModelLoadError(f"cannot load model {model}: {error}") from error
        pipeline.to(device)
        # diffusers leaves set_progress_bar_config unannotated.
        pipeline.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
        logger.info("loaded %s (%s) on %s as %s", model, family, device, dtype)
        declared = declared_control(model) if os.path.isdir(model) else None
        return cls(
            pipeline, family=family, model_name=model, options=options, default_control=declared
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
    ) -> MasaCtrlEngine:
        """Load one checkpoint file in the original SD layout (see ``masactrl_core.single_file``).

        ``config``: a diffusers config folder (offline) or hub id, else the family's reference
        config from the Hugging Face cache; ``family``: the declared family, checked against the
        file; ``prediction_type``: declared, else detected; ``allow_pickle``: accept ``.ckpt``.
        """
        device, dtype = _device_and_dtype(device, dtype)
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
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
        logger.info("loaded %s (%s) on %s as %s", path, info.generation, device, dtype)
        return cls(pipeline, family=info.family, model_name=str(path), options=options)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def load_condition_model(self, path_or_id: str | os.PathLike[str]) -> ConditionModel:
        """Load a ControlNet or T2I-Adapter for this model, on its device and in its dtype.

        The class comes from the model's config. A model made for another family or with other
        shapes is refused here, before any run. Loading is slow: callers keep the result.
        """
        name = str(path_or_id)
        if not os.path.exists(name) and _looks_like_local_path(name):
            raise ModelLoadError(f"condition model folder {name} does not exist")
        condition = load_condition_model(name, device=self.device, dtype=self.dtype)
        check_compatible(condition, self.family, self.unet.config, self.vae_scale_factor)
        return condition

    # -- public calls ----------------------------------------------------------------------

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
        return self._synthesis(
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
            target_limit=MAX_TARGETS,
            on_latents=on_latents,
        )

    def _synthesis(
        self,
        source_prompt: str,
        target_prompts: Sequence[str],
        *,
        seed: int,
        steps: int,
        guidance_scale: float,
        negative_prompt: str,
        width: int | None,
        height: int | None,
        control: ControlConfig | None,
        progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        masks: MaskConfig | None,
        condition: Condition | None,
        target_limit: int,
        on_image: ImageCallback | None = None,
        on_latents: LatentsCallback | None = None,
    ) -> MasaCtrlResult:
        """:meth:`synthesize` for up to ``target_limit`` targets."""
        width, height = self._check_size(width, height)
        target_prompts = self._check_prompts(target_prompts, steps, guidance_scale, target_limit)
        controlled = self._resolve_control(control, steps)
        plan = self._prepare_masks(masks, source_prompt, target_prompts, width, height, controlled)
        prepared = self._prepare_condition(condition, len(target_prompts), steps, width, height)
        noise = self.initial_noise(seed, width, height)
        return self._generate(
            noise,
            source_prompt,
            target_prompts,
            negative_prompt,
            steps,
            guidance_scale,
            controlled,
            plan,
            self._start_stats(),
            progress,
            should_cancel,
            condition=prepared,
            on_image=on_image,
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
        """Deterministic DDIM inversion of a real image to x_T."""
        width, height = self._check_size(width, height)
        self._check_steps(steps)
        with self._lock, torch.inference_mode():
            latents = self._encode_image(image, width, height)
        return self.invert_latents(
            latents,
            source_prompt=source_prompt,
            negative_prompt=negative_prompt,
            steps=steps,
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
        """DDIM inversion of clean latents (VAE posterior × scaling factor, shape (1, C, h, w))."""
        self._check_steps(steps)
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        self._check_size(width, height)
        with self._lock, torch.inference_mode():
            inverted = self._invert(
                latents.to(self.device),
                source_prompt,
                negative_prompt,
                steps,
                inversion_guidance_scale,
                stats or RunStats(),
                progress,
                should_cancel,
            )
        # Contiguous, like a round trip through safetensors: a cached inversion then denoises
        # bit-for-bit like a fresh one (convolutions round differently per memory layout).
        trajectory = inverted.float().cpu().contiguous()
        latents = trajectory[-1:].clone()
        return InvertedImage(latents, steps, width, height, source_prompt, trajectory)

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

        ``seed`` is recorded only: inversion and DDIM (eta 0) sampling are deterministic.
        ``image`` may be ``None`` when a cached ``inverted`` is given. ``condition`` guides the
        targets' layout (never the source's). ``anchor_source`` resets the source latent to the
        inversion trajectory at every step, so targets read the photo's own keys and values
        (the inversion must have its trajectory).
        """
        return self._edit(
            image,
            target_prompts,
            source_prompt=source_prompt,
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
            target_limit=MAX_TARGETS,
            on_latents=on_latents,
        )

    def _edit(
        self,
        image: Image.Image | None,
        target_prompts: Sequence[str],
        *,
        source_prompt: str,
        steps: int,
        guidance_scale: float,
        negative_prompt: str,
        width: int | None,
        height: int | None,
        control: ControlConfig | None,
        inversion_guidance_scale: float,
        inverted: InvertedImage | None,
        progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        masks: MaskConfig | None,
        condition: Condition | None,
        anchor_source: bool,
        target_limit: int,
        on_image: ImageCallback | None = None,
        on_latents: LatentsCallback | None = None,
    ) -> MasaCtrlResult:
        """:meth:`edit` for up to ``target_limit`` targets."""
        width, height = self._check_size(width, height)
        target_prompts = self._check_prompts(target_prompts, steps, guidance_scale, target_limit)
        controlled = self._resolve_control(control, steps)
        if inverted is not None and (inverted.steps, inverted.width, inverted.height) != (
            steps,
            width,
            height,
        ):
            raise InvalidInput("the cached inversion was made with other steps or size")
        if inverted is None and image is None:
            raise InvalidInput("give an image to edit (or a cached inversion of it)")
        if anchor_source and inverted is not None and not inverted.has_trajectory:
            raise InvalidInput(
                "anchor_source needs the inversion's trajectory, and this cached inversion has "
                "none; invert the image again"
            )
        # Masks and conditions are checked before the inversion: bad ones must not cost one.
        plan = self._prepare_masks(masks, source_prompt, target_prompts, width, height, controlled)
        prepared = self._prepare_condition(
            condition, len(target_prompts), steps, width, height, editing=True
        )
        stats = self._start_stats()
        if inverted is None:
            assert image is not None  # checked above
            inverted = self.invert(
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
        return self._generate(
            inverted.latents.to(self.device, self.dtype),
            source_prompt,
            target_prompts,
            negative_prompt,
            steps,
            guidance_scale,
            controlled,
            plan,
            stats,
            progress,
            should_cancel,
            inverted,
            condition=prepared,
            anchor=inverted.trajectory if anchor_source else None,
            on_image=on_image,
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
        frames = self._sequence_frames(condition)
        prompts = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
        if len(prompts) == 1:
            prompts = prompts * len(frames)
        if len(prompts) != len(frames):
            raise InvalidInput(
                f"give one target prompt for all frames or one per frame ({len(frames)}), "
                f"got {len(prompts)}"
            )
        condition = replace(condition, images=frames)

        def decoded(index: int, decoded_image: Image.Image) -> None:
            # Image 0 is the source; frame k is image k + 1.
            if on_frame is not None and index > 0:
                on_frame(index - 1, decoded_image)

        if image is None and inverted is None:
            if anchor_source:
                raise InvalidInput("anchor_source needs an image source (image or inverted)")
            result = self._synthesis(
                source_prompt,
                prompts,
                seed=seed,
                steps=steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
                control=control,
                progress=progress,
                should_cancel=should_cancel,
                masks=None,
                condition=condition,
                target_limit=self.options.max_sequence_frames,
                on_image=decoded,
                on_latents=on_latents,
            )
        else:
            result = self._edit(
                image,
                prompts,
                source_prompt=source_prompt,
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
                masks=None,
                condition=condition,
                anchor_source=anchor_source,
                target_limit=self.options.max_sequence_frames,
                on_image=decoded,
                on_latents=on_latents,
            )
        return SequenceResult(
            result.source, result.targets, result.stats, result.inverted, result.latents
        )

    def _sequence_frames(self, condition: Condition) -> list[Image.Image]:
        """The condition frames of a sequence, checked against the frame limit."""
        if not isinstance(condition, Condition):
            raise InvalidInput("a sequence needs a Condition holding its condition frames")
        images = condition.images
        frames = [images] if isinstance(images, Image.Image) else list(images)
        limit = self.options.max_sequence_frames
        if not frames:
            raise InvalidInput("a sequence needs at least one condition frame")
        if len(frames) > limit:
            raise InvalidInput(
                f"a sequence takes at most {limit} condition frames, got {len(frames)}"
            )
        return frames

    def _generate(
        self,
        noise: torch.Tensor,
        source_prompt: str,
        target_prompts: list[str],
        negative_prompt: str,
        steps: int,
        guidance_scale: float,
        controlled: tuple[frozenset[int], frozenset[int]],
        plan: ManualMasks | WordMasks | None,
        stats: RunStats,
        progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        inverted: InvertedImage | None = None,
        *,
        condition: PreparedCondition | None = None,
        anchor: torch.Tensor | None = None,
        on_image: ImageCallback | None = None,
        on_latents: LatentsCallback | None = None,
    ) -> MasaCtrlResult:
        """Denoise [source, targets] from ``noise`` under the control, then decode."""
        with self._lock, torch.inference_mode():
            latents = self._denoise(
                noise,
                source_prompt,
                target_prompts,
                negative_prompt,
                steps,
                guidance_scale,
                controlled,
                stats,
                progress,
                should_cancel,
                plan,
                condition=condition,
                anchor=None if anchor is None else anchor.to(self.device, self.dtype),
                on_latents=on_latents,
            )
            images = self._decode(latents, on_image)
            self._finish_stats(stats)
        return MasaCtrlResult(
            images[0],
            images[1:],
            stats,
            inverted,
            latents.float().cpu(),
            masks=None if plan is None else plan.images(len(target_prompts)),
        )

    def initial_noise(self, seed: int, width: int, height: int) -> torch.Tensor:
        """The seed contract: float32 CPU noise, then moved to the device and dtype."""
        shape = (
            1,
            # diffusers types config as a dict; its FrozenDict also exposes keys as attributes.
            self.unet.config.in_channels,  # type: ignore[attr-defined]
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return noise.to(self.device, self.dtype)

    def block_grid(self, block: int, width: int, height: int) -> tuple[int, int]:
        """The (h, w) token grid of transformer block ``block`` for an image of this size."""
        scale = self.vae_scale_factor * 2 ** self.block_levels[block]
        # Each downsampler (stride 2, padding 1) rounds up: ceil of the exact ratio.
        return math.ceil(height / scale), math.ceil(width / scale)

    # -- checks ----------------------------------------------------------------------------

    def _check_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        width = self.native_size[0] if width is None else width
        height = self.native_size[1] if height is None else height
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % self.size_multiple:
                raise InvalidInput(
                    f"{name} must be a positive multiple of {self.size_multiple} for this model, "
                    f"got {value}"
                )
        return width, height

    def _resolve_control(
        self, control: ControlConfig | None, steps: int
    ) -> tuple[frozenset[int], frozenset[int]]:
        if control is None:
            # The library fallback (see PAPER_START_STEP) adapts to short runs; explicit values
            # out of range are errors.
            start = min(self.default_control.start_step, steps)
            control = replace(self.default_control, start_step=start)
        elif control.start_layer is None:
            control = replace(control, start_layer=self.default_control.start_layer)
        return control.resolve(steps, self.block_count)

    @staticmethod
    def _check_steps(steps: int) -> None:
        if not 1 <= steps <= 1000:
            raise InvalidInput(f"steps must be between 1 and 1000, got {steps}")

    def _check_prompts(
        self,
        target_prompts: Sequence[str],
        steps: int,
        guidance_scale: float,
        limit: int = MAX_TARGETS,
    ) -> list[str]:
        self._check_steps(steps)
        if isinstance(target_prompts, str):
            target_prompts = [target_prompts]
        if not 1 <= len(target_prompts) <= limit:
            raise InvalidInput(
                f"give between 1 and {limit} target prompts, got {len(target_prompts)}"
            )
        if guidance_scale < 0:
            raise InvalidInput(f"guidance_scale must not be negative, got {guidance_scale}")
        return list(target_prompts)

    def _prepare_masks(
        self,
        config: MaskConfig | None,
        source_prompt: str,
        target_prompts: list[str],
        width: int,
        height: int,
        controlled: tuple[frozenset[int], frozenset[int]],
    ) -> ManualMasks | WordMasks | None:
        """Validate the mask options before any sampling and turn them into a per-run plan."""
        if config is None:
            return None
        if not isinstance(config, MaskConfig):
            raise InvalidInput("masks must be a MaskConfig")
        config.check()
        controlled_steps, controlled_layers = controlled
        if not config.automatic:
            plan = ManualMasks.prepare(config, width, height, self.device)
            if controlled_steps:
                grids: dict[tuple[int, int], int] = {}
                for block in sorted(controlled_layers):
                    grids.setdefault(self.block_grid(block, width, height), block)
                plan.check_grids(grids)
            return plan
        latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        map_grid = (latent[0] // 4, latent[1] // 4)
        processors = self.unet.attn_processors
        map_blocks = tuple(
            block
            for block, name in enumerate(self.layer_names)
            if self.block_grid(block, width, height) == map_grid
            and cross_attention_name(name) in processors
        )
        if not map_blocks or latent[0] % 4 or latent[1] % 4:
            raise InvalidInput(
                f"this model has no cross-attention on the {map_grid[1]}x{map_grid[0]} token grid "
                "(a quarter of the latent grid) that automatic masks are made from"
            )
        tokenizer = self.pipeline.tokenizer
        weights = torch.zeros(len(target_prompts) + 1, tokenizer.model_max_length)
        roles = [("source", source_prompt, config.source_word)] + [
            ("target", prompt, config.target_word) for prompt in target_prompts
        ]
        for image, (role, prompt, word) in enumerate(roles):
            assert word is not None  # config.check() requires both words
            weights[image, word_positions(tokenizer, prompt, word, role)] = 1.0
        return WordMasks(
            weights.to(self.device), config.threshold, map_grid, map_blocks, width, height
        )

    def _prepare_condition(
        self,
        condition: Condition | None,
        targets: int,
        steps: int,
        width: int,
        height: int,
        *,
        editing: bool = False,
    ) -> PreparedCondition | None:
        """Check a condition before any sampling: model fit, images, window."""
        if condition is None:
            return None
        prepared = prepare_condition(
            condition, targets=targets, steps=steps, width=width, height=height, editing=editing
        )
        check_compatible(condition.model, self.family, self.unet.config, self.vae_scale_factor)
        return prepared

    # -- pieces ----------------------------------------------------------------------------

    def _image_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """(width, height) in pixels of latents of this model."""
        return latents.shape[-1] * self.vae_scale_factor, latents.shape[-2] * self.vae_scale_factor

    def _time_ids(self, width: int, height: int, count: int) -> torch.Tensor:
        """SDXL's added time ids: original size, crop top-left, target size, each (h, w)."""
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype)
        return ids.to(self.device).expand(count, -1)

    def _encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> _Conditioning:
        """Conditioning per prompt; equal prompts get bitwise-equal rows (encoded once)."""
        unique = list(dict.fromkeys(prompts))
        if self.family == "sdxl":
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                unique, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )  # fmt: skip
            added = {
                "text_embeds": pooled.to(self.dtype),
                "time_ids": self._time_ids(*size, len(unique)),
            }
            encoded = _Conditioning(embeds.to(self.dtype), added)
        else:
            embeds, _ = self.pipeline.encode_prompt(
                unique, self.device, 1, do_classifier_free_guidance=False
            )
            encoded = _Conditioning(embeds)
        return encoded.rows([unique.index(p) for p in prompts])

    def _conditioning(
        self, prompts: Sequence[str], negative_prompt: str, size: tuple[int, int]
    ) -> tuple[_Conditioning, _Conditioning]:
        """Conditioning of ``prompts`` and the unconditional (negative-prompt) conditioning."""
        if self.force_zeros_for_empty_prompt and negative_prompt == "":
            # What StableDiffusionXLPipeline does without a negative prompt: zero embeddings.
            encoded = self._encode_prompts(prompts, size)
            first = encoded.rows([0])
            added = {**first.added, "text_embeds": torch.zeros_like(first.added["text_embeds"])}
            return encoded, _Conditioning(torch.zeros_like(first.embeds), added)
        encoded = self._encode_prompts([*prompts, negative_prompt], size)
        n = len(prompts)
        return encoded.rows(list(range(n))), encoded.rows([n])

    def _encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """Center-crop to the aspect, resize, and take the VAE posterior mean × scaling factor."""
        image = ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
        pixels = self.pipeline.image_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(self.device, self.vae.dtype)
        latents: torch.Tensor = self.vae.encode(pixels).latent_dist.mean
        scaling: float = self.vae.config.scaling_factor  # the pipeline's components are untyped
        return (latents * scaling).to(self.dtype)

    def _decode(
        self, latents: torch.Tensor, on_image: ImageCallback | None = None
    ) -> list[Image.Image]:
        images: list[Image.Image] = []
        # One image at a time keeps the VAE's peak memory independent of the number of targets.
        # torch leaves Tensor.split unannotated.
        for index, row in enumerate(latents.split(1)):  # type: ignore[no-untyped-call]
            decoded = self.vae.decode(
                row.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False
            )[0]
            images.extend(self.pipeline.image_processor.postprocess(decoded, output_type="pil"))
            if on_image is not None:
                on_image(index, images[-1])
        return images

    def _unet(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: _Conditioning,
        residuals: dict[str, object] | None = None,
    ) -> torch.Tensor:
        """One UNet call; ``residuals`` are a condition model's extra UNet arguments."""
        output: torch.Tensor = self.unet(
            latents,
            timestep,
            encoder_hidden_states=cond.embeds,
            added_cond_kwargs=cond.added or None,
            return_dict=False,
            **(residuals or {}),
        )[0]
        return output

    def _inversion_steps(self, steps: int) -> Iterator[tuple[torch.Tensor, float, float]]:
        """(t, ᾱ_t, ᾱ_prev) for each sampling step, in inversion order (least noisy first).

        The pairs are the sampler's own (DDIM steps from t to t - T // steps, whatever the
        spacing), so inverting step by step retraces exactly the steps sampling takes.
        """
        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        ratio = scheduler.config.num_train_timesteps // steps
        alphas = scheduler.alphas_cumprod
        for timestep in reversed(scheduler.timesteps):
            previous = int(timestep) - ratio
            alpha_prev = alphas[previous] if previous >= 0 else scheduler.final_alpha_cumprod
            yield timestep, float(alphas[int(timestep)]), float(alpha_prev)

    def _inverse_step(
        self, output: torch.Tensor, alpha: float, alpha_prev: float, sample: torch.Tensor
    ) -> torch.Tensor:
        """x_t from x_prev: the algebraic inverse of DDIM's step (eta 0) for this model output."""
        if self.prediction_type == "v_prediction":
            # DDIM's v step is x_prev = a·x_t + b·v; solve it for x_t.
            a = math.sqrt(alpha_prev * alpha) + math.sqrt((1 - alpha_prev) * (1 - alpha))
            b = math.sqrt((1 - alpha_prev) * alpha) - math.sqrt(alpha_prev * (1 - alpha))
            return (sample - b * output) / a
        original = (sample - math.sqrt(1 - alpha_prev) * output) / math.sqrt(alpha_prev)
        return math.sqrt(alpha) * original + math.sqrt(1 - alpha) * output

    def _invert(
        self,
        latents: torch.Tensor,
        prompt: str,
        negative_prompt: str,
        steps: int,
        guidance_scale: float,
        stats: RunStats,
        progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
    ) -> torch.Tensor:
        """The trajectory (float32, (steps + 1, C, h, w)) from clean ``latents`` to x_T.

        The model sees (x_prev, t) as in the paper's code.
        """
        started = time.perf_counter()
        size = self._image_size(latents)
        cond, uncond = self._conditioning([prompt], negative_prompt, size)
        guided = guidance_scale != 1.0
        if guided:
            # Guidance between identical branches is the identity: one UNet image suffices.
            if self.options.skip_redundant_guidance and uncond.same_as(cond):
                guided = False
            else:
                cond = _Conditioning.cat([uncond, cond])
        # The trajectory is kept in float32; only the UNet sees the model's dtype.
        sample = latents.float()
        trajectory = [sample[0]]
        for index, (timestep, alpha, alpha_prev) in enumerate(self._inversion_steps(steps)):
            if should_cancel is not None and should_cancel():
                raise JobCancelled("the run was cancelled during inversion")
            model_input = sample.to(self.dtype)
            if guided:
                model_input = torch.cat([model_input, model_input])
            output = self._unet(model_input, timestep, cond).float()
            stats.unet_image_evals += model_input.shape[0]
            if guided:
                uncond_out, cond_out = output.chunk(2)
                output = uncond_out + guidance_scale * (cond_out - uncond_out)
            sample = self._inverse_step(output, alpha, alpha_prev, sample)
            trajectory.append(sample[0])
            if progress is not None:
                progress("invert", index + 1, steps)
        stats.inversion_seconds += time.perf_counter() - started
        return torch.stack(trajectory)

    def _row_plan(
        self,
        source: _Conditioning,
        targets: _Conditioning,
        uncond: _Conditioning | None,
    ) -> tuple[list[int], _Conditioning, list[int], list[int], list[tuple[int, int]]]:
        """Rows of one denoising step.

        Returns, per row, the latent it denoises, the conditioning, the source slot it reads,
        the rows holding sources, and how to combine rows into one prediction per latent
        (``(uncond_row, cond_row)``; equal rows mean no guidance for that latent).
        """
        n = targets.embeds.shape[0]
        if uncond is None:  # no guidance
            latent_of = list(range(n + 1))
            cond = _Conditioning.cat([source, targets])
            return latent_of, cond, [0] * (n + 1), [0], [(i, i) for i in range(n + 1)]
        uncond_targets = _Conditioning.cat([uncond] * n)
        if self.options.share_source_branch and source.same_as(uncond):
            # The source's two guidance halves are the same computation: run it once.
            latent_of = [0, *range(1, n + 1), *range(1, n + 1)]
            cond = _Conditioning.cat([source, uncond_targets, targets])
            pairs = [(0, 0), *((k, k + n) for k in range(1, n + 1))]
            return latent_of, cond, [0] * (2 * n + 1), [0], pairs
        # The authors' layout: [source, targets] for the unconditional half, then the conditional.
        latent_of = [*range(n + 1), *range(n + 1)]
        cond = _Conditioning.cat([uncond, uncond_targets, source, targets])
        slots = [0] * (n + 1) + [1] * (n + 1)
        pairs = [(k, k + n + 1) for k in range(n + 1)]
        return latent_of, cond, slots, [0, n + 1], pairs

    def _denoise(
        self,
        noise: torch.Tensor,
        source_prompt: str,
        target_prompts: list[str],
        negative_prompt: str,
        steps: int,
        guidance_scale: float,
        controlled: tuple[frozenset[int], frozenset[int]],
        stats: RunStats,
        progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        masks: ManualMasks | WordMasks | None = None,
        *,
        condition: PreparedCondition | None = None,
        anchor: torch.Tensor | None = None,
        on_latents: LatentsCallback | None = None,
    ) -> torch.Tensor:
        """Denoise [source, targets]; ``anchor`` is the source's inversion trajectory, if kept."""
        started = time.perf_counter()
        # Adapter features are encoded here, once for the whole run.
        condition_run = (
            None if condition is None else ConditionRun(condition, self.device, self.dtype)
        )
        controlled_steps, controlled_layers = controlled
        n = len(target_prompts)
        size = self._image_size(noise)
        prompts, unconditional = self._conditioning(
            [source_prompt, *target_prompts], negative_prompt, size
        )
        source, targets = prompts.rows([0]), prompts.rows(list(range(1, n + 1)))
        uncond = unconditional if guidance_scale != 1.0 else None
        latent_of, cond, slots, source_rows, pairs = self._row_plan(source, targets, uncond)
        cond_rows = {c for _, c in pairs}

        # Execution order puts the sources first so that later chunks can read their keys, and
        # each target's conditional row before its unconditional one, whose automatic masks come
        # from the conditional row's cross-attention maps.
        rows = len(latent_of)
        order = source_rows + [
            r for u, c in pairs[1:] for r in dict.fromkeys((c, u)) if r not in source_rows
        ]
        size_limit = self.options.max_batch
        chunks = [order[i : i + size_limit] for i in range(0, rows, size_limit)]
        if len(chunks) == 1:
            chunks = [list(range(rows))]
        word_masks = isinstance(masks, WordMasks)
        chunk_plans = []
        for number, chunk in enumerate(chunks):
            chunk_sources = [chunk.index(r) for r in source_rows] if number == 0 else None
            recording = [i for i, r in enumerate(chunk) if r in cond_rows]
            layout = BatchLayout(
                source_rows=None
                if chunk_sources is None
                else torch.tensor(chunk_sources, device=self.device),
                row_slots=torch.tensor([slots[r] for r in chunk], device=self.device),
                keep_sources=len(chunks) > 1,
                row_images=[latent_of[r] for r in chunk] if masks is not None else None,
                map_rows=torch.tensor(recording, device=self.device)
                if word_masks and recording
                else None,
                map_images=[latent_of[chunk[i]] for i in recording],
            )
            chunk_plans.append(
                (
                    torch.tensor(chunk, device=self.device),
                    [latent_of[r] for r in chunk],
                    cond.rows(chunk),
                    layout,
                )
            )

        latent_hw = (noise.shape[-2], noise.shape[-1])
        state = MutualAttentionState(
            controlled_steps, controlled_layers, masks=masks, latent_hw=latent_hw
        )
        recorders = (
            {
                cross_attention_name(self.layer_names[block]): self.cross_processor_class(
                    block, state
                )
                for block in masks.map_blocks
            }
            if isinstance(masks, WordMasks) and controlled_steps
            else None
        )
        original = install_processors(
            self.unet,
            self.layer_names,
            state,
            self.processor_class,
            controlled_layers,
            extra=recorders,
        )
        try:
            self.scheduler.set_timesteps(steps, device=self.device)
            latents = noise.expand(n + 1, *noise.shape[1:]).clone()
            for index, timestep in enumerate(self.scheduler.timesteps):
                if should_cancel is not None and should_cancel():
                    raise JobCancelled("the run was cancelled during denoising")
                state.begin_step(index)
                if anchor is not None:
                    # The authors' ref_intermediate_latents[-1 - i]: the photo's own latent at t_i.
                    latents[0] = anchor[steps - index]
                outputs = torch.empty(
                    (rows, *latents.shape[1:]), device=latents.device, dtype=latents.dtype
                )
                for row_index, latent_index, chunk_cond, layout in chunk_plans:
                    state.layout = layout
                    model_input = self.scheduler.scale_model_input(latents[latent_index], timestep)
                    residuals = (
                        None
                        if condition_run is None
                        else condition_run.unet_kwargs(
                            index,
                            latent_index,
                            model_input,
                            timestep,
                            chunk_cond.embeds,
                            chunk_cond.added,
                        )
                    )
                    outputs[row_index] = self._unet(model_input, timestep, chunk_cond, residuals)
                    stats.unet_image_evals += len(latent_index)
                state.layout = None
                guided_outputs = torch.stack(
                    [
                        outputs[c]
                        if u == c
                        else outputs[u] + guidance_scale * (outputs[c] - outputs[u])
                        for u, c in pairs
                    ]
                )
                stepped = self.scheduler.step(guided_outputs, timestep, latents)
                latents = stepped.prev_sample
                if progress is not None:
                    progress("denoise", index + 1, steps)
                if on_latents is not None:
                    # DDIM's x̂₀ of this step, which it computes anyway on the way to x_{t-1}.
                    on_latents(index + 1, steps, stepped.pred_original_sample)
        finally:
            self.unet.set_attn_processor(dict(original))
            state.begin_step(None)
            if condition_run is not None:
                stats.condition_evals += condition_run.evaluations
        stats.denoise_seconds += time.perf_counter() - started
        return latents

    def _start_stats(self) -> RunStats:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return RunStats()

    def _finish_stats(self, stats: RunStats) -> None:
        if self.device.type == "cuda":
            stats.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)

    def describe(self) -> dict[str, Any]:
        """What a run record should say about the model."""
        return {
            "model": self.model_name,
            "family": self.family,
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.scheduler.config.timestep_spacing,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "block_count": self.block_count,
            "native_size": list(self.native_size),
            "size_multiple": self.size_multiple,
            "default_control": asdict(self.default_control),
            "loras": self.loras.active,
        }


def with_options(engine: MasaCtrlEngine, **changes: Any) -> MasaCtrlEngine:
    """A view of ``engine`` with other optimization switches (shares the loaded weights)."""
    view = MasaCtrlEngine.__new__(MasaCtrlEngine)
    view.__dict__.update(engine.__dict__)
    view.options = replace(engine.options, **changes)
    view._lock = threading.Lock()
    return view


__all__ = [
    "Condition",
    "ConditionModel",
    "ControlConfig",
    "EngineOptions",
    "MaskConfig",
    "InvertedImage",
    "MasaCtrlEngine",
    "MasaCtrlResult",
    "RunStats",
    "SequenceResult",
    "declared_control",
]
