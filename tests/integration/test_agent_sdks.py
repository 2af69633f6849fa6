"""
The agents' APIs as their own SDKs speak them: the C{anthropic} SDK on C{/v1/messages} and the
C{openai} SDK on C{/v1/responses}, over loopback TCP to the proxy service with the simulator as
its real child.  Every reply and event is parsed by the SDK's own types (they raise on what
they cannot read); the simulator's directive drives the tool loops.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
from twisted.trial.unittest import TestCase

from tests.support.processes import waitUntil
from tests.support.proxy import RunningProxy, inThread

PROFILES: dict[str, dict[str, Any]] = {
    "alpha": {"model": {"model_name": "Alpha-exl3"}, "aliases": ["claude-haiku-4-5", "gpt-5-codex"]},
    "slow": {"model": {"model_name": "Slow"}, "simulator": {"token_delay": 0.05}},
}
NOT_INPUT: Any = 5
ROBOT: Any = [{"role": "robot", "content": "x"}]
DIRECTIVE = 'Please run it. [[call Bash {"command": "echo MARK-42"}]]'
BASH_ANTHROPIC: Any = {"name": "Bash", "description": "Run a shell command.",
                  "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}
BASH_OPENAI: Any = {"type": "function", "name": "Bash", "description": "Run a shell command.",
                    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}


def anthropicClient(proxy: RunningProxy, key: str = "unused") -> anthropic.Anthropic:
    # Connection: close, so no idle keep-alive socket outlives the test.
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, timeout=30,
                               default_headers={"Connection": "close"})


def openaiClient(proxy: RunningProxy, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=30,
                         default_headers={"Connection": "close"})


def user(text: str) -> Any:
    return [{"role": "user", "content": text}]


class MessagesSDKTests(TestCase):
    timeout = 90

    async def test_createAndStream(self) -> None:
        """
        create and stream give the same text for the same request; the model's alias works; the
        stream's final Message has usage and the stop reason; structured output is JSON;
        count_tokens counts and models.list lists.
        """
        proxy = RunningProxy(self, PROFILES)
        client = anthropicClient(proxy)
        whole = await inThread(lambda: client.messages.create(model="claude-haiku-4-5", max_tokens=6,
                                                               messages=user("Hello there")))
        self.assertEqual((whole.model, whole.stop_reason, whole.usage.output_tokens),
                         ("claude-haiku-4-5", "max_tokens", 6))

        def streamed() -> tuple[str, anthropic.types.Message]:
            with client.messages.stream(model="alpha", max_tokens=6, messages=user("Hello there")) as stream:
                text = "".join(stream.text_stream)
                return text, stream.get_final_message()

        text, final = await inThread(streamed)
        [block] = whole.content
        assert isinstance(block, anthropic.types.TextBlock)
        self.assertEqual(text, block.text)
        self.assertTrue(text.startswith("Alpha-exl3 "))
        self.assertEqual((final.stop_reason, final.usage.output_tokens), ("max_tokens", 6))
        counted = await inThread(lambda: client.messages.count_tokens(model="alpha", messages=user("one two three")))
        self.assertGreater(counted.input_tokens, 0)
        structured = await inThread(lambda: client.messages.create(
            model="alpha", max_tokens=100, messages=user("Answer in JSON"),
            output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}}))
        [jsonBlock] = structured.content
        assert isinstance(jsonBlock, anthropic.types.TextBlock)
        self.assertIn("answer", json.loads(jsonBlock.text))
        models = await inThread(lambda: client.models.list())
        self.assertEqual({model.id for model in models.data}, {"alpha", "slow"})

    async def test_toolLoopAndThinking(self) -> None:
        """
        With thinking on, the answer starts with a thinking block; the directive gets a
        tool_use block for Bash; the tool_result sent back is quoted in the final text, streamed
        and not.
        """
        proxy = RunningProxy(self, PROFILES)
        client = anthropicClient(proxy)
        first = await inThread(lambda: client.messages.create(
            model="alpha", max_tokens=100, tools=[BASH_ANTHROPIC], messages=user(DIRECTIVE),
            thinking={"type": "enabled", "budget_tokens": 1024}))
        self.assertEqual([block.type for block in first.content], ["thinking", "tool_use"])
        call = first.content[1]
        assert isinstance(call, anthropic.types.ToolUseBlock)
        self.assertEqual((first.stop_reason, call.name, call.input), ("tool_use", "Bash", {"command": "echo MARK-42"}))
        history: Any = [*user(DIRECTIVE), {"role": "assistant", "content": first.content},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                      "content": "MARK-42"}]}]
        answer = await inThread(lambda: client.messages.create(model="alpha", max_tokens=100,
                                                                tools=[BASH_ANTHROPIC], messages=history))

        def streamed() -> str:
            with client.messages.stream(model="alpha", max_tokens=100, tools=[BASH_ANTHROPIC],
                                        messages=history) as stream:
                return "".join(stream.text_stream)

        [text] = answer.content
        assert isinstance(text, anthropic.types.TextBlock)
        self.assertIn("MARK-42", text.text)
        self.assertEqual(await inThread(streamed), text.text)

    async def test_errors(self) -> None:
        """
        An unknown model is NotFoundError, a bad body BadRequestError, a body over the limit
        Anthropic's 413, a missing key AuthenticationError: each in Anthropic's shape.
        """
        proxy = RunningProxy(self, PROFILES, "--simulate-auth", "--max-body-size", "4000")
        key = proxy.scheduler.install.keys.apiKeys[0]
        client = anthropicClient(proxy, key)
        for call, kind in (
            (lambda: client.messages.create(model="claude-opus-9", max_tokens=5, messages=user("x")),
             anthropic.NotFoundError),
            (lambda: client.messages.create(model="alpha", max_tokens=5, messages=ROBOT),
             anthropic.BadRequestError),
            (lambda: client.messages.create(model="alpha", max_tokens=5, messages=user("x" * 5000)),
             anthropic.APIStatusError),
            (lambda: anthropicClient(proxy, "wrong").messages.create(model="alpha", max_tokens=5, messages=user("x")),
             anthropic.AuthenticationError),
        ):
            error: Any = await self.assertFailure(inThread(call), kind)
            self.assertEqual(error.body["type"], "error")
        self.assertEqual(error.status_code, 401)
        tooLarge: Any = await self.assertFailure(inThread(lambda: client.messages.create(
            model="alpha", max_tokens=5, messages=user("x" * 5000))), anthropic.APIStatusError)
        self.assertEqual((tooLarge.status_code, tooLarge.body["error"]["type"]), (413, "request_too_large"))

    async def test_cancelMidStream(self) -> None:
        """
        A client that closes the stream mid-answer frees the model: the in-flight count returns
        to zero.
        """
        proxy = RunningProxy(self, PROFILES)
        client = anthropicClient(proxy)

        def partial() -> int:
            with client.messages.stream(model="slow", max_tokens=1000, messages=user("x")) as stream:
                for count, _ in enumerate(stream.text_stream):
                    if count == 3:
                        return count
            return -1

        self.assertEqual(await inThread(partial), 3)
        await waitUntil(lambda: proxy.scheduler.status()["in_flight"] == 0)


class ResponsesSDKTests(TestCase):
    timeout = 90

    async def test_createAndStream(self) -> None:
        """
        create and stream give the same text for the same request, through the alias; JSON
        output is JSON.
        """
        proxy = RunningProxy(self, PROFILES)
        client = openaiClient(proxy)
        whole = await inThread(lambda: client.responses.create(model="gpt-5-codex", input="Hello there"))
        self.assertEqual((whole.model, whole.status), ("gpt-5-codex", "completed"))
        short = await inThread(lambda: client.responses.create(model="alpha", input="Hello", max_output_tokens=3))
        self.assertEqual((short.status, short.incomplete_details and short.incomplete_details.reason),
                         ("incomplete", "max_output_tokens"))

        def streamed() -> tuple[str, openai.types.responses.Response]:
            with client.responses.stream(model="alpha", input="Hello there") as stream:
                text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
                return text, stream.get_final_response()

        text, final = await inThread(streamed)
        self.assertEqual(text, whole.output_text)
        self.assertEqual(final.output_text, text)
        structured = await inThread(lambda: client.responses.create(
            model="alpha", input="Answer in JSON", text={"format": {"type": "json_object"}}))
        self.assertIn("answer", json.loads(structured.output_text))

    async def test_toolLoopAndReasoning(self) -> None:
        """
        With reasoning on, a reasoning item comes first; the directive gets a function_call;
        its output sent back is quoted in the final text, streamed and not.
        """
        proxy = RunningProxy(self, PROFILES)
        client = openaiClient(proxy)
        first = await inThread(lambda: client.responses.create(model="alpha", input=DIRECTIVE, tools=[BASH_OPENAI],
                                                                reasoning={"effort": "low"}, store=False))
        self.assertEqual([item.type for item in first.output], ["reasoning", "function_call"])
        call = first.output[1]
        assert isinstance(call, openai.types.responses.ResponseFunctionToolCall)
        self.assertEqual((call.name, json.loads(call.arguments)), ("Bash", {"command": "echo MARK-42"}))
        history: Any = [{"role": "user", "content": DIRECTIVE},
                        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                        {"type": "function_call_output", "call_id": call.call_id, "output": "MARK-42"}]
        answer = await inThread(lambda: client.responses.create(model="alpha", input=history, tools=[BASH_OPENAI]))
        self.assertIn("MARK-42", answer.output_text)

        def streamed() -> str:
            with client.responses.stream(model="alpha", input=history, tools=[BASH_OPENAI]) as stream:
                return "".join(event.delta for event in stream if event.type == "response.output_text.delta")

        self.assertEqual(await inThread(streamed), answer.output_text)

    async def test_errors(self) -> None:
        """
        An unknown model is NotFoundError, a bad body BadRequestError, a body over the limit a
        413, a wrong key AuthenticationError.
        """
        proxy = RunningProxy(self, PROFILES, "--simulate-auth", "--max-body-size", "4000")
        client = openaiClient(proxy, proxy.scheduler.install.keys.apiKeys[0])
        for call, kind, status in (
            (lambda: client.responses.create(model="gpt-9", input="x"), openai.NotFoundError, 404),
            (lambda: client.responses.create(model="alpha", input=NOT_INPUT), openai.BadRequestError, 400),
            (lambda: client.responses.create(model="alpha", input="x" * 5000), openai.APIStatusError, 413),
            (lambda: openaiClient(proxy, "wrong").responses.create(model="alpha", input="x"),
             openai.AuthenticationError, 401),
        ):
            error: Any = await self.assertFailure(inThread(call), kind)
            self.assertEqual(error.status_code, status)

    async def test_cancelMidStream(self) -> None:
        """
        A client that closes the stream mid-answer frees the model.
        """
        proxy = RunningProxy(self, PROFILES)
        client = openaiClient(proxy)

        def partial() -> int:
            with client.responses.stream(model="slow", input="x", max_output_tokens=1000) as stream:
                deltas = 0
                for event in stream:
                    deltas += event.type == "response.output_text.delta"
                    if deltas == 3:
                        return deltas
            return -1

        self.assertEqual(await inThread(partial), 3)
        await waitUntil(lambda: proxy.scheduler.status()["in_flight"] == 0)
