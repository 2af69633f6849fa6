"""
The recent log, kept in memory for C{GET /logs} and streamed live to C{GET /logs/stream}: every
event of the proxy and every line TabbyAPI printed, as small JSON-ready records.
"""

from __future__ import annotations

import re
import sys
from collections import deque
from datetime import datetime, timezone
from string import Formatter
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

    An event becomes a record (its text formatted, its time written out) only when someone
    looks: by then most events have left the buffer unread, and formatting every one as it
    happened cost a busy proxy more than its routing.  What a record is made from is copied out
    of the event at once, and only when it is a plain value (text, a number), so the buffer
    never keeps a request, a failure or their frames alive.
    """

    def __init__(self, size: int = 2000) -> None:
        self._entries: deque[_Entry] = deque(maxlen=size)
        self._subscribers: list[Callable[[Record], None]] = []

    def __call__(self, event: LogEvent) -> None:
        entry = _Entry(event)
        self._entries.append(entry)
        if self._subscribers:
            record = entry.record()
            for subscriber in list(self._subscribers):
                subscriber(record)

    def __iter__(self) -> Iterator[Record]:
        return iter([entry.record() for entry in list(self._entries)])

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


# The plain values an event's text may be made of later; anything else is formatted at once.
_PLAIN = (str, int, float, bool, type(None))
# The top-level fields each format string names (None: one this buffer formats at once), for
# the few formats in the code; past this many distinct ones, events are formatted at once.
_FORMAT_FIELDS: dict[str, tuple[str, ...] | None] = {}
_MAX_FORMATS = 512


def _fieldsOf(logFormat: str) -> tuple[str, ...] | None:
    """
    The top-level fields C{logFormat} names (C{seconds} for C{{seconds:.3f}}, C{a} for
    C{{a.b}}), or C{None} when it calls one (C{{f()}}) or does not parse.
    """
    names = []
    try:
        parsed = list(Formatter().parse(logFormat))
    except ValueError:
        return None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name.endswith("()") or not name:
            return None
        names.append(re.split(r"[.\[]", name, maxsplit=1)[0])
    return tuple(names)


class _Entry:
    """
    One event as kept: what its record needs, with its text and time still to be written out.
    """

    __slots__ = ("_time", "_level", "_source", "_text", "_values", "_fields", "_record")

    def __init__(self, event: LogEvent) -> None:
        fromChild = "line" in event and "model" in event
        level = event.get("log_level")
        self._time: float = event.get("log_time", 0.0)
        self._level = level.name if level is not None else "info"
        self._source = "tabby" if fromChild else "proxy"
        self._values: dict[str, Any] | None = None
        self._text: str | None = event["line"] if fromChild else None
        if self._text is None:
            self._values = _plainValues(event)
            if self._values is None:
                self._text = formatEvent(event)
        self._fields = {name: event[name] for name in _FIELDS
                        if isinstance(event.get(name), (str, int, float))}
        self._record: Record | None = None

    def record(self) -> Record:
        if self._record is None:
            if self._text is None:
                self._text = formatEvent(self._values or {})
                self._values = None
            self._record = {
                "time": datetime.fromtimestamp(self._time, timezone.utc).isoformat(timespec="milliseconds"),
                "level": self._level,
                "source": self._source,
                "text": self._text,
                **self._fields,
            }
        return self._record


def _plainValues(event: LogEvent) -> dict[str, Any] | None:
    """
    What formatting C{event} later needs (its format and the fields it names), or C{None} when
    it must be formatted now: a field it names is not a plain value, or its format is unusual.
    """
    logFormat = event.get("log_format")
    if not isinstance(logFormat, str):
        return None
    names = _FORMAT_FIELDS.get(logFormat, ())
    if names == ():
        names = _fieldsOf(logFormat)
        if len(_FORMAT_FIELDS) < _MAX_FORMATS:
            _FORMAT_FIELDS[logFormat] = names
    if names is None:
        return None
    values: dict[str, Any] = {"log_format": logFormat}
    for name in names:
        if name not in event:
            return None
        value = event[name]
        if not isinstance(value, _PLAIN):
            return None
        values[name] = value
    return values


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
