"""
Real Ollama clients against the real proxy: the service built from command-line options, the
simulator as its child, real loopback TCP, the C{ollama} package as the client, and a replay of
the calls Open WebUI makes, checking the fields each reads.
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable

import ollama
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed

from tabbyproxy.ollamawire import PROMPT_TOO_LONG
from tests.support.logs import CapturedEvents
from tests.support.processes import waitUntil
from tests.support.proxy import RunningProxy, inThread
from tests.support.wire import StreamedBody

PROFILES: dict[str, dict[str, Any]] = {
    "alpha": {"model": {"model_name": "Alpha-exl3", "max_seq_len": 4096},
              "template": {"system": "Be brief."}},
    "beta": {"model": {"model_name": "Beta-exl3"}, "embeddings": {"embedding_model_name": "bge-small"}},
    "fragile": {"model": {"model_name": "Fragile"}, "simulator": {"crash_after_tokens": 3}},
    "slow": {"model": {"model_name": "Slow"}, "simulator": {"token_delay": 0.05}},
    # TabbyAPI's default output chunking: the cache must hold the prompt and a 256-token chunk,
    # so prompts of up to 769 tokens fit.
    "tiny": {"model": {"model_name": "Tiny", "max_seq_len": 1024, "chunk_size": 256}},
    "plain": {"model": {"model_name": "Plain"},
              "simulator": {"chat_template": "{% for message in messages %}{{ message.content }}{% endfor %}"}},
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def ollamaClient(testCase: TestCase, proxy: RunningProxy) -> ollama.Client:
    """
    An C{ollama} client for the proxy; C{Connection: close}, so no socket outlives the test.
    """
    client = ollama.Client(host=proxy.url, headers={"Connection": "close"}, timeout=30)
    testCase.addCleanup(client.close)
    return client


async def responseError(call: Callable[[], object]) -> ollama.ResponseError:
    """
    The C{ollama.ResponseError} that C{call} raises in a thread.
    """
    try:
        await inThread(call)
    except ollama.ResponseError as e:
        return e
    raise AssertionError("no ollama.ResponseError was raised")


def secondsUntil(expiresAt: datetime) -> float:
    return expiresAt.timestamp() - time.time()


class OllamaClientTests(TestCase):
    """
    The C{ollama} package, as applications use it.
    """

    timeout = 60

    async def test_listShowChatGenerate(self) -> None:
        """
        list, show and ps describe the profiles and the running model; chat and generate work
        streaming and not, with the model's answer, the name echoed, and Ollama's final
        metrics; think gives thinking; everything is served by one child.
        """
        proxy = RunningProxy(self, PROFILES)
        client = ollamaClient(self, proxy)

        listed = await inThread(client.list)
        names = sorted(model.model or "" for model in listed.models)
        self.assertEqual(names, ["alpha:latest", "beta:latest", "fragile:latest", "plain:latest", "slow:latest",
                                 "tiny:latest"])
        for model in listed.models:
            self.assertIsInstance(model.modified_at, datetime)
            self.assertIsNotNone(model.details)
        shown = await inThread(lambda: client.show("alpha"))
        self.assertEqual(shown.modelinfo["llama.context_length"], 4096)  # type: ignore[index]
        self.assertIn("completion", shown.capabilities or [])
        self.assertEqual((await inThread(client.ps)).models, [])

        messages = [{"role": "user", "content": "Hello"}]
        reply = await inThread(lambda: client.chat(model="alpha", messages=messages))
        self.assertTrue((reply.message.content or "").startswith("Alpha-exl3 "), reply)
        self.assertEqual((reply.model, reply.done, reply.done_reason), ("alpha", True, "stop"))
        self.assertEqual(reply.eval_count, 16)
        self.assertGreater(reply.prompt_eval_count or 0, 0)
        self.assertGreater(reply.total_duration or 0, 0)
        self.assertGreater(reply.load_duration or 0, 0)

        def streamChat() -> list[Any]:
            return list(client.chat(model="alpha:latest", messages=messages, stream=True,
                                    options={"num_predict": 5}))

        chunks = await inThread(streamChat)
        streamedText = "".join(chunk.message.content or "" for chunk in chunks)
        self.assertTrue(streamedText.startswith("Alpha-exl3 "), streamedText)
        self.assertEqual([chunk.done for chunk in chunks], [False] * 5 + [True])
        self.assertEqual((chunks[-1].done_reason, chunks[-1].eval_count, chunks[-1].model),
                         ("length", 5, "alpha:latest"))

        generated = await inThread(lambda: client.generate(model="alpha", prompt="Once", system="Terse."))
        self.assertTrue((generated.response or "").startswith("Alpha-exl3 "))
        self.assertEqual(generated.done_reason, "stop")
        pieces = await inThread(lambda: list(client.generate(model="alpha", prompt="Once", stream=True, raw=True)))
        self.assertTrue("".join(piece.response or "" for piece in pieces).startswith("Alpha-exl3 "))
        self.assertTrue(pieces[-1].done)

        thought = await inThread(lambda: client.chat(model="alpha", messages=messages, think=True))
        self.assertTrue(thought.message.thinking, thought)
        self.assertTrue((thought.message.content or "").startswith("Alpha-exl3 "))

        [running] = (await inThread(client.ps)).models
        self.assertEqual((running.model, running.context_length), ("alpha:latest", 4096))
        self.assertTrue(890 < secondsUntil(running.expires_at) <= 900, running.expires_at)  # type: ignore[arg-type]
        self.assertEqual(proxy.scheduler.starts, 1)

    async def test_twoModelsLoadedAtOnce(self) -> None:
        """
        On GPUs with room for both, Open WebUI's sequence for a question with documents (embed,
        then chat, then embed) starts each model once and swaps nothing: C{ollama.ps()} lists
        both, each with the GPU memory accounted to it.
        """
        profiles = {"alpha": {**PROFILES["alpha"], "memory": "8GiB"}, "beta": {**PROFILES["beta"], "memory": "2GiB"}}
        events = CapturedEvents(self)
        proxy = RunningProxy(self, profiles, "--simulate-gpus", "1x24GiB")
        client = ollamaClient(self, proxy)
        await inThread(lambda: client.embed(model="beta", input=["a document"]))
        await inThread(lambda: client.chat(model="alpha", messages=[{"role": "user", "content": "Hi"}]))
        await inThread(lambda: client.embed(model="beta", input=["a question"]))
        self.assertEqual((events.starts(), events.stops()), (["beta", "alpha"], []))
        running = (await inThread(client.ps)).models
        self.assertEqual({(model.name, model.size_vram) for model in running},
                         {("alpha:latest", 8 * 2**30), ("beta:latest", 2 * 2**30)})

    async def test_embed(self) -> None:
        """
        embed answers one normalized vector per input; the legacy embeddings call answers one; a
        profile without an embedding model is a 400 at once, and show says which can embed.
        """
        proxy = RunningProxy(self, PROFILES)
        client = ollamaClient(self, proxy)
        embedded = await inThread(lambda: client.embed(model="beta", input=["first", "second"]))
        self.assertEqual(embedded.model, "beta")
        self.assertEqual([len(vector) for vector in embedded.embeddings], [8, 8])
        for vector in embedded.embeddings:
            self.assertAlmostEqual(math.sqrt(sum(value * value for value in vector)), 1.0, places=6)
        self.assertGreater(embedded.prompt_eval_count or 0, 0)
        legacy = await inThread(lambda: client.embeddings(model="beta:latest", prompt="first"))
        self.assertEqual(len(legacy.embedding), 8)
        error = await responseError(lambda: client.embed(model="alpha", input="x"))
        self.assertEqual((error.status_code, error.error), (400, '"alpha" does not support embedding'))
        self.assertEqual([model.profile.id for model in proxy.scheduler.snapshot()], ["beta"])
        self.assertEqual((await inThread(lambda: client.show("beta"))).capabilities,
                         ["completion", "tools", "thinking", "embedding"])

    async def test_loadUnloadAndKeepAlive(self) -> None:
        """
        An empty request loads the model and one with keep_alive 0 unloads it; keep_alive "5m"
        and -1 show in /api/ps and /status, and 0 on a real request unloads after it.
        """
        proxy = RunningProxy(self, PROFILES)
        client = ollamaClient(self, proxy)
        loaded = await inThread(lambda: client.generate(model="alpha", prompt=""))
        self.assertEqual((loaded.done, loaded.done_reason, loaded.response), (True, "load", ""))
        self.assertEqual(proxy.scheduler.status()["state"], "ready")

        messages = [{"role": "user", "content": "Hi"}]
        await inThread(lambda: client.chat(model="alpha", messages=messages, keep_alive="5m"))
        [running] = (await inThread(client.ps)).models
        self.assertTrue(290 < secondsUntil(running.expires_at) <= 300, running.expires_at)  # type: ignore[arg-type]
        self.assertTrue(290 < proxy.scheduler.status()["unload"]["fires_in_seconds"] <= 300)

        await inThread(lambda: client.chat(model="alpha", messages=messages, keep_alive=-1))
        [running] = (await inThread(client.ps)).models
        self.assertGreaterEqual(running.expires_at.year, 2300)  # type: ignore[union-attr]
        self.assertEqual(proxy.scheduler.status()["unload"]["keep_alive"], "forever")

        unloaded = await inThread(lambda: client.generate(model="alpha", keep_alive=0))
        self.assertEqual(unloaded.done_reason, "unload")
        self.assertEqual((await inThread(client.ps)).models, [])
        await waitUntil(lambda: not proxy.scheduler.snapshot())

        chatLoad = await inThread(lambda: client.chat(model="alpha", messages=[]))
        self.assertEqual((chatLoad.done_reason, chatLoad.message.content), ("load", ""))
        await inThread(lambda: client.chat(model="alpha", messages=messages, keep_alive=0))
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertEqual(proxy.scheduler.status()["state"], "stopped")
        self.assertEqual(proxy.scheduler.starts, 2)

    async def test_toolsRoundTrip(self) -> None:
        """
        A tool call comes back with its arguments as an object, streaming or not, and the
        conversation goes on with the tool's result; the same call asked for again gets a new
        id each time (issue 11, item 12).
        """
        proxy = RunningProxy(self, PROFILES)
        client = ollamaClient(self, proxy)
        messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
        reply = await inThread(lambda: client.chat(model="alpha", messages=messages, tools=[WEATHER_TOOL]))
        [call] = reply.message.tool_calls or []
        self.assertEqual((call.function.name, dict(call.function.arguments)), ("get_weather", {"city": "Paris"}))
        self.assertEqual(reply.done_reason, "stop")

        def streamed() -> list[Any]:
            return list(client.chat(model="alpha", messages=messages, tools=[WEATHER_TOOL], stream=True))

        chunks = await inThread(streamed)
        calls = [call for chunk in chunks for call in chunk.message.tool_calls or []]
        self.assertEqual([dict(call.function.arguments) for call in calls], [{"city": "Paris"}])
        self.assertTrue(chunks[-1].done)

        messages += [reply.message, {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 21 C"}]
        answer = await inThread(lambda: client.chat(model="alpha", messages=messages))
        self.assertEqual(answer.message.content, 'The tool said: "Sunny, 21 C"')

        # The package drops ids; Open WebUI keeps them, and the same call round after round
        # must not repeat one.
        headers: dict[bytes | str, bytes | str] = {"Connection": "close"}

        async def rawCall() -> dict[str, Any]:
            response = await proxy.http.post(proxy.url + "/api/chat", headers=headers, json={
                "model": "alpha", "stream": False, "tools": [WEATHER_TOOL], "messages": messages[:1]})
            [call] = json.loads(await response.content())["message"]["tool_calls"]
            return dict(call)

        ids = [(await rawCall())["id"] for _ in range(3)]
        self.assertEqual(len(set(ids)), 3)
        self.assertTrue(all(re.fullmatch(r"call_[0-9a-f]{8}", callId) for callId in ids))

    async def test_errors(self) -> None:
        """
        Unknown models and model-file routes are ResponseErrors with Ollama's status (names in
        another case or with Ollama's namespace are not unknown); a
        child that dies mid-stream ends the stream with an error line, which the client
        raises.
        """
        proxy = RunningProxy(self, PROFILES)
        client = ollamaClient(self, proxy)
        error = await responseError(lambda: client.chat(model="gamma", messages=[{"role": "user", "content": "x"}]))
        self.assertEqual((error.status_code, error.error), (404, "model 'gamma' not found"))
        # Names as Ollama matches them (issue 11, item 10).
        shown = await inThread(lambda: client.show(" library/Alpha:Latest "))
        self.assertIn("completion", shown.capabilities or [])
        reply = await inThread(lambda: client.generate(model="registry.ollama.ai/library/ALPHA", prompt="x"))
        self.assertEqual(reply.model, "registry.ollama.ai/library/ALPHA")
        error = await responseError(lambda: client.pull("alpha"))
        self.assertEqual(error.status_code, 501)
        self.assertIn("does not manage model files", error.error)

        def crash() -> list[Any]:
            return list(client.chat(model="fragile", stream=True, options={"num_predict": 10},
                                    messages=[{"role": "user", "content": "x"}]))

        error = await responseError(crash)
        self.assertIn("connection to TabbyAPI broke", error.error)
        await waitUntil(lambda: not proxy.scheduler.snapshot())

    async def test_longChatTruncated(self) -> None:
        """
        A conversation longer than the model's context is answered, as Ollama answers it: the
        oldest messages are dropped, the system message and the latest message kept, until
        TabbyAPI takes the prompt; with C{truncate: false} TabbyAPI's refusal is the answer; a
        latest message too long alone (or a generate prompt) is Ollama's 400 (issue 11, item 7).
        """
        proxy = RunningProxy(self, PROFILES)
        client = ollamaClient(self, proxy)
        history: list[dict[str, str]] = [{"role": "system", "content": "Be kind."}]
        for turn in range(10):
            history += [{"role": "user", "content": " ".join([f"question{turn}"] * 100)},
                        {"role": "assistant", "content": " ".join([f"answer{turn}"] * 100)}]
        messages = [*history, {"role": "user", "content": "Hello"}]
        reply = await inThread(lambda: client.chat(model="tiny", messages=messages))
        self.assertTrue((reply.message.content or "").startswith("Tiny "), reply)
        self.assertTrue(0 < (reply.prompt_eval_count or 0) <= 769, reply.prompt_eval_count)
        chunks = await inThread(lambda: list(client.chat(model="tiny", messages=messages, stream=True)))
        self.assertTrue(chunks[-1].done)
        self.assertEqual(chunks[-1].prompt_eval_count, reply.prompt_eval_count)

        headers: dict[bytes | str, bytes | str] = {"Connection": "close"}
        response = await proxy.http.post(proxy.url + "/api/chat", headers=headers, json={
            "model": "tiny", "truncate": False, "messages": messages})
        self.assertEqual(response.code, 400)
        self.assertIn("exceeds the available context size of 1024 tokens", json.loads(await response.content())["error"])

        alone = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "word " * 900}]
        error = await responseError(lambda: client.chat(model="tiny", messages=alone))
        self.assertEqual(error.status_code, 400)
        self.assertTrue(error.error.startswith(PROMPT_TOO_LONG), error.error)
        error = await responseError(lambda: client.generate(model="tiny", prompt="word " * 900))
        self.assertEqual(error.status_code, 400)
        self.assertTrue(error.error.startswith(PROMPT_TOO_LONG), error.error)
        self.assertEqual(proxy.scheduler.starts, 1)

    async def test_capabilityRefusals(self) -> None:
        """
        A model whose chat template takes neither tools nor thinking shows only
        C{completion}, and refuses C{tools} and C{think} with Ollama's 400s, without loading
        (issue 11, item 9).
        """
        proxy = RunningProxy(self, PROFILES)
        client = ollamaClient(self, proxy)
        self.assertEqual((await inThread(lambda: client.show("plain"))).capabilities, ["completion"])
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        error = await responseError(lambda: client.chat(model="plain", messages=messages, tools=[WEATHER_TOOL]))
        self.assertEqual((error.status_code, error.error), (400, '"plain" does not support tools'))
        error = await responseError(lambda: client.chat(model="plain", messages=messages, think=True))
        self.assertEqual((error.status_code, error.error), (400, '"plain" does not support thinking'))
        error = await responseError(lambda: client.generate(model="plain", prompt="x", think="high"))
        self.assertEqual((error.status_code, error.error), (400, '"plain" does not support thinking'))
        self.assertEqual(proxy.scheduler.snapshot(), ())
        reply = await inThread(lambda: client.chat(model="plain", messages=messages, think=False))
        self.assertTrue((reply.message.content or "").startswith("Plain "), reply)

    async def test_logprobs(self) -> None:
        """
        C{logprobs} and C{top_logprobs} come back from TabbyAPI on chat and generate, streamed
        or not, raw or templated: one entry per token of the answer with its alternatives;
        C{top_logprobs} outside 0-20 is Ollama's 400 (issue 11, item 8).
        """
        proxy = RunningProxy(self, PROFILES)
        client = ollamaClient(self, proxy)
        messages = [{"role": "user", "content": "Hello"}]
        reply = await inThread(lambda: client.chat(model="alpha", messages=messages, logprobs=True, top_logprobs=2,
                                                   options={"num_predict": 3}))
        entries = reply.logprobs or []
        self.assertEqual("".join(entry.token for entry in entries), reply.message.content)
        self.assertEqual(len(entries), 3)
        for entry in entries:
            self.assertLessEqual(entry.logprob, 0)
            top = entry.top_logprobs or []
            self.assertEqual(len(top), 2)
            self.assertEqual((top[0].token, top[0].logprob), (entry.token, entry.logprob))

        def streamed() -> list[Any]:
            return list(client.chat(model="alpha", messages=messages, stream=True, logprobs=True,
                                    options={"num_predict": 3}))

        chunks = await inThread(streamed)
        streamedEntries = [entry for chunk in chunks for entry in chunk.logprobs or []]
        self.assertEqual([entry.token for entry in streamedEntries], [entry.token for entry in entries])
        # Without top_logprobs there are no alternatives, and Ollama leaves the key out.
        self.assertEqual([entry.top_logprobs for entry in streamedEntries], [None] * 3)

        for raw in (False, True):
            generated = await inThread(lambda: client.generate(model="alpha", prompt="Once", raw=raw, logprobs=True,
                                                               top_logprobs=3, options={"num_predict": 2}))
            pieces = generated.logprobs or []
            self.assertEqual("".join(entry.token for entry in pieces), generated.response)
            self.assertEqual([len(entry.top_logprobs or []) for entry in pieces], [3, 3])
        plain = await inThread(lambda: client.chat(model="alpha", messages=messages))
        self.assertIsNone(plain.logprobs)
        error = await responseError(lambda: client.chat(model="alpha", messages=messages, logprobs=True,
                                                        top_logprobs=21))
        self.assertEqual((error.status_code, error.error), (400, "top_logprobs must be between 0 and 20"))

    async def test_disconnectMidStreamStopsGeneration(self) -> None:
        """
        A client that leaves an /api/chat stream makes the proxy close its request to TabbyAPI
        (the simulator reports the cancel), and the in-flight count returns to zero.
        """
        events = CapturedEvents(self)
        proxy = RunningProxy(self, PROFILES)
        response = await proxy.http.post(
            proxy.url + "/api/chat", unbuffered=True,
            json={"model": "slow", "options": {"num_predict": 1000}, "messages": [{"role": "user", "content": "x"}]},
        )
        self.assertEqual(response.code, 200)
        body = StreamedBody.of(response)
        await waitUntil(lambda: body.data.count(b"\n") >= 3)
        self.assertEqual(proxy.scheduler.status()["in_flight"], 1)
        body.hangUp()
        await self.assertFailure(body.ended, ResponseFailed)
        await waitUntil(lambda: events.childSaid("cancelled by user"))
        await waitUntil(lambda: proxy.scheduler.status()["in_flight"] == 0)


class OpenWebUIReplayTests(TestCase):
    """
    The calls Open WebUI makes when it connects to an Ollama server and chats, and the fields it
    reads from each answer (its backend's routers/ollama.py).
    """

    timeout = 60

    async def test_connectChatUnload(self) -> None:
        """
        version parses as Open WebUI parses it; tags entries are keyed by tagged C{model}
        names; ps's expires_at parses with fromisoformat; a C{:latest} chat streams NDJSON
        with a final done line and metrics; generate with keep_alive 0 and an empty prompt
        unloads.
        """
        proxy = RunningProxy(self, PROFILES)
        headers: dict[bytes | str, bytes | str] = {"Connection": "close"}

        async def get(path: str) -> Any:
            response = await proxy.http.get(proxy.url + path, headers=headers)
            self.assertEqual(response.code, 200)
            return json.loads(await response.content())

        version = (await get("/api/version"))["version"]
        self.assertEqual(len(tuple(map(int, re.sub(r"^v|-.*", "", version).split(".")))), 3)

        tags = await get("/api/tags")
        byModel = {entry["model"]: entry for entry in tags["models"]}
        model = "alpha"
        if ":" not in model:
            model += ":latest"
        self.assertIn(model, byModel)
        self.assertEqual(byModel[model]["name"], model)

        self.assertEqual(await get("/api/ps"), {"models": []})

        response = await proxy.http.post(proxy.url + "/api/chat", headers=headers, json={
            "model": model, "stream": True, "options": {},
            "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}],
        })
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/x-ndjson"])
        body = await response.content()
        self.assertTrue(body.endswith(b"\n"))
        lines = [json.loads(line) for line in body[:-1].split(b"\n")]
        for line in lines:
            self.assertEqual(line["model"], model)
            self.assertEqual(line["message"]["role"], "assistant")
            self.assertIsInstance(line["message"]["content"], str)
            datetime.fromisoformat(line["created_at"])
        self.assertTrue("".join(line["message"]["content"] for line in lines).startswith("Alpha-exl3 "))
        final = lines[-1]
        self.assertEqual((final["done"], final["done_reason"]), (True, "stop"))
        for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                    "eval_count", "eval_duration"):
            self.assertIsInstance(final[key], int)

        [running] = (await get("/api/ps"))["models"]
        self.assertEqual(running["model"], model)
        expiresAt = datetime.fromisoformat(running["expires_at"])
        self.assertGreater(expiresAt, datetime.now(timezone.utc))

        response = await proxy.http.post(proxy.url + "/api/generate", headers=headers,
                                         json={"model": model, "keep_alive": 0, "prompt": ""})
        self.assertEqual(response.code, 200)
        unloaded = json.loads(await response.content())
        self.assertEqual((unloaded["model"], unloaded["done"], unloaded["done_reason"]), (model, True, "unload"))
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertEqual(await get("/api/ps"), {"models": []})


class CopilotReplayTests(TestCase):
    """
    What VS Code Copilot's Ollama provider sends before it shows models: /api/version,
    /api/tags and /api/show, without a key (issue 11, item 11).
    """

    timeout = 60

    async def test_discoveryWithoutKey(self) -> None:
        """
        With auth on, /api/version answers without a key; with C{--open-model-list} so do the
        lists, and /api/show has the C{model_info} and C{capabilities} the picker reads; a chat
        without a key is still a 401.
        """
        proxy = RunningProxy(self, PROFILES, "--simulate-auth", "--open-model-list")
        headers: dict[bytes | str, bytes | str] = {"Connection": "close"}
        response = await proxy.http.get(proxy.url + "/api/version", headers=headers)
        self.assertEqual(response.code, 200)
        major, minor, patch = (int(part) for part in json.loads(await response.content())["version"].split("."))
        self.assertGreaterEqual((major, minor, patch), (0, 6, 4))
        response = await proxy.http.get(proxy.url + "/api/tags", headers=headers)
        self.assertEqual(response.code, 200)
        names = [entry["name"] for entry in json.loads(await response.content())["models"]]
        self.assertIn("alpha:latest", names)
        response = await proxy.http.post(proxy.url + "/api/show", headers=headers, json={"model": "alpha:latest"})
        shown = json.loads(await response.content())
        architecture = shown["model_info"]["general.architecture"]
        self.assertEqual(shown["model_info"][f"{architecture}.context_length"], 4096)
        self.assertIn("completion", shown["capabilities"])
        response = await proxy.http.get(proxy.url + "/v1/models", headers=headers)
        self.assertEqual(response.code, 200)
        await response.content()
        response = await proxy.http.post(proxy.url + "/api/chat", headers=headers, json={
            "model": "alpha", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(response.code, 401)
        await response.content()
        self.assertEqual(proxy.scheduler.snapshot(), ())

