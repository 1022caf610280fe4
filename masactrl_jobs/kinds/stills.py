"""What edits and syntheses share: still images from prompts, masks and per-target conditions.

Both kinds take the same parameters (the request body's common part, ``StillParams``), the same
mask rules, the same layout conditions (one image per target prompt or one for all) and store the
same results (the source, a target per prompt, the condition images). They differ in their
source: an edit inverts a photo (``edit.py``), a synthesis generates it from the source prompt
(``synthesis.py``). These are the pieces, not a kind: each kind module says which it uses.

The mask and condition checks that relate fields of the request are the gateway's own; the
control, size, LoRA and condition-window rules are the shared ones of ``masactrl_jobs.control``
(the worker and the CLI apply the same).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from masactrl_jobs.catalog import ModelEntry
from masactrl_jobs.control import (
    CONDITION_IMAGES_RULE,
    CONDITION_SCALE_RULE,
    CONDITION_SOURCE_IMAGE_RULE,
    CONDITION_WINDOW_RULE,
    InvalidParameters,
    Rule,
    condition_problems,
    resolve_control,
    resolve_loras,
    resolve_size,
)
from masactrl_jobs.images import Payload, StoredInput, ValidatedImage
from masactrl_jobs.kinds.base import (
    AUTOMATIC_MASK_RULE,
    BODY,
    CONDITION_FAMILY_RULE,
    CONDITION_MODEL_RULE,
    NEGATIVE_PROMPT_RULE,
    PARAMETER_RULES,
    ImageOutput,
    Intake,
    Issue,
    JobInputError,
    Output,
    Ran,
    RunContext,
    automatic_mask_issues,
    condition_family_issues,
    condition_model_issues,
    issues,
    negative_prompt_issues,
    parameter_issues,
    random_seed,
)
from masactrl_jobs.schema import (
    ConditionInput,
    ImageRole,
    JobInput,
    MaskControl,
    MaskMode,
    MaskRegion,
)
from masactrl_jobs.schema import _JobCreate as StillParams

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "MASK_RULES",
    "STILL_RULES",
    "StillInputs",
    "StillParams",
    "check_still",
    "read_still_inputs",
    "resolve_still",
    "still_condition",
    "still_outputs",
    "takes_still_inputs",
]


@dataclass
class StillInputs:
    """An edit's or a synthesis's inputs, read and checked, not yet stored."""

    image: ValidatedImage | None = None
    masks: list[tuple[ValidatedImage, ValidatedImage]] = field(default_factory=list)
    conditions: list[ValidatedImage] = field(default_factory=list)
    source_condition: ValidatedImage | None = None

    def to_store(self) -> list[ValidatedImage | StoredInput]:
        """The photo, the masks and the condition images, in the order they were read."""
        image = [self.image] if self.image is not None else []
        masks = [image for pair in self.masks for image in pair]
        source = [self.source_condition] if self.source_condition is not None else []
        return [*image, *masks, *self.conditions, *source]


# -- at the gateway -------------------------------------------------------------------------------


MASK_RULES = (
    Rule(("control.mask.regions",), "mode `manual` needs them; only `manual` takes them."),
    Rule(
        ("control.mask.source_word",),
        "mode `auto` needs it, a whole word (any case) of `source_prompt`; only `auto` takes it.",
    ),
    Rule(
        ("control.mask.target_word",),
        "mode `auto` needs it, a whole word (any case) of every target prompt; only `auto` takes "
        "it.",
    ),
)
# What check_still enforces.
STILL_RULES = (
    *PARAMETER_RULES,
    *MASK_RULES,
    AUTOMATIC_MASK_RULE,
    NEGATIVE_PROMPT_RULE,
    CONDITION_FAMILY_RULE,
    CONDITION_MODEL_RULE,
    CONDITION_IMAGES_RULE,
    CONDITION_SOURCE_IMAGE_RULE,
    CONDITION_WINDOW_RULE,
    CONDITION_SCALE_RULE,
)


def check_still(body: StillParams, entry: ModelEntry, *, editing: bool) -> list[Issue]:
    """Every cross-field or catalog problem of ``body`` (empty when it can run)."""
    unsupported_mask = automatic_mask_issues(entry, body.control.mask.mode.value)
    return (
        parameter_issues(entry, body)
        + (unsupported_mask or _mask_issues(body))
        + negative_prompt_issues(entry, body.negative_prompt)
        + _condition_issues(body, entry, editing)
    )


def _condition_issues(body: StillParams, entry: ModelEntry, editing: bool) -> list[Issue]:
    condition = body.condition
    if condition is None:
        return []
    unsupported = condition_family_issues(entry)
    if unsupported:
        return unsupported  # the condition's own fields do not matter on this model
    found = condition_model_issues(entry, condition.model)
    problems = condition_problems(
        targets=len(body.target_prompts),
        images=len(condition.images),
        has_source_image=condition.source_image is not None,
        editing=editing,
        scale=condition.scale,
        start=condition.start,
        end=condition.end,
        preprocess=condition.preprocess,
    )
    return found + issues(problems)


def _contains_word(text: str, word: str) -> bool:
    # A whole word, case-insensitive: "cat" is in "A Cat sits" but not in "a category".
    return re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, re.IGNORECASE) is not None


def _mask_issues(body: StillParams) -> list[Issue]:
    mask = body.control.mask
    at = (BODY, "control", "mask")
    found = []
    if mask.mode is not MaskMode.manual and mask.regions:
        found.append(Issue((*at, "regions"), "regions are used only with mode 'manual'"))
    if mask.mode is not MaskMode.auto:
        for name in ("source_word", "target_word"):
            if getattr(mask, name) is not None:
                found.append(Issue((*at, name), f"{name} is used only with mode 'auto'"))
    if mask.mode is MaskMode.manual and not mask.regions:
        found.append(
            Issue(
                (*at, "regions"),
                "mode 'manual' needs at least one region of source and target mask images",
            )
        )
    if mask.mode is MaskMode.auto:
        if mask.source_word is None:
            found.append(Issue((*at, "source_word"), "mode 'auto' needs a source_word"))
        elif not _contains_word(body.source_prompt, mask.source_word):
            found.append(
                Issue(
                    (*at, "source_word"),
                    f"source_word {mask.source_word!r} does not appear in source_prompt",
                )
            )
        if mask.target_word is None:
            found.append(Issue((*at, "target_word"), "mode 'auto' needs a target_word"))
        else:
            missing = [
                i
                for i, p in enumerate(body.target_prompts)
                if not _contains_word(p, mask.target_word)
            ]
            if missing:
                found.append(
                    Issue(
                        (*at, "target_word"),
                        f"target_word {mask.target_word!r} does not appear in target_prompts "
                        f"{missing}",
                    )
                )
    return found


def takes_still_inputs(body: StillParams) -> bool:
    """Whether ``body`` names mask or condition images (a photo is the edit's own question)."""
    return bool(body.control.mask.regions) or body.condition is not None


async def read_still_inputs(
    intake: Intake,
    body: StillParams,
    image: ValidatedImage | None = None,
    condition_parts: Sequence[Payload] = (),
) -> StillInputs:
    """The mask and condition images of ``body`` (condition images from ``condition_parts``
    when the form sent them as files), read and checked after the photo ``image``."""
    inputs = StillInputs(image=image)
    for i, region in enumerate(body.control.mask.regions or []):
        at = (BODY, "control", "mask", "regions", i)
        source = await intake.read(region.source, (*at, "source"), "mask")
        target = await intake.read(region.target, (*at, "target"), "mask")
        inputs.masks.append((source, target))
    if body.condition is None:
        return inputs
    for i, ref in enumerate(body.condition.images):
        if condition_parts:
            loc: tuple[str | int, ...] = (BODY, "condition_image", i)
            stored = await intake.check(condition_parts[i], loc, "condition image")
        else:
            loc = (BODY, "condition", "images", i)
            stored = await intake.read(ref, loc, "condition image")
        inputs.conditions.append(stored)
    if body.condition.source_image is not None:
        inputs.source_condition = await intake.read(
            body.condition.source_image,
            (BODY, "condition", "source_image"),
            "condition image",
        )
    return inputs


def resolve_still(
    body: StillParams, entry: ModelEntry, inputs: StillInputs | None, *, anchor_source: bool
) -> JobInput:
    """The parameters as they will run: defaults filled in from the model, images as keys.

    ``body`` has passed :func:`check_still`.
    """
    inputs = inputs or StillInputs()
    mask = body.control.mask
    region_keys = [(source.key, target.key) for source, target in inputs.masks]
    if region_keys or mask.regions is not None:
        stored_mask = MaskControl(
            mode=mask.mode,
            regions=[MaskRegion(source=s, target=t) for s, t in region_keys] or None,
            source_word=mask.source_word,
            target_word=mask.target_word,
            threshold=mask.threshold,
        )
    else:
        stored_mask = mask  # no images to replace by keys: the request's mask runs as it is
    # check_still has reported every control and size problem: resolve without looking again.
    width, height = resolve_size(entry, body.width, body.height, checked=True)
    source_condition = inputs.source_condition
    return JobInput(
        image=inputs.image.key if inputs.image is not None else None,
        source_prompt=body.source_prompt,
        target_prompts=list(body.target_prompts),
        negative_prompt=body.negative_prompt,
        seed=body.seed if body.seed is not None else random_seed(),
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        width=width,
        height=height,
        control=resolve_control(entry, body.control, body.steps, stored_mask, checked=True),
        condition=None
        if body.condition is None
        else ConditionInput(
            model=body.condition.model,
            images=[image.key for image in inputs.conditions],
            source_image=source_condition.key if source_condition is not None else None,
            scale=body.condition.scale,
            start=body.condition.start,
            end=body.condition.end,
            preprocess=body.condition.preprocess,
        ),
        anchor_source=anchor_source,
        loras=resolve_loras(entry, body.loras),
        previews=body.previews,
    )


# -- on a GPU worker ------------------------------------------------------------------------------


def still_condition(ctx: RunContext, *, editing: bool) -> tuple[Any, list[tuple[str, Image.Image]]]:
    """The engine's ``Condition`` for the job (None without one), and its images as the engine
    receives them (after canny), each with the prompt it lays out."""
    job = ctx.input
    requested = job.condition
    if requested is None:
        return None, []
    problems = condition_problems(
        targets=len(job.target_prompts),
        images=len(requested.images),
        has_source_image=requested.source_image is not None,
        editing=editing,
        scale=requested.scale,
        start=requested.start,
        end=requested.end,
        preprocess=requested.preprocess,
    )
    if problems:
        raise JobInputError(str(InvalidParameters(problems)))
    model = ctx.condition_model(requested.model)

    def read(key: str, what: str) -> Image.Image:
        return ctx.preprocess(ctx.decode(ctx.read(key, what), what), requested.preprocess)

    images = [read(key, f"condition image {k}") for k, key in enumerate(requested.images)]
    source = (
        None
        if requested.source_image is None
        else read(requested.source_image, "source condition image")
    )
    # Labelled with the prompt each one lays out; one shared image serves every target.
    prompts = job.target_prompts if len(images) > 1 else ["(every target prompt)"]
    shown = [
        *([(job.source_prompt, source)] if source is not None else []),
        *zip(prompts, images, strict=True),
    ]
    return ctx.condition(model, images, requested, source_image=source), shown


def still_outputs(job: JobInput, ran: Ran) -> list[Output]:
    """The source, a target per prompt, then the condition images."""
    result = ran.result
    outputs: list[Output] = [ImageOutput(ImageRole.source, 0, job.source_prompt, result.source)]
    outputs += [
        ImageOutput(ImageRole.target, k, prompt, image)
        for k, (prompt, image) in enumerate(zip(job.target_prompts, result.targets, strict=True))
    ]
    outputs += [
        ImageOutput(ImageRole.condition, k, prompt, image)
        for k, (prompt, image) in enumerate(ran.conditions)
    ]
    return outputs
