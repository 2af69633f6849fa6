"""
The log file as twistd writes it (C{--logfile}, or standard output with C{-n}), written at less
cost: twistd's own observer for its options, whose lines (L{ClassicLogText}) are exactly the ones
Twisted's C{formatEventAsClassicLogText} makes, with the time written out once per second and a
plain message formatted by C{str.format_map} rather than by Twisted's slower formatter.  A busy
proxy writes a line per request and another per line its TabbyAPI prints, and twistd's text
observer, with its time zone arithmetic and its formatter, was about a tenth of the proxy's CPU on
small requests (bench/profile.py --scenario b).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from twisted.logger import FileLogObserver, LogEvent, formatEventAsClassicLogText, formatTime, timeFormatRFC3339
from twisted.scripts import _twistd_unix


class ClassicLogText:
    """
    An event as a line of twistd's log (C{"{time} [{system}] {message}\\n"}, or C{None} for an
    event with nothing to say), the same text as C{formatEventAsClassicLogText} with twistd's
    RFC 3339 time.

    The time string is kept for the second it names (the format has no finer field).  A
    message whose format calls a field (C{{name()}}), carries a traceback or was flattened, or
    that C{str.format_map} cannot format, is left to Twisted whole, so its text (an
    "Unable to format event" included) stays Twisted's.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = ""

    def timeStamp(self, when: float | None) -> str:
        """
        C{formatTime(when)}: the local time of C{when} in RFC 3339, C{"-"} without one.
        """
        if when is None:
            return "-"
        second = math.floor(when)
        if second == self._second:
            return self._stamp
        stamp = formatTime(when, timeFormatRFC3339)
        # datetime rounds to microseconds: the last one of a second may name the next second.
        if when - second < 0.999999:
            self._second, self._stamp = second, stamp
        return stamp

    def __call__(self, event: LogEvent) -> str | None:
        logFormat = event.get("log_format")
        if type(logFormat) is not str or "()" in logFormat or "log_failure" in event or "log_flattened" in event:
            return formatEventAsClassicLogText(event, formatTime=self.timeStamp)
        try:
            message = logFormat.format_map(event)
        except BaseException:
            return formatEventAsClassicLogText(event, formatTime=self.timeStamp)
        if not message:
            return None
        line = f"{self.timeStamp(event.get('log_time'))} [{_system(event)}] {message}"
        return line.replace("\n", "\n\t") + "\n"


def _system(event: LogEvent) -> str:
    """
    The bracketed part of a log line: the event's C{log_system}, else its namespace and level
    (C{tabbyproxy.server.ProxyRequest#info}), as Twisted writes them.
    """
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        return f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def twistdLogObserver(twistdOptions: Mapping[str, Any]) -> FileLogObserver | None:
    """
    The observer twistd would make for its own options (the same file, its rotation on SIGUSR1
    and by size, standard output with C{-n}), writing L{ClassicLogText}'s lines; C{None} where
    twistd's log is not its text file (C{--logger}, C{--syslog}), or where this Twisted lacks
    the private method that makes it (then twistd makes its own).
    """
    if twistdOptions.get("logger") is not None or twistdOptions.get("syslog"):
        return None
    makeObserver = getattr(getattr(_twistd_unix, "UnixAppLogger", None), "_getLogObserver", None)
    if makeObserver is None:
        return None
    observer = makeObserver(_twistd_unix.UnixAppLogger(twistdOptions))
    if not isinstance(observer, FileLogObserver):
        return None
    observer.formatEvent = ClassicLogText()
    return observer
