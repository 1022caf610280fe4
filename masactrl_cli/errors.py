"""The exceptions subcommands raise (their own module so that running ``python -m
masactrl_cli.main`` and importing ``masactrl_cli.main`` share one class each)."""


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2."""


class StackError(Exception):
    """The local stack could not be prepared, started or stopped: one line that says why and
    where to look, reported with exit status 1."""
