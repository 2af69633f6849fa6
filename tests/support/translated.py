"""
What the tests of the translated routes (Anthropic Messages, OpenAI Responses) share: one
profile, TabbyAPI's chat stream chunks they are answered from, and L{TranslatedRouteCase}, the
proxy's whole site in memory with the requests and checks every such route needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from treq import content
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.routes.translated import TranslatedStream
from tests.support.fakes import InMemoryProxy
from tests.support.logs import CapturedEvents
from tests.support.wire import StreamedBody, namedEvents

PROFILES: dict[str, dict[str, Any]] = {
    "qwen": {
        "model": {"model_name": "Qwen", "unload_timer": 60},
        "template": {"temperature": 0.6, "system": "Be brief."},
    },
}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    """
    One event of TabbyAPI's chat stream: a delta for choice 0 (with its finish reason), or
    none, and the usage where given.
    """
    document: dict[str, Any] = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "Qwen",
                                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        document["usage"] = usage
    return b"data: " + json.dumps(document).encode() + b"\r\n\r\n"


DONE = b"data: [DONE]\r\n\r\n"
HELLO = [chunk({"content": "Hel"}), chunk({"content": "lo"}, "stop"),
         chunk(usage={"prompt_tokens": 3, "completion_tokens": 2}), DONE]
TOOL_CALL = [chunk({"tool_calls": [{"index": 0, "id": "call_7", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                   "tool_calls"), DONE]


class TranslatedRouteCase(SynchronousTestCase):
    """
    A translated route in memory: the fake TabbyAPI answers L{HELLO} unless a test says
    otherwise.  Subclasses name the route, the headers its clients send, a minimal streamed
    request, and how the client's SDK reads a whole answer and each event.
    """

    path: ClassVar[str]
    headers: ClassVar[dict[str, str]] = {}
    # A streamed request that needs nothing but the profile, and the type of the event that
    # carries a text delta.
    streamedRequest: ClassVar[dict[str, Any]]
    deltaEvent: ClassVar[bytes]

    def parseAnswer(self, document: dict[str, Any]) -> None:
        """
        Read a whole answer with the client's SDK types (which raise on a wrong shape).
        """
        raise NotImplementedError

    def parseEvent(self, event: dict[str, Any]) -> None:
        """
        Read one stream event with the client's SDK types.
        """
        raise NotImplementedError

    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)
        self.proxy.tabby.chunks = list(HELLO)

    def post(self, body: object, headers: dict[str, str] | None = None, path: str | None = None) -> tuple[Any, bytes]:
        """
        Send C{body} (JSON, or bytes as they are) and return the response with its whole body.
        """
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        d = self.proxy.client.post(f"http://localhost{path or self.path}", data=raw,
                                   headers={"Content-Type": "application/json", **self.headers, **(headers or {})})
        self.proxy.flush()
        response = self.successResultOf(d)
        return response, self.successResultOf(content(response))

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        A non-streamed request that succeeds: its answer, checked by the SDK.
        """
        response, raw = self.post(body)
        self.assertEqual(response.code, 200, raw)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        document: dict[str, Any] = json.loads(raw)
        self.parseAnswer(document)
        return document

    def stream(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """
        A streamed request that succeeds: its events, each checked by the SDK.
        """
        response, raw = self.post({**body, "stream": True})
        self.assertEqual(response.code, 200, raw)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        events = namedEvents(raw)
        for event in events:
            self.parseEvent(event)
        return events

    def lastUpstream(self) -> dict[str, Any]:
        """
        The body of the chat request TabbyAPI got last.
        """
        path, body, _ = self.proxy.tabby.requests[-1]
        self.assertEqual(path, "/v1/chat/completions")
        result: dict[str, Any] = body
        return result


class SharedBehaviours:
    """
    The behaviours every translated route shares, tested once: mixed into a
    L{TranslatedRouteCase} of each route.
    """

    def streamFirstEvent(self: Any) -> tuple[StreamedBody, list[Failure]]:
        """
        Start a streamed request and have TabbyAPI send its first chunk, holding the rest back;
        returns the client's body as it comes, and the list that gets the failure that ends
        TabbyAPI's request if it is closed.
        """
        self.proxy.tabby.hold = True
        d = self.proxy.client.post(f"http://localhost{self.path}", unbuffered=True, headers=self.headers,
                                   json=self.streamedRequest)
        self.proxy.flush()
        [upstream] = self.proxy.tabby.pending
        upstreamGone: list[Failure] = []
        upstream.notifyFinish().addErrback(upstreamGone.append)
        upstream.write(HELLO[0])
        self.proxy.flush()
        return StreamedBody.of(self.successResultOf(d)), upstreamGone

    def test_clientLeavingStopsUpstream(self: Any) -> None:
        """
        A client that leaves mid-stream closes the request to TabbyAPI and gives the lease back.
        """
        body, upstreamGone = self.streamFirstEvent()
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 1)
        self.assertIn(self.deltaEvent, body.data)
        body.hangUp()
        self.proxy.flush()
        self.proxy.flush()
        self.failureResultOf(body.ended)
        self.assertEqual(len(upstreamGone), 1)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_failedTranslationIsTheProxysError(self: Any) -> None:
        """
        A translation that fails on TabbyAPI's stream (a bug of the proxy's) ends the stream
        with an internal error and closes TabbyAPI's request; it is logged with its traceback
        as the proxy's error, not as TabbyAPI's stream breaking.
        """
        def fail(stream: TranslatedStream[Any], data: bytes) -> None:
            raise ValueError("a translation bug")

        self.patch(TranslatedStream, "dataReceived", fail)
        events = CapturedEvents(self)
        body, upstreamGone = self.streamFirstEvent()
        self.proxy.flush()
        self.successResultOf(body.ended)
        self.assertIn(b"internal error in tabbyproxy", body.data)
        self.assertEqual(len(upstreamGone), 1)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)
        self.assertEqual([failure.value.args for failure in self.flushLoggedErrors(ValueError)],
                         [("a translation bug",)])
        self.assertFalse([event for event in events.events if "problem" in event])

    def test_loneSurrogateFromTabbyAPIIsEscaped(self: Any) -> None:
        """
        A lone UTF-16 surrogate in TabbyAPI's text (JSON's escape allows it; UTF-8 has none)
        reaches the client escaped as TabbyAPI sent it, streamed or not, and the answer is
        complete.
        """
        self.proxy.tabby.chunks = [chunk({"content": "a\ud800b"}, "stop"), DONE]
        events = self.stream(self.streamedRequest)
        # Responses gives a delta's text as the delta, Messages as its "text".
        deltas = [event["delta"] for event in events if event["type"].encode() == self.deltaEvent]
        self.assertEqual([delta if isinstance(delta, str) else delta["text"] for delta in deltas], ["a\ud800b"])
        self.assertIn(events[-1]["type"], ("message_stop", "response.completed"))
        answer = self.create({**self.streamedRequest, "stream": False})
        self.assertIn('"a\\ud800b"', json.dumps(answer))
