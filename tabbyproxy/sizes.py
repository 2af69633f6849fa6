"""
Byte sizes as people write them in profiles and options (C{18GiB}, C{24000MiB}, C{24G}), and as
the proxy writes them back (C{17.5 GiB}).  A bare number is refused: whether C{24} means bytes or
gigabytes is exactly the mistake a unit prevents.
"""

from __future__ import annotations

import re

MiB = 1024**2
GiB = 1024**3

_UNITS = {
    "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*")


class SizeError(ValueError):
    """
    A size that is not a number with a unit; the message says what was given and what works.
    """


def parseSize(text: object) -> int:
    """
    The bytes that C{text} means: a number and a unit, binary for C{K}/C{M}/C{G}/C{T} and their
    C{iB} forms, decimal for C{KB}/C{MB}/C{GB}/C{TB}, case-insensitive.

    @raise SizeError: for anything else, a bare number included.
    """
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise SizeError(f"{text!r} is not a size: give a number and a unit, such as 24GiB, 24000MiB or 24G")
    return int(float(match.group(1)) * unit)


def formatGiB(size: int) -> str:
    """
    C{size} bytes in GiB with one decimal, as messages and reports show memory.
    """
    return f"{size / GiB:.1f} GiB"
