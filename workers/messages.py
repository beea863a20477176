"""How an error message shows a value the user gave: never more than a line's worth of it."""
from __future__ import annotations

from typing import Any

SHOWN_CHARS = 200  # of a value's repr in an error message


def shown(value: Any) -> str:
    """`value`'s repr for an error message, cut to SHOWN_CHARS characters with '...' when longer."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."
