"""The submission routes' rules in words, written from the checks and the catalog at start-up.

What a request schema cannot say on its own (a rule over several fields, or one that depends on
the chosen model) is still part of the contract, so each submission route's OpenAPI description
states it. Those words are not written here: each check declares its rule beside it
(:class:`masactrl_jobs.control.Rule`, in ``masactrl_jobs.control`` and the job kinds), each job
kind lists the rules its check enforces (``Kind.rules``), and :func:`submission_rules` renders
them once, when the app is built:

- the kind's rules, their ``{limit}`` placeholders filled in from the gateway's settings;
- the defaults of omitted fields, from the resolver;
- a table of the app's catalog: every value a rule names "the model's" (size multiple, block
  count, default control, max pixels), as the catalog declares it or the family's reference
  checkpoint measures it. ``GET /v1/models`` shows what live workers measured, which the gateway
  validates against once they have reported;
- the intake rules of every submission (webhook, images, the body), whose checks are the
  gateway's own (``masactrl_jobs.netguard``, ``masactrl_jobs.images``, ``service.bodies``).

A submission route names its kind in its operation (``x-job-kind``, from
``service.api.deps.submission_openapi``); :func:`describe_submissions` appends that kind's text
to the operation's description when the app's OpenAPI document is generated (once, then cached).
So the served schema follows the catalog the app runs with; the committed
``openapi/openapi.json`` is the default catalog's (``python -m service.openapi``).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from masactrl_jobs.catalog import Catalog, ModelEntry
from masactrl_jobs.control import CONTROL_DEFAULTS, SIZE_DEFAULTS, Rule
from masactrl_jobs.kinds import KINDS
from masactrl_jobs.kinds.base import Limits
from masactrl_jobs.schema import JobKind
from service.submission import QUEUE_RULES

__all__ = ["JOB_KIND", "describe_submissions", "models_table", "submission_rules"]

# The OpenAPI extension by which a submission operation names the kind of job it creates.
JOB_KIND = "x-job-kind"


# Checked by the gateway itself for every submission, outside the job kinds.
_INTAKE_RULES = (
    """
Every submission:

- `webhook.url` is `https://` to a public address; an IP literal in any spelling (decimal,
  hex, octal, short) is read as the address it names.
- Images (`image`, mask `regions`, condition images and frames): PNG, JPEG or WebP by content, at
  least 8×8 pixels, at most `MASACTRL_MAX_IMAGE_SIDE` per side and `MASACTRL_MAX_IMAGE_BYTES`.
- The body: JSON sent as `application/json` (else 415), no key given twice; at most
  `MASACTRL_MAX_JSON_BYTES` plus one image allowance per inline `data:` image (else 413).
- Inputs (file parts, `data:` URLs, fetched URLs and `s3://` objects) together: at most
  `MASACTRL_MAX_REQUEST_INPUT_BYTES` (else 413 naming the input that crossed it); a reference
  named twice is read once. 503 `inputs_busy` when the gateway holds its limit of inputs.
"""
    + QUEUE_RULES
)

# The table's columns: heading, and the entry's value as shown.
_COLUMNS: tuple[tuple[str, Callable[[ModelEntry], object]], ...] = (
    ("family", lambda entry: entry.family),
    ("native size", lambda entry: f"{entry.native_width}×{entry.native_height}"),
    ("size multiple", lambda entry: entry.size_multiple),
    ("block count", lambda entry: entry.block_count),
    ("default start step", lambda entry: entry.default_start_step),
    ("default start layer", lambda entry: entry.default_start_layer),
    ("max pixels", lambda entry: entry.max_pixels),
)


def _line(rule: Rule, limits: Limits) -> str:
    names = {name for _, name, _, _ in string.Formatter().parse(rule.text) if name}
    # Every placeholder is a limit; an unknown one fails here, when the app is built.
    values: Mapping[str, object] = {name: getattr(limits, name) for name in names}
    fields = ", ".join(f"`{field}`" for field in rule.fields)
    return f"- {fields}: {rule.text.format_map(values)}"


def _lines(rules: Iterable[Rule], limits: Limits) -> str:
    return "\n".join(_line(rule, limits) for rule in rules)


def models_table(catalog: Catalog) -> str:
    """The catalog's models and the values the rules name, one row each (Markdown)."""
    rows = [
        "| model | " + " | ".join(heading for heading, _ in _COLUMNS) + " |",
        "|---" * (len(_COLUMNS) + 1) + "|",
    ]
    for entry in catalog.models:
        name = f"`{entry.name}`" + (" (default)" if entry.name == catalog.default else "")
        rows.append(f"| {name} | " + " | ".join(str(value(entry)) for _, value in _COLUMNS) + " |")
    return "\n".join(rows)


def submission_rules(catalog: Catalog, limits: Limits) -> dict[JobKind, str]:
    """What each kind's submission route adds to its summary: rules, defaults, the models."""
    table = models_table(catalog)
    defaults = _lines((*SIZE_DEFAULTS, *CONTROL_DEFAULTS), limits)
    return {
        job_kind: _text(kind.rules, defaults, table, limits) for job_kind, kind in KINDS.items()
    }


def _text(rules: Iterable[Rule], defaults: str, table: str, limits: Limits) -> str:
    return f"""

Rules that relate fields or depend on the model (a request that breaks one is answered 422, or
the status the rule says, naming the field):

{_lines(rules, limits)}

Omitted fields:

{defaults}

The model's values, as the catalog declares them or its family's reference checkpoint measures
them. Once a model's workers are live, the gateway checks against what they measured, which
`GET /v1/models` shows.

{table}
{_INTAKE_RULES}"""


def describe_submissions(document: dict[str, Any], rules: Mapping[JobKind, str]) -> None:
    """Append its kind's ``rules`` to the description of each submission operation of
    ``document`` (an OpenAPI document, changed in place)."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            kind = operation.get(JOB_KIND)
            if kind is not None:
                operation["description"] = operation.get("description", "") + rules[JobKind(kind)]
