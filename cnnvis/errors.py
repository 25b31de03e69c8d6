"""Errors the library raises; the CLI turns each into one line and an exit status."""

from __future__ import annotations


class CnnvisError(Exception):
    """A problem the user can fix (bad config, missing file, wrong layer name ...).

    The CLI prints ``str(error)`` on one line and exits with ``exit_code``.
    """

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        if not self.hint:
            return text
        # "message. Hint." reads as two sentences whether or not the message ends in a stop.
        return f"{text} {self.hint}" if text.endswith((".", "!", "?", ":")) else f"{text}. {self.hint}"


class ConfigError(CnnvisError):
    """The config file or a --set override is invalid."""


class DataError(CnnvisError):
    """A data set cannot be found, read or split."""


class CheckpointError(CnnvisError):
    """A checkpoint or run directory is missing, corrupt or does not fit the model."""


class TrainingError(CnnvisError):
    """Training cannot go on (non-finite loss, out of memory, unwritable run directory)."""

    exit_code = 1


class TrainingInterrupted(Exception):
    """Raised by the trainer after Ctrl-C, once ``last.pt`` is safely written."""

    def __init__(self, run_dir: str, epoch: int) -> None:
        super().__init__(f"interrupted in epoch {epoch}")
        self.run_dir = run_dir
        self.epoch = epoch
