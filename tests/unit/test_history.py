"""
The request history behind the dashboard: what one record holds, that the list is bounded, and
that prompts are kept only when asked for, and then only for the last few requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq import content
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.history import PROMPT_CHARS, RequestHistory, RequestRecord, promptOf
from tests.support.fakes import InMemoryProxy

PROFILES: dict[str, dict[str, Any]] = {"alpha": {"model": {"model_name": "Alpha"}}}


def record(requestId: str, prompt: str | None = None) -> RequestRecord:
    return RequestRecord(
        id=requestId, time="2026-01-01T00:00:00.000+00:00", method="POST", route="/v1/chat/completions",
        model="alpha", status=200, seconds=1.0, firstToken=0.1, streamed=True, tokensIn=None, tokensOut=9,
        tokensExact=False, tokensPerSecond=10.0, prompt=prompt,
    )


class HistoryTests(SynchronousTestCase):
    def test_boundedToItsSize(self) -> None:
        """
        The history keeps the last C{size} records, oldest first, and drops the rest.
        """
        history = RequestHistory(size=3)
        for number in range(10):
            history.add(record(str(number)))
        self.assertEqual([r.id for r in history], ["7", "8", "9"])

    def test_listenersHearEachNewRecord(self) -> None:
        """
        A subscriber gets every record added while subscribed, and none after unsubscribing.
        """
        history = RequestHistory()
        heard: list[str] = []
        unsubscribe = history.subscribe(lambda r: heard.append(r.id))
        history.add(record("a"))
        unsubscribe()
        history.add(record("b"))
        self.assertEqual(heard, ["a"])

    def test_promptsKeptOnlyForTheLastN(self) -> None:
        """
        With C{keepBodies=2}, only the two latest records still hold their prompt; older ones
        keep everything else.
        """
        history = RequestHistory(keepBodies=2)
        for number in range(4):
            history.add(record(str(number), prompt=f"prompt {number}"))
        self.assertEqual([r.prompt for r in history], [None, None, "prompt 2", "prompt 3"])
        self.assertEqual([r.tokensOut for r in history], [9, 9, 9, 9])

    def test_promptOfChatAndCompletions(self) -> None:
        """
        The prompt text of a chat body is its messages with their roles (text parts of a list
        content too); of a completion, its prompt; long text is cut; non-JSON gives nothing.
        """
        chat = {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]}]}
        self.assertEqual(promptOf(json.dumps(chat).encode()), "system: Be brief.\nuser: hi")
        self.assertEqual(promptOf(b'{"prompt": "Once"}'), "Once")
        long = promptOf(json.dumps({"prompt": "x" * (PROMPT_CHARS + 10)}).encode())
        assert long is not None
        self.assertEqual(len(long), PROMPT_CHARS + 1)
        self.assertIsNone(promptOf(b"not json"))
        self.assertIsNone(promptOf(b"[1]"))

    def test_toJSONLeavesOutAMissingPrompt(self) -> None:
        """
        A record without a prompt has no C{prompt} key at all in its JSON form.
        """
        self.assertNotIn("prompt", record("a").toJSON())
        self.assertEqual(record("a", "p").toJSON()["prompt"], "p")


class HistoryFromTheSiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)

    def chat(self, stream: bool, text: str = "hello") -> bytes:
        response = self.successResultOf(self.proxy.client.post(
            "http://localhost/v1/chat/completions",
            data=json.dumps({"model": "alpha", "stream": stream,
                             "messages": [{"role": "user", "content": text}]}).encode(),
            headers={"Content-Type": "application/json"},
        ))
        body: bytes = self.successResultOf(content(response))
        return body

    def test_streamedRequestIsRecorded(self) -> None:
        """
        A streamed chat request ends up in the history with its route, model, status, time to
        first token, the streamed events as approximate tokens out, and no prompt text.
        """
        self.chat(stream=True)
        [entry] = list(self.proxy.state.history)
        self.assertEqual((entry.method, entry.route, entry.model, entry.status), ("POST", "/v1/chat/completions",
                                                                                  "alpha", 200))
        self.assertTrue(entry.streamed)
        # FakeTabby streams one content event and [DONE].
        self.assertEqual((entry.tokensOut, entry.tokensExact, entry.tokensIn), (1, False, None))
        self.assertIsNotNone(entry.firstToken)
        self.assertGreaterEqual(entry.seconds, 0)
        self.assertIsNone(entry.prompt)

    def test_plainAnswerIsRecordedWithoutTokens(self) -> None:
        """
        A non-streamed answer is recorded with no token estimate (nothing was counted).
        """
        self.chat(stream=False)
        [entry] = list(self.proxy.state.history)
        self.assertEqual((entry.streamed, entry.tokensOut, entry.tokensPerSecond), (False, None, None))

    def test_promptKeptWhenAsked(self) -> None:
        """
        With C{keepBodies} on, the request's text is kept with its record.
        """
        self.proxy.state.history.keepBodies = 1
        self.chat(stream=True, text="a private question")
        [entry] = list(self.proxy.state.history)
        self.assertEqual(entry.prompt, "user: a private question")

    def test_ownPagesAreNotRecorded(self) -> None:
        """
        The proxy's own routes (status, health, metrics, the dashboard) are not in the history;
        an unknown model's 404 is.
        """
        for path in ("/status", "/health", "/metrics", "/ui/"):
            self.successResultOf(self.proxy.client.get("http://localhost" + path))
        self.assertEqual(list(self.proxy.state.history), [])
        response = self.successResultOf(self.proxy.client.post(
            "http://localhost/v1/chat/completions", data=b'{"model": "nope", "messages": []}',
            headers={"Content-Type": "application/json"},
        ))
        self.successResultOf(content(response))
        [entry] = list(self.proxy.state.history)
        self.assertEqual((entry.status, entry.model, entry.route), (404, None, "/v1/chat/completions"))
