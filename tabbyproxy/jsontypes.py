"""
How error messages name the type of a JSON value a client sent: with JSON's own words (an array,
an object), not Python's (a list, a dict).
"""

from __future__ import annotations


def describeJSON(value: object) -> str:
    """
    C{"null"}, C{"a boolean"}, C{"a number"}, C{"a string"}, C{"an array"} or C{"an object"}.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
