"""
How long a model stays loaded once idle: parsing Ollama's ``keep_alive`` and the resettable timer.

``keep_alive`` follows Ollama's rules: a JSON number is seconds, a string is a Go duration
("5m", "1h30m", "300ms", "0"), zero means "unload as soon as the last request ends", and any
negative value means "keep loaded until told otherwise" (represented as ``FOREVER``). Unlike
Ollama, a bare numeric string such as ``"300"`` is accepted as seconds: Ollama's own
``OLLAMA_KEEP_ALIVE`` setting takes that form, and rejecting it would break no one's safety.

A value whose magnitude is beyond what Go's ``time.ParseDuration`` accepts (2**63 - 1 ns, about
292 years), including infinities and numbers too large for a float, is refused with
L{KeepAliveError} (a 400 on requests, a usage error on options) rather than taken as "forever":
Ollama refuses such strings too, and a refused value can never reach time formatting.
"""

from __future__ import annotations

import math
import re
from typing import Callable

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from tabbyproxy.jsontypes import describeJSON

FOREVER = math.inf
MAX_SECONDS = (2**63 - 1) / 1e9
"""The longest duration Go's C{time.ParseDuration} accepts, in seconds."""

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 MICRO SIGN
    "μs": 1e-6,  # U+03BC GREEK SMALL LETTER MU
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_BARE_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)")


class KeepAliveError(ValueError):
    """
    A ``keep_alive`` value that is neither a number nor a duration.
    """


def parseKeepAlive(value: object) -> float:
    """
    Turn a ``keep_alive`` value as sent by a client into seconds.

    @return: the idle time in seconds; C{0.0} for "unload now", L{FOREVER} for a negative value.
    @raise KeepAliveError: for anything else, with a message fit for the client.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise KeepAliveError(
            f"keep_alive must be a number of seconds or a duration string like \"5m\", "
            f"not {describeJSON(value)}"
        )
    try:
        seconds = _parseDuration(value) if isinstance(value, str) else float(value)
    except OverflowError:
        seconds = math.inf
    if math.isnan(seconds):
        raise KeepAliveError("keep_alive must be a number of seconds, not NaN")
    if abs(seconds) > MAX_SECONDS:
        shown = repr(value) if isinstance(value, str) else f"{seconds:g}"
        raise KeepAliveError(
            f"keep_alive {shown} is out of range: at most {MAX_SECONDS:.0f} seconds "
            f"(about 292 years); use -1 for forever"
        )
    return FOREVER if seconds < 0 else seconds + 0.0  # + 0.0 turns -0.0 into 0.0


def _parseDuration(text: str) -> float:
    stripped = text.strip()
    if _BARE_NUMBER.fullmatch(stripped):
        return float(stripped)
    sign = 1.0
    rest = stripped
    if rest[:1] in ("-", "+"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    total = 0.0
    position = 0
    while position < len(rest):
        match = _DURATION_PART.match(rest, position)
        if match is None:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not rest or position != len(rest):
        raise KeepAliveError(
            f"keep_alive {text!r} is not a duration: use seconds (300) or a Go duration "
            f"such as \"5m\", \"1h30m\" or \"-1\" (forever)"
        )
    return sign * total


def describeDuration(seconds: float) -> str:
    """
    A short human form of an idle time, for logs and status: C{"forever"}, C{"14m 59s"}.
    """
    if seconds == FOREVER:
        return "forever"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h"] if hours else []
    if minutes:
        parts.append(f"{minutes}m")
    if secs or not parts:
        parts.append(f"{secs}s")
    return " ".join(parts)


@define
class IdleTimer:
    """
    One resettable delayed call: armed when a model goes idle, stopped when it gets busy.

    Built on a single L{IDelayedCall} that is reset rather than replaced, as Twisted's
    C{TimeoutMixin} does.
    """

    clock: IReactorTime
    onExpire: Callable[[], object]
    _call: IDelayedCall | None = field(default=None, init=False)

    def arm(self, seconds: float) -> None:
        """
        Fire C{onExpire} after C{seconds}; L{FOREVER} disarms instead.
        """
        if seconds == FOREVER:
            self.stop()
        elif self._call is not None and self._call.active():
            self._call.reset(seconds)
        else:
            self._call = self.clock.callLater(seconds, self._expire)

    def stop(self) -> None:
        """
        Disarm; nothing fires until the next L{arm}.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    @property
    def deadline(self) -> float | None:
        """
        When the timer fires, in the clock's seconds, or C{None} when disarmed.
        """
        if self._call is not None and self._call.active():
            return self._call.getTime()
        return None

    def _expire(self) -> None:
        self._call = None
        self.onExpire()
