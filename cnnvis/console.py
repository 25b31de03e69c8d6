"""How the ``cnnvis`` command talks: rich consoles, library errors and warnings as one coloured line
each (and an exit status), and help pages that show on/off flags as flags."""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import (
    escape,  # user text (paths, values) may hold "[...]", which rich reads as markup
)
from typer.core import TyperCommand, TyperGroup

from cnnvis.errors import CnnvisError


class _FlagsShowNoValue:
    """Typer labels on/off flags (``--debug``, ``--help``) ``<bool>`` as if they took a value
    (``--debug true`` is an error): an empty label shows them as the flags they are."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_FlagsShowNoValue, TyperCommand):
    pass


class Group(_FlagsShowNoValue, TyperGroup):
    pass


console = Console()
err_console = Console(stderr=True)

#: the library names parameters; on the command line they are these flags
FLAGS = {"split": "--split", "target": "--target", "device": "--device", "images": "--images", "wrong": "--wrong",
         "method": "-m", "mean": "--mean", "std": "--std", "size": "--size", "param": "--param"}


def print_notes(notes: list[str]) -> None:
    """What the model's loading decided (defaults used, random weights, a deprecated format), one line each."""
    for note in notes:
        level = "warning" if ("random weights" in note or "deprecated" in note) else "note"
        err_console.print(f"[yellow]{level}:[/] {escape(note)}", highlight=False, soft_wrap=True)


def print_skipped(skipped: list[tuple[str, str]]) -> None:
    """Image files left out, with why, as one warning line (``path: reason; ...``)."""
    from cnnvis.data.images import describe_skipped

    err_console.print(f"[yellow]warning:[/] skipped {len(skipped)} unreadable image(s): {escape(describe_skipped(skipped))}",
                      highlight=False, soft_wrap=True)


def error_line(exc: CnnvisError) -> str:
    """The error as the CLI shows it: a message about a parameter names its flag instead."""
    text = str(exc)
    flag = FLAGS.get(exc.parameter or "")
    if flag and text.startswith(f"{exc.parameter} "):
        text = flag + text[len(exc.parameter):]
    return text


def friendly_errors(command: Callable) -> Callable:
    """Library errors become one red line and an exit status: 2 for bad input, 130 for Ctrl-C."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            with warnings.catch_warnings():  # restores the default display afterwards (tests, notebooks)
                warnings.showwarning = _warning_line
                return command(*args, **kwargs)
        except typer.Exit:
            raise
        except CnnvisError as exc:
            if debug:
                raise
            if not _quiet_rank():
                err_console.print(f"[bold red]error:[/] {escape(error_line(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if debug:
                raise
            if not _quiet_rank():
                err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A library warning (a method that could only partly apply, a deprecated file format) as one
    yellow line, like errors, instead of Python's file-and-line format."""
    if not _quiet_rank():
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def _quiet_rank() -> bool:
    """A torchrun process other than rank 0: rank 0 speaks for the run (every rank meets the same errors)."""
    return os.environ.get("RANK", "0") != "0"
