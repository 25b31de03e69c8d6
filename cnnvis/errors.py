"""Every error the library raises; the CLI turns each into one line and an exit status.

Messages name the library's parameters (``split``, ``target``, ``device`` ...); an error that is
about one of them says which in ``parameter``, so the CLI can show it as its own flag.
"""

from __future__ import annotations


class CnnvisError(Exception):
    """A problem the user can fix (bad config, missing file, wrong layer name ...).

    The CLI prints ``str(error)`` on one line and exits with ``exit_code``.
    """

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        #: the parameter the message starts with (``"split 'x': choose val or test"``), if any
        self.parameter = parameter

    @property
    def message(self) -> str:
        return super().__str__()

    def __str__(self) -> str:
        text = self.message
        if not self.hint:
            return text
        # "message. Hint." reads as two sentences whether or not the message ends in a stop.
        return f"{text} {self.hint}" if text.endswith((".", "!", "?", ":")) else f"{text}. {self.hint}"


class ConfigError(CnnvisError):
    """The config file, an override or an argument is invalid."""


class DataError(CnnvisError):
    """A data set cannot be found, read or split."""


class CheckpointError(CnnvisError):
    """A checkpoint or run directory is missing, corrupt or does not fit the model."""


class TrainingError(CnnvisError):
    """Training cannot go on (non-finite loss, out of memory, unwritable run directory)."""

    exit_code = 1


class VisError(CnnvisError):
    """A visualisation request that cannot be served as asked (bad target, bad parameter ...)."""


class LayerNotFoundError(VisError):
    """A layer name that is not a submodule of the model; the message lists the valid names."""


class UnsupportedModelError(VisError):
    """The method does not apply to this model (e.g. CAM without GAP + linear, no ReLU for guided backprop)."""


class UnknownMethodError(VisError):
    """A method name that is not in :data:`cnnvis.vis.registry.METHODS`."""


class VisWarning(UserWarning):
    """A visualisation ran, but not quite as the method's name promises (e.g. guided backprop
    that had to leave some activations with the plain gradient); the message says where."""


def nearest_names(name: str, choices: list[str], n: int = 5, cutoff: float = 0.6) -> list[str]:
    """The valid names closest to a mistyped ``name`` (difflib's ratio), best first: the one rule
    behind every "did you mean" and "nearest" in cnnvis's messages."""
    import difflib  # only when a message is being written

    return difflib.get_close_matches(name, choices, n=n, cutoff=cutoff)


def did_you_mean(name: str, choices: list[str], n: int = 5) -> str:
    """``"did you mean a, b? "`` for the valid names closest to a mistyped ``name``, else ``""``:
    what an unknown layer, method or choice says before listing the valid ones."""
    near = nearest_names(name, choices, n=n, cutoff=0.5)
    return f"did you mean {', '.join(near)}? " if near else ""
