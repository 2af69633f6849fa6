"""
Reading what the proxy sent: the payloads of an SSE body, the named events of a Messages or
Responses stream, the objects of an NDJSON body, and a streamed body received piece by piece.
"""

from __future__ import annotations

import json
from typing import Any

import treq.response
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse


def ssePayloads(body: bytes) -> list[str]:
    """
    The C{data:} payloads of an SSE body, in order (comments skipped, C{[DONE]} kept).
    """
    return [line[len("data: "):] for line in body.decode("utf-8").splitlines()
            if line.startswith("data: ")]


def sseDocuments(body: bytes) -> list[dict[str, Any]]:
    """
    The JSON objects of an SSE body, in order (C{[DONE]} skipped).
    """
    return [json.loads(payload) for payload in ssePayloads(body) if payload != "[DONE]"]


def streamedText(body: bytes) -> tuple[str, list[str]]:
    """
    The content of an OpenAI chat stream, and its raw event payloads.
    """
    events = ssePayloads(body)
    text = ""
    for event in events:
        if event == "[DONE]":
            continue
        document = json.loads(event)
        if "error" in document:
            continue
        for choice in document.get("choices", []):
            text += (choice.get("delta") or {}).get("content") or ""
    return text, events


def namedEvents(raw: bytes) -> list[dict[str, Any]]:
    """
    The events of a stream whose events are named (Anthropic's Messages, OpenAI's Responses),
    each checked: its C{event:} line names its C{type}.  Comments (pings, loading notes) are
    skipped.
    """
    events = []
    for block in raw.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        event = json.loads(fields["data"])
        if fields.get("event") != event.get("type"):
            raise AssertionError(f"event line {fields.get('event')!r} for an event of type {event.get('type')!r}")
        events.append(event)
    return events


def ndjsonDocuments(raw: bytes) -> list[dict[str, Any]]:
    """
    The objects of an NDJSON body, checking the framing Ollama clients rely on: every line
    ends with a newline, none is blank, each is one JSON object.
    """
    assert raw.endswith(b"\n"), raw
    lines = raw[:-1].split(b"\n")
    assert all(line.strip() for line in lines), raw
    documents = [json.loads(line) for line in lines]
    assert all(isinstance(document, dict) for document in documents)
    return documents


class StreamedBody(Protocol):
    """
    A response body as it arrives, for tests that act mid-stream: L{hangUp} leaves as a client
    that gives up does; L{ended} fires when the whole body has arrived, or fails with the reason
    it did not (C{ResponseFailed} when the connection was dropped).
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ended: Deferred[None] = Deferred()

    @classmethod
    def of(cls, response: IResponse | treq.response._Response) -> StreamedBody:
        """
        Start receiving C{response}'s body.
        """
        body = cls()
        response.deliverBody(body)
        return body

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.ended.callback(None)
        else:
            self.ended.errback(reason)

    def hangUp(self) -> None:
        """
        Stop the download and drop the connection, as a client that leaves does.
        """
        # A response body's transport is a push producer: stopping it drops the connection.
        IPushProducer(self.transport).stopProducing()
