"""How far a long method has come, told to whoever listens (the CLI's progress bar).

Methods call :func:`advance` from their loops (occlusion per batch of windows, maximize per
step); it costs one context-variable read when nobody listens. A caller listens with
``with reporting(callback): ...``; ``callback(done, total)`` runs on the calling thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Callback = Callable[[int, int], None]

_listener: ContextVar[Callback | None] = ContextVar("cnnvis_vis_progress", default=None)


@contextmanager
def reporting(callback: Callback) -> Iterator[None]:
    """Send every :func:`advance` inside the block to ``callback(done, total)``."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


def advance(done: int, total: int) -> None:
    """``done`` of ``total`` units of the running method are finished."""
    callback = _listener.get()
    if callback is not None:
        callback(done, total)
