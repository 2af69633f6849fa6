"""
The log file as twistd writes it (C{--logfile}, or standard output with C{-n}), written at less
cost: twistd's own observer for its options, whose lines (L{ClassicLogText}) are exactly the ones
Twisted's C{formatEventAsClassicLogText} makes, with the time written out once per second and a
plain message formatted by C{str.format_map} rather than by Twisted's slower formatter.  A busy
proxy writes a line per request and another per line its TabbyAPI prints, and twistd's text
observer, with its time zone arithmetic and its formatter, was about a tenth of the proxy's CPU on
small requests (bench/profile.py --scenario b).  While the reactor runs, the lines of a busy
moment reach the file together (L{LineBatches}), a hundredth of a second late at most.
"""

from __future__ import annotations

import math
import threading
from typing import IO, Any, Mapping, cast

from twisted.internet.interfaces import IDelayedCall
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


class LineBatches:
    """
    A log's file, written a batch of lines at a time while the reactor runs: a line waits at
    most L{DELAY} seconds for the others of its moment, and they go out in one write.  twistd's
    file is unbuffered, so every line was a C{write} call of its own, about 5% of the proxy's
    CPU on small requests (bench/profile.py --scenario b: C{BaseLogFile.write}).

    Before the reactor runs, once it has shut down, and from any other thread, a line is written
    at once; at shutdown what waits is written.

    @param reactor: an C{IReactorTime} and C{IReactorCore}.
    """

    DELAY = 0.01

    def __init__(self, file: IO[Any], reactor: Any) -> None:
        self.file = file
        self._reactor = reactor
        self._pending: list[Any] = []
        self._flushing: IDelayedCall | None = None
        # The reactor's thread, while it runs.
        self._thread: int | None = None
        reactor.callWhenRunning(self._start)
        reactor.addSystemEventTrigger("after", "shutdown", self._stop)

    def _start(self) -> None:
        self._thread = threading.get_ident()

    def _stop(self) -> None:
        self._thread = None
        if self._flushing is not None and self._flushing.active():
            self._flushing.cancel()
        self._write()

    def write(self, text: Any) -> None:
        if self._thread == threading.get_ident():
            self._pending.append(text)
            if self._flushing is None:
                self._flushing = self._reactor.callLater(self.DELAY, self._write)
        else:
            self.file.write(text)
            self.file.flush()

    def flush(self) -> None:
        # The observer flushes after each line: a batch is flushed when it is written.
        pass

    def _write(self) -> None:
        self._flushing = None
        if self._pending:
            pending, self._pending = self._pending, []
            self.file.write(pending[0][:0].join(pending))
            self.file.flush()


def twistdLogObserver(twistdOptions: Mapping[str, Any], reactor: Any = None) -> FileLogObserver | None:
    """
    The observer twistd would make for its own options (the same file, its rotation on SIGUSR1
    and by size, standard output with C{-n}), writing L{ClassicLogText}'s lines, in
    L{LineBatches} while C{reactor} (when given) runs; C{None} where twistd's log is not its
    text file (C{--logger}, C{--syslog}), or where this Twisted lacks the private method that
    makes it (then twistd makes its own).
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
    if reactor is not None:
        observer._outFile = cast(IO[Any], LineBatches(observer._outFile, reactor))
    return observer
