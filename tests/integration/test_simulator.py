"""
Integration tests for the TabbyAPI simulator: each test runs it as a real child process in a
temporary TabbyAPI-like directory and talks to it over loopback TCP, because what the proxy relies
on is the simulator's behaviour as a process (ports, signals, exit codes, console lines) as much as
its HTTP answers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.processes import findFreePorts
from tests.support.simulator import (
    SimulatorProcess,
    makeHTTPClient,
    makeTabbyDirectory,
    reactor,
    spawnSimulator,
    waitForHealth,
)

API_KEY = "a" * 32
ADMIN_KEY = "b" * 32
HeaderMap = dict[bytes | str, bytes | str]
API: HeaderMap = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_BEARER: HeaderMap = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}

CAPTURES = Path(os.environ.get("TABBYAPI_CAPTURES",
                               "/work/shared/reference/tabbyapi-captures"))


def sseEvents(body: bytes) -> list[bytes]:
    """
    Split an SSE body on its CRLF event separator, checking nothing but CRLF is used.
    """
    assert body.endswith(b"\r\n\r\n"), body[-40:]
    return body[:-4].split(b"\r\n\r\n")


def dataEvents(body: bytes) -> list[Any]:
    """
    The decoded C{data:} payloads of an SSE body (pings skipped; [DONE] kept as a string).
    """
    result: list[Any] = []
    for event in sseEvents(body):
        if event.startswith(b":"):
            continue
        assert event.startswith(b"data: "), event
        payload = event[len(b"data: "):]
        result.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return result


class BodyReader(Protocol):
    """
    Collects a streamed response body; C{first} fires on the first bytes and C{done} with all
    bytes when the connection ends, however it ends.
    """

    def __init__(self) -> None:
        self.data = b""
        self.first: Deferred[bytes] = Deferred()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.first.called:
            self.first.callback(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.done.callback(self.data)


class SimulatorTestCase(TestCase):
    """
    Starts simulators in temporary directories and reaps them after each test.
    """

    timeout = 20

    def setUp(self) -> None:
        self.client = makeHTTPClient(self)
        self.port = findFreePorts(2)

    def spawn(self, directory: Path, args: tuple[str, ...] = ()) -> SimulatorProcess:
        process = spawnSimulator(directory, self.port, args)
        self.addCleanup(process.kill)
        return process

    async def start(self, **kwargs: Any) -> SimulatorProcess:
        """
        Make a directory with L{makeTabbyDirectory}, spawn the simulator in it, wait for health.
        """
        kwargs.setdefault("apiKey", API_KEY)
        kwargs.setdefault("adminKey", ADMIN_KEY)
        directory = makeTabbyDirectory(Path(self.mktemp()), port=self.port, **kwargs)
        process = self.spawn(directory)
        await waitForHealth(self.client, process)
        return process

    async def post(self, process: SimulatorProcess, path: str, body: Any,
                   headers: HeaderMap | None = None) -> tuple[int, Any, bytes]:
        response = await self.client.post(
            process.url(path), data=json.dumps(body).encode(),
            headers=headers if headers is not None else API)
        raw = await response.content()
        contentType = response.headers.getRawHeaders("content-type", [""])[0]
        return response.code, contentType, raw


class CaptureTests(SimulatorTestCase):
    """
    The simulator against real TabbyAPI answers recorded with no model loaded.
    """

    def parseCapture(self, name: str) -> tuple[int, str, bytes]:
        head = (CAPTURES / f"{name}.headers").read_text().splitlines()
        status = int(head[0].split()[1])
        headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        return status, headers.get("content-type", ""), (CAPTURES / f"{name}.body").read_bytes()

    async def test_capturesMatch(self) -> None:
        """
        Every request in the captures' README gets the captured status, content type and body
        (ignoring timestamps): auth header rules, 401/404/405/422/503 bodies, the admin model
        listing, serviceinfo, and the plain-text 500 TabbyAPI gives when a request names a
        model while none is loaded.
        """
        if not (CAPTURES / "README.md").exists():
            raise SkipTest(f"captures not found at {CAPTURES}")
        process = await self.start(emptyModels=["tiny-model"])
        admin: HeaderMap = {"x-admin-key": ADMIN_KEY}
        cases: list[tuple[str, str, str, HeaderMap, bytes | None]] = [
            ("health", "GET", "/health", {}, None),
            ("models_nokey", "GET", "/v1/models", {}, None),
            ("models_badkey", "GET", "/v1/models", {"Authorization": "Bearer nope"}, None),
            ("models_api", "GET", "/v1/models", API, None),
            ("models_admin", "GET", "/v1/models", admin, None),
            ("models_admin_bearer", "GET", "/v1/models", ADMIN_BEARER, None),
            ("model_current", "GET", "/v1/model", API, None),
            ("chat_nomodel", "POST", "/v1/chat/completions", API, json.dumps(CHAT).encode()),
            ("chat_nomodel_withmodel", "POST", "/v1/chat/completions", API,
             json.dumps(dict(CHAT, model="tiny-model")).encode()),
            ("chat_stream_nomodel", "POST", "/v1/chat/completions", API,
             json.dumps(dict(CHAT, stream=True)).encode()),
            ("compl_nomodel", "POST", "/v1/completions", API, b'{"prompt":"hi"}'),
            ("chat_badjson", "POST", "/v1/chat/completions", API, b'{"messages":['),
            ("chat_noauth", "POST", "/v1/chat/completions", {}, json.dumps(CHAT).encode()),
            ("chat_negpenalty", "POST", "/v1/chat/completions", API,
             json.dumps(dict(CHAT, presence_penalty=-1)).encode()),
            ("notfound", "GET", "/nope", {}, None),
            ("wrongmethod", "DELETE", "/health", {}, None),
            ("load_nokey", "POST", "/v1/model/load", {}, b'{"model_name":"missing"}'),
            ("load_apikey", "POST", "/v1/model/load", API, b'{"model_name":"missing"}'),
            ("load_missing", "POST", "/v1/model/load", admin, b'{"model_name":"missing"}'),
            ("unload_admin", "POST", "/v1/model/unload", admin, None),
            ("permission_api", "GET", "/v1/auth/permission", API, None),
            ("embeddings", "POST", "/v1/embeddings", API, b'{"input":"hi"}'),
            ("encode", "POST", "/v1/token/encode", API, b'{"text":"hi"}'),
            ("serviceinfo", "GET", "/.well-known/serviceinfo", {}, None),
        ]
        for name, method, path, headers, body in cases:
            status, contentType, expected = self.parseCapture(name)
            response = await self.client.request(method, process.url(path), headers=headers,
                                                 data=body)
            raw = await response.content()
            self.assertEqual(response.code, status, name)
            self.assertEqual(
                response.headers.getRawHeaders("content-type", [""])[0], contentType, name)
            if contentType == "application/json":
                self.assertEqual(normalise(json.loads(raw)), normalise(json.loads(expected)),
                                 name)
            else:
                self.assertEqual(raw, expected, name)
        response = await self.client.request("DELETE", process.url("/health"))
        await response.content()
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET"])


def normalise(value: Any) -> Any:
    """
    Drop fields that differ on every run (timestamps) before comparing bodies.
    """
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items() if k not in ("created", "time")}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


class GenerationTests(SimulatorTestCase):
    """
    Generation with a model loaded: shapes of chat, completions, usage, tools, embeddings.
    """

    async def test_streamingChat(self) -> None:
        """
        A streamed chat answer has TabbyAPI HEAD's SSE headers, CRLF framing, chunks keyed id,
        object, created, choices, model, no role in any delta, the finish reason inside the last
        chunk's choice, and ends with [DONE]; the text starts with the model's name.
        """
        process = await self.start(models=["alpha"], modelName="alpha",
                                   simulator={"tokens": 4})
        response = await self.client.post(
            process.url("/v1/chat/completions"), headers=API,
            data=json.dumps(dict(CHAT, stream=True, model="whatever")).encode())
        body = await response.content()
        headers = response.headers
        self.assertEqual(headers.getRawHeaders("content-type"),
                         ["text/event-stream; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])
        self.assertEqual(headers.getRawHeaders("x-accel-buffering"), ["no"])
        events = dataEvents(body)
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        self.assertEqual(len(chunks), 4)
        for chunk in chunks:
            self.assertEqual(list(chunk), ["id", "object", "created", "choices", "model"])
            self.assertTrue(chunk["id"].startswith("chatcmpl-"))
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertEqual(chunk["model"], "alpha")
            self.assertNotIn("role", chunk["choices"][0]["delta"])
        self.assertEqual([c["choices"][0]["finish_reason"] for c in chunks],
                         [None, None, None, "stop"])
        self.assertEqual(chunks[-1]["choices"][0]["eos_reason"], "stop_token")
        text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
        self.assertTrue(text.startswith("alpha "))
        self.assertEqual(len(text.split()), 4)

    async def test_nonStreamingChatAndDeterminism(self) -> None:
        """
        A non-streamed chat answer is a chat.completion with a cmpl- id, the loaded model's
        name whatever the request asked for, usage null without include_usage, and the same
        text for the same prompt.
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        answers = []
        for _ in range(2):
            code, contentType, raw = await self.post(
                process, "/v1/chat/completions", dict(CHAT, model="gpt-4"))
            self.assertEqual((code, contentType), (200, "application/json"))
            answers.append(json.loads(raw))
        first = answers[0]
        self.assertTrue(first["id"].startswith("cmpl-"))
        self.assertEqual(first["object"], "chat.completion")
        self.assertEqual(first["model"], "alpha")
        self.assertIsNone(first["usage"])
        choice = first["choices"][0]
        self.assertEqual((choice["finish_reason"], choice["eos_reason"]), ("stop", "stop_token"))
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(len(choice["message"]["content"].split()), 16)
        self.assertEqual(choice["message"]["content"],
                         answers[1]["choices"][0]["message"]["content"])
        self.assertIn("Metrics (ID: ", process.text)

    async def test_maxTokensAndUsage(self) -> None:
        """
        max_tokens bounds the answer and gives finish_reason length / eos_reason
        max_new_tokens; include_usage gives HEAD's eight-field usage object.
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        code, _, raw = await self.post(process, "/v1/chat/completions", dict(
            CHAT, max_tokens=3, stream_options={"include_usage": True}))
        answer = json.loads(raw)
        choice = answer["choices"][0]
        self.assertEqual((choice["finish_reason"], choice["eos_reason"]),
                         ("length", "max_new_tokens"))
        self.assertEqual(len(choice["message"]["content"].split()), 3)
        usage = answer["usage"]
        self.assertEqual(list(usage), [
            "prompt_tokens", "prompt_time", "prompt_tokens_per_sec", "completion_tokens",
            "completion_time", "completion_tokens_per_sec", "total_tokens", "total_time"])
        # The templated prompt: <|im_start|> user hi <|im_end|> <|im_start|> assistant
        self.assertEqual((usage["prompt_tokens"], usage["completion_tokens"],
                          usage["total_tokens"]), (6, 3, 9))
        self.assertIsInstance(usage["completion_time"], float)

    async def test_lengthOfWrongTypeIs422(self) -> None:
        """
        A max_tokens that is not an integer is a 422 validation error, as pydantic answers in
        TabbyAPI, not a crash.
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        code, _, raw = await self.post(process, "/v1/chat/completions", dict(CHAT, max_tokens="x"))
        self.assertEqual(code, 422)
        [problem] = json.loads(raw)["detail"]
        self.assertEqual((problem["type"], problem["loc"]), ("int_type", ["body", "max_tokens"]))

    async def test_streamingUsageChunk(self) -> None:
        """
        With include_usage, the last text chunk's finish_reason is null and an extra chunk with
        an empty delta, the finish reason and the usage follows before [DONE].
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        code, _, raw = await self.post(process, "/v1/chat/completions", dict(
            CHAT, stream=True, max_tokens=2, stream_options={"include_usage": True}))
        events = dataEvents(raw)
        self.assertEqual(events[-1], "[DONE]")
        texts, usageChunk = events[:-2], events[-2]
        self.assertEqual([c["choices"][0]["finish_reason"] for c in texts], [None, None])
        self.assertEqual(list(usageChunk), ["id", "object", "created", "choices", "usage",
                                            "model"])
        self.assertEqual(usageChunk["choices"],
                         [{"index": 0, "delta": {}, "finish_reason": "length"}])
        self.assertEqual(usageChunk["usage"]["completion_tokens"], 2)

    async def test_streamingCompletions(self) -> None:
        """
        Completion stream chunks are text_completion objects carrying the upstream quirk
        C{model_name} instead of C{model}, with the text under choices[0].text.
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        code, _, raw = await self.post(process, "/v1/completions",
                                       {"prompt": "once upon", "stream": True, "max_tokens": 3})
        events = dataEvents(raw)
        self.assertEqual(events[-1], "[DONE]")
        for chunk in events[:-1]:
            self.assertEqual(list(chunk), ["id", "object", "choices", "created", "model_name"])
            self.assertEqual((chunk["object"], chunk["model_name"]), ("text_completion", "alpha"))
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "length")
        self.assertTrue(events[0]["choices"][0]["text"].startswith("alpha"))
        code, _, raw = await self.post(process, "/v1/completions", {"prompt": "once upon"})
        whole = json.loads(raw)
        self.assertEqual((whole["object"], whole["model"]), ("text_completion", "alpha"))
        self.assertTrue(whole["choices"][0]["text"].startswith("alpha "))

    async def test_toolCalls(self) -> None:
        """
        With tools and a user message about the weather, the answer is one call to the first
        tool with finish_reason tool_calls; streamed, the call arrives whole in the final chunk.
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        request = {
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                                                        "parameters": {"type": "object"}}}],
        }
        code, _, raw = await self.post(process, "/v1/chat/completions", request)
        choice = json.loads(raw)["choices"][0]
        self.assertEqual(choice["finish_reason"], "tool_calls")
        [call] = choice["message"]["tool_calls"]
        self.assertTrue(call["id"].startswith("call_"))
        self.assertEqual((call["type"], call["function"]),
                         ("function", {"name": "get_weather",
                                       "arguments": '{"city": "Paris"}'}))
        code, _, raw = await self.post(process, "/v1/chat/completions",
                                       dict(request, stream=True))
        events = dataEvents(raw)
        self.assertEqual(events[-1], "[DONE]")
        final = events[-2]["choices"][0]
        self.assertEqual(final["finish_reason"], "tool_calls")
        self.assertEqual(final["delta"]["tool_calls"][0]["function"]["name"], "get_weather")

    async def test_toolLoopDirective(self) -> None:
        """
        A C{[[call NAME {json}]]} directive in the last user message, naming an offered tool,
        is answered with that call (after the reasoning, when thinking is on), streamed whole in
        TabbyAPI's final chunk as non-streamed; once a tool result follows, the answer quotes it.
        A directive naming a tool not offered is plain text.
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        shell = {"type": "function", "function": {"name": "Bash", "parameters": {"type": "object"}}}
        asking = [{"role": "user", "content": 'Run it [[call Bash {"command": "echo MARK-1"}]]'},
                  {"role": "system", "content": "Mind the tools."}]
        request = {"messages": asking, "tools": [shell], "template_vars": {"enable_thinking": True},
                   "stream_options": {"include_usage": True}}
        code, _, raw = await self.post(process, "/v1/chat/completions", request)
        choice = json.loads(raw)["choices"][0]
        self.assertEqual((choice["finish_reason"], choice["message"]["reasoning_content"][:9]),
                         ("tool_calls", "Thinking "))
        [call] = choice["message"]["tool_calls"]
        self.assertEqual(call["function"], {"name": "Bash", "arguments": '{"command": "echo MARK-1"}'})
        code, _, raw = await self.post(process, "/v1/chat/completions", dict(request, stream=True))
        events = dataEvents(raw)
        self.assertEqual(events[-1], "[DONE]")
        self.assertIn("reasoning_content", events[0]["choices"][0]["delta"])
        calls = [c for e in events[:-1] for c in e["choices"][0]["delta"].get("tool_calls") or []]
        self.assertEqual([(c["index"], c["function"]["arguments"]) for c in calls], [(0, '{"command": "echo MARK-1"}')])
        self.assertEqual(events[-2]["usage"]["total_tokens"],
                         events[-2]["usage"]["prompt_tokens"] + events[-2]["usage"]["completion_tokens"])
        answered = asking + [{"role": "assistant", "content": None, "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": call["id"], "content": "MARK-1"}]
        code, _, raw = await self.post(process, "/v1/chat/completions", {"messages": answered, "tools": [shell]})
        message = json.loads(raw)["choices"][0]["message"]
        self.assertEqual((message["content"], message["tool_calls"]), ('The tool said: "MARK-1"', None))
        code, _, raw = await self.post(process, "/v1/chat/completions",
                                       {"messages": asking, "tools": [dict(shell, function={"name": "Other"})]})
        self.assertIsNone(json.loads(raw)["choices"][0]["message"]["tool_calls"])

    async def test_embeddingsTokensAndModels(self) -> None:
        """
        With an embedding model configured, /v1/embeddings returns one 8-float vector per
        input; encode gives one id per word and decode turns them back; /v1/models shows an API
        key only the loaded model and /v1/model carries parameters.
        """
        process = await self.start(models=["alpha", "beta"], modelName="alpha",
                                   extra={"embeddings": {"embedding_model_name": "emb"}})
        code, _, raw = await self.post(process, "/v1/embeddings", {"input": ["a b", "c"]})
        result = json.loads(raw)
        self.assertEqual(code, 200)
        self.assertEqual([d["index"] for d in result["data"]], [0, 1])
        self.assertEqual([len(d["embedding"]) for d in result["data"]], [8, 8])
        self.assertEqual(result["usage"], {"prompt_tokens": 3, "total_tokens": 3,
                                           "completion_tokens": 0})
        code, _, raw = await self.post(process, "/v1/token/encode", {"text": "amber basil x"})
        encoded = json.loads(raw)
        self.assertEqual(encoded["length"], 3)
        code, _, raw = await self.post(process, "/v1/token/decode",
                                       {"tokens": encoded["tokens"][:2]})
        self.assertEqual(json.loads(raw), {"text": "amber basil"})
        response = await self.client.get(process.url("/v1/models"), headers=API)
        self.assertEqual([m["id"] for m in json.loads(await response.content())["data"]],
                         ["alpha"])
        response = await self.client.get(process.url("/v1/models"), headers=ADMIN_BEARER)
        self.assertEqual([m["id"] for m in json.loads(await response.content())["data"]],
                         ["alpha", "beta"])
        response = await self.client.get(process.url("/v1/model"), headers=API)
        card = json.loads(await response.content())
        self.assertEqual((card["id"], card["parameters"]["max_seq_len"]), ("alpha", 4096))

    async def test_contextLimits(self) -> None:
        """
        Encoding a list of messages counts them through the chat template without the
        generation prompt, as TabbyAPI does; a chat counts it with the generation prompt.  A
        prompt longer than max_seq_len, or (without output chunking) one whose max_tokens do not
        fit the cache, is TabbyAPI's 400 context_length_exceeded in OpenAI's shape.
        """
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "amber basil cedar"}]
        process = await self.start(models=["alpha"], modelName="alpha",
                                   extra={"model": {"max_seq_len": 64, "output_chunking": False}})
        code, _, raw = await self.post(process, "/v1/token/encode", {"text": messages})
        # <|im_start|> system be brief <|im_end|> <|im_start|> user amber basil cedar <|im_end|>
        self.assertEqual((code, json.loads(raw)["length"]), (200, 11))
        code, _, raw = await self.post(process, "/v1/chat/completions", {
            "messages": messages, "max_tokens": 1, "stream_options": {"include_usage": True}})
        self.assertEqual((code, json.loads(raw)["usage"]["prompt_tokens"]), (200, 13))
        long = [{"role": "user", "content": "word " * 70}]
        code, contentType, raw = await self.post(process, "/v1/chat/completions", dict(CHAT, messages=long, stream=True))
        self.assertEqual((code, contentType), (400, "application/json"))
        self.assertEqual(json.loads(raw), {"error": {
            "message": "Prompt length 75 exceeds the available context size of 64 tokens",
            "type": "invalid_request_error", "param": None, "code": "context_length_exceeded"}})
        code, _, raw = await self.post(process, "/v1/chat/completions", {"messages": messages, "max_tokens": 60})
        self.assertEqual((code, json.loads(raw)["error"]["message"]),
                         (400, "Initial job allocation requires 73 cache tokens, which exceeds the available "
                               "context size of 64 tokens"))

    async def test_contextLimitsWithChunking(self) -> None:
        """
        With output chunking (TabbyAPI's default) max_tokens does not count: the cache must
        hold the prompt and one chunk, rounded up to 256 tokens.
        """
        messages = [{"role": "user", "content": "amber"}]
        process = await self.start(models=["alpha"], modelName="alpha",
                                   extra={"model": {"max_seq_len": 1024, "chunk_size": 256}})
        code, _, raw = await self.post(process, "/v1/chat/completions", {"messages": messages, "max_tokens": 2000})
        self.assertEqual(code, 200)
        code, _, raw = await self.post(process, "/v1/completions", {"prompt": "word " * 800})
        self.assertEqual((code, json.loads(raw)["error"]["message"]),
                         (400, "Initial job allocation requires 1280 cache tokens, which exceeds the available "
                               "context size of 1024 tokens"))

    async def test_logprobs(self) -> None:
        """
        With logprobs, each chat chunk of the answer carries TabbyAPI's C{logprobs.content}
        entries (token, token_id, logprob, top_logprobs as long as asked, the token first), the
        reasoning none; completions carry the converted form (parallel lists, a map of
        alternatives per token, offsets from the chunk's start); a whole answer carries them all.
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        code, _, raw = await self.post(process, "/v1/chat/completions", dict(
            CHAT, stream=True, max_tokens=2, logprobs=True, top_logprobs=3,
            template_vars={"enable_thinking": True}))
        chunks = [event["choices"][0] for event in dataEvents(raw)[:-1]]
        reasoning = [chunk for chunk in chunks if "reasoning_content" in chunk["delta"]]
        content = [chunk for chunk in chunks if "content" in chunk["delta"]]
        self.assertEqual((len(reasoning), len(content)), (3, 2))
        self.assertTrue(all("logprobs" not in chunk for chunk in reasoning))
        for chunk in content:
            [entry] = chunk["logprobs"]["content"]
            self.assertEqual(list(entry), ["token", "token_id", "logprob", "top_logprobs"])
            self.assertEqual(entry["token"], chunk["delta"]["content"])
            self.assertEqual(len(entry["top_logprobs"]), 3)
            self.assertEqual(entry["top_logprobs"][0], {k: entry[k] for k in ("token", "token_id", "logprob")})
            values = [top["logprob"] for top in entry["top_logprobs"]]
            self.assertEqual(values, sorted(values, reverse=True))
        code, _, raw = await self.post(process, "/v1/chat/completions", dict(CHAT, max_tokens=2, logprobs=True))
        [choice] = json.loads(raw)["choices"]
        self.assertEqual([(entry["token"], entry["top_logprobs"]) for entry in choice["logprobs"]["content"]],
                         [("alpha ", []), (choice["message"]["content"].split(" ", 1)[1], [])])
        code, _, raw = await self.post(process, "/v1/completions",
                                       {"prompt": "once", "stream": True, "max_tokens": 2, "logprobs": 2})
        first = dataEvents(raw)[0]["choices"][0]
        self.assertEqual(list(first["logprobs"]), ["tokens", "token_logprobs", "top_logprobs", "text_offset"])
        self.assertEqual((first["logprobs"]["tokens"], first["logprobs"]["text_offset"]), ([first["text"]], [0]))
        self.assertEqual(len(first["logprobs"]["top_logprobs"][0]), 2)
        code, _, raw = await self.post(process, "/v1/chat/completions", dict(CHAT, max_tokens=2))
        self.assertIsNone(json.loads(raw)["choices"][0]["logprobs"])

    async def test_unload(self) -> None:
        """
        POST /v1/model/unload with the admin key answers null, and generation then answers
        503 No models are currently loaded.
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        code, contentType, raw = await self.post(process, "/v1/model/unload", None,
                                                 {"x-admin-key": ADMIN_KEY})
        self.assertEqual((code, raw), (200, b"null"))
        code, _, raw = await self.post(process, "/v1/chat/completions", CHAT)
        self.assertEqual((code, json.loads(raw)),
                         (503, {"detail": "No models are currently loaded."}))

    async def test_pings(self) -> None:
        """
        While a slow stream runs, ": ping - <time>" comments arrive every sse_ping_interval.
        """
        process = await self.start(
            models=["alpha"], modelName="alpha",
            simulator={"token_delay": 0.1, "tokens": 4},
            extra={"network": {"sse_ping_interval": 0.05}})
        code, _, raw = await self.post(process, "/v1/chat/completions", dict(CHAT, stream=True))
        pings = [e for e in sseEvents(raw) if e.startswith(b": ping - ")]
        self.assertGreaterEqual(len(pings), 3)
        self.assertEqual(dataEvents(raw)[-1], "[DONE]")


class ProcessBehaviourTests(SimulatorTestCase):
    """
    The knobs and process-level behaviour a scheduler has to handle.
    """

    async def test_failLoad(self) -> None:
        """
        fail_load prints a traceback ending in TabbyAPI's ValueError and exits 1 without ever
        opening its port.
        """
        directory = makeTabbyDirectory(Path(self.mktemp()), port=self.port, models=["alpha"],
                                       modelName="alpha", simulator={"fail_load": True})
        process = self.spawn(directory)
        code = await process.exited()
        self.assertEqual(code, 1)
        self.assertIn("ValueError: Failed to load config.json from", process.text)
        self.assertNotIn("Uvicorn running", process.text)

    async def test_missingConfigJson(self) -> None:
        """
        A model folder without config.json fails the start-up load the same way, naming the
        absolute model folder.
        """
        directory = makeTabbyDirectory(Path(self.mktemp()), port=self.port,
                                       emptyModels=["tiny-model"])
        (directory / "override.yml").write_text("model:\n  model_name: tiny-model\n")
        process = self.spawn(directory, ("--config", "override.yml"))
        code = await process.exited()
        self.assertEqual(code, 1)
        self.assertIn(f"ValueError: Failed to load config.json from "
                      f"{(directory / 'models' / 'tiny-model').resolve()}", process.text)

    async def test_configOverrideWinsOverFlags(self) -> None:
        """
        The --config file is merged over config.yml per key, and --port is ignored when
        --config is given, as in TabbyAPI.
        """
        directory = makeTabbyDirectory(Path(self.mktemp()), port=1, models=["alpha"],
                                       apiKey=API_KEY, adminKey=ADMIN_KEY)
        (directory / "override.yml").write_text(
            f"network:\n  port: {self.port}\nmodel:\n  model_name: alpha\n  max_seq_len:\n")
        process = self.spawn(directory, ("--config", "override.yml", "--port", "2"))
        await waitForHealth(self.client, process)
        response = await self.client.get(process.url("/v1/model"), headers=API)
        card = json.loads(await response.content())
        self.assertEqual(card["id"], "alpha")

    async def test_portBusy(self) -> None:
        """
        When the configured port is taken the simulator says so and serves on port+1.
        """
        blocker = reactor.listenTCP(self.port, Factory.forProtocol(Protocol),
                                    interface="127.0.0.1")
        self.addCleanup(blocker.stopListening)
        directory = makeTabbyDirectory(Path(self.mktemp()), port=self.port, apiKey=API_KEY,
                                       adminKey=ADMIN_KEY)
        process = self.spawn(directory)
        await waitForHealth(self.client, process, port=self.port + 1)
        self.assertIn(f"Port {self.port} is currently in use. Switching to {self.port + 1}.",
                      process.text)
        self.assertIn(f"Uvicorn running on http://127.0.0.1:{self.port + 1}", process.text)

    async def test_sigterm(self) -> None:
        """
        SIGTERM while serving prints the shutdown line and exits 0 within about a second.
        """
        process = await self.start()
        started = time.monotonic()
        process.signalProcess("TERM")
        code = await process.exited()
        self.assertEqual(code, 0)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIn("Shutdown signal called. Exiting gracefully.", process.text)

    async def test_sigtermDuringStream(self) -> None:
        """
        SIGTERM with a stream in flight still exits 0 promptly; the stream just ends.
        """
        process = await self.start(models=["alpha"], modelName="alpha",
                                   simulator={"token_delay": 0.1, "tokens": 100})
        response = await self.client.post(process.url("/v1/chat/completions"), headers=API,
                                          data=json.dumps(dict(CHAT, stream=True)).encode())
        reader = BodyReader()
        response.deliverBody(reader)
        await reader.first
        started = time.monotonic()
        process.signalProcess("TERM")
        self.assertEqual(await process.exited(), 0)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertNotIn(b"[DONE]", await reader.done)

    async def test_sigtermDuringLoad(self) -> None:
        """
        hang_at_start never opens the port, but SIGTERM still ends the process with status 0.
        """
        directory = makeTabbyDirectory(Path(self.mktemp()), port=self.port, models=["alpha"],
                                       modelName="alpha", simulator={"hang_at_start": True})
        process = self.spawn(directory)
        await process.printed("Loading model:")
        process.signalProcess("TERM")
        self.assertEqual(await process.exited(), 0)
        self.assertIn("Shutdown signal called. Exiting gracefully.", process.text)
        self.assertNotIn("Uvicorn running", process.text)

    async def test_ignoreSigterm(self) -> None:
        """
        ignore_sigterm logs SIGTERM and keeps serving; only SIGKILL ends the process.
        """
        process = await self.start(simulator={"ignore_sigterm": True})
        process.signalProcess("TERM")
        await process.printed("ignoring it")
        await waitForHealth(self.client, process, timeout=2)
        self.assertFalse(process.finished)
        process.signalProcess("KILL")
        await process.exited()
        self.assertEqual(process.exitSignal, 9)

    async def test_crashAfterTokens(self) -> None:
        """
        crash_after_tokens kills the process mid-stream: the client gets those tokens, no
        [DONE], and the process exits with status 1.
        """
        process = await self.start(models=["alpha"], modelName="alpha",
                                   simulator={"crash_after_tokens": 3, "tokens": 10})
        response = await self.client.post(process.url("/v1/chat/completions"), headers=API,
                                          data=json.dumps(dict(CHAT, stream=True)).encode())
        reader = BodyReader()
        response.deliverBody(reader)
        body = await reader.done
        self.assertNotIn(b"[DONE]", body)
        self.assertEqual(body.count(b'"content"'), 3)
        self.assertEqual(await process.exited(), 1)

    async def test_failGenerationAfterStreaming(self) -> None:
        """
        fail_generation_after 1: the second generation, streamed, gets one in-stream error
        event and no [DONE]; /health is 503 with an issue from then on, even though the next
        generation succeeds.
        """
        process = await self.start(models=["alpha"], modelName="alpha",
                                   simulator={"fail_generation_after": 1})
        code, _, raw = await self.post(process, "/v1/chat/completions", CHAT)
        self.assertEqual(code, 200)
        code, _, raw = await self.post(process, "/v1/chat/completions", dict(CHAT, stream=True))
        self.assertEqual(code, 200)
        self.assertEqual(dataEvents(raw), [{"error": {
            "message": "Chat completion aborted. Please check the server console.",
            "trace": None}}])
        code, _, raw = await self.post(process, "/v1/chat/completions", CHAT)
        self.assertEqual(code, 200)
        for _ in range(2):
            response = await self.client.get(process.url("/health"))
            health = json.loads(await response.content())
            self.assertEqual(response.code, 503)
            self.assertEqual(health["status"], "unhealthy")
            [issue] = health["issues"]
            self.assertEqual(set(issue), {"time", "description"})

    async def test_failGenerationNonStreaming(self) -> None:
        """
        fail_generation_after 0: the first non-streamed generation gets TabbyAPI's 503
        "Chat completion <id> aborted" body, and /health turns 503.
        """
        process = await self.start(models=["alpha"], modelName="alpha",
                                   simulator={"fail_generation_after": 0})
        code, _, raw = await self.post(process, "/v1/chat/completions", CHAT)
        self.assertEqual(code, 503)
        message = json.loads(raw)["detail"]
        self.assertRegex(message, r"^Chat completion [0-9a-f]{32} aborted\. Maybe the model "
                                  r"was unloaded\? Please check the server console\.$")
        response = await self.client.get(process.url("/health"))
        await response.content()
        self.assertEqual(response.code, 503)

    async def test_clientDisconnect(self) -> None:
        """
        When the client drops a stream, generation stops and the console says the request
        was cancelled by user, naming the request id seen in the stream.
        """
        process = await self.start(models=["alpha"], modelName="alpha",
                                   simulator={"token_delay": 0.05, "tokens": 200})
        response = await self.client.post(process.url("/v1/chat/completions"), headers=API,
                                          data=json.dumps(dict(CHAT, stream=True)).encode())
        reader = BodyReader()
        response.deliverBody(reader)
        first = await reader.first
        requestId = json.loads(first.split(b"\r\n")[0][len(b"data: "):])["id"]
        # The body transport is a push producer; stopping it drops the connection.
        cast(IPushProducer, reader.transport).stopProducing()
        await reader.done
        await process.printed("cancelled by user")
        line = [ln for ln in process.text.splitlines() if "cancelled by user" in ln][0]
        self.assertIn(requestId.removeprefix("chatcmpl-"), line)
        self.assertNotIn(f"Metrics (ID: {requestId.removeprefix('chatcmpl-')})", process.text)

    async def test_backpressure(self) -> None:
        """
        A client that stops reading pauses generation: the simulator's memory stays flat and
        the answer does not complete, instead of the whole answer piling up in its buffers.
        """
        process = await self.start(models=["alpha"], modelName="alpha")
        assert process.transport is not None
        status = Path(f"/proc/{process.transport.pid}/status")
        if not status.exists():
            raise SkipTest("needs /proc to read the child's memory use")
        response = await self.client.post(
            process.url("/v1/chat/completions"), headers=API,
            data=json.dumps(dict(CHAT, stream=True, max_tokens=200000)).encode())
        reader = BodyReader()
        response.deliverBody(reader)
        await reader.first
        producer = cast(IPushProducer, reader.transport)
        producer.pauseProducing()
        before = residentKiB(status)
        # Unpaused, 200000 tokens take about a second and some 50 MB of buffers.
        await deferLater(reactor, 1.5)
        grown = residentKiB(status) - before
        self.assertLess(grown, 20 * 1024)
        self.assertNotIn("Metrics (ID:", process.text)
        producer.stopProducing()
        await reader.done
        await process.printed("cancelled by user")


def residentKiB(status: Path) -> int:
    """
    VmRSS of a process, in KiB, from its /proc status file.
    """
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")
