"""The MasaCtrl sampler: mutual self-attention over [source, targets], for any backbone and solver.

It holds everything MasaCtrl adds to sampling, and nothing about a model family or a schedule:

* **Rows.** One denoising step evaluates the denoiser on rows: the source and each target, in
  two classifier-free-guidance halves (unconditional, conditional), or only the conditional
  rows when the backbone takes guidance as a model input (``classifier_free_guidance`` False:
  FLUX.1 [dev], :meth:`~masactrl_core.backbones.base.Backbone.with_guidance`). ``_row_plan``
  lays them out, sharing the source's two halves when their conditioning tensors are equal, and
  ``_denoise`` runs them in chunks of at most ``EngineOptions.max_batch`` rows, sources first
  so later chunks read their cached keys and values.
* **Control.** :class:`~masactrl_core.runs.ControlConfig` resolves to controlled steps and blocks
  (numbers in the backbone's execution order). The attention processors of
  :mod:`masactrl_core.attention` are installed under the backbone's ``layer_names`` with
  ``denoiser.set_attn_processor`` for the run and restored after it, cancelled or not; the loop
  tells them the step and the row layout, they never count calls.
* **Masks** (:mod:`masactrl_core.masks`) are checked against the backbone's token grid of every
  controlled block before any work; automatic ones read the cross-attention the backbone names
  (:meth:`~masactrl_core.backbones.base.Backbone.map_layer`) on the quarter grid.
* **Layout conditions, anchoring, sequences, previews, statistics**: a prepared condition is
  handed to the backbone, which feeds its residuals to the denoiser per row; an anchored edit
  resets the source latent to its inversion trajectory at every step; a sequence is a synthesis
  or edit with one target per condition frame; ``on_latents`` gets the solver's x̂₀ of each
  step; :class:`~masactrl_core.runs.RunStats` counts denoiser images and condition evaluations.

The backbone (:mod:`masactrl_core.backbones`) encodes prompts and images, calls the denoiser and
decodes; the solver (:mod:`masactrl_core.solvers`) sets up timesteps, steps and inverts. Neither
the sampler nor its processors assume a UNet, its ``down/mid/up`` naming or DDIM.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from PIL import Image

from masactrl_core.attention import (
    BatchLayout,
    CrossAttentionMapProcessor,
    MutualAttentionState,
    MutualSelfAttentionProcessor,
    install_processors,
)
from masactrl_core.backbones.base import Backbone, Conditioning, ConditionResiduals
from masactrl_core.conditions import Condition, PreparedCondition, prepare_condition
from masactrl_core.errors import InvalidInput, JobCancelled
from masactrl_core.masks import ManualMasks, MaskConfig, WordMasks, word_positions
from masactrl_core.runs import (
    MAX_TARGETS,
    PAPER_START_DEPTH,
    PAPER_START_STEP,
    CancelCheck,
    ControlConfig,
    EngineOptions,
    ImageCallback,
    InvertedImage,
    MasaCtrlResult,
    ProgressCallback,
    RunStats,
    SequenceResult,
    paper_start_layer,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from masactrl_core.previews import LatentsCallback
    from masactrl_core.solvers.base import Solver

__all__ = ["PAPER_START_DEPTH", "PAPER_START_STEP", "MasaCtrlSampler", "paper_default_control"]

# The fallback control of callers that pass none (the service and the CLI always pass one,
# resolved from the model catalog by masactrl_jobs.control): the MasaCtrl paper's start step 4,
# and its start layer 10 of SD's 16 blocks kept at the same depth of any other model (44 of
# SDXL's 70). A rule of the model's shape, not a table of families, so it cannot drift.
Controlled = tuple[frozenset[int], frozenset[int]]


def paper_default_control(block_count: int) -> ControlConfig:
    """The paper's start step and start depth on a model of ``block_count`` blocks."""
    return ControlConfig(
        start_step=PAPER_START_STEP,
        start_layer=paper_start_layer(block_count),
    )


class MasaCtrlSampler:
    """MasaCtrl synthesis, inversion, editing and sequences on one backbone and solver.

    Runs hold a lock: one at a time per sampler (processors are installed on the shared model).
    ``processor_class`` / ``cross_processor_class`` are the attention processors installed on
    controlled blocks and on the cross-attention automatic masks read (tests swap in references).
    """

    def __init__(
        self,
        backbone: Backbone,
        solver: Solver,
        options: EngineOptions,
        default_control: ControlConfig,
    ) -> None:
        self.backbone = backbone
        self.solver = solver
        self.options = options
        self.default_control = default_control
        # The family's mutual-attention processor (MM-DiTs have their own), else the UNets'.
        self.processor_class: type[MutualSelfAttentionProcessor] = (
            backbone.mutual_attention or MutualSelfAttentionProcessor
        )
        self.cross_processor_class: type = CrossAttentionMapProcessor
        self._lock = threading.Lock()

    def rebind(self, backbone: Backbone, solver: Solver, options: EngineOptions) -> MasaCtrlSampler:
        """A sampler with the same settings on another backbone view, solver and options."""
        view = MasaCtrlSampler(backbone, solver, options, self.default_control)
        view.processor_class = self.processor_class
        view.cross_processor_class = self.cross_processor_class
        return view

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

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
        """The engine's ``synthesize`` (documented there: :mod:`masactrl_core.engine`)."""
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
        """The engine's ``invert`` (documented there: :mod:`masactrl_core.engine`)."""
        width, height = self._check_size(width, height)
        self._check_steps(steps)
        with self._lock, torch.inference_mode():
            latents = self.backbone.encode_image(image, width, height)
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
        """The engine's ``invert_latents`` (documented there: :mod:`masactrl_core.engine`)."""
        self._check_steps(steps)
        width, height = self.backbone.image_size(latents)
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
        """The engine's ``edit`` (documented there: :mod:`masactrl_core.engine`)."""
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
        """The engine's ``sequence`` (documented there: :mod:`masactrl_core.engine`)."""
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
        controlled: Controlled,
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
        shape = (1, *self.backbone.latent_shape(width, height))
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return noise.to(self.device, self.dtype)

    # -- checks ----------------------------------------------------------------------------

    def _check_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        native_width, native_height = self.backbone.native_size
        width = native_width if width is None else width
        height = native_height if height is None else height
        multiple = self.backbone.size_multiple
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % multiple:
                raise InvalidInput(
                    f"{name} must be a positive multiple of {multiple} for this model, got {value}"
                )
        return width, height

    def _resolve_control(self, control: ControlConfig | None, steps: int) -> Controlled:
        if control is None:
            # The library fallback (see PAPER_START_STEP) adapts to short runs; explicit values
            # out of range are errors.
            start = min(self.default_control.start_step, steps)
            control = replace(self.default_control, start_step=start)
        elif control.start_layer is None:
            control = replace(control, start_layer=self.default_control.start_layer)
        return control.resolve(steps, self.backbone.block_count)

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
        controlled: Controlled,
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
                    grids.setdefault(self.backbone.block_grid(block, width, height), block)
                plan.check_grids(grids)
            return plan
        backbone = self.backbone
        latent = backbone.latent_shape(width, height)[1:]
        map_grid = (latent[0] // 4, latent[1] // 4)
        map_blocks = tuple(
            block
            for block in range(backbone.block_count)
            if backbone.block_grid(block, width, height) == map_grid
            and backbone.map_layer(block) is not None
        )
        if not map_blocks or latent[0] % 4 or latent[1] % 4:
            raise InvalidInput(
                f"this model has no cross-attention on the {map_grid[1]}x{map_grid[0]} token grid "
                "(a quarter of the latent grid) that automatic masks are made from"
            )
        tokenizer = backbone.tokenizer
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
        if not self.backbone.supports_conditions:
            raise InvalidInput(
                f"layout conditions and sequences are not supported on {self.backbone.family} "
                "models yet"
            )
        prepared = prepare_condition(
            condition, targets=targets, steps=steps, width=width, height=height, editing=editing
        )
        self.backbone.check_condition(condition.model)
        return prepared

    def _decode(
        self, latents: torch.Tensor, on_image: ImageCallback | None = None
    ) -> list[Image.Image]:
        images: list[Image.Image] = []
        for index, image in enumerate(self.backbone.decode(latents)):
            images.append(image)
            if on_image is not None:
                on_image(index, image)
        return images

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
        backbone, solver = self.backbone, self.solver
        size = backbone.image_size(latents)
        cond, uncond = backbone.conditioning([prompt], negative_prompt, size)
        # A guidance-distilled model takes the scale as an input: no unconditional row.
        cond = backbone.with_guidance(cond, guidance_scale)
        guided = guidance_scale != 1.0 and backbone.classifier_free_guidance
        if guided:
            # Guidance between identical branches is the identity: one denoiser image suffices.
            if self.options.skip_redundant_guidance and uncond.same_as(cond):
                guided = False
            else:
                cond = Conditioning.cat([uncond, cond])
        # The trajectory is kept in float32; only the denoiser sees the model's dtype.
        sample = latents.float()
        trajectory = [sample[0]]
        solver.set_image_seq_len(self._image_tokens(*size))
        for index, step in enumerate(solver.inversion_steps(steps, self.device)):
            if should_cancel is not None and should_cancel():
                raise JobCancelled("the run was cancelled during inversion")
            model_input = solver.scale_model_input(sample.to(self.dtype), step.timestep)
            if guided:
                model_input = torch.cat([model_input, model_input])
            output = backbone.predict(model_input, step.timestep, cond).float()
            stats.unet_image_evals += model_input.shape[0]
            if guided:
                uncond_out, cond_out = output.chunk(2)
                output = uncond_out + guidance_scale * (cond_out - uncond_out)
            sample = solver.inverse_step(output, step, sample)
            trajectory.append(sample[0])
            if progress is not None:
                progress("invert", index + 1, steps)
        stats.inversion_seconds += time.perf_counter() - started
        return torch.stack(trajectory)

    def _row_plan(
        self,
        source: Conditioning,
        targets: Conditioning,
        uncond: Conditioning | None,
    ) -> tuple[list[int], Conditioning, list[int], list[int], list[tuple[int, int]]]:
        """Rows of one denoising step.

        Returns, per row, the latent it denoises, the conditioning, the source slot it reads,
        the rows holding sources, and how to combine rows into one prediction per latent
        (``(uncond_row, cond_row)``; equal rows mean no guidance for that latent).
        """
        n = targets.embeds.shape[0]
        if uncond is None:  # no guidance
            latent_of = list(range(n + 1))
            cond = Conditioning.cat([source, targets])
            return latent_of, cond, [0] * (n + 1), [0], [(i, i) for i in range(n + 1)]
        uncond_targets = Conditioning.cat([uncond] * n)
        if self.options.share_source_branch and source.same_as(uncond):
            # The source's two guidance halves are the same computation: run it once.
            latent_of = [0, *range(1, n + 1), *range(1, n + 1)]
            cond = Conditioning.cat([source, uncond_targets, targets])
            pairs = [(0, 0), *((k, k + n) for k in range(1, n + 1))]
            return latent_of, cond, [0] * (2 * n + 1), [0], pairs
        # The authors' layout: [source, targets] for the unconditional half, then the conditional.
        latent_of = [*range(n + 1), *range(n + 1)]
        cond = Conditioning.cat([uncond, uncond_targets, source, targets])
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
        controlled: Controlled,
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
        backbone, solver = self.backbone, self.solver
        condition_run: ConditionResiduals | None = (
            None if condition is None else backbone.start_condition(condition)
        )
        controlled_steps, controlled_layers = controlled
        n = len(target_prompts)
        size = backbone.image_size(noise)
        prompts, unconditional = backbone.conditioning(
            [source_prompt, *target_prompts], negative_prompt, size
        )
        source, targets = prompts.rows([0]), prompts.rows(list(range(1, n + 1)))
        # Classifier-free guidance runs unconditional rows; a guidance-distilled model (FLUX)
        # takes the scale as an input instead, and its rows are the source and the targets.
        guided = guidance_scale != 1.0 and backbone.classifier_free_guidance
        uncond = unconditional if guided else None
        latent_of, cond, slots, source_rows, pairs = self._row_plan(source, targets, uncond)
        cond = backbone.with_guidance(cond, guidance_scale)
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
            controlled_steps,
            controlled_layers,
            masks=masks,
            latent_hw=latent_hw,
            image_tokens=self._image_tokens(*size),
        )
        recorders = (
            {
                # prepare_masks kept only blocks whose map layer exists.
                str(backbone.map_layer(block)): self.cross_processor_class(block, state)
                for block in masks.map_blocks
            }
            if isinstance(masks, WordMasks) and controlled_steps
            else None
        )
        original = install_processors(
            backbone.denoiser,
            backbone.layer_names,
            state,
            self.processor_class,
            controlled_layers,
            extra=recorders,
        )
        try:
            solver.set_image_seq_len(self._image_tokens(*size))
            timesteps = solver.timesteps(steps, self.device)
            latents = noise.expand(n + 1, *noise.shape[1:]).clone()
            for index, timestep in enumerate(timesteps):
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
                    model_input = solver.scale_model_input(latents[latent_index], timestep)
                    residuals = (
                        None
                        if condition_run is None
                        else condition_run.arguments(
                            index, latent_index, model_input, timestep, chunk_cond
                        )
                    )
                    outputs[row_index] = backbone.predict(
                        model_input, timestep, chunk_cond, residuals
                    )
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
                stepped = solver.step(guided_outputs, timestep, latents)
                latents = stepped.prev_sample
                if progress is not None:
                    progress("denoise", index + 1, steps)
                if on_latents is not None:
                    # The solver's x̂₀ of this step, computed anyway on the way to the next state.
                    on_latents(index + 1, steps, stepped.pred_original_sample)
        finally:
            backbone.denoiser.set_attn_processor(dict(original))
            state.begin_step(None)
            if condition_run is not None:
                stats.condition_evals += condition_run.evaluations
        stats.denoise_seconds += time.perf_counter() - started
        return latents

    def _image_tokens(self, width: int, height: int) -> int:
        """Image tokens per row in the first block (a transformer's patches; a flow schedule's
        dynamic shift depends on their number)."""
        rows, columns = self.backbone.block_grid(0, width, height)
        return rows * columns

    def _start_stats(self) -> RunStats:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return RunStats()

    def _finish_stats(self, stats: RunStats) -> None:
        if self.device.type == "cuda":
            stats.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
