"""
The last requests the proxy answered, kept in memory for the dashboard (C{/ui/api/requests} and
the C{request} events of C{/events}): route, model, status, time to first token, tokens in and
out, tokens per second and duration of each.

Prompts are private: no request text is kept unless the owner asks for it with
C{--keep-request-bodies N}, and then only for the last N requests, cut to a few thousand
characters.  Memory is bounded either way: a fixed number of small records.
"""

from __future__ import annotations

import json
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from attrs import asdict, evolve, frozen
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from tabbyproxy.channel import pathOf
from tabbyproxy.server import UNMATCHED, ProxyRequest

DEFAULT_SIZE = 500

# How much of a kept prompt is kept: enough to recognise it, not a whole document.
PROMPT_CHARS = 4000

# The proxy's own pages and streams are not requests anyone wants to see in this list.
_OWN_PREFIXES = (b"/ui", b"/events", b"/logs", b"/status", b"/metrics", b"/health", b"/unload")

Listener = Callable[["RequestRecord"], None]


@frozen
class RequestRecord:
    """
    One request, as the dashboard shows it.

    @ivar firstToken: seconds from arrival to the first streamed event (the first token), or to
        the first byte of a non-streamed answer; C{None} when nothing was written.
    @ivar tokensOut: the completion's tokens: exact when the route knew the usage, else the
        number of streamed events (about one per token; C{tokensExact} is then false).
    @ivar tokensPerSecond: C{tokensOut} over the time from the first token to the end.
    @ivar prompt: the request's text, only with C{--keep-request-bodies}.
    """

    id: str
    time: str
    method: str
    route: str
    model: str | None
    status: int
    seconds: float
    firstToken: float | None
    streamed: bool
    tokensIn: int | None
    tokensOut: int | None
    tokensExact: bool
    tokensPerSecond: float | None
    prompt: str | None = None

    def toJSON(self) -> dict[str, Any]:
        document = asdict(self)
        if document["prompt"] is None:
            del document["prompt"]
        return document


class RequestHistory:
    """
    The last C{size} requests, and the listeners that want each new one as it is added.

    @param keepBodies: how many of the latest requests keep their prompt text (0: none).
    """

    log = Logger()

    def __init__(self, size: int = DEFAULT_SIZE, keepBodies: int = 0) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=size)
        self._listeners: list[Listener] = []
        self.keepBodies = keepBodies
        # The ids of the records that still hold their prompt, oldest first.
        self._withPrompt: deque[str] = deque()

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(list(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """
        Call C{listener} with every record added from now on.

        @return: a callable that ends the subscription.
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def add(self, record: RequestRecord) -> None:
        if record.prompt is not None:
            self._withPrompt.append(record.id)
            while len(self._withPrompt) > self.keepBodies:
                self._forgetPrompt(self._withPrompt.popleft())
        self._records.append(record)
        for listener in list(self._listeners):
            listener(record)

    def _forgetPrompt(self, requestId: str) -> None:
        for index, record in enumerate(self._records):
            if record.id == requestId:
                self._records[index] = _withoutPrompt(record)
                return

    def requestFinished(self, request: IRequest, status: int, seconds: float) -> None:
        """
        The server's hook: keep a record of C{request}, which ended with C{status} after
        C{seconds}, unless it was one of the proxy's own pages.
        """
        if not isinstance(request, ProxyRequest):
            return
        path = pathOf(request.uri)
        if path.startswith(_OWN_PREFIXES) or path == b"/":
            return
        try:
            record = recordOf(request, status, seconds, self.keepBodies > 0)
        except Exception:
            # The history is a view: it must never break a request's accounting.
            self.log.failure("Could not record request {request_id}", request_id=request.requestId)
            return
        self.add(record)


def recordOf(request: ProxyRequest, status: int, seconds: float, keepPrompt: bool) -> RequestRecord:
    """
    The record of a request that has ended.
    """
    path = pathOf(request.uri)
    firstToken = request.firstTokenSeconds
    usage = request.usage
    streamed = request.streamedEvents > 0
    if usage is not None:
        tokensIn, tokensOut, exact = usage[0], usage[1], True
    elif streamed:
        # The last event of an OpenAI stream is "[DONE]", not a token.
        tokensIn, tokensOut, exact = None, max(request.streamedEvents - 1, 0), False
    else:
        tokensIn, tokensOut, exact = None, None, False
    generating = seconds - firstToken if firstToken is not None else None
    tokensPerSecond = (
        round(tokensOut / generating, 2) if tokensOut and generating is not None and generating > 0 else None
    )
    return RequestRecord(
        id=request.requestId,
        time=datetime.fromtimestamp(request.arrivedAt, timezone.utc).isoformat(timespec="milliseconds"),
        method=request.method.decode("latin-1"),
        # The path when no route matched (the metrics call it "unmatched"): an owner wants to see it.
        route=request.route if request.route != UNMATCHED else path.decode("utf-8", "replace")[:200],
        model=request.modelId,
        status=status,
        seconds=round(seconds, 4),
        firstToken=None if firstToken is None else round(firstToken, 4),
        streamed=streamed,
        tokensIn=tokensIn,
        tokensOut=tokensOut,
        tokensExact=exact,
        tokensPerSecond=tokensPerSecond,
        prompt=promptOf(request.body) if keepPrompt and request.body is not None else None,
    )


def promptOf(raw: bytes) -> str | None:
    """
    The text of a request body worth showing: its chat messages, prompt or input, cut to
    L{PROMPT_CHARS}.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    parts: list[str] = []
    for key in ("system", "prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            parts.append(value)
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                role = message.get("role", "?")
                if isinstance(content, str):
                    parts.append(f"{role}: {content}")
                elif isinstance(content, list):
                    texts = [part.get("text") for part in content if isinstance(part, dict)]
                    parts.append(f"{role}: " + " ".join(text for text in texts if isinstance(text, str)))
    if not parts:
        return None
    text = "\n".join(parts)
    return text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS] + "…"


def _withoutPrompt(record: RequestRecord) -> RequestRecord:
    return evolve(record, prompt=None)
