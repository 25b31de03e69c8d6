"""Method parameters given as text (``--param aug_smooth=true``), checked against the method's own
signature and converted to the type it declares.

The command line reads each value as a YAML scalar (``true``/``false``/``yes``/``no`` are booleans,
``3`` an int, ``[3, 5]`` a list); here the value must fit the parameter's annotation -- its one
home is the method's function, so nothing here can drift from the code. Booleans also take ``1`` and
``0`` (what many tools accept), stored as ``true``/``false``; numbers take whole numbers where they
declare ``float``; a ``Literal`` takes only its choices. Types the command line cannot spell (a
tensor baseline, a mapping) are accepted as the library passes them.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

import torch

from cnnvis.errors import VisError, did_you_mean

_NOT = object()  #: "does not fit", distinct from every value (None included)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError, AttributeError):  # an annotation that does not resolve: checked by its default's type
        return {}


def _fit(value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint``, or :data:`_NOT`."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        # bool before the numbers: True is an int to Python, but not to a user typing a count
        for arg in sorted(args, key=lambda a: a is not bool):
            fitted = _fit(value, arg)
            if fitted is not _NOT:
                return fitted
        return _NOT
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _NOT
    if hint is type(None):
        return None if value is None else _NOT
    if hint is bool:
        if isinstance(value, bool):
            return value
        return bool(value) if isinstance(value, int) and value in (0, 1) else _NOT
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot before the exponent) as text
            try:
                return float(value)
            except ValueError:
                return _NOT
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NOT
    if hint is str:
        return value if isinstance(value, str) else _NOT
    if origin is tuple and isinstance(value, (list, tuple)):
        inner = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        fitted = [_fit(v, a) for v, a in zip(value, inner)] if len(inner) == len(value) else [_NOT]
        return _NOT if any(f is _NOT for f in fitted) else tuple(fitted)
    if origin in (list, Sequence) and isinstance(value, (list, tuple)):
        fitted = [_fit(v, args[0] if args else Any) for v in value]
        return _NOT if any(f is _NOT for f in fitted) else fitted
    if origin in (tuple, list, Sequence):  # a text or a number where a list belongs
        return _NOT
    if origin in (dict, Mapping):
        return value if isinstance(value, Mapping) else _NOT
    if hint is torch.Tensor:
        return value if isinstance(value, torch.Tensor) else _NOT
    if isinstance(hint, type) and origin is None:
        return value if isinstance(value, hint) else _NOT
    return value  # an annotation this module does not know: the method checks it


def _yaml(value: Any) -> str:
    """``value`` as it is typed after ``--param KEY=``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _expected(hint: Any) -> tuple[str, Any]:
    """What ``hint`` takes in words, and an example value."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [_expected(a) for a in args if a is not type(None)]
        words = " or ".join(p[0] for p in parts) + (" or null" if type(None) in args else "")
        return words, parts[0][1] if parts else None
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(_yaml(a) for a in args), args[0]
    if hint is bool:
        return "true or false (1 or 0 work too)", True
    if hint is int:
        return "a whole number", 3
    if hint is float:
        return "a number", 0.5
    if hint is str:
        return "text", "text"
    if origin in (tuple, list, Sequence):
        items = [a for a in args if a is not Ellipsis] or [Any]
        word, example = _expected(items[0])
        plural = word[2:] + "s" if word.startswith("a ") else word
        count = f"{len(items)} " if origin is tuple and Ellipsis not in args else ""
        return f"a list of {count}{plural}", [example] * (len(items) if count else 2)
    if origin in (dict, Mapping):
        return "a mapping", {"steps": 10}
    return getattr(hint, "__name__", str(hint)), None


def convert(key: str, value: Any, takers: Sequence[tuple[str, Callable[..., Any], Any]]) -> dict[str, Any]:
    """``value`` of parameter ``key`` for each ``(method, function, default)`` in ``takers``, converted to
    the type the function declares (``1`` -> ``True`` for a bool); a value that does not fit is one
    :class:`VisError` naming the parameter, the methods, the type expected and an example."""
    converted: dict[str, Any] = {}
    failed: list[tuple[str, Any, Any]] = []
    for method, fn, default in takers:
        hint = _hints(fn).get(key, type(default) if default is not None else Any)
        fitted = _fit(value, hint)
        if fitted is _NOT:
            failed.append((method, hint, default))
        converted[method] = fitted
    if not failed:
        return converted
    wanted: dict[str, list[str]] = {}  # what is expected -> the methods that expect it
    for method, hint, _ in failed:
        wanted.setdefault(_expected(hint)[0], []).append(method)
    said = "; ".join(f"{', '.join(ms)} {'takes' if len(ms) == 1 else 'take'} {words}" for words, ms in wanted.items())
    _, hint, default = failed[0]
    example = _expected(hint)[1]
    if isinstance(default, bool):
        example = not default  # the switch the user most likely wants to flip
    elif default is not None and _fit(default, hint) is not _NOT:
        example = default  # the method's own default is the best example
    choices = [a for a in get_args(hint) if isinstance(a, str)] if get_origin(hint) is Literal else []
    near = did_you_mean(value, choices, 1).strip() if choices and isinstance(value, str) else ""
    raise VisError(f"param {key}={_yaml(value)}: {said}{f' ({near})' if near else ''}, e.g. {key}={_yaml(example)}",
                   parameter="param")
