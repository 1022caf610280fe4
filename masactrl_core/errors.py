"""Exceptions the engine raises at its boundary; each message is one sentence for a user."""


class InvalidInput(ValueError):
    """A request the engine cannot run as given (size, steps, layers, prompts, masks)."""


class ModelLoadError(RuntimeError):
    """The checkpoint could not be found or loaded."""


class JobCancelled(Exception):
    """The caller's cancellation check asked the run to stop."""
