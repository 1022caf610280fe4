"""The edit: a photo, inverted, then regenerated under each target prompt (``POST /v1/edits``).

Parameters: ``EditCreate`` (JSON, the photo by reference) or ``EditParams`` with
:class:`EditFiles` (multipart: the photo and the condition images as file parts). Everything else
is a still job's (``stills.py``): masks, per-target conditions, the results. Its own: the photo
(always an input, so an edit always spends its rate token before reading), ``anchor_source``, a
condition without a source image (the source is the inverted photo), and the inversion cache.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from masactrl_jobs.catalog import ModelEntry
from masactrl_jobs.images import Payload, payload_sha256
from masactrl_jobs.kinds.base import (
    BODY,
    Intake,
    Issue,
    JobInputError,
    Kind,
    Limits,
    Output,
    Ran,
    RunContext,
    Source,
    read_source,
)
from masactrl_jobs.kinds.stills import (
    STILL_RULES,
    StillInputs,
    check_still,
    read_still_inputs,
    resolve_still,
    still_condition,
    still_outputs,
)
from masactrl_jobs.schema import EditCreate, EditParams, JobInput, JobKind

__all__ = ["EDIT", "EditFiles", "EditKind"]

EditBody = EditCreate | EditParams


@dataclass(frozen=True)
class EditFiles:
    """The file parts of a multipart edit: the photo, and condition images in target order
    (each standing for the entry of ``condition.images`` at its index). Each is its bytes or the
    temporary file the upload was spooled to."""

    image: Payload
    conditions: Sequence[Payload] = field(default_factory=tuple)

    def sha256(self) -> str:
        """A digest of the files, for the request hash (the photo's own digest when alone)."""
        image = payload_sha256(self.image)
        if not self.conditions:
            return image
        digests = [image, *(payload_sha256(c) for c in self.conditions)]
        return hashlib.sha256(" ".join(digests).encode()).hexdigest()


def _at_condition_parts(issue: Issue) -> Issue:
    """``issue`` naming the condition_image parts where it names the list they stand for."""
    if issue.loc[:3] != (BODY, "condition", "images"):
        return issue
    return Issue((BODY, "condition_image", *issue.loc[3:]), issue.message, issue.type)


class EditKind(Kind[EditBody, EditFiles, StillInputs]):
    kind = JobKind.edit
    bodies = (EditCreate, EditParams)
    rules = STILL_RULES

    def files_digest(self, files: EditFiles) -> str | None:
        return files.sha256()

    def check(
        self, body: EditBody, entry: ModelEntry, limits: Limits, files: EditFiles | None
    ) -> list[Issue]:
        found = check_still(body, entry, editing=True)
        if files is not None and files.conditions:
            return [_at_condition_parts(issue) for issue in found]
        return found

    def takes_inputs(self, body: EditBody, files: EditFiles | None) -> bool:
        return True  # the photo

    async def read_inputs(
        self, intake: Intake, limits: Limits, body: EditBody, files: EditFiles | None
    ) -> StillInputs:
        if files is not None:
            image = await intake.check(files.image, (BODY, "image"))
        elif isinstance(body, EditCreate):
            image = await intake.read(body.image, (BODY, "image"))
        else:  # EditParams come with files (the route parses them from a multipart form)
            raise TypeError("a multipart edit's params come with its files")
        return await read_still_inputs(
            intake, body, image, files.conditions if files is not None else ()
        )

    def resolve(self, body: EditBody, entry: ModelEntry, inputs: StillInputs | None) -> JobInput:
        return resolve_still(body, entry, inputs, anchor_source=body.anchor_source)

    def load(self, ctx: RunContext) -> Source:
        key = ctx.input.image
        if not key:
            raise JobInputError("the edit has no input image")
        return read_source(ctx, key)

    def run(self, ctx: RunContext, source: Source) -> Ran:
        job = ctx.input
        assert source.image is not None and source.sha256 is not None  # load() read the photo
        options = ctx.engine_options()
        masks = ctx.masks()
        condition, shown = still_condition(ctx, editing=True)
        inversion = ctx.inversion(source.sha256)
        started = time.perf_counter()
        result = ctx.engine.edit(
            source.image,
            job.target_prompts,
            source_prompt=job.source_prompt,
            inverted=inversion.inverted,
            anchor_source=job.anchor_source,
            masks=masks,
            condition=condition,
            **options,
        )
        engine_seconds = time.perf_counter() - started
        inversion.keep(result.inverted)
        return Ran(result, engine_seconds, shown)

    def outputs(self, job: JobInput, ran: Ran) -> list[Output]:
        return still_outputs(job, ran)


EDIT = EditKind()
