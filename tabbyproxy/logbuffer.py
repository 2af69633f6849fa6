"""
The recent log, kept in memory for C{GET /logs} and streamed live to C{GET /logs/stream}: every
event of the proxy and every line TabbyAPI printed, as small JSON-ready records.
"""

from __future__ import annotations

import sys
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from twisted.application.service import Service
from twisted.logger import ILogObserver, LogEvent, LogPublisher, formatEvent, jsonFileLogObserver
from zope.interface import implementer

Record = dict[str, Any]

# Structured fields worth keeping beside the text, when an event has them.
_FIELDS = ("model", "request_id", "route", "status", "seconds")


@implementer(ILogObserver)
class LogBuffer:
    """
    The last C{size} log records, and the callables that want each new one as it happens.
    """

    def __init__(self, size: int = 2000) -> None:
        self._records: deque[Record] = deque(maxlen=size)
        self._subscribers: list[Callable[[Record], None]] = []

    def __call__(self, event: LogEvent) -> None:
        record = toRecord(event)
        self._records.append(record)
        for subscriber in list(self._subscribers):
            subscriber(record)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records))

    def subscribe(self, subscriber: Callable[[Record], None]) -> Callable[[], None]:
        """
        Call C{subscriber} with every new record.

        @return: a callable that ends the subscription.
        """
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe


def toRecord(event: LogEvent) -> Record:
    """
    A log event as a small JSON-ready record: time, level, source (C{"tabby"} for TabbyAPI's own
    lines, C{"proxy"} otherwise), text, and the structured fields that matter.
    """
    fromChild = "line" in event and "model" in event
    level = event.get("log_level")
    record: Record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc).isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else "info",
        "source": "tabby" if fromChild else "proxy",
        "text": event["line"] if fromChild else formatEvent(event),
    }
    for name in _FIELDS:
        value = event.get(name)
        if isinstance(value, (str, int, float)):
            record[name] = value
    return record


class LogBufferService(Service):
    """
    Keeps a L{LogBuffer} subscribed to a log publisher while the proxy runs.
    """

    def __init__(self, buffer: LogBuffer, publisher: LogPublisher) -> None:
        self.buffer = buffer
        self.publisher = publisher

    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self.buffer)

    def stopService(self) -> None:
        super().stopService()
        self.publisher.removeObserver(self.buffer)


def jsonLogObserver() -> ILogObserver:
    """
    A log observer factory for twistd's C{--logger} option: every event as one JSON object per
    line on standard output (C{twistd -n --logger tabbyproxy.logbuffer.jsonLogObserver
    tabbyproxy ...}), with all its structured fields (model, request_id, route, status, ...).
    """
    return jsonFileLogObserver(sys.stdout)
