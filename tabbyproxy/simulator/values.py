"""
How TabbyAPI reads loosely typed values: JSON objects, and flags and numbers that arrive as YAML,
command-line or environment strings (pydantic-style coercion).
"""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]


def asBool(value: Any) -> bool:
    # Flags arrive as strings from the command line and environment; pydantic-style coercion.
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "y", "t")
    return bool(value)


def asOptionalInt(value: Any) -> int | None:
    if value is None or value is False:
        return None
    return int(value)
