"""Did-you-mean: the one way a command suggests the name a user probably meant."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: str, options: Iterable[str], n: int = 1, cutoff: float = 0.6, prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the closest of `options` (up to n, each shown with `prefix`),
    or '' when none is close: ready to append to an error line."""
    close = difflib.get_close_matches(name, [str(o) for o in options], n=n, cutoff=cutoff)
    return f" (did you mean {', '.join(repr(prefix + c) for c in close)}?)" if close else ""
