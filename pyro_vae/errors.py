"""Exceptions that carry a one-line message meant for the user.

The CLI turns :class:`UserError` (a mistake in the input: a config, data or
checkpoint) into a one-line message and exit code 2, with no traceback.
"""

from __future__ import annotations


class PyroVAEError(Exception):
    """Base class of every error raised on purpose by pyro-vae."""


class UserError(PyroVAEError, ValueError):
    """Bad input from the user: the message says what was wrong and what is valid."""


class ConfigError(UserError):
    """An invalid configuration: unknown name, missing key, wrong type or value."""


class DataError(UserError):
    """Data that cannot be found, read, or that does not fit the model."""


class CheckpointError(UserError):
    """A run directory or checkpoint that is missing, unreadable or mismatched."""


class RunInUseError(UserError):
    """Another process is writing to the run directory (it holds the directory's lock)."""


class PyroVAEWarning(UserWarning):
    """A note for the user (a fallback taken, data that changed); the CLI prints it as one line."""


class NonFiniteLossError(PyroVAEError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class NonFiniteStartError(NonFiniteLossError, UserError):
    """The loss was NaN or infinite before the first checkpoint: bad input, nothing was kept.

    Its message names the likely cause (the scale of the data, the learning rate).
    """


class TrainingInterrupted(PyroVAEError, KeyboardInterrupt):
    """Training was interrupted (Ctrl-C) after a checkpoint was saved."""

    def __init__(self, message: str, out_dir: str | None) -> None:
        super().__init__(message)
        self.out_dir = out_dir
