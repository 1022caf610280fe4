"""Checks that need the catalog or several fields at once, and the resolved job input.

pydantic has already checked each field on its own (ranges, lengths, unknown fields); what is
left needs the chosen model or relates fields. The control and size rules are the shared ones of
``masactrl_jobs.control`` (the worker and the CLI apply the same), and so are the condition's
shape and window; the mask and webhook rules are the gateway's own.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

import httpx

from masactrl_jobs import netguard
from masactrl_jobs.catalog import ModelEntry, UnknownCondition
from masactrl_jobs.control import (
    condition_problems,
    control_problems,
    lora_problems,
    resolve_control,
    resolve_loras,
    resolve_size,
    size_problems,
)
from masactrl_jobs.schema import (
    MAX_SEED,
    ConditionInput,
    EditCreate,
    EditParams,
    JobInput,
    MaskControl,
    MaskMode,
    MaskRegion,
    SynthesisCreate,
)
from service.errors import FieldError

__all__ = ["check_request", "check_webhook_url", "resolve_input"]

JobCreate = EditCreate | EditParams | SynthesisCreate
_BODY = "body"


def _contains_word(text: str, word: str) -> bool:
    # A whole word, case-insensitive: "cat" is in "A Cat sits" but not in "a category".
    return re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, re.IGNORECASE) is not None


def check_request(body: JobCreate, entry: ModelEntry) -> list[FieldError]:
    """Every cross-field or catalog problem of ``body`` (empty when it can run)."""
    problems = control_problems(entry, body.control, body.steps)
    problems += size_problems(entry, body.width, body.height)
    problems += lora_problems(entry, body.loras)
    errors = [FieldError((_BODY, *problem.field), problem.message) for problem in problems]
    return errors + _check_mask(body) + _check_condition(body, entry)


def _check_condition(body: JobCreate, entry: ModelEntry) -> list[FieldError]:
    condition = body.condition
    if condition is None:
        return []
    errors = []
    try:
        entry.condition(condition.model)
    except UnknownCondition as exc:
        errors.append(FieldError((_BODY, "condition", "model"), str(exc), "unknown_condition"))
    problems = condition_problems(
        targets=len(body.target_prompts),
        images=len(condition.images),
        has_source_image=condition.source_image is not None,
        editing=not isinstance(body, SynthesisCreate),
        scale=condition.scale,
        start=condition.start,
        end=condition.end,
        preprocess=condition.preprocess,
    )
    return errors + [FieldError((_BODY, *p.field), p.message) for p in problems]


def _check_mask(body: JobCreate) -> list[FieldError]:
    mask = body.control.mask
    at = (_BODY, "control", "mask")
    errors = []
    if mask.mode is not MaskMode.manual and mask.regions:
        errors.append(FieldError((*at, "regions"), "regions are used only with mode 'manual'"))
    if mask.mode is not MaskMode.auto:
        for name in ("source_word", "target_word"):
            if getattr(mask, name) is not None:
                errors.append(FieldError((*at, name), f"{name} is used only with mode 'auto'"))
    if mask.mode is MaskMode.manual and not mask.regions:
        errors.append(
            FieldError(
                (*at, "regions"),
                "mode 'manual' needs at least one region of source and target mask images",
            )
        )
    if mask.mode is MaskMode.auto:
        if mask.source_word is None:
            errors.append(FieldError((*at, "source_word"), "mode 'auto' needs a source_word"))
        elif not _contains_word(body.source_prompt, mask.source_word):
            errors.append(
                FieldError(
                    (*at, "source_word"),
                    f"source_word {mask.source_word!r} does not appear in source_prompt",
                )
            )
        if mask.target_word is None:
            errors.append(FieldError((*at, "target_word"), "mode 'auto' needs a target_word"))
        else:
            missing = [
                i
                for i, p in enumerate(body.target_prompts)
                if not _contains_word(p, mask.target_word)
            ]
            if missing:
                errors.append(
                    FieldError(
                        (*at, "target_word"),
                        f"target_word {mask.target_word!r} does not appear in target_prompts "
                        f"{missing}",
                    )
                )
    return errors


def check_webhook_url(url: str, *, allow_loopback_http: bool) -> FieldError | None:
    """The checks that need no DNS, at submission; delivery resolves and checks again."""
    loc = (_BODY, "webhook", "url")
    try:
        literal = netguard.check_url_syntax(url, allow_loopback_http=allow_loopback_http)
    except netguard.UnsafeURL as exc:
        return FieldError(loc, str(exc), "unsafe_url")
    # Plain http only to a loopback literal in development: a name is resolved only at delivery.
    if httpx.URL(url).scheme == "http" and literal is None:
        return FieldError(loc, "must be an https:// URL", "unsafe_url")
    return None


_SEED_BITS = MAX_SEED.bit_length()


def _random_seed() -> int:
    """A uniform seed in [0, MAX_SEED]: random bits, as many as MAX_SEED has."""
    # MAX_SEED is 2**32 - 1, so 32 bits always fit; randbelow(2**32) would draw 33 bits and
    # retry half the time. The fallback keeps the draw uniform should MAX_SEED ever change.
    seed = secrets.randbits(_SEED_BITS)
    return seed if seed <= MAX_SEED else secrets.randbelow(MAX_SEED + 1)


def resolve_input(
    body: JobCreate,
    entry: ModelEntry,
    *,
    image_key: str | None = None,
    region_keys: Sequence[tuple[str, str]] = (),
    condition_keys: Sequence[str] = (),
    source_condition_key: str | None = None,
) -> JobInput:
    """The parameters as they will run: defaults filled in from the model, images as keys.

    ``body`` has passed :func:`check_request`.
    """
    mask = body.control.mask
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
    # check_request has reported every control and size problem: resolve without looking again.
    width, height = resolve_size(entry, body.width, body.height, checked=True)
    return JobInput(
        image=image_key,
        source_prompt=body.source_prompt,
        target_prompts=list(body.target_prompts),
        negative_prompt=body.negative_prompt,
        seed=body.seed if body.seed is not None else _random_seed(),
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        width=width,
        height=height,
        control=resolve_control(entry, body.control, body.steps, stored_mask, checked=True),
        condition=None
        if body.condition is None
        else ConditionInput(
            model=body.condition.model,
            images=list(condition_keys),
            source_image=source_condition_key,
            scale=body.condition.scale,
            start=body.condition.start,
            end=body.condition.end,
            preprocess=body.condition.preprocess,
        ),
        # Not getattr(body, ...): a missing attribute costs pydantic a raised exception.
        anchor_source=False if isinstance(body, SynthesisCreate) else body.anchor_source,
        loras=resolve_loras(entry, body.loras),
        previews=body.previews,
    )
