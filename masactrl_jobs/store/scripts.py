"""The Lua scripts, loaded from the ``lua/`` folder shipped inside this package.

Each state change is one script, so a job record, its indexes, its queue entry and its event
stream never disagree, whichever process dies between two calls. Scripts that move jobs between
states share the helpers of ``prelude.lua`` (appending an event, finishing a job, the token
bucket), which is prepended to them.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["SCRIPTS"]

_NAMES = (
    "cancel",
    "claim",
    "claim_due_webhooks",
    "create",
    "delete_if_owner",
    "delivery",
    "depths",
    "expire",
    "finish",
    "forget_inputs",
    "get",
    "inversion_sweep",
    "list",
    "live_models",
    "mark_webhook_sent",
    "preview",
    "progress",
    "purge",
    "push_webhook",
    "queued",
    "rate_limit",
    "register",
    "renew_if_owner",
    "renew_lease",
    "requeue",
    "stale",
    "start",
)
_USE_PRELUDE = frozenset(
    {
        "cancel",
        "claim",
        "create",
        "expire",
        "finish",
        "get",
        "list",
        "preview",
        "progress",
        "rate_limit",
        "requeue",
        "start",
    }
)


def _read(name: str) -> str:
    return (resources.files("masactrl_jobs.store") / "lua" / f"{name}.lua").read_text(
        encoding="utf-8"
    )


def _load() -> dict[str, str]:
    prelude = _read("prelude")
    return {
        name: (prelude + _read(name)) if name in _USE_PRELUDE else _read(name) for name in _NAMES
    }


# Script sources by name, read once at import.
SCRIPTS: dict[str, str] = _load()
