"""
The Ollama routes, end to end in memory: a StubTreq client against the proxy's resource, the
scheduler on a fake process reactor, and a TabbyAPI stand-in answering with streams recorded
from both TabbyAPI generations (HEAD and 2025-02).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import treq
from treq import content
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed
from twisted.web.server import Request

from tabbyproxy.config import Keys
from tabbyproxy.keepalive import FOREVER
from tabbyproxy.ollamawire import PROMPT_TOO_LONG
from tabbyproxy.routes.ollama import NOT_MANAGED, OLLAMA_VERSION
from tabbyproxy.scheduler import SchedulerSettings
from tests.support.fakes import FakeTabby, InMemoryProxy
from tests.support.wire import StreamedBody, ndjsonDocuments
from tests.unit.test_ollamawire import (
    HEAD_CHAT,
    HEAD_COMPLETIONS,
    HEAD_REASONING,
    HEAD_TOOLS,
    OLD_CHAT,
    OLD_COMPLETIONS,
    STARTED,
)

PROFILES: dict[str, dict[str, Any]] = {
    "qwen": {
        "model": {"model_name": "Qwen3-8B-exl3", "max_seq_len": 32768},
        "template": {"temperature": 0.6, "top_k": 20, "system": "Be brief."},
        "embeddings": {"embedding_model_name": "bge-small"},
    },
    "llama": {"model": {"model_name": "Llama-3-8B-exl2"}},
    "coder:7b": {"model": {"model_name": "Coder-7B"}},
}
KEYS = Keys(enabled=True, apiKeys=("api-key",), adminKey="admin-key")

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{1,9}Z$")
FINAL_METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                 "eval_count", "eval_duration")


def events(stream: bytes) -> list[bytes]:
    """
    A recorded SSE stream cut into its events, each written by TabbyAPI separately.
    """
    return [event + b"\r\n\r\n" for event in stream.split(b"\r\n\r\n") if event]


class OllamaTestCase(SynchronousTestCase):
    """
    A proxy in memory whose clock reads L{STARTED}, and helpers to talk to it.
    """

    keys = Keys(enabled=False)

    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, keys=self.keys)
        self.proxy.reactor.advance(STARTED)

    def call(self, method: str, path: str, body: object = None,
             headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        """
        One request to the proxy, and its response with the whole body.
        """
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        d = self.proxy.client.request(method, "http://localhost" + path, data=data,
                                      headers={"Content-Type": "application/json", **(headers or {})})
        self.proxy.flush()
        response = self.successResultOf(d)
        raw = content(response)
        self.proxy.flush()
        return response, self.successResultOf(raw)

    def post(self, path: str, body: object, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        return self.call("POST", path, body, headers)

    def assertJSON(self, response: Any, raw: bytes, status: int = 200) -> Any:
        """
        C{response} is a JSON answer (Ollama's content type) with C{status}; return its document.
        """
        self.assertEqual(response.code, status, raw)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        return json.loads(raw)

    def assertOllamaError(self, response: Any, raw: bytes, status: int, message: str) -> None:
        """
        C{response} is Ollama's error: C{status} and exactly C{{"error": ...}} containing
        C{message}.
        """
        document = self.assertJSON(response, raw, status)
        self.assertEqual(list(document), ["error"])
        self.assertIn(message, document["error"])

    def upstreamBodies(self) -> list[tuple[str, Any]]:
        return [(path, body) for path, body, _ in self.proxy.tabby.requests]

    def toolsAndThinking(self, profileId: str) -> None:
        """
        Give the profile's model a chat template that takes tools and thinking.
        """
        (self.modelFolder(profileId) / "chat_template.jinja").write_text(
            "{% if tools %}{{ tools }}{% endif %}{% if enable_thinking %}<think>{% endif %}")

    def modelFolder(self, profileId: str) -> Path:
        folder = self.proxy.state.install.modelDirectory(self.proxy.catalog.profiles[profileId])
        folder.mkdir(parents=True, exist_ok=True)
        return folder


class ListingTests(OllamaTestCase):
    """
    C{/api/version}, C{/api/tags}, C{/api/show} and C{/api/ps}.
    """

    def test_versionMatchesTheFeaturesReliedOn(self) -> None:
        """
        /api/version names the newest Ollama version among those that added what the emulation
        carries on the wire, so clients that gate a feature on the version use it.  Add a row
        when the wire gains an Ollama feature (issue 11, item 13).
        """
        relied = {
            "tool calls with function.index": "0.4.7",
            "/api/show capabilities": "0.6.4",
            "think and thinking": "0.9.0",
            "think levels (low, medium, high)": "0.11.1",
            "/api/embed dimensions": "0.11.11",
            "ids on tool calls in replies": "0.12.10",
            "logprobs and top_logprobs": "0.12.11",
        }

        def parsed(version: str) -> tuple[int, ...]:
            return tuple(int(part) for part in version.split("."))

        self.assertEqual(parsed(OLLAMA_VERSION), max(parsed(version) for version in relied.values()))
        self.toolsAndThinking("qwen")
        self.proxy.tabby.chunks = events(HEAD_TOOLS)
        lines = ndjsonDocuments(self.post("/api/chat", {
            "model": "qwen", "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]})[1])
        self.assertEqual([set(call) for call in lines[0]["message"]["tool_calls"]], [{"id", "function"}] * 2)
        self.assertEqual([call["function"]["index"] for call in lines[0]["message"]["tool_calls"]], [0, 1])

    def test_version(self) -> None:
        """
        /api/version is a plain numeric x.y.z (clients parse each part as an integer), also
        for HEAD.
        """
        document = self.assertJSON(*self.call("GET", "/api/version"))
        self.assertEqual(document, {"version": OLLAMA_VERSION})
        self.assertEqual(len([int(part) for part in document["version"].split(".")]), 3)
        response, raw = self.call("HEAD", "/api/version")
        self.assertEqual((response.code, raw), (200, b""))

    def test_root(self) -> None:
        """
        GET and HEAD / answer as Ollama does, so clients find the server.
        """
        response, raw = self.call("GET", "/")
        self.assertEqual((response.code, raw), (200, b"Ollama is running"))
        self.assertEqual(self.call("HEAD", "/")[0].code, 200)

    def test_tags(self) -> None:
        """
        /api/tags lists every profile with an explicit tag, C{model} equal to C{name}, an RFC
        3339 time, the model folder's size, a 64-hex digest and details whose strings are all
        present, read from the folder's config where it has one.
        """
        folder = self.modelFolder("llama")
        (folder / "config.json").write_text(json.dumps({
            "model_type": "llama", "quantization_config": {"quant_method": "exl2", "bits": 4.0}}))
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        document = self.assertJSON(*self.call("GET", "/api/tags"))
        models = {entry["name"]: entry for entry in document["models"]}
        self.assertEqual(sorted(models), ["coder:7b", "llama:latest", "qwen:latest"])
        for entry in models.values():
            self.assertEqual(entry["model"], entry["name"])
            self.assertRegex(entry["modified_at"], TIMESTAMP)
            self.assertRegex(entry["digest"], "^[0-9a-f]{64}$")
            self.assertIsInstance(entry["size"], int)
            details = entry["details"]
            for key in ("parent_model", "format", "family", "parameter_size", "quantization_level"):
                self.assertIsInstance(details[key], str)
            self.assertIsInstance(details["families"], list)
        llama = models["llama:latest"]
        self.assertEqual(llama["size"], 1000 + len((folder / "config.json").read_bytes()))
        self.assertEqual(
            (llama["details"]["format"], llama["details"]["family"], llama["details"]["quantization_level"]),
            ("exl2", "llama", "4.0bpw"),
        )
        self.assertEqual(models["qwen:latest"]["size"], 0)
        self.assertEqual(models["qwen:latest"]["details"]["format"], "exl3")
        self.assertEqual([(entry["capabilities"], entry["details"]["context_length"]) for entry in document["models"]],
                         [(["completion"], 8192), (["completion"], 8192), (["completion", "embedding"], 32768)])
        response, raw = self.call("HEAD", "/api/tags")
        self.assertEqual((response.code, raw), (200, b""))

    def test_show(self) -> None:
        """
        /api/show takes C{model} or Continue's C{name}, any form of the name, and answers the
        details, non-null model_info with the context length, the parameters as Ollama's text,
        the profile's system prompt and the capabilities (tools when the chat template takes
        them).
        """
        folder = self.modelFolder("qwen")
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 4096}))
        (folder / "chat_template.jinja").write_text("{% if tools %}{{ tools }}{% endif %}")
        for body in ({"model": "qwen"}, {"name": "qwen:latest"}, {"model": "qwen:latest", "verbose": True}):
            document = self.assertJSON(*self.post("/api/show", body))
            self.assertEqual(document["model_info"]["general.architecture"], "qwen3")
            self.assertEqual(document["model_info"]["qwen3.context_length"], 32768)
            self.assertIn("num_ctx                        32768", document["parameters"])
            self.assertIn("temperature                    0.6", document["parameters"])
            self.assertEqual(document["system"], "Be brief.")
            self.assertEqual(document["template"], "{% if tools %}{{ tools }}{% endif %}")
            self.assertEqual(document["capabilities"], ["completion", "tools", "embedding"])
            self.assertEqual(document["details"]["family"], "qwen3")
            self.assertRegex(document["modified_at"], TIMESTAMP)

    def test_showUnknown(self) -> None:
        """
        /api/show of an unknown model is a 404 with Ollama's message; without a name it is a 400.
        """
        self.assertOllamaError(*self.post("/api/show", {"model": "mistral"}), 404, "model 'mistral' not found")
        self.assertOllamaError(*self.post("/api/show", {}), 400, "model is required")

    def test_psFollowsTheRunningModel(self) -> None:
        """
        /api/ps is empty while nothing runs; after a request it shows the model with
        C{expires_at} from the idle timer (the profile's, then the request's keep_alive), its
        context length, and a far-future time for "forever".
        """
        self.assertEqual(self.assertJSON(*self.call("GET", "/api/ps")), {"models": []})
        self.post("/api/generate", {"model": "qwen", "prompt": "hi", "keep_alive": "5m"})
        [entry] = self.assertJSON(*self.call("GET", "/api/ps"))["models"]
        self.assertEqual((entry["name"], entry["model"]), ("qwen:latest", "qwen:latest"))
        self.assertEqual(entry["context_length"], 32768)
        self.assertEqual(entry["size_vram"], entry["size"])
        expiresIn = _epoch(entry["expires_at"]) - self.proxy.scheduler.wallClock()
        self.assertTrue(295 < expiresIn <= 300.001, expiresIn)
        self.post("/api/generate", {"model": "qwen", "prompt": "hi", "keep_alive": -1})
        [entry] = self.assertJSON(*self.call("GET", "/api/ps"))["models"]
        self.assertTrue(entry["expires_at"].startswith("2318-"), entry["expires_at"])


class GenerationTests(OllamaTestCase):
    """
    C{/api/chat} and C{/api/generate}: what reaches TabbyAPI and what the client gets back.
    """

    def test_chatStreamsByDefault(self) -> None:
        """
        Without C{stream}, /api/chat streams NDJSON (Ollama's default): one line per piece of
        text, then a final line with done, done_reason, an empty message and the metrics from
        TabbyAPI's usage in nanoseconds; the model name is echoed as sent.
        """
        self.proxy.tabby.chunks = events(HEAD_CHAT)
        response, raw = self.post("/api/chat", {"model": "qwen:latest",
                                                "messages": [{"role": "user", "content": "Hi"}]})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/x-ndjson"])
        lines = ndjsonDocuments(raw)
        self.assertEqual([line["message"] for line in lines[:-1]],
                         [{"role": "assistant", "content": "Hel"}, {"role": "assistant", "content": "lo"}])
        self.assertEqual([line["done"] for line in lines], [False, False, True])
        for line in lines:
            self.assertEqual(line["model"], "qwen:latest")
            self.assertEqual(line["created_at"], "2023-08-04T19:22:40.000000000Z")
        final = lines[-1]
        self.assertEqual(final["message"], {"role": "assistant", "content": ""})
        self.assertEqual(final["done_reason"], "stop")
        self.assertEqual(
            {key: final[key] for key in FINAL_METRICS},
            {"total_duration": 0, "load_duration": 0, "prompt_eval_count": 26,
             "prompt_eval_duration": 125_000_000, "eval_count": 2, "eval_duration": 500_000_000},
        )

    def test_chatOldGeneration(self) -> None:
        """
        A 2025-02 TabbyAPI stream (role in every delta, usage in a chunk without choices)
        gives the same lines, with C{done_reason: "length"}.
        """
        self.proxy.tabby.chunks = events(OLD_CHAT)
        lines = ndjsonDocuments(self.post("/api/chat", {"model": "llama", "messages": [{"role": "user", "content": "Hi"}]})[1])
        self.assertEqual("".join(line["message"]["content"] for line in lines), "Hello")
        self.assertEqual((lines[-1]["done_reason"], lines[-1]["eval_count"], lines[-1]["prompt_eval_count"]),
                         ("length", 2, 26))

    def test_chatNotStreaming(self) -> None:
        """
        C{stream: false} gets one JSON object: the final line with the whole message.
        """
        self.proxy.tabby.chunks = events(HEAD_CHAT)
        document = self.assertJSON(*self.post("/api/chat", {
            "model": "qwen", "stream": False, "messages": [{"role": "user", "content": "Hi"}]}))
        self.assertEqual(document["message"], {"role": "assistant", "content": "Hello"})
        self.assertEqual((document["done"], document["done_reason"], document["eval_count"]), (True, "stop", 2))
        self.assertEqual(document["model"], "qwen")

    def test_chatRequestToTabby(self) -> None:
        """
        TabbyAPI gets a streaming chat request with usage, the options under TabbyAPI's names
        (winning over the profile's defaults, which fill the rest), the profile's system prompt
        in front, and neither C{model} nor C{keep_alive}; options with no TabbyAPI equivalent
        are left out and logged at debug level.
        """
        with capturedLogs() as logged:
            self.post("/api/chat", {
                "model": "qwen", "keep_alive": "10m", "stream": False, "format": "json",
                "options": {"temperature": 0.1, "num_predict": 64, "repeat_penalty": 1.1, "num_ctx": 4096},
                "messages": [{"role": "user", "content": "Hi"}],
            })
        [ignored] = [event for event in logged if "options" in event]
        self.assertEqual((ignored["log_level"], ignored["model"], ignored["options"]),
                         (LogLevel.debug, "qwen", {"num_ctx": 4096}))
        [(path, body)] = self.upstreamBodies()
        self.assertEqual(path, "/v1/chat/completions")
        self.assertEqual(body, {
            "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.1, "max_tokens": 64, "repetition_penalty": 1.1, "top_k": 20,
            "response_format": {"type": "json"},
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        })

    def test_generateUsesChatTemplate(self) -> None:
        """
        /api/generate goes to TabbyAPI's chat route so the model's chat template applies: the
        prompt as a user message, C{system} as a system message (which replaces the profile's
        system prompt), and answers lines with C{response}.
        """
        self.proxy.tabby.chunks = events(HEAD_CHAT)
        lines = ndjsonDocuments(self.post("/api/generate", {"model": "qwen", "prompt": "Hi", "system": "Shout."})[1])
        self.assertEqual([line["response"] for line in lines], ["Hel", "lo", ""])
        self.assertNotIn("message", lines[0])
        self.assertEqual((lines[-1]["done"], lines[-1]["done_reason"]), (True, "stop"))
        self.post("/api/generate", {"model": "qwen", "prompt": "Hi"})
        [(path, first), (_, second)] = self.upstreamBodies()
        self.assertEqual(path, "/v1/chat/completions")
        self.assertEqual(first["messages"], [{"role": "system", "content": "Shout."},
                                             {"role": "user", "content": "Hi"}])
        self.assertEqual(second["messages"], [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hi"}])

    def test_generateRaw(self) -> None:
        """
        C{raw} requests go to /v1/completions with the prompt as it is (and no profile system
        prompt); both generations' completion streams become C{response} lines.
        """
        for recorded, reason in ((HEAD_COMPLETIONS, "length"), (OLD_COMPLETIONS, "stop")):
            self.proxy.tabby.chunks = events(recorded)
            document = self.assertJSON(*self.post("/api/generate", {
                "model": "qwen", "prompt": "[INST]Once", "raw": True, "stream": False}))
            self.assertEqual((document["response"], document["done_reason"]), ("Once upon", reason))
        bodies = self.upstreamBodies()
        self.assertEqual([path for path, _ in bodies], ["/v1/completions"] * 2)
        self.assertEqual(bodies[0][1]["prompt"], "[INST]Once")
        self.assertEqual(bodies[0][1]["temperature"], 0.6)
        self.assertNotIn("messages", bodies[0][1])

    def test_capabilitiesRefused(self) -> None:
        """
        C{tools}, C{think} and a C{suffix} on a model that cannot take them are 400s in Ollama's
        words, before the model loads, so clients fall back; C{think: false} and empty tools
        are fine (issue 11, item 9).
        """
        user = [{"role": "user", "content": "Hi"}]
        tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
        for path, body, missing in (
            ("/api/chat", {"model": "Qwen", "messages": user, "tools": [tool]}, "tools"),
            ("/api/chat", {"model": "qwen", "messages": user, "think": True}, "thinking"),
            ("/api/generate", {"model": "qwen", "prompt": "Hi", "think": "high"}, "thinking"),
            ("/api/generate", {"model": "qwen:latest", "prompt": "def f(", "suffix": "return 1"}, "insert"),
        ):
            self.assertOllamaError(*self.post(path, body), 400, f'{json.dumps(body["model"])} does not support {missing}')
        self.assertEqual(self.proxy.reactor.spawned, [])
        self.toolsAndThinking("qwen")
        self.proxy.tabby.chunks = events(HEAD_CHAT)
        for body in ({"tools": [tool], "think": True}, {"think": False, "tools": []}):
            self.assertJSON(*self.post("/api/chat", {"model": "qwen", "messages": user, "stream": False, **body}))
        self.assertOllamaError(*self.post("/api/generate", {"model": "qwen", "prompt": "x", "suffix": "y"}),
                               400, '"qwen" does not support insert')

    def test_logprobs(self) -> None:
        """
        C{logprobs} and C{top_logprobs} reach TabbyAPI, and TabbyAPI's come back on the lines;
        C{top_logprobs} outside 0-20 is Ollama's 400 (issue 11, item 8).
        """
        self.proxy.tabby.chunks = [
            b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi",'
            b'"logprob":-0.5,"top_logprobs":[{"token":"Hi","logprob":-0.5}]}]}}]}\r\n\r\n',
            b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n']
        user = [{"role": "user", "content": "Hi"}]
        lines = ndjsonDocuments(self.post("/api/chat", {"model": "qwen", "messages": user, "logprobs": True,
                                                        "top_logprobs": 2})[1])
        hi = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}
        self.assertEqual(lines[0]["logprobs"], [{**hi, "top_logprobs": [hi]}])
        body = self.upstreamBodies()[0][1]
        self.assertEqual((body["logprobs"], body["top_logprobs"]), (True, 2))
        self.assertOllamaError(*self.post("/api/chat", {"model": "qwen", "messages": user, "top_logprobs": 21}),
                               400, "top_logprobs must be between 0 and 20")

    def test_thinking(self) -> None:
        """
        C{think} turns on the template switch, and reasoning comes back as C{thinking}.
        """
        self.toolsAndThinking("qwen")
        self.proxy.tabby.chunks = events(HEAD_REASONING)
        document = self.assertJSON(*self.post("/api/chat", {
            "model": "qwen", "think": True, "stream": False, "messages": [{"role": "user", "content": "Hi"}]}))
        self.assertEqual(document["message"], {"role": "assistant", "content": "Hi", "thinking": "Thinking."})
        self.assertEqual(self.upstreamBodies()[0][1]["template_vars"], {"enable_thinking": True})

    def test_toolCallsRoundTrip(self) -> None:
        """
        Tool calls come back in a non-final line with JSON-object arguments and ids; when the
        client sends them back with the tool's results, TabbyAPI gets string arguments and
        matching C{tool_call_id}s.
        """
        self.toolsAndThinking("qwen")
        self.proxy.tabby.chunks = events(HEAD_TOOLS)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
        lines = ndjsonDocuments(self.post("/api/chat", {
            "model": "qwen", "tools": tools, "messages": [{"role": "user", "content": "Weather?"}]})[1])
        self.assertEqual(len(lines), 2)
        calls = lines[0]["message"]["tool_calls"]
        self.assertEqual(lines[0]["done"], False)
        self.assertEqual([call["function"]["arguments"] for call in calls], [{"city": "Tokyo"}, {"zone": "JST"}])
        self.assertEqual(lines[1]["done_reason"], "stop")
        self.assertEqual(self.upstreamBodies()[0][1]["tools"], tools)

        self.proxy.tabby.chunks = events(HEAD_CHAT)
        self.post("/api/chat", {"model": "qwen", "tools": tools, "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_name": "get_time", "content": "09:00"},
            {"role": "tool", "tool_name": "get_weather", "content": "Sunny"},
        ]})
        messages = self.upstreamBodies()[1][1]["messages"]
        sent = messages[2]["tool_calls"]
        self.assertEqual([call["function"]["arguments"] for call in sent], ['{"city": "Tokyo"}', '{"zone": "JST"}'])
        self.assertEqual([call["id"] for call in sent], [call["id"] for call in calls])
        self.assertEqual((messages[3]["tool_call_id"], messages[4]["tool_call_id"]),
                         (calls[1]["id"], calls[0]["id"]))

    def test_linesFlushedAsChunksArrive(self) -> None:
        """
        Each upstream chunk reaches the client as its NDJSON line before the next chunk exists,
        and the lease is held until the stream ends.
        """
        self.proxy.tabby.hold = True
        d = self.proxy.client.post("http://localhost/api/chat", unbuffered=True, json={
            "model": "qwen", "messages": [{"role": "user", "content": "Hi"}]})
        self.proxy.flush()
        [upstream] = self.proxy.tabby.pending
        upstream.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        first, *rest = events(HEAD_CHAT)
        upstream.write(first)
        self.proxy.flush()
        received: list[bytes] = []
        done = treq.collect(self.successResultOf(d), received.append)
        self.proxy.flush()
        self.assertEqual([json.loads(line)["message"]["content"] for line in received], ["Hel"])
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 1)
        for chunk in rest:
            upstream.write(chunk)
        upstream.finish()
        self.proxy.flush()
        self.successResultOf(done)
        self.assertEqual(ndjsonDocuments(b"".join(received))[-1]["done"], True)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_loadDuration(self) -> None:
        """
        C{load_duration} is the time the request waited for the model to start, and
        C{total_duration} includes it.
        """
        self.proxy.tabby.healthy = False
        self.proxy.tabby.chunks = events(HEAD_CHAT)
        d = self.proxy.client.post("http://localhost/api/chat", json={
            "model": "qwen", "stream": False, "messages": [{"role": "user", "content": "Hi"}]})
        for _ in range(10):
            self.proxy.reactor.advance(0.25)
            self.proxy.flush()
        self.assertNoResult(d)
        self.proxy.tabby.healthy = True
        self.proxy.reactor.advance(0.25)
        self.proxy.flush()
        document = json.loads(self.successResultOf(content(self.successResultOf(d))))
        self.assertEqual(document["load_duration"], 2_750_000_000)
        self.assertEqual(document["total_duration"], 2_750_000_000)

    def test_clientLeavingStopsUpstream(self) -> None:
        """
        A client that disconnects mid-stream closes the request to TabbyAPI and gives the
        lease back.
        """
        self.proxy.tabby.hold = True
        d = self.proxy.client.post("http://localhost/api/generate", unbuffered=True,
                                   json={"model": "qwen", "prompt": "Hi"})
        self.proxy.flush()
        [upstream] = self.proxy.tabby.pending
        upstreamGone: list[Failure] = []
        upstream.notifyFinish().addErrback(upstreamGone.append)
        upstream.write(events(HEAD_CHAT)[0])
        self.proxy.flush()
        response = self.successResultOf(d)
        body = StreamedBody.of(response)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 1)
        body.hangUp()
        self.proxy.flush()
        self.proxy.flush()
        self.failureResultOf(body.ended, ResponseFailed)
        self.assertEqual(len(upstreamGone), 1)
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)


class ContextTabby(FakeTabby):
    """
    A TabbyAPI with a small context: its tokenizer counts a message as its words and 3 tokens
    of template, a chat prompt as its messages and 2 tokens of generation prompt; a prompt over
    C{maxSeqLen} is its 400, and so is a prompt whose C{max_tokens} do not fit C{cacheSize}
    (TabbyAPI without output chunking).

    @ivar encodeFails: answer C{/v1/token/encode} with a 422, as TabbyAPI does for a model
        without a chat template.
    """

    def __init__(self, maxSeqLen: int, cacheSize: int | None = None) -> None:
        super().__init__()
        self.maxSeqLen = maxSeqLen
        self.cacheSize = maxSeqLen if cacheSize is None else cacheSize
        self.encodeFails = False

    @staticmethod
    def tokens(messages: list[dict[str, Any]]) -> int:
        return sum(len(str(message.get("content") or "").split()) + 3 for message in messages)

    def render(self, request: Request) -> Any:
        path = request.path.decode()
        if path not in ("/v1/token/encode", "/v1/chat/completions", "/v1/completions"):
            return super().render(request)
        assert request.content is not None
        body = json.loads(request.content.read())
        request.content.seek(0)
        request.setHeader(b"Content-Type", b"application/json")
        if path == "/v1/token/encode":
            self.requests.append((path, body, {}))
            if self.encodeFails:
                request.setResponseCode(422)
                return b'{"detail":"Cannot tokenize chat completion message because a prompt template is not set."}'
            count = self.tokens(body["text"])
            return json.dumps({"tokens": list(range(count)), "length": count}).encode()
        count = self.tokens(body["messages"]) + 2 if "messages" in body else len(body["prompt"].split())
        required = count + body.get("max_tokens", 0)
        if count > self.maxSeqLen:
            problem = f"Prompt length {count} exceeds the available context size of {self.maxSeqLen} tokens"
        elif body.get("max_tokens") and required > self.cacheSize:
            problem = (f"Initial job allocation requires {required} cache tokens, which exceeds the "
                       f"available context size of {self.cacheSize} tokens")
        else:
            return super().render(request)
        self.requests.append((path, body, {}))
        request.setResponseCode(400)
        return json.dumps({"error": {"message": problem, "type": "invalid_request_error", "param": None,
                                     "code": "context_length_exceeded"}}).encode()


def words(count: int, word: str = "word") -> str:
    return " ".join([word] * count)


# Each message is its words and 3 tokens: 13, 13, 13, 13, 6, 4 (62, and 2 for the reply's prompt).
LONG_CHAT = [
    {"role": "system", "content": words(10, "first")},
    {"role": "user", "content": words(10, "old")},
    {"role": "assistant", "content": words(10, "older")},
    {"role": "user", "content": words(10, "recent")},
    {"role": "system", "content": words(3, "later")},
    {"role": "user", "content": "latest"},
]


class TruncationTests(OllamaTestCase):
    """
    A conversation longer than the context loses its oldest messages, as in Ollama, unless
    C{truncate: false} (issue 11, item 7).
    """

    def setUp(self) -> None:
        self.tabby = ContextTabby(maxSeqLen=40)
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, tabby=self.tabby)
        self.proxy.reactor.advance(STARTED)

    def chats(self) -> list[Any]:
        return [body for path, body in self.upstreamBodies() if path == "/v1/chat/completions"]

    def encoded(self) -> list[Any]:
        return [body for path, body in self.upstreamBodies() if path == "/v1/token/encode"]

    def test_oldestDroppedSystemAndLatestKept(self) -> None:
        """
        TabbyAPI's refusal of the whole conversation (64 tokens of 40) makes the proxy drop the
        oldest messages until it fits, counted by TabbyAPI's tokenizer: the system messages
        before the cut stay, in order, and so does everything from the cut to the latest
        message; the answer streams as usual, the client never sees the refusal.
        """
        self.proxy.tabby.chunks = events(HEAD_CHAT)
        response, raw = self.post("/api/chat", {"model": "llama", "messages": LONG_CHAT})
        self.assertEqual(response.code, 200)
        self.assertEqual("".join(line["message"]["content"] for line in ndjsonDocuments(raw)), "Hello")
        first, retried = self.chats()
        self.assertEqual(len(first["messages"]), 6)
        # 13 + 13 + 6 + 4 + 2 = 38: dropping "old" and "older" is enough, "recent" stays.
        self.assertEqual([message["content"] for message in retried["messages"]],
                         [words(10, "first"), words(10, "recent"), words(3, "later"), "latest"])
        self.assertEqual({key: value for key, value in retried.items() if key != "messages"},
                         {key: value for key, value in first.items() if key != "messages"})
        # The whole, then a halving's candidates, each as TabbyAPI templates them.
        counted = self.encoded()
        self.assertEqual(counted[0], {"text": first["messages"]})
        self.assertLessEqual(len(counted), 4)

    def test_latestMessageEvenWhenAlone(self) -> None:
        """
        When only the system messages and the latest message fit, that is what is sent; the
        profile's system prompt is a system message like the others.
        """
        self.tabby.maxSeqLen = 25
        self.proxy.tabby.chunks = events(HEAD_CHAT)
        response, raw = self.post("/api/chat", {"model": "qwen", "stream": False, "messages": LONG_CHAT[1:]})
        self.assertEqual(self.assertJSON(response, raw)["message"]["content"], "Hello")
        retried = self.chats()[-1]
        self.assertEqual([message["content"] for message in retried["messages"]],
                         ["Be brief.", words(3, "later"), "latest"])

    def test_truncateFalseKeepsTheRefusal(self) -> None:
        """
        With C{truncate: false}, TabbyAPI's refusal is the answer, in Ollama's shape, and
        nothing is counted; a C{truncate} that is not a boolean is a 400.
        """
        response, raw = self.post("/api/chat", {"model": "llama", "truncate": False, "messages": LONG_CHAT})
        self.assertOllamaError(response, raw, 400, "Prompt length 64 exceeds the available context size of 40 tokens")
        self.assertEqual((len(self.chats()), self.encoded()), (1, []))
        response, raw = self.post("/api/chat", {"model": "llama", "truncate": "no", "messages": LONG_CHAT})
        self.assertOllamaError(response, raw, 400, "truncate must be a boolean")

    def test_tooLongAlone(self) -> None:
        """
        A latest message too long by itself is Ollama's 400, before any stream starts, with
        TabbyAPI's figures: at once when there is nothing to drop, after counting otherwise;
        nothing is sent to generate again.
        """
        alone = [{"role": "user", "content": words(60)}]
        response, raw = self.post("/api/chat", {"model": "llama", "messages": alone})
        self.assertOllamaError(response, raw, 400, PROMPT_TOO_LONG)
        self.assertIn("Prompt length 65 exceeds the available context size of 40 tokens", json.loads(raw)["error"])
        self.assertEqual((len(self.chats()), self.encoded()), (1, []))
        response, raw = self.post("/api/chat", {"model": "llama", "messages": LONG_CHAT[:3] + alone})
        self.assertOllamaError(response, raw, 400, PROMPT_TOO_LONG)
        self.assertEqual(len(self.chats()), 2)
        self.assertTrue(self.encoded())

    def test_generate(self) -> None:
        """
        /api/generate's prompt is the latest message, so a prompt too long is Ollama's 400
        (templated or raw); with C{truncate: false} TabbyAPI's refusal.
        """
        response, raw = self.post("/api/generate", {"model": "llama", "system": "Terse.", "prompt": words(60)})
        self.assertOllamaError(response, raw, 400, PROMPT_TOO_LONG)
        response, raw = self.post("/api/generate", {"model": "llama", "raw": True, "prompt": words(60)})
        self.assertOllamaError(response, raw, 400, PROMPT_TOO_LONG)
        response, raw = self.post("/api/generate", {"model": "llama", "truncate": False, "prompt": words(60)})
        self.assertOllamaError(response, raw, 400, "Prompt length 65 exceeds the available context size")
        self.assertNotIn(PROMPT_TOO_LONG, json.loads(raw)["error"])
        self.assertEqual(self.encoded(), [])

    def test_roomForNumPredict(self) -> None:
        """
        The room an answer needs is TabbyAPI's: when the prompt fits max_seq_len but not with
        the C{num_predict} asked for in the cache, the refusal says by how much, and a second
        cut follows a first when the conversation breaks both limits.
        """
        self.tabby.maxSeqLen = self.tabby.cacheSize = 70
        self.proxy.tabby.chunks = events(HEAD_CHAT)
        response, raw = self.post("/api/chat", {"model": "llama", "messages": LONG_CHAT, "options": {"num_predict": 30}})
        self.assertEqual(response.code, 200, raw)
        # 64 + 30 > 70: 40 tokens at most, as above.
        self.assertEqual(len(self.chats()[-1]["messages"]), 4)
        self.tabby.requests.clear()
        self.tabby.maxSeqLen = 52
        response, raw = self.post("/api/chat", {"model": "llama", "messages": LONG_CHAT, "options": {"num_predict": 30}})
        self.assertEqual(response.code, 200, raw)
        # 64 > 52 first, then 51 + 30 > 70: 40 at most.
        self.assertEqual([len(body["messages"]) for body in self.chats()], [6, 5, 4])

    def test_countFailing(self) -> None:
        """
        When TabbyAPI cannot count (no chat template), its refusal of the prompt is the answer.
        """
        self.tabby.encodeFails = True
        response, raw = self.post("/api/chat", {"model": "llama", "messages": LONG_CHAT})
        self.assertOllamaError(response, raw, 400, "Prompt length 64 exceeds the available context size of 40 tokens")
        self.assertEqual(len(self.chats()), 1)


class EmptyRequestTests(OllamaTestCase):
    """
    Empty prompts and messages load the model, and with C{keep_alive: 0} unload it.
    """

    def test_emptyRequestsLoad(self) -> None:
        """
        An empty /api/chat or /api/generate starts the model and answers one JSON object with
        C{done_reason: "load"}, even when a stream was asked for; TabbyAPI is not asked to
        generate.
        """
        for path, body, key in (("/api/chat", {"model": "qwen:latest", "messages": []}, "message"),
                                ("/api/generate", {"model": "qwen", "prompt": "", "stream": True}, "response"),
                                ("/api/generate", {"model": "qwen"}, "response")):
            document = self.assertJSON(*self.post(path, body))
            self.assertEqual((document["model"], document["done"], document["done_reason"]),
                             (body["model"], True, "load"))
            self.assertIn(key, document)
            self.assertRegex(document["created_at"], TIMESTAMP)
        self.assertEqual(len(self.proxy.reactor.spawned), 1)
        self.assertEqual(self.proxy.scheduler.status()["state"], "ready")
        self.assertEqual(self.upstreamBodies(), [])

    def test_unloadWithoutLoading(self) -> None:
        """
        An empty request with C{keep_alive: 0} answers C{done_reason: "unload"}; it starts
        nothing when the model is not running, and stops it when it is.
        """
        document = self.assertJSON(*self.post("/api/generate", {"model": "qwen", "prompt": "", "keep_alive": 0}))
        self.assertEqual((document["response"], document["done_reason"]), ("", "unload"))
        self.assertEqual(self.proxy.reactor.spawned, [])
        self.post("/api/chat", {"model": "qwen", "messages": []})
        [process] = self.proxy.reactor.spawned
        document = self.assertJSON(*self.post("/api/chat", {"model": "qwen", "messages": [], "keep_alive": "0s"}))
        self.assertEqual((document["message"], document["done_reason"]),
                         ({"role": "assistant", "content": ""}, "unload"))
        self.assertEqual(process.signals, ["TERM"])
        self.assertEqual(self.proxy.scheduler.status()["state"], "stopped")
        self.assertEqual(self.assertJSON(*self.call("GET", "/api/ps")), {"models": []})

    def test_unloadLeavesOtherModel(self) -> None:
        """
        Unloading a model that is not the running one leaves the running one alone.
        """
        self.post("/api/chat", {"model": "qwen", "messages": []})
        self.post("/api/chat", {"model": "llama", "messages": [], "keep_alive": 0})
        self.assertEqual(self.proxy.reactor.spawned[0].signals, [])
        self.assertEqual(self.proxy.scheduler.status()["model"], "qwen")


class KeepAliveTests(OllamaTestCase):
    """
    C{keep_alive} on /api/chat and /api/generate follows Ollama's rules.
    """

    def unloadStatus(self) -> dict[str, Any]:
        status: dict[str, Any] = self.proxy.scheduler.status()["unload"]
        return status

    def test_rules(self) -> None:
        """
        A number is seconds, a string a Go duration, negative is forever, absent leaves the
        last value, and 0 unloads when the request ends.
        """
        body: dict[str, Any] = {"model": "qwen", "prompt": "Hi", "stream": False}
        self.post("/api/generate", {**body, "keep_alive": 90})
        self.assertEqual(self.unloadStatus()["fires_in_seconds"], 90)
        self.post("/api/generate", {**body, "keep_alive": "1h30m"})
        self.assertEqual(self.unloadStatus()["fires_in_seconds"], 5400)
        self.post("/api/generate", body)
        self.assertEqual(self.unloadStatus()["keep_alive_seconds"], 5400)
        self.post("/api/generate", {**body, "keep_alive": "-1m"})
        self.assertEqual((self.unloadStatus()["keep_alive"], self.unloadStatus()["fires_in_seconds"]),
                         ("forever", None))
        self.assertEqual([m.keepAlive for m in self.proxy.scheduler.snapshot()], [FOREVER])
        self.post("/api/chat", {"model": "qwen", "keep_alive": 0, "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(self.proxy.scheduler.status()["state"], "stopped")
        self.assertEqual(len(self.proxy.reactor.spawned), 1)

    def test_badKeepAlive(self) -> None:
        """
        A keep_alive that is not a duration is a 400, and starts nothing.
        """
        for value in ("5 minutes", True, [1]):
            self.assertOllamaError(
                *self.post("/api/chat", {"model": "qwen", "keep_alive": value, "messages": []}), 400, "keep_alive")
        self.assertEqual(self.proxy.reactor.spawned, [])


class ErrorTests(OllamaTestCase):
    """
    Errors are C{{"error": "..."}} with a status before a stream starts, and a last NDJSON line
    after.
    """

    def test_unknownModel(self) -> None:
        """
        An unknown model is a 404 with Ollama's message on every route that names one, and
        starts nothing.
        """
        for path in ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"):
            self.assertOllamaError(*self.post(path, {"model": "gpt-4", "prompt": "x", "messages": []}),
                                   404, "model 'gpt-4' not found")
        self.assertOllamaError(*self.post("/api/chat", {"model": "coder", "messages": []}), 404, "'coder'")
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_badInput(self) -> None:
        """
        Malformed bodies and fields of the wrong type are 400s that say what was wrong.
        """
        cases: list[tuple[object, str]] = [
            (b"{", "not valid JSON"),
            (b"", "missing request body"),
            ({"messages": []}, "model is required"),
            ({"model": 3, "messages": []}, "model must be a string"),
            ({"model": "qwen", "stream": "yes", "messages": []}, "stream must be true or false"),
            ({"model": "qwen", "options": {"temperature": "hot"}, "messages": []},
             'option "temperature" must be of type float'),
            ({"model": "qwen", "format": "xml", "messages": []}, "format must be"),
            ({"model": "qwen", "messages": "hi"}, "messages must be an array"),
        ]
        for body, message in cases:
            self.assertOllamaError(*self.post("/api/chat", body), 400, message)
        self.assertOllamaError(*self.post("/api/generate", {"model": "qwen", "prompt": 1}),
                               400, "prompt must be a string")
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_upstreamHTTPError(self) -> None:
        """
        TabbyAPI's error answers reach the client as Ollama errors with TabbyAPI's status.
        """
        self.proxy.tabby.hold = True
        d = self.proxy.client.post("http://localhost/api/chat", json={"model": "qwen", "messages": [{"role": "user"}]})
        self.proxy.flush()
        [pending] = self.proxy.tabby.pending
        pending.setResponseCode(422)
        pending.write(json.dumps({"detail": [{"loc": ["body", "presence_penalty"], "msg": "too small"}]}).encode())
        pending.finish()
        self.proxy.flush()
        response = self.successResultOf(d)
        self.assertOllamaError(response, self.successResultOf(content(response)), 422, "presence_penalty: too small")

    def test_errorAfterStreamStarted(self) -> None:
        """
        TabbyAPI's error event mid-stream becomes a last line C{{"error": ...}} (no done line);
        without streaming it is a 502.
        """
        broken = events(HEAD_CHAT)[:1] + [
            b'data: {"error":{"message":"Chat completion aborted. Please check the server console.",'
            b'"trace":null}}\r\n\r\n']
        self.proxy.tabby.chunks = broken
        response, raw = self.post("/api/chat", {"model": "qwen", "messages": [{"role": "user", "content": "Hi"}]})
        self.assertEqual(response.code, 200)
        lines = ndjsonDocuments(raw)
        self.assertEqual(lines[0]["message"]["content"], "Hel")
        self.assertEqual(lines[1:], [{"error": "Chat completion aborted. Please check the server console."}])
        self.assertOllamaError(
            *self.post("/api/chat", {"model": "qwen", "stream": False,
                                     "messages": [{"role": "user", "content": "Hi"}]}),
            502, "Chat completion aborted")
        self.assertEqual(self.proxy.scheduler.status()["in_flight"], 0)

    def test_truncatedStream(self) -> None:
        """
        A stream that ends without TabbyAPI's [DONE] ends with an error line, not a done line.
        """
        self.proxy.tabby.chunks = events(HEAD_CHAT)[:2]
        lines = ndjsonDocuments(self.post("/api/generate", {"model": "qwen", "prompt": "Hi"})[1])
        self.assertEqual([line.get("response") for line in lines[:2]], ["Hel", "lo"])
        self.assertIn("ended before it was complete", lines[-1]["error"])
        self.assertNotIn("done", lines[-1])

    def test_failedStart(self) -> None:
        """
        A model that fails to start answers 503 with the child's exit and last output.
        """
        self.proxy.tabby.healthy = False
        d = self.proxy.client.post("http://localhost/api/chat", json={"model": "qwen", "messages": [{"role": "user"}]})
        [process] = self.proxy.reactor.spawned
        process.print("ValueError: Failed to load config.json\n")
        process.exit(1)
        self.proxy.flush()
        response = self.successResultOf(d)
        self.assertOllamaError(response, self.successResultOf(content(response)), 503, "exited with status 1")

    def test_queueFull(self) -> None:
        """
        When too many requests wait for a model, the next one is a 503 Ollama error.
        """
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, settings=SchedulerSettings(maxWaiting=1))
        self.proxy.tabby.healthy = False
        self.proxy.client.post("http://localhost/api/generate", json={"model": "qwen", "prompt": "a"})
        self.assertOllamaError(*self.post("/api/generate", {"model": "qwen", "prompt": "b"}), 503, "server busy")

    def test_modelFilesNotManaged(self) -> None:
        """
        pull, push, create, copy, delete and blobs answer 501 saying where models come from.
        """
        for method, path in (("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                             ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("HEAD", "/api/blobs/sha256:ab"),
                             ("POST", "/api/blobs/sha256:ab")):
            response, raw = self.call(method, path, {"model": "qwen"})
            self.assertEqual(response.code, 501)
            if method != "HEAD":
                self.assertEqual(json.loads(raw), {"error": NOT_MANAGED})

    def test_unknownRouteAndMethod(self) -> None:
        """
        Unknown /api routes are JSON 404s and wrong methods JSON 405s, in Ollama's error shape.
        """
        self.assertOllamaError(*self.call("GET", "/api/nothing"), 404, "/api/nothing")
        self.assertOllamaError(*self.call("GET", "/api/chat"), 405, "GET is not allowed")


class EmbeddingTests(OllamaTestCase):
    """
    /api/embed and /api/embeddings go to TabbyAPI's /v1/embeddings.
    """

    def embed(self, path: str, body: dict[str, Any], answer: dict[str, Any], status: int = 200) -> tuple[Any, bytes]:
        """
        Send C{body} to C{path} and let TabbyAPI answer C{answer}.
        """
        self.proxy.tabby.hold = True
        d = self.proxy.client.post("http://localhost" + path, json=body)
        self.proxy.flush()
        pending: Request = self.proxy.tabby.pending.pop()
        pending.setResponseCode(status)
        pending.setHeader(b"Content-Type", b"application/json")
        pending.write(json.dumps(answer).encode())
        pending.finish()
        self.proxy.flush()
        response = self.successResultOf(d)
        return response, self.successResultOf(content(response))

    def test_embed(self) -> None:
        """
        /api/embed sends the inputs as floats and answers normalized vectors in input order,
        cut to C{dimensions}, with durations and the prompt token count.
        """
        answer = {"object": "list", "model": "bge", "usage": {"prompt_tokens": 7, "total_tokens": 7},
                  "data": [{"object": "embedding", "index": 1, "embedding": [0.0, 0.0, 2.0]},
                           {"object": "embedding", "index": 0, "embedding": [3.0, 4.0, 0.0]}]}
        document = self.assertJSON(*self.embed(
            "/api/embed", {"model": "qwen:latest", "input": ["a", "b"], "keep_alive": "1m"}, answer))
        self.assertEqual(document, {
            "model": "qwen:latest", "embeddings": [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]],
            "total_duration": 0, "load_duration": 0, "prompt_eval_count": 7})
        self.assertEqual(self.upstreamBodies(), [("/v1/embeddings", {"input": ["a", "b"], "encoding_format": "float"})])
        self.assertEqual(self.proxy.scheduler.status()["unload"]["fires_in_seconds"], 60)
        document = self.assertJSON(*self.embed(
            "/api/embed", {"model": "qwen", "input": "a", "dimensions": 1},
            {"data": [{"index": 0, "embedding": [-3.0, 4.0]}]}))
        self.assertEqual(document["embeddings"], [[-1.0]])

    def test_legacyEmbeddings(self) -> None:
        """
        /api/embeddings answers TabbyAPI's vector for C{prompt} as it is.
        """
        document = self.assertJSON(*self.embed(
            "/api/embeddings", {"model": "qwen", "prompt": "a"}, {"data": [{"index": 0, "embedding": [3.0, 4.0]}]}))
        self.assertEqual(document, {"embedding": [3.0, 4.0]})

    def test_emptyInputOnlyLoads(self) -> None:
        """
        Nothing to embed loads the model and answers no vectors, without asking TabbyAPI.
        """
        self.assertEqual(self.assertJSON(*self.post("/api/embed", {"model": "qwen", "input": []}))["embeddings"], [])
        self.assertEqual(self.assertJSON(*self.post("/api/embeddings", {"model": "qwen"})), {"embedding": []})
        self.assertEqual(self.proxy.scheduler.status()["state"], "ready")
        self.assertEqual(self.upstreamBodies(), [])

    def test_noEmbeddingModel(self) -> None:
        """
        TabbyAPI's 503 for a profile without an embedding model reaches the client as is, and
        an answer without the vectors is a 502.
        """
        self.assertOllamaError(*self.embed("/api/embed", {"model": "qwen", "input": "a"},
                                           {"detail": "No embedding models are currently loaded."}, status=503),
                               503, "No embedding models are currently loaded.")
        self.assertOllamaError(*self.embed("/api/embed", {"model": "qwen", "input": "a"}, {"data": []}),
                               502, "does not hold 1 vectors")
        self.assertOllamaError(*self.post("/api/embed", {"model": "qwen", "input": [1]}), 400, "input must be")

    def test_profileWithoutEmbeddings(self) -> None:
        """
        Embedding with a profile that loads no embedding model is a 400 at once, in Ollama's
        words, without loading the model (TabbyAPI would only answer 503 after the load).
        """
        for path, body in (("/api/embed", {"model": "Llama", "input": "a"}), ("/api/embeddings", {"model": "llama", "prompt": "a"})):
            self.assertOllamaError(*self.post(path, body), 400, f'{json.dumps(body["model"])} does not support embedding')
        self.assertEqual(self.proxy.reactor.spawned, [])


class AuthTests(OllamaTestCase):
    """
    With TabbyAPI's auth on, /api/* needs an API key; / stays open.
    """

    keys = KEYS

    def test_keyRequired(self) -> None:
        """
        Without a valid key every /api route but /api/version is a 401 Ollama error; a Bearer
        or x-api-key API key (or the admin key) opens them; / and /api/version answer without
        one, as Ollama's do (issue 11, item 11).
        """
        for method, path in (("GET", "/api/tags"), ("GET", "/api/ps"),
                             ("POST", "/api/show"), ("POST", "/api/chat"), ("POST", "/api/generate"),
                             ("POST", "/api/embed"), ("POST", "/api/pull")):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response, raw = self.call(method, path, {"model": "qwen", "messages": []}, headers)
                self.assertOllamaError(response, raw, 401, "key")
        for headers in ({"Authorization": "Bearer api-key"}, {"x-api-key": "api-key"},
                        {"Authorization": "Bearer admin-key"}):
            self.assertEqual(self.call("GET", "/api/tags", headers=headers)[0].code, 200)
        self.assertEqual(self.call("GET", "/")[0].code, 200)
        self.assertEqual(self.assertJSON(*self.call("GET", "/api/version")), {"version": OLLAMA_VERSION})
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_openModelList(self) -> None:
        """
        With C{--open-model-list}, the model lists and descriptions (/api/tags, /api/show,
        /v1/models, /v1/models/ID) answer without a key; everything that runs a model, and
        /api/ps, still needs one.
        """
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, keys=self.keys, openModelList=True)
        self.assertEqual(len(self.assertJSON(*self.call("GET", "/api/tags"))["models"]), 3)
        self.assertIn("completion", self.assertJSON(*self.post("/api/show", {"model": "qwen"}))["capabilities"])
        for path in ("/v1/models", "/v1/models/qwen"):
            self.assertEqual(self.call("GET", path)[0].code, 200)
        for method, path in (("GET", "/api/ps"), ("POST", "/api/chat"), ("POST", "/api/generate"),
                             ("POST", "/api/embed"), ("POST", "/v1/chat/completions")):
            response, raw = self.call(method, path, {"model": "qwen", "messages": [{"role": "user", "content": "x"}]})
            self.assertEqual(response.code, 401, raw)
        self.assertEqual(self.proxy.reactor.spawned, [])


def _epoch(timestamp: str) -> float:
    """
    Seconds since the epoch of an Ollama timestamp (nanoseconds cut to microseconds).
    """
    match = re.match(r"^(.*?)(?:\.(\d+))?Z$", timestamp)
    assert match is not None
    whole = datetime.fromisoformat(match.group(1) + "+00:00").timestamp()
    return whole + float("0." + (match.group(2) or "0"))
