"""
The OpenAI routes, end to end in memory: a StubTreq client against the proxy's resource, and a
StubTreq TabbyAPI stand-in as the upstream.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq import content, json_content
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed

from tabbyproxy.config import Keys
from tabbyproxy.scheduler import SchedulerSettings
from tests.support.fakes import InMemoryProxy
from tests.support.logs import CapturedEvents
from tests.support.wire import StreamedBody, sseDocuments

PROFILES: dict[str, dict[str, Any]] = {
    "qwen": {
        "model": {"model_name": "Qwen", "unload_timer": 60},
        "template": {"temperature": 0.6, "top_k": 20, "system": "Be brief."},
    },
    "llama": {"model": {"model_name": "Llama"}},
}
KEYS = Keys(enabled=True, apiKeys=("api-key",), adminKey="admin-key")

# The fake TabbyAPI's default stream, as the proxy relays it: a role in the first delta.
RELAYED_CHUNKS = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"}}]}\r\n\r\ndata: [DONE]\r\n\r\n'

HEAD_CHAT_CHUNKS = [
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{"reasoning_content":"Hm"},"finish_reason":null}],"model":"Qwen3-8B-exl3"}\r\n\r\n',
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{"content":"Hi"},"finish_reason":"stop","eos_reason":"stop_token"}],"model":"Qwen3-8B-exl3"}\r\n\r\n',
    b"data: [DONE]\r\n\r\n",
]
"""A chat stream as TabbyAPI's HEAD writes it: no role, its folder as model."""

HEAD_COMPLETION_CHUNKS = [
    b'data: {"id":"chatcmpl-1","object":"text_completion","choices":[{"index":0,"text":"Once",'
    b'"finish_reason":null}],"created":1,"model_name":"Qwen3-8B-exl3"}\r\n\r\n',
    b"data: [DONE]\r\n\r\n",
]
"""A completions stream as TabbyAPI's HEAD writes it: its folder as model_name."""


class OpenAIRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)

    def post(self, path: str, body: object, headers: dict[str, str] | None = None) -> Any:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.successResultOf(self.proxy.client.post(
            "http://localhost" + path, data=raw, headers={"Content-Type": "application/json", **(headers or {})}
        ))

    def jsonOf(self, response: Any) -> Any:
        return self.successResultOf(json_content(response))

    def assertOpenAIError(self, response: Any, status: int, fragment: str) -> None:
        self.assertEqual(response.code, status)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        error = self.jsonOf(response)["error"]
        self.assertIn(fragment, error["message"])
        self.assertEqual(set(error), {"message", "type", "code", "param"})

    def test_chatIsForwardedWithTemplateDefaults(self) -> None:
        """
        A chat request starts its model and reaches TabbyAPI without the proxy's fields (model,
        keep_alive), with the profile's defaults where the request set nothing and the profile's
        system prompt in front; the request's own values win.
        """
        response = self.post("/v1/chat/completions", {
            "model": "qwen", "keep_alive": "5m", "temperature": 0.1,
            "messages": [{"role": "user", "content": "hi"}],
        })
        self.assertEqual(response.code, 200)
        self.assertEqual(self.jsonOf(response)["path"], "/v1/chat/completions")
        [(path, body, _)] = self.proxy.tabby.requests
        self.assertEqual(path, "/v1/chat/completions")
        self.assertEqual(body, {
            "temperature": 0.1, "top_k": 20, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        })
        self.assertEqual(self.proxy.scheduler.status()["unload"]["fires_in_seconds"], 300)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_streamIsRelayedWithRole(self) -> None:
        """
        A streaming answer reaches the client as an event stream, with a role in its first delta.
        """
        response = self.post("/v1/chat/completions", {
            "model": "llama", "stream": True, "messages": [{"role": "user", "content": "hi"}],
        })
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        self.assertEqual(self.successResultOf(content(response)), RELAYED_CHUNKS)
        [(_, body, _)] = self.proxy.tabby.requests
        self.assertNotIn("stream_options", body)

    def test_chatStreamNamesTheAskedModelAndRole(self) -> None:
        """
        TabbyAPI's chat stream reaches the client with the model name the client sent in every
        chunk, and C{"role": "assistant"} in the first delta only; the rest is unchanged.
        """
        self.proxy.tabby.chunks = HEAD_CHAT_CHUNKS
        response = self.post("/v1/chat/completions", {
            "model": "qwen:latest", "stream": True, "messages": [{"role": "user", "content": "hi"}],
        })
        chunks = sseDocuments(self.successResultOf(content(response)))
        self.assertEqual([chunk["model"] for chunk in chunks], ["qwen:latest", "qwen:latest"])
        self.assertEqual([chunk["choices"][0]["delta"] for chunk in chunks],
                         [{"role": "assistant", "reasoning_content": "Hm"}, {"content": "Hi"}])
        self.assertEqual(chunks[1]["choices"][0]["eos_reason"], "stop_token")

    def test_completionsStreamCarriesModel(self) -> None:
        """
        TabbyAPI's completions chunks say C{model_name}: the client gets C{model}, the name it
        sent, and no role.
        """
        self.proxy.tabby.chunks = HEAD_COMPLETION_CHUNKS
        response = self.post("/v1/completions", {"model": "qwen", "stream": True, "prompt": "x"})
        [chunk] = sseDocuments(self.successResultOf(content(response)))
        self.assertEqual(chunk["model"], "qwen")
        self.assertNotIn("model_name", chunk)
        self.assertEqual(chunk["choices"], [{"index": 0, "text": "Once", "finish_reason": None}])

    def test_replyNamesTheAskedModelAndHasUsage(self) -> None:
        """
        A non-streamed reply asks TabbyAPI for usage (it counts only when asked) and names the
        model the client sent.
        """
        response = self.post("/v1/chat/completions", {
            "model": "qwen", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"x": 1},
        })
        [(_, body, _)] = self.proxy.tabby.requests
        self.assertEqual(body["stream_options"], {"x": 1, "include_usage": True})
        self.assertEqual(self.jsonOf(response)["model"], "qwen")

    def test_replyHasItsLength(self) -> None:
        """
        A non-streamed reply, rewritten by the proxy, is sent with its own C{Content-Length}, not
        chunked.
        """
        response = self.post("/v1/chat/completions", {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]})
        body = self.successResultOf(content(response))
        # Twisted's client keeps the framing headers to itself, and gives the length.
        self.assertEqual(response.length, len(body))

    def test_completionsTakeModelAndDefaults(self) -> None:
        """
        /v1/completions accepts an Ollama-style tagged name and gets sampler defaults, but no
        system prompt.
        """
        response = self.post("/v1/completions", {"model": "qwen:latest", "prompt": "Once"})
        self.assertEqual(response.code, 200)
        [(path, body, _)] = self.proxy.tabby.requests
        self.assertEqual((path, body), ("/v1/completions", {
            "prompt": "Once", "temperature": 0.6, "top_k": 20, "stream_options": {"include_usage": True}}))

    def test_unknownModel(self) -> None:
        """
        An unknown model is a 404 that says where to find the ids, and starts nothing.
        """
        response = self.post("/v1/chat/completions", {"model": "gpt-4", "messages": []})
        self.assertOpenAIError(response, 404, "model 'gpt-4' not found: GET /v1/models")
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_badInput(self) -> None:
        """
        Malformed JSON, a body that is not an object, a bad keep_alive, missing messages and a
        path-like model each get a 400 that says what was wrong, and start nothing.
        """
        cases: list[tuple[object, int, str]] = [
            (b'{"messages": [', 400, "not valid JSON"),
            ([1, 2], 400, "must be a JSON object"),
            (b"", 400, "missing request body"),
            ({"model": "qwen", "keep_alive": "5 minutes", "messages": []}, 400, "keep_alive '5 minutes'"),
            ({"model": "qwen", "messages": "hi"}, 400, "messages must be a list"),
            ({"model": "../etc/passwd", "messages": []}, 404, "not found"),
            ({"model": ["qwen"], "messages": []}, 404, "not found"),
        ]
        for body, status, fragment in cases:
            self.assertOpenAIError(self.post("/v1/chat/completions", body), status, fragment)
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_bodyOverLimit(self) -> None:
        """
        A body over the size limit is a 413.
        """
        proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, maxBodySize=100)
        self.proxy = proxy
        response = self.post("/v1/chat/completions", {"model": "qwen", "messages": [{"content": "x" * 200}]})
        self.assertOpenAIError(response, 413, "over the limit of 100 bytes")

    def test_upstreamErrorsBecomeOpenAIErrors(self) -> None:
        """
        TabbyAPI's FastAPI errors (C{{"detail": ...}}) reach the client in OpenAI's shape, with
        TabbyAPI's status.
        """
        self.proxy.tabby.hold = True
        d = self.proxy.client.post("http://localhost/v1/chat/completions", json={"model": "qwen", "messages": []})
        [pending] = self.proxy.tabby.pending
        pending.setResponseCode(422)
        pending.write(json.dumps({"detail": [{"loc": ["body", "presence_penalty"],
                                              "msg": "Input should be greater than or equal to 0"}]}).encode())
        pending.finish()
        self.proxy.flush()
        self.assertOpenAIError(self.successResultOf(d), 422, "presence_penalty: Input should be greater")

    def test_queueFullIs503(self) -> None:
        """
        When too many requests wait for a model, the next one gets a 503 in OpenAI's shape.
        """
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, settings=SchedulerSettings(maxWaiting=1))
        self.proxy.tabby.healthy = False
        self.proxy.client.post("http://localhost/v1/completions", json={"model": "qwen", "prompt": "a"})
        self.assertOpenAIError(self.post("/v1/completions", {"model": "qwen", "prompt": "b"}), 503, "server busy")

    def test_failedStartIs503WithChildOutput(self) -> None:
        """
        A model that fails to load answers the waiting request with the exit status and the
        cause from the child's last lines, not its traceback and not the server's folders; the
        whole output is in /status's last_error.
        """
        self.proxy.tabby.healthy = False
        d = self.proxy.client.post("http://localhost/v1/completions", json={"model": "qwen", "prompt": "a"})
        [process] = self.proxy.reactor.spawned
        process.print("Traceback (most recent call last):\n"
                      '  File "/srv/tabbyAPI/main.py", line 59, in entrypoint_async\n'
                      "    await model.load_model(\n"
                      "ValueError: Failed to load config.json from /srv/tabbyAPI/models/Qwen\n")
        process.exit(1)
        self.proxy.flush()
        response = self.successResultOf(d)
        self.assertOpenAIError(response, 503, "exited with status 1")
        message = self.successResultOf(json_content(response))["error"]["message"]
        self.assertTrue(message.endswith("; TabbyAPI said: ValueError: Failed to load config.json from .../Qwen"), message)
        self.assertNotIn("/srv", message)
        self.assertNotIn("Traceback", message)
        lastError = self.proxy.scheduler.status()["last_error"]
        self.assertIn('File "/srv/tabbyAPI/main.py"', lastError)

    def test_modelsList(self) -> None:
        """
        /v1/models lists every profile in OpenAI's shape, saying which one is loaded.
        """
        self.post("/v1/completions", {"model": "qwen", "prompt": "a"})
        response = self.successResultOf(self.proxy.client.get("http://localhost/v1/models"))
        document = self.jsonOf(response)
        self.assertEqual(document["object"], "list")
        self.assertEqual(
            sorted((m["id"], m["object"], m["owned_by"], m["loaded"]) for m in document["data"]),
            [("llama", "model", "tabbyproxy", False), ("qwen", "model", "tabbyproxy", True)],
        )

    def test_passThroughToRunningModel(self) -> None:
        """
        /v1/token/encode goes to the running model; with nothing running it is a 503 that says
        how to start one.
        """
        self.assertOpenAIError(self.post("/v1/token/encode", {"text": "hi"}), 503, "no model is loaded")
        self.post("/v1/completions", {"model": "qwen", "prompt": "a"})
        self.assertEqual(self.post("/v1/token/encode", {"text": "hi"}).code, 200)
        self.assertEqual(self.proxy.tabby.requests[-1][:2], ("/v1/token/encode", {"text": "hi"}))

    def test_unknownRouteIsJSON404(self) -> None:
        """
        Unknown routes under /v1 are 404s in OpenAI's shape.
        """
        response = self.successResultOf(self.proxy.client.get("http://localhost/v1/nothing"))
        self.assertOpenAIError(response, 404, "/v1/nothing")


class MissingRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)

    def call(self, method: bytes, path: str) -> tuple[int, Any]:
        response = self.successResultOf(self.proxy.client.request(method.decode(), "http://localhost" + path))
        return response.code, self.successResultOf(json_content(response))

    def test_answersInEachAPIsShape(self) -> None:
        """
        A wrong method under /v1 is a 405 in OpenAI's shape; an unknown path or a wrong method
        elsewhere outside /api is a 404 or 405 with C{{"error": "..."}}.
        """
        code, document = self.call(b"GET", "/v1/chat/completions")
        self.assertEqual((code, document["error"]["message"]), (405, "GET is not allowed here"))
        self.assertEqual(set(document["error"]), {"message", "type", "code", "param"})
        self.assertEqual(self.call(b"GET", "/nope"), (404, {"error": "no route /nope"}))
        self.assertEqual(self.call(b"DELETE", "/status"), (405, {"error": "DELETE is not allowed here"}))

    def test_emptySegmentIsAMissingRouteNotARedirect(self) -> None:
        """
        A path with an empty segment that would match once merged (werkzeug raises a redirect
        for it, which API clients do not follow) is a 404 in the route's API shape, not a 500.
        """
        code, document = self.call(b"GET", "/v1//models/qwen")
        self.assertEqual((code, document["error"]["message"]), (404, "Invalid URL (GET /v1//models/qwen)"))
        self.assertEqual(set(document["error"]), {"message", "type", "code", "param"})
        code, document = self.call(b"POST", "/v1//chat/completions")
        self.assertEqual(code, 404)
        self.assertIn("error", document)
        self.assertEqual(self.call(b"GET", "/api//tags"), (404, {"error": "no route /api//tags"}))


class AuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, keys=KEYS)

    def get(self, path: str, key: str | None = None, header: str = "Authorization", method: str = "GET") -> Any:
        headers = {} if key is None else {header: f"Bearer {key}" if header == "Authorization" else key}
        return self.successResultOf(self.proxy.client.request(method, "http://localhost" + path, headers=headers))

    def test_keysRequired(self) -> None:
        """
        With auth on, /v1 routes need an API key (Bearer or x-api-key) and answer 401 in OpenAI's
        shape without one.
        """
        for key in (None, "wrong"):
            response = self.get("/v1/models", key)
            self.assertEqual(response.code, 401)
            self.assertIn("error", self.successResultOf(json_content(response)))
        self.assertEqual(self.get("/v1/models", "api-key").code, 200)
        self.assertEqual(self.get("/v1/models", "api-key", header="x-api-key").code, 200)
        self.assertEqual(self.get("/v1/models", "admin-key").code, 200)

    def test_unloadNeedsAdminKey(self) -> None:
        """
        /unload refuses API keys and accepts the admin key; /status is open.
        """
        self.assertEqual(self.get("/unload", "api-key", method="POST").code, 401)
        self.assertEqual(self.get("/unload", "admin-key", method="POST").code, 200)
        self.assertEqual(self.get("/status").code, 200)

    def test_statusWithoutAdminKeyShowsNoInternals(self) -> None:
        """
        With auth on, /status without the admin key shows what a dashboard needs (model, state,
        timer, counts) but not the child's port and pid, nor the last error with TabbyAPI's
        output; the admin key sees them.
        """
        self.proxy.tabby.healthy = False
        self.proxy.client.post("http://localhost/v1/completions", json={"model": "qwen", "prompt": "a"},
                               headers={"Authorization": "Bearer api-key"})
        [process] = self.proxy.reactor.spawned
        process.print("ValueError: Failed to load config.json from /srv/tabbyAPI/models/Qwen\n")
        process.exit(1)
        self.proxy.flush()
        self.assertIn("/srv/tabbyAPI", self.successResultOf(json_content(self.get("/status", "admin-key")))["last_error"])
        self.assertStatusShownWithout({"pid", "port", "last_error", "estimate"})
        self.proxy.tabby.healthy = True
        self.proxy.client.post("http://localhost/v1/completions", json={"model": "qwen", "prompt": "a"},
                               headers={"Authorization": "Bearer api-key"})
        self.proxy.flush()
        self.proxy.reactor.advance(1)
        self.proxy.flush()
        admin = self.successResultOf(json_content(self.get("/status", "admin-key")))
        self.assertEqual(admin["state"], "ready")
        self.assertIsInstance(admin["port"], int)
        self.assertIsInstance(admin["pid"], int)
        self.assertStatusShownWithout({"pid", "port", "last_error", "estimate"})

    def assertStatusShownWithout(self, hidden: set[str]) -> None:
        """
        /status without the admin key is the admin's /status without C{hidden} (and nothing of
        the server's folders).
        """
        admin = self.successResultOf(json_content(self.get("/status", "admin-key")))
        for key in (None, "api-key", "wrong"):
            shown = self.successResultOf(json_content(self.get("/status", key)))
            self.assertEqual(set(shown), set(admin) - hidden, key)
            # The timer's fires_at is read from the wall clock at each request.
            self.assertEqual(_without(shown, {"unload"}), _without(admin, hidden | {"unload"}), key)
            self.assertNotIn("/srv", json.dumps(shown))

    def test_proxyAuthenticatesToTabby(self) -> None:
        """
        The proxy sends TabbyAPI's admin key with each request it forwards.
        """
        response = self.successResultOf(self.proxy.client.post(
            "http://localhost/v1/completions", json={"model": "qwen", "prompt": "a"},
            headers={"Authorization": "Bearer api-key"},
        ))
        self.assertEqual(response.code, 200)
        [(_, _, headers)] = self.proxy.tabby.requests
        self.assertEqual(headers["authorization"], ["Bearer admin-key"])


class LoadingFeedbackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)
        self.proxy.tabby.healthy = False

    def streamChat(self) -> Any:
        d = self.proxy.client.post("http://localhost/v1/chat/completions", json={
            "model": "qwen", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        return d

    def test_commentsWhileTheModelStarts(self) -> None:
        """
        A streaming request that waits for its model gets its headers at once and an SSE
        comment every few seconds (clients skip comments), then the model's stream.
        """
        d = self.streamChat()
        self.proxy.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        body = content(response)
        self.proxy.reactor.advance(5)
        self.proxy.tabby.healthy = True
        self.proxy.reactor.advance(0.05)
        self.proxy.flush()
        raw = self.successResultOf(body)
        self.assertEqual(raw, b": loading qwen ... 0s\r\n\r\n: loading qwen ... 5s\r\n\r\n" + RELAYED_CHUNKS)

    def test_failedStartAfterCommentsIsAnEvent(self) -> None:
        """
        When the model fails to start after the stream began, the error arrives as an SSE event
        in OpenAI's error shape.
        """
        d = self.streamChat()
        self.proxy.flush()
        body = content(self.successResultOf(d))
        self.proxy.reactor.spawned[0].exit(1)
        self.proxy.flush()
        lines = self.successResultOf(body).split(b"\r\n\r\n")
        self.assertTrue(lines[0].startswith(b": loading qwen"))
        error = json.loads(lines[1][len(b"data: "):])["error"]
        self.assertIn("exited with status 1", error["message"])
        self.assertEqual(error["type"], "server_error")

    def test_noCommentsWhenTheModelIsReady(self) -> None:
        """
        A request for a ready model gets no comment at all: only its stream.
        """
        self.proxy.tabby.healthy = True
        self.successResultOf(self.proxy.client.post("http://localhost/v1/completions", json={"model": "qwen", "prompt": "x"}))
        response = self.successResultOf(self.streamChat())
        self.assertEqual(self.successResultOf(content(response)), RELAYED_CHUNKS)


class SuspectAnswerTests(SynchronousTestCase):
    def test_inStreamErrorChecksHealth(self) -> None:
        """
        TabbyAPI's in-stream error event makes the proxy check /health at once; an unhealthy
        child is replaced before the next request.
        """
        proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)
        proxy.tabby.chunks = [b'data: {"error":{"message":"Chat completion aborted.","trace":null}}\r\n\r\n']
        first = self.successResultOf(proxy.client.post("http://localhost/v1/completions", json={"model": "qwen", "prompt": "x"}))
        self.successResultOf(content(first))
        proxy.tabby.healthy = False
        response = self.successResultOf(proxy.client.post("http://localhost/v1/completions", json={
            "model": "qwen", "prompt": "x", "stream": True}))
        self.successResultOf(content(response))
        self.assertEqual(proxy.reactor.spawned[0].signals, ["TERM"])
        self.assertIn("is unhealthy", proxy.scheduler.status()["last_error"])


class CutOffAnswerTests(TestCase):
    """
    Issue 10, items 13 and 14: a non-streamed answer that TabbyAPI does not finish, and a client
    that leaves before TabbyAPI answered.
    """

    def setUp(self) -> None:
        self.events = CapturedEvents(self)
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)
        self.proxy.tabby.hold = True
        self.request = self.proxy.client.post("http://localhost/v1/chat/completions", json={
            "model": "qwen", "messages": [{"role": "user", "content": "hi"}]})
        self.proxy.flush()
        [self.upstream] = self.proxy.tabby.pending

    def errors(self) -> list[str]:
        return [formatEvent(e) for e in self.events.events if e["log_level"] >= LogLevel.error]

    def cutOff(self, upstream: Any, request: Any, start: bytes) -> None:
        """
        TabbyAPI's connection drops in the middle of a non-streamed answer that begins with
        C{start}: the client gets a 502 in OpenAI's error shape that points at GET /status, not
        a 200 with half a JSON document, and the failure is logged as an error.
        """
        upstream.setHeader(b"Content-Type", b"application/json")
        upstream.setHeader(b"Content-Length", b"100")
        upstream.write(start)
        self.proxy.flush()
        transport = upstream.channel.transport
        assert transport is not None
        transport.loseConnection()
        self.proxy.flush()
        response = self.successResultOf(request)
        self.assertEqual(response.code, 502)
        error = self.successResultOf(json_content(response))["error"]
        self.assertIn("the connection to TabbyAPI broke", error["message"])
        self.assertIn("see GET /status", error["message"])
        self.assertEqual(error["type"], "server_error")
        [logged] = self.errors()
        self.assertIn("TabbyAPI failed a request for qwen", logged)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_cutOffAnswerIs502(self) -> None:
        """
        A chat completion cut off mid-body is a 502.
        """
        self.cutOff(self.upstream, self.request, b'{"object":"chat.comp')

    def test_cutOffPassThroughIs502(self) -> None:
        """
        A pass-through answer (here C{/v1/embeddings}, which is relayed without rewriting) cut
        off mid-body is a 502 too.
        """
        self.upstream.write(b"{}")
        self.upstream.finish()
        self.proxy.flush()
        self.successResultOf(self.request)
        request = self.proxy.client.post("http://localhost/v1/embeddings", json={"model": "qwen", "input": "hi"})
        self.proxy.flush()
        self.cutOff(self.proxy.tabby.pending[-1], request, b'{"object":"list","data":[{"emb')

    def test_clientLeavingIsNoError(self) -> None:
        """
        A client that gives up on a non-streamed request before TabbyAPI answered is a 499
        access line at info level; nothing is logged as an error (Twisted reports the cancel
        as C{ResponseNeverReceived}, which is not TabbyAPI failing), and TabbyAPI's request is
        closed.
        """
        upstreamGone: list[Failure] = []
        self.upstream.notifyFinish().addErrback(upstreamGone.append)
        self.request.cancel()
        self.proxy.flush()
        self.failureResultOf(self.request)
        self.assertEqual(self.errors(), [])
        [access] = [e for e in self.events.events if e.get("log_format", "").startswith("{method} {path} {status}")]
        self.assertEqual((access["status"], access["log_level"]), (499, LogLevel.info))
        self.assertEqual(len(upstreamGone), 1)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_clientLeavingMidStreamIsNoError(self) -> None:
        """
        A client that leaves in the middle of a stream is a 499 access line too, with no error
        logged, and TabbyAPI's request is closed.
        """
        self.request = self.proxy.client.post("http://localhost/v1/chat/completions", unbuffered=True, json={
            "model": "qwen", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        self.proxy.flush()
        upstream = self.proxy.tabby.pending[-1]
        upstreamGone: list[Failure] = []
        upstream.notifyFinish().addErrback(upstreamGone.append)
        upstream.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        upstream.write(self.proxy.tabby.chunks[0])
        self.proxy.flush()
        body = StreamedBody.of(self.successResultOf(self.request))
        self.proxy.flush()
        body.hangUp()
        self.proxy.flush()
        self.failureResultOf(body.ended, ResponseFailed)
        self.assertEqual(self.errors(), [])
        [access] = [e for e in self.events.events if e.get("log_format", "").startswith("{method} {path} {status}")]
        self.assertEqual((access["status"], access["log_level"]), (499, LogLevel.info))
        self.assertEqual(len(upstreamGone), 1)


class StalledAnswerTests(TestCase):
    """
    Issue 10, item 11: an answer whose body stops coming (a hung TabbyAPI) ends with an error
    after --first-token-timeout or --chunk-timeout, and TabbyAPI's request is closed.
    """

    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)
        self.proxy.tabby.hold = True
        self.request = self.proxy.client.post("http://localhost/v1/chat/completions", json={
            "model": "qwen", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        self.proxy.flush()
        [self.upstream] = self.proxy.tabby.pending
        self.upstreamGone: list[Failure] = []
        self.upstream.notifyFinish().addErrback(self.upstreamGone.append)
        self.upstream.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        self.upstream.write(b"")
        self.proxy.flush()

    def wait(self, seconds: float) -> None:
        self.proxy.reactor.advance(seconds)
        self.proxy.flush()

    def error(self) -> str:
        """
        The message of the error the client got: the stream's last event, or the 502 that
        answers a stream with nothing written yet.
        """
        response = self.successResultOf(self.request)
        collected = content(response)
        self.proxy.flush()
        raw = self.successResultOf(collected)
        if raw.startswith(b"data:"):
            message: str = sseDocuments(raw)[-1]["error"]["message"]
            return message
        self.assertEqual(response.code, 502)
        message = json.loads(raw)["error"]["message"]
        return message

    def test_headersComeBeforeTheFirstToken(self) -> None:
        """
        A stream's status and headers reach the client as soon as TabbyAPI sent them, before
        its first token, as from TabbyAPI itself.
        """
        response = self.successResultOf(self.request)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        collected = content(response)
        self.upstream.write(self.proxy.tabby.chunks[0])
        self.upstream.finish()
        self.proxy.flush()
        self.assertEqual(sseDocuments(self.successResultOf(collected))[0]["choices"][0]["delta"]["content"], "Hi")

    def test_silenceBetweenChunksEndsTheStream(self) -> None:
        """
        After a first token, 120 s without another piece end the stream with an error event
        that names --chunk-timeout, and close TabbyAPI's request.
        """
        self.upstream.write(self.proxy.tabby.chunks[0])
        self.wait(100)
        self.upstream.write(self.proxy.tabby.chunks[0])
        self.proxy.flush()
        self.wait(119)
        self.assertEqual(self.upstreamGone, [])
        self.wait(1)
        self.assertIn("TabbyAPI sent nothing for 120s (--chunk-timeout)", self.error())
        self.assertEqual(len(self.upstreamGone), 1)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_firstTokenMayTakeLonger(self) -> None:
        """
        Before the first token the wait is --first-token-timeout (300 s): a long prompt is read
        first.
        """
        self.wait(299)
        self.assertEqual(self.upstreamGone, [])
        self.wait(1)
        self.assertIn("(--first-token-timeout)", self.error())
        self.assertEqual(len(self.upstreamGone), 1)


class HungChildTests(TestCase):
    """
    Issue 10, item 11: a child that hangs (its C{/health} unanswered for --hang-timeout while
    requests are in flight) ends those requests at once, each in its route's shape, and a
    child that never sends its response headers ends the request after --first-token-timeout.
    """

    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)
        self.proxy.tabby.hold = True

    def wait(self, seconds: float) -> None:
        self.proxy.reactor.advance(seconds)
        self.proxy.flush()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = self.proxy.client.post("http://localhost" + path, json=body)
        self.proxy.flush()
        return request

    def hang(self) -> None:
        """
        Leave C{/health} unanswered from now on, and let the hang check find it.
        """
        self.proxy.tabby.healthHangs = True
        self.wait(30)
        self.wait(60)

    def body(self, request: Any) -> tuple[int, bytes]:
        response = self.successResultOf(request)
        collected = content(response)
        self.proxy.flush()
        return response.code, self.successResultOf(collected)

    def test_streamsAndWaitingAnswersEndInTheirShapes(self) -> None:
        """
        When the child is judged hung, an OpenAI stream under way ends with an SSE error event,
        an Ollama stream with an error line, and a non-streamed request still waiting for
        TabbyAPI's headers with a 502; each names the hang, and nothing stays in flight.
        """
        chat = {"model": "qwen", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        openaiStream = self.post("/v1/chat/completions", chat)
        ollamaStream = self.post("/api/chat", chat)
        waiting = self.post("/v1/completions", {"model": "qwen", "prompt": "hi"})
        for upstream in self.proxy.tabby.pending[:2]:
            upstream.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
            upstream.write(self.proxy.tabby.chunks[0])
        self.proxy.flush()
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 3)

        self.hang()
        hung = "TabbyAPI for qwen (pid 1000) hung: GET /health did not answer within 60s (--hang-timeout)"
        code, raw = self.body(openaiStream)
        self.assertEqual(code, 200)
        self.assertIn(hung, sseDocuments(raw)[-1]["error"]["message"])
        code, raw = self.body(ollamaStream)
        self.assertEqual(code, 200)
        self.assertIn(hung, json.loads(raw.splitlines()[-1])["error"])
        code, raw = self.body(waiting)
        self.assertEqual(code, 502)
        self.assertIn(hung, json.loads(raw)["error"]["message"])
        status = self.proxy.scheduler.status()
        self.assertEqual((status["in_flight"], status["health"]), (0, "hung"))

    def test_headersMustComeWithinTheFirstTokenTimeout(self) -> None:
        """
        A child that takes the request and never answers it (while its C{/health} answers)
        gets 300 s for its headers; then the client gets a 502 that names --first-token-timeout.
        """
        waiting = self.post("/v1/completions", {"model": "qwen", "prompt": "hi"})
        [upstream] = self.proxy.tabby.pending
        gone: list[Failure] = []
        upstream.notifyFinish().addErrback(gone.append)
        self.wait(299)
        self.assertNoResult(waiting)
        self.wait(1)
        code, raw = self.body(waiting)
        self.assertEqual(code, 502)
        self.assertIn("TabbyAPI for qwen did not answer: no response within 300s (--first-token-timeout)",
                      json.loads(raw)["error"]["message"])
        self.assertEqual(len(gone), 1)
        self.assertEqual(self.proxy.scheduler.status()["health"], "ok")


    def test_anErrorBodyThatStopsComingEnds(self) -> None:
        """
        An error answer whose body stops coming is bounded as any body is: 120 s after its
        last piece the client gets a 502 that names --chunk-timeout, and TabbyAPI's request is
        closed.
        """
        waiting = self.post("/v1/completions", {"model": "qwen", "prompt": "hi"})
        [upstream] = self.proxy.tabby.pending
        gone: list[Failure] = []
        upstream.notifyFinish().addErrback(gone.append)
        upstream.setResponseCode(500)
        upstream.setHeader(b"Content-Type", b"application/json")
        upstream.write(b'{"detail": "')
        self.proxy.flush()
        self.wait(119)
        self.assertNoResult(waiting)
        self.wait(1)
        code, raw = self.body(waiting)
        self.assertEqual(code, 502)
        self.assertIn("TabbyAPI sent nothing for 120s (--chunk-timeout)", json.loads(raw)["error"]["message"])
        self.assertEqual(len(gone), 1)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_anErrorBodyEndsWhenTheChildHangs(self) -> None:
        """
        The error body of a child judged hung ends with the hang, in the route's shape.
        """
        waiting = self.post("/v1/completions", {"model": "qwen", "prompt": "hi"})
        [upstream] = self.proxy.tabby.pending
        upstream.setResponseCode(500)
        upstream.write(b'{"detail": "')
        self.proxy.flush()
        self.hang()
        code, raw = self.body(waiting)
        self.assertEqual(code, 502)
        self.assertIn("hung: GET /health did not answer within 60s", json.loads(raw)["error"]["message"])


def _without(document: Any, names: set[str]) -> Any:
    """
    C{document} without the keys C{names}, at any depth.
    """
    if isinstance(document, dict):
        return {key: _without(value, names) for key, value in document.items() if key not in names}
    if isinstance(document, list):
        return [_without(value, names) for value in document]
    return document
