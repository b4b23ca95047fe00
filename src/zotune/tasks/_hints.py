"""The "Did you mean ...?" part of lookup errors."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest option (by similarity or shared prefix), else ""."""
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    close = close or [o for o in options if word and (o.startswith(word) or word.startswith(o))][:1]
    return f" Did you mean {close[0]!r}?" if close else ""
