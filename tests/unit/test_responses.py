"""
The Responses routes end to end in memory: the proxy's whole site over InMemoryProxy, with the
fake TabbyAPI answering, every answer and event read with the C{openai} SDK's types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq import content

from tabbyproxy.config import Keys
from tabbyproxy.responsestore import ResponseStore
from tabbyproxy.scheduler import SchedulerSettings
from tests.support.fakes import InMemoryProxy
from tests.support.responsestypes import parseEvent, parseResponse
from tests.support.translated import HELLO, PROFILES, TOOL_CALL, SharedBehaviours, TranslatedRouteCase, chunk
from tests.support.wire import namedEvents

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


class ResponsesTestCase(TranslatedRouteCase):
    path = "/v1/responses"
    streamedRequest = {"model": "qwen", "input": "Hi", "stream": True}
    deltaEvent = b"response.output_text.delta"

    def parseAnswer(self, document: dict[str, Any]) -> None:
        parseResponse(document)

    def parseEvent(self, event: dict[str, Any]) -> None:
        parseEvent(event)

    def stream(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        events = super().stream(body)
        self.assertEqual([event["sequence_number"] for event in events], list(range(len(events))))
        return events

    def assertOpenAIError(self, response: Any, raw: bytes, status: int, fragment: str) -> None:
        self.assertEqual(response.code, status, raw)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        error = json.loads(raw)["error"]
        self.assertIn(fragment, error["message"])
        self.assertEqual(set(error), {"message", "type", "code", "param"})


class CreateTests(ResponsesTestCase):
    def test_notStreamed(self) -> None:
        """
        A Response object with the model's text, the model as the client named it, and usage;
        TabbyAPI got a chat stream with the profile's defaults and system prompt, without the
        proxy's fields, and keep_alive set the idle time.
        """
        document = self.create({"model": "qwen:latest", "input": "Hi", "keep_alive": "5m"})
        response = parseResponse(document)
        self.assertEqual((response.output_text, response.status, response.model), ("Hello", "completed", "qwen:latest"))
        assert response.usage is not None
        self.assertEqual((response.usage.input_tokens, response.usage.output_tokens), (3, 2))
        self.assertTrue(response.id.startswith("resp_"))
        self.assertEqual(self.lastUpstream(), {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.6,
        })
        status = self.proxy.scheduler.status()
        self.assertEqual((status["in_flight"], status["unload"]["fires_in_seconds"]), (0, 300))

    def test_streamed(self) -> None:
        """
        A streamed response is the same answer as events: created, in progress, the message and
        its text deltas, completed; the streamed text equals the non-streamed text.
        """
        events = self.stream({"model": "qwen", "input": "Hi"})
        self.assertEqual([event["type"] for event in events], [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.completed",
        ])
        streamed = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
        self.assertEqual(streamed, parseResponse(self.create({"model": "qwen", "input": "Hi"})).output_text)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_toolCall(self) -> None:
        """
        A tool call from TabbyAPI is a function_call item; the tool result sent back reaches
        TabbyAPI as a tool message answering that call.
        """
        self.proxy.tabby.chunks = list(TOOL_CALL)
        events = self.stream({"model": "qwen", "input": "Weather in Paris?", "tools": [WEATHER]})
        [call] = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        self.assertEqual((call["type"], call["call_id"], call["name"], call["arguments"]),
                         ("function_call", "call_7", "get_weather", '{"city": "Paris"}'))
        self.assertEqual(self.lastUpstream()["tools"][0]["function"]["name"], "get_weather")
        self.proxy.tabby.chunks = list(HELLO)
        self.create({"model": "qwen", "tools": [WEATHER], "input": [
            {"role": "user", "content": "Weather in Paris?"}, call,
            {"type": "function_call_output", "call_id": "call_7", "output": "Sunny"}]})
        self.assertEqual(self.lastUpstream()["messages"][-2:], [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_7", "content": "Sunny"},
        ])


class StoreTests(ResponsesTestCase):
    def test_previousResponseContinues(self) -> None:
        """
        A response stored (the default) is continued by C{previous_response_id}: TabbyAPI gets
        its input and output before the new input; GET returns it and DELETE forgets it.
        """
        first = self.create({"model": "qwen", "input": "Hi", "instructions": "Old rules."})
        self.create({"model": "qwen", "input": "Again", "previous_response_id": first["id"]})
        self.assertEqual(self.lastUpstream()["messages"], [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}])
        got = self.successResultOf(self.proxy.client.get(f"http://localhost/v1/responses/{first['id']}"))
        self.assertEqual(json.loads(self.successResultOf(content(got))), first)
        deleted = self.successResultOf(self.proxy.client.delete(f"http://localhost/v1/responses/{first['id']}"))
        self.assertEqual(json.loads(self.successResultOf(content(deleted))),
                         {"id": first["id"], "object": "response", "deleted": True})
        response, raw = self.post({"model": "qwen", "input": "x", "previous_response_id": first["id"]})
        self.assertOpenAIError(response, raw, 404, f"previous response '{first['id']}' not found")

    def test_storeFalseKeepsNothing(self) -> None:
        """
        With C{store: false} (what Codex sends) nothing is kept: a follow-up naming it is a 404
        that says why, and GET is a 404 too.
        """
        first = self.create({"model": "qwen", "input": "Hi", "store": False})
        response, raw = self.post({"model": "qwen", "input": "x", "previous_response_id": first["id"]})
        self.assertOpenAIError(response, raw, 404, "only those sent without store: false")
        got = self.successResultOf(self.proxy.client.get(f"http://localhost/v1/responses/{first['id']}"))
        self.assertOpenAIError(got, self.successResultOf(content(got)), 404, "not found")

    def test_storeIsBounded(self) -> None:
        """
        The store keeps at most its count and its bytes, the oldest evicted first.
        """
        store = ResponseStore(maxResponses=2, maxBytes=10_000)
        for number in range(3):
            store.put({"id": f"resp_{number}", "output": []}, [{"role": "user", "content": "x"}])
        self.assertEqual((store.get("resp_0"), len(store)), (None, 2))
        store.put({"id": "resp_big", "output": []}, [{"role": "user", "content": "x" * 6000}])
        self.assertIsNone(store.get("resp_1"))
        self.assertIsNotNone(store.get("resp_big"))
        self.assertLessEqual(store.bytes, 10_000)
        store.put({"id": "resp_huge", "output": []}, [{"role": "user", "content": "x" * 20_000}])
        self.assertIsNone(store.get("resp_huge"))


class ErrorTests(ResponsesTestCase):
    def test_badRequests(self) -> None:
        """
        A missing or unknown model, a body that is not JSON and a malformed field each get
        OpenAI's error document with a message that says what was wrong, and start nothing.
        """
        cases: list[tuple[object, int, str]] = [
            ({"input": "x"}, 400, "model is required"),
            ({"model": "gpt-5", "input": "x"}, 404, "model 'gpt-5' not found"),
            (b"{", 400, "not valid JSON"),
            ({"model": "qwen", "input": 5}, 400, "input must be a string or a list of items"),
            ({"model": "qwen", "input": "x", "keep_alive": "soon"}, 400, "keep_alive"),
        ]
        for body, status, fragment in cases:
            self.assertOpenAIError(*self.post(body), status, fragment)
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_keyRequired(self) -> None:
        """
        With keys on, a request without one is OpenAI's 401.
        """
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES,
                                   keys=Keys(enabled=True, apiKeys=("api-key",), adminKey="admin-key"))
        self.assertOpenAIError(*self.post({"model": "qwen", "input": "x"}), 401, "")
        self.proxy.tabby.chunks = list(HELLO)
        response, raw = self.post({"model": "qwen", "input": "x"}, {"Authorization": "Bearer api-key"})
        self.assertEqual(response.code, 200, raw)

    def test_bodyOverLimit(self) -> None:
        """
        A body over the size limit is OpenAI's 413.
        """
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, maxBodySize=100)
        self.assertOpenAIError(*self.post({"model": "qwen", "input": "x" * 200}), 413, "over the limit")

    def test_errorInTabbyStream(self) -> None:
        """
        TabbyAPI's error event mid-stream ends a streamed response with an C{error} event and
        C{response.failed}; a non-streamed one is a 502.
        """
        self.proxy.tabby.chunks = [chunk({"content": "Hel"}),
                                   b'data: {"error":{"message":"Chat completion aborted.","trace":null}}\r\n\r\n']
        events = self.stream({"model": "qwen", "input": "x"})
        self.assertEqual([e["type"] for e in events[-2:]], ["error", "response.failed"])
        self.assertEqual(events[-1]["response"]["error"]["message"], "Chat completion aborted.")
        self.assertOpenAIError(*self.post({"model": "qwen", "input": "x"}), 502, "Chat completion aborted.")
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_truncatedStream(self) -> None:
        """
        A TabbyAPI stream that ends without C{[DONE]} is a failed response, not a completed one.
        """
        self.proxy.tabby.chunks = [chunk({"content": "Hel"})]
        events = self.stream({"model": "qwen", "input": "x"})
        self.assertEqual(events[-1]["type"], "response.failed")
        self.assertIn("ended before it was complete", events[-1]["response"]["error"]["message"])

    def test_tabbyRefuses(self) -> None:
        """
        TabbyAPI's error answer is OpenAI's error document when not streaming, and the end of
        the stream when streaming, with OpenAI's code for a prompt over the context.
        """
        for streaming in (False, True):
            self.proxy.tabby.hold = True
            d = self.proxy.client.post("http://localhost/v1/responses",
                                       json={"model": "qwen", "input": "x", "stream": streaming})
            self.proxy.flush()
            [pending] = self.proxy.tabby.pending
            self.proxy.tabby.pending.clear()
            pending.setResponseCode(400)
            pending.write(json.dumps({"error": {"message": "Prompt length 9000 exceeds the available context size "
                                                           "of 4096 tokens"}}).encode())
            pending.finish()
            self.proxy.flush()
            response = self.successResultOf(d)
            raw = self.successResultOf(content(response))
            if not streaming:
                self.assertOpenAIError(response, raw, 400, "exceeds the available context size")
            else:
                events = namedEvents(raw)
                self.assertEqual(events[-2]["code"], "context_length_exceeded")
                self.assertEqual(events[-1]["type"], "response.failed")


class LoadingTests(ResponsesTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.proxy.tabby.healthy = False

    def test_createdAtOnceThenComments(self) -> None:
        """
        A streamed request whose model is starting gets C{response.created} at once, an SSE
        comment every few seconds while it waits, then the answer.
        """
        d = self.proxy.client.post("http://localhost/v1/responses", json={"model": "qwen", "input": "x", "stream": True})
        self.proxy.flush()
        body = content(self.successResultOf(d))
        self.proxy.reactor.advance(5)
        self.proxy.tabby.healthy = True
        self.proxy.reactor.advance(0.25)
        self.proxy.flush()
        raw = self.successResultOf(body)
        self.assertTrue(raw.startswith(b"event: response.created\n"))
        self.assertIn(b"\n\n: loading qwen ... 5s\n\n", raw)
        self.assertEqual(namedEvents(raw)[-1]["type"], "response.completed")

    def test_failedStartFailsTheStream(self) -> None:
        """
        A model that fails to start ends the stream with C{response.failed} saying why; a
        non-streamed request gets OpenAI's 503.
        """
        d = self.proxy.client.post("http://localhost/v1/responses", json={"model": "qwen", "input": "x", "stream": True})
        self.proxy.flush()
        body = content(self.successResultOf(d))
        self.proxy.reactor.spawned[0].exit(1)
        self.proxy.flush()
        events = namedEvents(self.successResultOf(body))
        self.assertEqual([e["type"] for e in events], ["response.created", "response.in_progress", "error",
                                                       "response.failed"])
        self.assertIn("exited with status 1", events[-1]["response"]["error"]["message"])
        d = self.proxy.client.post("http://localhost/v1/responses", json={"model": "qwen", "input": "x"})
        self.proxy.flush()
        self.proxy.reactor.spawned[-1].exit(1)
        self.proxy.flush()
        response = self.successResultOf(d)
        self.assertOpenAIError(response, self.successResultOf(content(response)), 503, "exited with status 1")

    def test_queueFull(self) -> None:
        """
        A request over the wait queue's bound is OpenAI's 503.
        """
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, settings=SchedulerSettings(maxWaiting=1))
        self.proxy.tabby.healthy = False
        self.proxy.client.post("http://localhost/v1/responses", json={"model": "qwen", "input": "a"})
        self.assertOpenAIError(*self.post({"model": "qwen", "input": "b"}), 503, "server busy")


class SharedTests(SharedBehaviours, ResponsesTestCase):
    """
    What every translated route does, on the Responses route.
    """
