"""How a number is shown to a person: in the CLI's tables and in the HTML evaluation report."""
from __future__ import annotations

from typing import Any


def format_value(value: Any, digits: int = 3, missing: str = "-") -> str:
    """A float with ``digits`` decimals, a bool as yes/no, None as ``missing``, anything else as its text."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
