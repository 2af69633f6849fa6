"""
The log events the proxy emits while a test runs (the service logs to the global publisher), and
what the tests read from them: the children started and stopped, and TabbyAPI's console lines.
"""

from __future__ import annotations

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase


class CapturedEvents:
    """
    Every log event from now until the end of C{testCase}.
    """

    def __init__(self, testCase: TestCase) -> None:
        self.events = EventLoggingObserver.createWithCleanup(testCase, globalLogPublisher)

    def starts(self) -> list[str]:
        """
        The models the scheduler started, in order.
        """
        return [e["model"] for e in self.events if e.get("log_format", "").startswith("Starting {model}")]

    def stops(self) -> list[str]:
        """
        Why the scheduler stopped each child, in order.
        """
        return [e["why"] for e in self.events if e.get("log_format", "").startswith("Stopping {model}")]

    def childLines(self) -> list[str]:
        """
        The console lines of every TabbyAPI child, in order.
        """
        return [e["line"] for e in self.events if "line" in e and "model" in e]

    def childSaid(self, fragment: str) -> bool:
        """
        Whether a TabbyAPI child printed a line containing C{fragment}.
        """
        return any(fragment in line for line in self.childLines())
