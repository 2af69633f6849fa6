"""
The Messages routes end to end in memory: the proxy's whole site over InMemoryProxy, with the
fake TabbyAPI answering, every answer and event read with the C{anthropic} SDK's types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq import content

from tabbyproxy.config import Keys
from tabbyproxy.routes.loading import TICK_INTERVAL
from tabbyproxy.scheduler import SchedulerSettings
from tests.support.fakes import InMemoryProxy
from tests.support.messagestypes import parseError, parseEvent, parseMessage
from tests.support.translated import HELLO, PROFILES, TOOL_CALL, SharedBehaviours, TranslatedRouteCase, chunk
from tests.support.wire import StreamedBody, namedEvents

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14"}


class MessagesTestCase(TranslatedRouteCase):
    path = "/v1/messages?beta=true"
    headers = ANTHROPIC_HEADERS
    streamedRequest = {"model": "qwen", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    deltaEvent = b"content_block_delta"

    def parseAnswer(self, document: dict[str, Any]) -> None:
        parseMessage(document)

    def parseEvent(self, event: dict[str, Any]) -> None:
        parseEvent(event)

    def assertAnthropicError(self, response: Any, raw: bytes, status: int, kind: str, fragment: str) -> None:
        self.assertEqual(response.code, status, raw)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        document = json.loads(raw)
        self.assertEqual((document["type"], document["error"]["type"]), ("error", kind))
        self.assertIn(fragment, document["error"]["message"])
        self.assertEqual(set(document), {"type", "error", "request_id"})
        if kind != "request_too_large":  # Anthropic's documented type, which the SDK's union lacks
            parseError(document)


class CreateTests(MessagesTestCase):
    def test_notStreamed(self) -> None:
        """
        A Message with the model's text, the model as the client named it, end_turn and
        usage; TabbyAPI got a chat stream with the profile's defaults and system prompt, and
        keep_alive set the idle time.
        """
        document = self.create({"model": "qwen:latest", "max_tokens": 50, "keep_alive": "5m",
                                "messages": [{"role": "user", "content": "Hi"}]})
        message = parseMessage(document)
        self.assertEqual((message.content[0].type, message.model, message.stop_reason), ("text", "qwen:latest", "end_turn"))
        self.assertEqual(document["content"][0]["text"], "Hello")
        self.assertEqual((message.usage.input_tokens, message.usage.output_tokens), (3, 2))
        self.assertTrue(message.id.startswith("msg_"))
        self.assertEqual(self.lastUpstream(), {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 50, "temperature": 0.6,
        })
        status = self.proxy.scheduler.status()
        self.assertEqual((status["in_flight"], status["unload"]["fires_in_seconds"]), (0, 300))
        [record] = list(self.proxy.state.history)
        self.assertEqual((record.tokensIn, record.tokensOut, record.tokensExact), (3, 2, True))

    def test_streamed(self) -> None:
        """
        A streamed message is the same answer as events; the streamed text equals the
        non-streamed text.
        """
        events = self.stream({"model": "qwen", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]})
        self.assertEqual([event["type"] for event in events], [
            "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
            "content_block_stop", "message_delta", "message_stop",
        ])
        streamed = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        document = self.create({"model": "qwen", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]})
        self.assertEqual(streamed, document["content"][0]["text"])
        self.assertEqual(events[-2]["usage"]["output_tokens"], 2)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)
        self.assertEqual([(r.tokensOut, r.tokensExact) for r in self.proxy.state.history], [(2, True), (2, True)])

    def test_toolUse(self) -> None:
        """
        A tool call from TabbyAPI is a tool_use block and the tool_use stop reason; the
        tool_result sent back reaches TabbyAPI as a tool message answering that call.
        """
        self.proxy.tabby.chunks = list(TOOL_CALL)
        document = self.create({"model": "qwen", "max_tokens": 50, "tools": [WEATHER],
                                "messages": [{"role": "user", "content": "Weather in Paris?"}]})
        [block] = document["content"]
        self.assertEqual((block["type"], block["name"], block["input"], document["stop_reason"]),
                         ("tool_use", "get_weather", {"city": "Paris"}, "tool_use"))
        self.assertTrue(block["id"].startswith("toolu_"))
        self.assertEqual(self.lastUpstream()["tools"][0]["function"]["name"], "get_weather")
        self.proxy.tabby.chunks = list(HELLO)
        self.create({"model": "qwen", "max_tokens": 50, "tools": [WEATHER], "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": document["content"]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "Sunny"}]}]})
        self.assertEqual(self.lastUpstream()["messages"][-2:], [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": block["id"], "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": block["id"], "content": "Sunny"},
        ])

    def test_countTokens(self) -> None:
        """
        count_tokens asks TabbyAPI's tokenizer for the templated messages and answers
        C{{"input_tokens": N}}.
        """
        tabby = self.proxy.tabby
        render = tabby.render

        def answer(request: Any) -> Any:
            if request.path == b"/v1/token/encode":
                request.content.seek(0)
                tabby.requests.append(("/v1/token/encode", json.loads(request.content.read()), {}))
                return b'{"tokens":[1,2,3,4],"length":4}'
            return render(request)

        tabby.render = answer  # type: ignore[method-assign]
        response, raw = self.post({"model": "qwen", "messages": [{"role": "user", "content": "Hi"}]},
                                  path="/v1/messages/count_tokens")
        self.assertEqual((response.code, json.loads(raw)), (200, {"input_tokens": 4}))
        self.assertEqual(tabby.requests[-1][1], {"text": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Hi"}]})

    def test_models(self) -> None:
        """
        GET /v1/models with anthropic-version is Anthropic's list; without it, OpenAI's.
        """
        from anthropic.types import ModelInfo

        got = self.successResultOf(self.proxy.client.get("http://localhost/v1/models", headers=ANTHROPIC_HEADERS))
        listing = json.loads(self.successResultOf(content(got)))
        self.assertEqual((listing["has_more"], listing["first_id"], listing["last_id"]), (False, "qwen", "qwen"))
        [card] = listing["data"]
        self.assertEqual(ModelInfo.model_validate(card).id, "qwen")
        got = self.successResultOf(self.proxy.client.get("http://localhost/v1/models"))
        self.assertEqual(json.loads(self.successResultOf(content(got)))["object"], "list")


class ErrorTests(MessagesTestCase):
    def test_badRequests(self) -> None:
        """
        A missing or unknown model, a body that is not JSON and a malformed field each get
        Anthropic's error document, and start nothing.
        """
        cases: list[tuple[object, int, str, str]] = [
            ({"messages": []}, 400, "invalid_request_error", "model: Field required"),
            ({"model": "claude-sonnet-4-5", "messages": []}, 404, "not_found_error", "claude-sonnet-4-5 not found"),
            (b"{", 400, "invalid_request_error", "not valid JSON"),
            ({"model": "qwen", "messages": 5}, 400, "invalid_request_error", "messages: must be a list"),
        ]
        for body, status, kind, fragment in cases:
            self.assertAnthropicError(*self.post(body), status, kind, fragment)
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_keys(self) -> None:
        """
        With keys on, a request without one is Anthropic's 401; x-api-key and Bearer both carry it.
        """
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES,
                                   keys=Keys(enabled=True, apiKeys=("api-key",), adminKey="admin-key"))
        body = {"model": "qwen", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        self.assertAnthropicError(*self.post(body), 401, "authentication_error", "API key")
        for headers in ({"x-api-key": "api-key"}, {"Authorization": "Bearer api-key"}):
            self.proxy.tabby.chunks = list(HELLO)
            response, raw = self.post(body, headers)
            self.assertEqual(response.code, 200, raw)

    def test_bodyOverLimit(self) -> None:
        """
        A body over the size limit is Anthropic's 413.
        """
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, maxBodySize=100)
        self.assertAnthropicError(*self.post({"model": "qwen", "messages": [{"role": "user", "content": "x" * 200}]}),
                                  413, "request_too_large", "over the limit")

    def test_errorInTabbyStream(self) -> None:
        """
        TabbyAPI's error event mid-stream ends a streamed message with an error event; a
        non-streamed one is Anthropic's api_error 502.
        """
        self.proxy.tabby.chunks = [chunk({"content": "Hel"}),
                                   b'data: {"error":{"message":"Chat completion aborted.","trace":null}}\r\n\r\n']
        body = {"model": "qwen", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        events = self.stream(body)
        self.assertEqual(events[-1], {"type": "error", "error": {"type": "api_error", "message": "Chat completion aborted."}})
        self.assertAnthropicError(*self.post(body), 502, "api_error", "Chat completion aborted.")

    def test_queueFull(self) -> None:
        """
        A request over the wait queue's bound is Anthropic's overloaded_error, 529, which its
        clients retry.
        """
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, settings=SchedulerSettings(maxWaiting=1))
        self.proxy.tabby.healthy = False
        body = {"model": "qwen", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        self.proxy.client.post("http://localhost/v1/messages", json=body)
        self.assertAnthropicError(*self.post(body), 529, "overloaded_error", "server busy")
        response, raw = self.post({**body, "stream": True})
        self.assertEqual(namedEvents(raw)[-1]["error"]["type"], "overloaded_error")


class LoadingTests(MessagesTestCase):
    def test_pingsWhileLoading(self) -> None:
        """
        A streaming request whose model starts gets message_start and a ping at once, a ping
        every few seconds while it waits, then the answer.
        """
        self.proxy.tabby.healthy = False
        d = self.proxy.client.post("http://localhost/v1/messages", headers=ANTHROPIC_HEADERS, json={
            "model": "qwen", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]})
        self.proxy.flush()
        body = content(self.successResultOf(d))
        self.proxy.reactor.advance(TICK_INTERVAL)
        self.proxy.tabby.healthy = True
        self.proxy.reactor.advance(0.25)
        self.proxy.flush()
        events = namedEvents(self.successResultOf(body))
        self.assertEqual([e["type"] for e in events][:4], ["message_start", "ping", "ping", "content_block_start"])
        self.assertEqual(events[-1]["type"], "message_stop")

    def test_pingsUntilFirstToken(self) -> None:
        """
        While TabbyAPI reads the prompt (no token yet) the stream still gets a ping every few
        seconds; once tokens come, no more pings.
        """
        self.proxy.tabby.hold = True
        d = self.proxy.client.post("http://localhost/v1/messages", unbuffered=True, headers=ANTHROPIC_HEADERS, json={
            "model": "qwen", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]})
        self.proxy.flush()
        [upstream] = self.proxy.tabby.pending
        body = StreamedBody.of(self.successResultOf(d))
        self.proxy.reactor.advance(TICK_INTERVAL)
        self.proxy.flush()
        self.assertEqual([e["type"] for e in namedEvents(body.data)], ["message_start", "ping", "ping"])
        upstream.setHeader(b"Content-Type", b"text/event-stream")
        upstream.write(HELLO[0])
        self.proxy.flush()
        self.proxy.reactor.advance(3 * TICK_INTERVAL)
        for data in HELLO[1:]:
            upstream.write(data)
        upstream.finish()
        self.proxy.flush()
        types = [e["type"] for e in namedEvents(body.data)]
        self.assertEqual(types.count("ping"), 2)
        self.assertEqual(types[-1], "message_stop")

    def test_failedStartFailsTheStream(self) -> None:
        """
        A model that fails to start ends the stream with an overloaded_error event saying why;
        a non-streamed request gets Anthropic's 529.
        """
        self.proxy.tabby.healthy = False
        body = {"model": "qwen", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        d = self.proxy.client.post("http://localhost/v1/messages", headers=ANTHROPIC_HEADERS,
                                   json={**body, "stream": True})
        self.proxy.flush()
        streamed = content(self.successResultOf(d))
        self.proxy.reactor.spawned[0].exit(1)
        self.proxy.flush()
        events = namedEvents(self.successResultOf(streamed))
        self.assertEqual([e["type"] for e in events], ["message_start", "ping", "error"])
        parseEvent(events[-1])
        self.assertEqual(events[-1]["error"]["type"], "overloaded_error")
        self.assertIn("exited with status 1", events[-1]["error"]["message"])
        d = self.proxy.client.post("http://localhost/v1/messages", headers=ANTHROPIC_HEADERS, json=body)
        self.proxy.flush()
        self.proxy.reactor.spawned[-1].exit(1)
        self.proxy.flush()
        response = self.successResultOf(d)
        self.assertAnthropicError(response, self.successResultOf(content(response)), 529, "overloaded_error",
                                  "exited with status 1")


class SharedTests(SharedBehaviours, MessagesTestCase):
    """
    What every translated route does, on the Messages route.
    """
