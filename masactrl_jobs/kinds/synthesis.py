"""The synthesis: a source generated from its prompt, and targets that keep its content and layout
(``POST /v1/syntheses``).

Parameters: ``SynthesisCreate`` (JSON only, so no files). Everything else is a still job's
(``stills.py``); its own: no photo (inputs only when it names mask or condition images, so a
plain synthesis spends its rate token inside the step that records it), no ``anchor_source``, and
a condition that may lay out the source too (``condition.source_image``).
"""

from __future__ import annotations

import time

from masactrl_jobs.catalog import ModelEntry
from masactrl_jobs.kinds.base import Intake, Issue, Kind, Limits, Output, Ran, RunContext, Source
from masactrl_jobs.kinds.stills import (
    STILL_RULES,
    StillInputs,
    check_still,
    read_still_inputs,
    resolve_still,
    still_condition,
    still_outputs,
    takes_still_inputs,
)
from masactrl_jobs.schema import JobInput, JobKind, SynthesisCreate

__all__ = ["SYNTHESIS", "SynthesisKind"]


class SynthesisKind(Kind[SynthesisCreate, None, StillInputs]):
    kind = JobKind.synthesis
    bodies = (SynthesisCreate,)
    rules = STILL_RULES

    def check(
        self, body: SynthesisCreate, entry: ModelEntry, limits: Limits, files: None
    ) -> list[Issue]:
        return check_still(body, entry, editing=False)

    def takes_inputs(self, body: SynthesisCreate, files: None) -> bool:
        return takes_still_inputs(body)

    async def read_inputs(
        self, intake: Intake, limits: Limits, body: SynthesisCreate, files: None
    ) -> StillInputs:
        return await read_still_inputs(intake, body)

    def resolve(
        self, body: SynthesisCreate, entry: ModelEntry, inputs: StillInputs | None
    ) -> JobInput:
        return resolve_still(body, entry, inputs, anchor_source=False)

    def load(self, ctx: RunContext) -> Source:
        return Source()

    def run(self, ctx: RunContext, source: Source) -> Ran:
        job = ctx.input
        options = ctx.engine_options()
        masks = ctx.masks()
        condition, shown = still_condition(ctx, editing=False)
        started = time.perf_counter()
        result = ctx.engine.synthesize(
            job.source_prompt, job.target_prompts, masks=masks, condition=condition, **options
        )
        return Ran(result, time.perf_counter() - started, shown)

    def outputs(self, job: JobInput, ran: Ran) -> list[Output]:
        return still_outputs(job, ran)


SYNTHESIS = SynthesisKind()
