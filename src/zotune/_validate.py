"""Small validation helpers shared by every public constructor (errors name the argument)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming ``name`` and the value."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def check_int(name: str, value: int, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum``, or raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, float) and value.is_integer()):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_range(name: str, value: float, low: float, high: float, *, high_inclusive=False) -> float:
    """Return ``value`` as a float in [low, high) (or [low, high]), else ``ValueError``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = low <= v <= high if high_inclusive else low <= v < high
    if not ok:
        right = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{right}, got {value!r}")
    return v


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest option (by similarity or shared prefix), else ""."""
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    close = close or [o for o in options if word and (o.startswith(word) or word.startswith(o))][:1]
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_choice(kind: str, value: str, choices: Iterable[str]) -> str:
    """The message for an unknown registry name: 'Did you mean ...? Available: ...'."""
    choices = sorted(choices)
    return f"Unknown {kind} '{value}'.{did_you_mean(str(value), choices)} Available: {', '.join(choices)}"


def build_checked(kind: str, name: str, fn, kwargs: dict):
    """``fn(**kwargs)`` for a registry entry, refusing arguments ``fn`` does not take with a
    ValueError naming them; a TypeError raised inside ``fn`` is a bug and keeps its trace."""
    import inspect

    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"{kind} '{name}': {e}") from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    return fn(**kwargs)
