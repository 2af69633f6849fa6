"""
The proxy as users run it: the service built from command-line options, the simulator as a real
child process, real loopback TCP, and the C{openai} package as the client.
"""

from __future__ import annotations

import json
import os
from typing import Any

import openai
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed

from tests.support.processes import waitUntil
from tests.support.proxy import RunningProxy, inThread
from tests.support.logs import CapturedEvents
from tests.support.wire import StreamedBody, ssePayloads

PROFILES: dict[str, dict[str, Any]] = {
    "alpha": {"model": {"model_name": "Alpha-exl3"}, "template": {"system": "Be brief."}},
    "beta": {"model": {"model_name": "Beta-exl3"}},
}


def openaiClient(proxy: RunningProxy) -> openai.OpenAI:
    # Connection: close, so no idle keep-alive socket outlives the test.
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30,
                         default_headers={"Connection": "close"})


class OpenAIClientTests(TestCase):
    timeout = 60

    async def test_chatStartsModelAndAnswers(self) -> None:
        """
        The openai client's first chat request starts the model and gets that model's answer;
        the second is served by the same child.
        """
        proxy = RunningProxy(self, PROFILES)
        client = openaiClient(proxy)
        for _ in range(2):
            reply = await inThread(lambda: client.chat.completions.create(
                model="alpha", messages=[{"role": "user", "content": "Hello"}], max_tokens=5))
            self.assertTrue((reply.choices[0].message.content or "").startswith("Alpha-exl3 "))
            self.assertEqual(reply.choices[0].finish_reason, "length")
        status = proxy.scheduler.status()
        self.assertEqual((status["model"], status["state"], status["starts"]), ("alpha", "ready", 1))

    async def test_streamingChatAndSwap(self) -> None:
        """
        Streaming works through the proxy, and naming another model swaps the child.
        """
        proxy = RunningProxy(self, PROFILES)
        client = openaiClient(proxy)

        def stream(model: str) -> str:
            chunks = client.chat.completions.create(
                model=model, stream=True, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

        self.assertTrue((await inThread(lambda: stream("alpha"))).startswith("Alpha-exl3 "))
        firstPid = proxy.scheduler.status()["pid"]
        self.assertTrue((await inThread(lambda: stream("beta"))).startswith("Beta-exl3 "))
        status = proxy.scheduler.status()
        self.assertEqual((status["model"], status["starts"]), ("beta", 2))
        self.assertFalse(_alive(firstPid))

    async def test_completionsAndErrors(self) -> None:
        """
        /v1/completions works with the openai client; an unknown model is an OpenAI NotFoundError.
        """
        proxy = RunningProxy(self, PROFILES)
        client = openaiClient(proxy)
        reply = await inThread(lambda: client.completions.create(model="beta", prompt="Once", max_tokens=3))
        self.assertTrue(reply.choices[0].text.startswith("Beta-exl3 "))
        error = await self.assertFailure(
            inThread(lambda: client.completions.create(model="gamma", prompt="x")), openai.NotFoundError)
        self.assertIn("model 'gamma' not found", str(error))

    async def test_keepAliveZeroUnloads(self) -> None:
        """
        keep_alive 0 on an OpenAI request unloads the model when the request ends.
        """
        proxy = RunningProxy(self, PROFILES)
        client = openaiClient(proxy)
        await inThread(lambda: client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            extra_body={"keep_alive": 0}))
        pid = proxy.scheduler.status()["pid"] or proxy.scheduler.starts
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertEqual(proxy.scheduler.status()["state"], "stopped")
        self.assertFalse(_alive(pid))

    async def test_disconnectMidStreamClosesUpstream(self) -> None:
        """
        A client that leaves mid-stream makes the proxy close its request to TabbyAPI (the
        simulator reports the cancel), and the in-flight count returns to zero.
        """
        events = CapturedEvents(self)
        proxy = RunningProxy(self, {"slow": {"model": {"model_name": "Slow"}, "simulator": {"token_delay": 0.05}}})
        response = await proxy.http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "slow", "stream": True, "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}]},
            unbuffered=True,
        )
        self.assertEqual(response.code, 200)
        body = StreamedBody.of(response)
        await waitUntil(lambda: len(body.data) > 200)
        self.assertEqual(proxy.scheduler.status()["in_flight"], 1)
        body.hangUp()
        await self.assertFailure(body.ended, ResponseFailed)
        await waitUntil(lambda: events.childSaid("cancelled by user"))
        await waitUntil(lambda: proxy.scheduler.status()["in_flight"] == 0)

    async def test_crashMidStreamIsReportedInStream(self) -> None:
        """
        When TabbyAPI dies mid-stream the client gets an SSE error event, /status says what
        happened, and the next request starts a fresh child.
        """
        proxy = RunningProxy(self, {"fragile": {"model": {"model_name": "Fragile"},
                                                "simulator": {"crash_after_tokens": 3}}})
        response = await proxy.http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "fragile", "stream": True, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
        )
        events = ssePayloads(await response.content())
        error = json.loads(events[-1])["error"]
        self.assertIn("connection to TabbyAPI broke", error["message"])
        self.assertNotIn("[DONE]", events)
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertIn("unexpectedly", proxy.scheduler.status()["last_error"])

        response = await proxy.http.post(
            proxy.url + "/v1/completions", json={"model": "fragile", "prompt": "x", "max_tokens": 2})
        self.assertEqual(response.code, 200)
        self.assertTrue(json.loads(await response.content())["choices"][0]["text"].startswith("Fragile "))
        self.assertEqual(proxy.scheduler.starts, 2)

    async def test_crashMidBodyIs502(self) -> None:
        """
        When TabbyAPI dies half-way through a non-streamed answer the client gets a 502 in
        OpenAI's shape, not a 200 with half a JSON document, and /status says what happened.
        """
        proxy = RunningProxy(self, {"fragile": {"model": {"model_name": "Fragile"},
                                                "simulator": {"crash_mid_body": True}}})
        response = await proxy.http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "fragile", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
        )
        self.assertEqual(response.code, 502)
        error = (await response.json())["error"]
        self.assertIn("connection to TabbyAPI broke", error["message"])
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertIn("unexpectedly", proxy.scheduler.status()["last_error"])

    async def test_failedLoadAnswersWithChildOutput(self) -> None:
        """
        A model whose load fails answers 503 with TabbyAPI's exit status and the cause from its
        last lines, and the next request tries again.
        """
        proxy = RunningProxy(self, {"broken": {"model": {"model_name": "Broken"}, "simulator": {"fail_load": True}}})
        for attempt in (1, 2):
            response = await proxy.http.post(
                proxy.url + "/v1/completions", json={"model": "broken", "prompt": "x"})
            self.assertEqual(response.code, 503)
            message = (await response.json())["error"]["message"]
            self.assertIn("exited with status 1", message)
            self.assertIn("Failed to load config.json", message)
            self.assertEqual(proxy.scheduler.starts, attempt)

    async def test_stopServiceLeavesNoChild(self) -> None:
        """
        Stopping the proxy stops the child and waits for it: its pid is gone afterwards.
        """
        proxy = RunningProxy(self, PROFILES)
        response = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "alpha", "prompt": "x"})
        await response.content()
        pid = proxy.scheduler.status()["pid"]
        self.assertTrue(_alive(pid))
        await proxy.service.stopService()
        self.assertFalse(_alive(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
