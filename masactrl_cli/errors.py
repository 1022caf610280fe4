"""The one exception subcommands raise for bad input (its own module so that running
``python -m masactrl_cli.main`` and importing ``masactrl_cli.main`` share one class)."""


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2."""
