"""
The log file's lines: L{ClassicLogText} writes exactly what Twisted's text observer writes, and
L{twistdLogObserver} is twistd's own observer for its options, with those lines.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.application.service import Application
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.tap import _ProxyService
from tabbyproxy.textlog import ClassicLogText, LineBatches, twistdLogObserver


def twistedText(event: LogEvent) -> str | None:
    """
    The line twistd's own text observer writes for C{event}.
    """
    return formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when, timeFormatRFC3339))


_NAMES = ("a", "b", "missing")
_fields = st.builds(
    lambda name, access, conversion, spec: "{" + name + access + conversion + spec + "}",
    st.sampled_from(_NAMES + ("", "0")),
    st.sampled_from(["", "()", ".real", "[0]"]),
    st.sampled_from(["", "!r", "!s", "!a"]),
    st.sampled_from(["", ":>6", ":.3f", ":d", ":x", ":{b}"]),
)
_formats = st.lists(st.one_of(st.text(alphabet="xy \n{}é", max_size=4), _fields), max_size=4).map("".join)
_values = st.one_of(st.text(max_size=5), st.integers(), st.floats(allow_nan=False), st.none(),
                    st.lists(st.integers(), max_size=2), st.just(lambda: "called"))
# Timestamps on and around second boundaries, where a cached time string could be wrong.
_times = st.builds(lambda second, fraction: second + fraction, st.integers(1_700_000_000, 1_700_000_003),
                   st.sampled_from([0.0, 0.25, 0.999999, 0.9999994, 0.9999996, 0.9999999]))


@st.composite
def events(draw: Any) -> LogEvent:
    event: dict[str, Any] = {}
    if draw(st.booleans()):
        event["log_format"] = draw(st.one_of(_formats, st.just(b"bytes {a}"), st.just(3)))
    for name in _NAMES[:2]:
        if draw(st.booleans()):
            event[name] = draw(_values)
    if draw(st.booleans()):
        event["log_time"] = draw(_times)
    if draw(st.booleans()):
        event["log_system"] = draw(st.one_of(st.text(max_size=4), st.integers()))
    if draw(st.booleans()):
        event["log_namespace"] = draw(st.text(max_size=6))
    if draw(st.booleans()):
        event["log_level"] = draw(st.sampled_from(list(LogLevel.iterconstants())))
    if draw(st.integers(0, 9)) == 0:
        event["log_failure"] = Failure(ValueError("boom"))
    return event


class ClassicLogTextTests(SynchronousTestCase):
    """
    L{ClassicLogText} makes twistd's log lines.
    """

    @given(st.lists(events(), max_size=6))
    def test_sameAsTwisted(self, logged: list[LogEvent]) -> None:
        """
        For any events, one after the other (so the time string it keeps is put to use), each
        line is the one Twisted's text observer writes: the time, the system, the message, an
        unformattable event's "Unable to format event" text, a traceback, the tab after each
        newline.
        """
        text = ClassicLogText()
        for event in logged:
            self.assertEqual(text(event), twistedText(event))

    def test_timeRoundedIntoTheNextSecond(self) -> None:
        """
        A time in a second's last half microsecond is written, as Twisted writes it, as the next
        second, and the rest of its second is still written as that second.
        """
        text = ClassicLogText()
        for when in (1_700_000_000.9999996, 1_700_000_000.25, 1_700_000_001.0):
            event = {"log_format": "tick", "log_time": when}
            self.assertEqual(text(event), twistedText(event))

    def test_acrossATimeZoneChange(self) -> None:
        """
        The time keeps its offset right across a change of daylight saving time (Berlin's, on
        29 March 2026 at 01:00 UTC).
        """
        previous = os.environ.get("TZ")

        def restore() -> None:
            if previous is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = previous
            time.tzset()

        self.addCleanup(restore)
        os.environ["TZ"] = "Europe/Berlin"
        time.tzset()
        text = ClassicLogText()
        change = 1774746000
        for when in (change - 1.5, change - 0.5, change - 0.0000001, change, change + 0.5, change + 1):
            event = {"log_format": "tick", "log_time": when}
            self.assertEqual(text(event), twistedText(event))
        self.assertIn("+0200", text({"log_format": "tick", "log_time": change + 0.5}) or "")


class TwistdLogObserverTests(SynchronousTestCase):
    """
    L{twistdLogObserver} is twistd's own observer for its options, with L{ClassicLogText}'s
    lines, and steps aside where twistd does not log to a text file.
    """

    def test_foregroundLogsToStandardOutput(self) -> None:
        """
        With C{-n} and no C{--logfile} (or C{--logfile=-}), the lines go to standard output.
        """
        for options in ({"nodaemon": True, "logfile": None}, {"nodaemon": True, "logfile": "-"}):
            observer = twistdLogObserver(options)
            assert isinstance(observer, FileLogObserver)
            self.assertIs(observer._outFile, sys.stdout)
            self.assertIsInstance(observer.formatEvent, ClassicLogText)

    def test_logFileRotates(self) -> None:
        """
        With C{--logfile}, the lines go to that file, which rotates on SIGUSR1 as twistd's does.
        """
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        path = Path(self.mktemp())
        observer = twistdLogObserver({"nodaemon": False, "logfile": str(path)})
        assert isinstance(observer, FileLogObserver)
        logFile = observer._outFile
        assert isinstance(logFile, LogFile)
        self.addCleanup(logFile.close)
        self.assertEqual(Path(logFile.path), path.absolute())
        self.assertNotIn(signal.getsignal(signal.SIGUSR1), (signal.SIG_DFL, None))
        observer({"log_format": "hello {who}", "who": "you", "log_time": 0.0, "log_system": "here"})
        self.assertEqual(path.read_text(), twistedText({"log_format": "hello you", "log_time": 0.0, "log_system": "here"}))

    def test_otherLoggersLeftAlone(self) -> None:
        """
        With C{--logger} or C{--syslog}, there is none: twistd logs as it was told.
        """
        self.assertIsNone(twistdLogObserver({"nodaemon": True, "logger": lambda: None}))
        self.assertIsNone(twistdLogObserver({"nodaemon": True, "syslog": True}))

    def test_givenToTheApplication(self) -> None:
        """
        The proxy's service gives its observer to twistd's application as its C{ILogObserver},
        which twistd logs to when no C{--logger} was given, and gives none when it has none.
        """
        observer = FileLogObserver(sys.stdout, ClassicLogText())
        application = Application("tabbyproxy")
        _ProxyService(Path("unused"), observer).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)
        application = Application("tabbyproxy")
        _ProxyService(Path("unused")).setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver))


class CountedFile:
    """
    A file that records each write and flush.
    """

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        self.flushes += 1


class LineBatchesTests(SynchronousTestCase):
    """
    L{LineBatches} writes the lines of a busy moment together while the reactor runs, and each
    line at once otherwise.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.file = CountedFile()
        self.observer = twistdLogObserver({"nodaemon": True, "logfile": "-"}, self.reactor)
        assert self.observer is not None
        self.batches = self.observer._outFile
        assert isinstance(self.batches, LineBatches)
        self.batches.file = self.file

    def log(self, message: str) -> None:
        assert self.observer is not None
        self.observer({"log_format": message, "log_time": 0.0, "log_system": "-"})

    def start(self) -> None:
        for hook, args, kwargs in self.reactor.whenRunningHooks:
            hook(*args, **kwargs)

    def shutDown(self) -> None:
        for hook, args, kwargs in self.reactor.triggers["after"]["shutdown"]:
            hook(*args, **kwargs)

    def test_atOnceBeforeTheReactorRuns(self) -> None:
        self.log("starting")
        self.assertEqual(self.file.writes, [twistedText({"log_format": "starting", "log_time": 0.0, "log_system": "-"})])
        self.assertEqual(self.file.flushes, 1)

    def test_batchedWhileRunning(self) -> None:
        """
        While the reactor runs, lines wait for L{LineBatches.DELAY} and go out in one write and
        one flush, in order.
        """
        self.start()
        for message in ("one", "two", "three"):
            self.log(message)
        self.assertEqual(self.file.writes, [])
        self.reactor.advance(LineBatches.DELAY)
        self.assertEqual(self.file.writes, ["".join(
            twistedText({"log_format": message, "log_time": 0.0, "log_system": "-"}) or ""
            for message in ("one", "two", "three"))])
        self.assertEqual(self.file.flushes, 1)
        self.log("four")
        self.reactor.advance(LineBatches.DELAY)
        self.assertEqual(len(self.file.writes), 2)

    def test_writtenAtShutdown(self) -> None:
        """
        What waits when the reactor shuts down is written then, and later lines at once.
        """
        self.start()
        self.log("stopping")
        self.shutDown()
        self.assertEqual(len(self.file.writes), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.log("Main loop terminated.")
        self.assertEqual(len(self.file.writes), 2)

    def test_otherThreadsAtOnce(self) -> None:
        self.start()
        thread = threading.Thread(target=self.log, args=("from a thread",))
        thread.start()
        thread.join()
        self.assertEqual(len(self.file.writes), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
