"""
The OpenAI routes through the SDKs' own helpers (issue 11): openai-python over TCP, and
openai-node through C{node} where it is installed, against the simulator speaking TabbyAPI's
HEAD wire (no usage unless asked, no role in deltas, its folder as C{model}, C{model_name} in
completions chunks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import openai
from openai.types import Completion, CreateEmbeddingResponse, ErrorObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.test_integration import openaiClient
from tests.support.proxy import RunningProxy, inThread

PROFILES: dict[str, dict[str, Any]] = {"alpha": {"model": {"model_name": "Alpha-exl3"}}}
MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]

_TESTS = Path(__file__).resolve().parent.parent
OPENAI_NODE = _TESTS / "tools" / "node_modules" / "openai" / "index.mjs"
NODE_SCRIPT = _TESTS / "support" / "openai_node.mjs"


async def _refused(call: Callable[[], object]) -> openai.APIStatusError:
    """
    The error the SDK raised for C{call}'s answer.
    """
    try:
        await inThread(call)
    except openai.APIStatusError as e:
        return e
    raise AssertionError("the call succeeded")


class OpenAIPythonTests(TestCase):
    timeout = 60

    async def test_repliesCountTokens(self) -> None:
        """
        Non-streamed chat and completions replies carry usage, although TabbyAPI counts only
        when asked (item 1).
        """
        client = openaiClient(RunningProxy(self, PROFILES))
        reply = await inThread(lambda: client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=5))
        assert reply.usage is not None
        self.assertEqual(reply.usage.completion_tokens, 5)
        self.assertGreater(reply.usage.prompt_tokens, 0)
        completion = await inThread(lambda: client.completions.create(model="alpha", prompt="Once", max_tokens=3))
        assert completion.usage is not None
        self.assertEqual(completion.usage.completion_tokens, 3)

    async def test_streamHelperAndRoles(self) -> None:
        """
        The stream helper's final completion has the assistant role; only the first chunk's delta
        carries it (item 2).
        """
        client = openaiClient(RunningProxy(self, PROFILES))

        def final() -> Any:
            with client.chat.completions.stream(model="alpha", messages=MESSAGES) as stream:
                return stream.get_final_completion()

        completion = await inThread(final)
        self.assertEqual(completion.choices[0].message.role, "assistant")
        self.assertTrue((completion.choices[0].message.content or "").startswith("Alpha-exl3 "))
        chunks = await inThread(lambda: list(client.chat.completions.create(
            model="alpha", messages=MESSAGES, max_tokens=5, stream=True)))
        self.assertEqual([chunk.choices[0].delta.role for chunk in chunks],
                         ["assistant"] + [None] * (len(chunks) - 1))

    async def test_everyAnswerNamesTheAskedModel(self) -> None:
        """
        Replies and every stream chunk, chat and completions, name the model as the client asked
        for it, never TabbyAPI's folder (items 3 and 4).
        """
        client = openaiClient(RunningProxy(self, PROFILES))
        reply = await inThread(lambda: client.chat.completions.create(model="alpha:latest", messages=MESSAGES, max_tokens=2))
        self.assertEqual(reply.model, "alpha:latest")
        completion = await inThread(lambda: client.completions.create(model="alpha", prompt="x", max_tokens=2))
        self.assertEqual(completion.model, "alpha")
        chats = await inThread(lambda: list(client.chat.completions.create(
            model="alpha", messages=MESSAGES, max_tokens=3, stream=True, stream_options={"include_usage": True})))
        self.assertEqual({chunk.model for chunk in chats}, {"alpha"})
        assert chats[-1].usage is not None
        completions = await inThread(lambda: list(client.completions.create(
            model="alpha", prompt="x", max_tokens=3, stream=True)))
        self.assertEqual([chunk.model for chunk in completions], ["alpha"] * len(completions))

    async def test_errorsAsOpenAI(self) -> None:
        """
        Errors carry C{param}; an unknown route is C{Invalid URL (METHOD PATH)} with a null code;
        a 422 status line has its reason phrase (item 5).
        """
        proxy = RunningProxy(self, PROFILES)
        client = openaiClient(proxy)
        error = await _refused(lambda: client.chat.completions.create(model="nope", messages=MESSAGES))
        self.assertEqual((error.status_code, error.code, error.param), (404, "model_not_found", None))
        self.assertIsInstance(error.body, dict)
        assert isinstance(error.body, dict)
        self.assertIn("param", error.body)
        missing = await _refused(lambda: client.post("/nope", cast_to=object, body={}))
        self.assertEqual(missing.status_code, 404)
        self.assertEqual(missing.body, {"message": "Invalid URL (POST /v1/nope)", "type": "invalid_request_error",
                                        "code": None, "param": None})
        response = await proxy.http.post(proxy.url + "/v1/chat/completions", json={
            "model": "alpha", "messages": MESSAGES, "presence_penalty": -1})
        await response.content()
        self.assertEqual((response.code, response.phrase), (422, b"Unprocessable Entity"))


class OpenAINodeTests(TestCase):
    timeout = 90

    async def test_helpersAcceptTheAnswers(self) -> None:
        """
        openai-node's C{.stream().finalChatCompletion()} gets its role (it throws "missing role
        for choice 0" without one), replies have usage and the asked model, completions chunks
        have C{model}, and an unknown model is a 404 with C{param} null.
        """
        node = shutil.which("node")
        if node is None:
            raise SkipTest("node is not installed (tests/tools/install installs it with openai-node)")
        if not OPENAI_NODE.exists():
            raise SkipTest("openai-node is not installed: run tests/tools/install")
        proxy = RunningProxy(self, PROFILES)
        out, err, code = await getProcessOutputAndValue(
            node, [str(NODE_SCRIPT), str(OPENAI_NODE), proxy.url + "/v1", "alpha"], reactor=reactor)
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        result = json.loads(out)
        self.assertEqual(result["final"]["role"], "assistant")
        self.assertEqual(result["final"]["model"], "alpha")
        self.assertTrue(result["final"]["content"].startswith("Alpha-exl3 "))
        self.assertEqual(result["reply"]["model"], "alpha")
        self.assertEqual(result["reply"]["usage"]["completion_tokens"], 5)
        self.assertEqual(set(result["completionModels"]), {"alpha"})
        self.assertEqual(result["error"], {"status": 404, "type": "invalid_request_error",
                                           "code": "model_not_found", "param": None})


class SDKTypesTests(TestCase):
    """
    Every reply and stream chunk of the C{/v1} surface validates against the C{openai} SDK's own
    pydantic types, strictly for the fields they declare (item 6).
    """

    timeout = 60

    async def test_everyAnswerValidates(self) -> None:
        """
        Chat and completions, streamed or not, with a tool call and with usage; the model list
        and one model; embeddings; and errors (C{ErrorObject}).
        """
        profiles = {**PROFILES, "beta": {"model": {"model_name": "Beta-exl3"},
                                         "embeddings": {"embedding_model_name": "bge-small"}}}
        proxy = RunningProxy(self, profiles)
        headers: dict[bytes | str, bytes | str] = {"Connection": "close"}

        async def answer(method: str, path: str, body: object = None) -> tuple[int, bytes]:
            response = await proxy.http.request(method, proxy.url + path, headers=headers,
                                                json=body if body is not None else None)
            return response.code, await response.content()

        def validate(model: type[BaseModel], document: object) -> None:
            model.model_validate(document, strict=True)

        def events(raw: bytes) -> list[Any]:
            data = [line[len(b"data: "):] for line in raw.splitlines() if line.startswith(b"data: ")]
            self.assertEqual(data[-1], b"[DONE]")
            return [json.loads(item) for item in data[:-1]]

        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}]
        chats: list[dict[str, Any]] = [
            {"messages": MESSAGES, "max_tokens": 4},
            {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": tools},
        ]
        for chat in chats:
            code, raw = await answer("POST", "/v1/chat/completions", {"model": "alpha", **chat})
            self.assertEqual(code, 200, raw)
            validate(ChatCompletion, json.loads(raw))
            code, raw = await answer("POST", "/v1/chat/completions", {
                "model": "alpha", "stream": True, "stream_options": {"include_usage": True}, **chat})
            for chunk in events(raw):
                validate(ChatCompletionChunk, chunk)
        self.assertIn(b'"tool_calls"', raw)
        code, raw = await answer("POST", "/v1/completions", {"model": "alpha", "prompt": "Once", "max_tokens": 3})
        validate(Completion, json.loads(raw))
        code, raw = await answer("POST", "/v1/completions", {"model": "alpha", "prompt": "Once", "max_tokens": 3,
                                                              "stream": True, "stream_options": {"include_usage": True}})
        for chunk in events(raw):
            # OpenAI's own completions stream has a null finish_reason until the end, which the
            # SDK's Completion (used for chunks too) does not declare: only that one is let pass.
            for choice in chunk["choices"]:
                if choice["finish_reason"] is None:
                    choice["finish_reason"] = "stop"
            validate(Completion, chunk)
        code, raw = await answer("GET", "/v1/models")
        listed = json.loads(raw)
        self.assertEqual(listed["object"], "list")
        for card in listed["data"]:
            validate(Model, card)
        validate(Model, json.loads((await answer("GET", "/v1/models/alpha"))[1]))
        code, raw = await answer("POST", "/v1/embeddings", {"model": "beta", "input": ["a", "b"]})
        self.assertEqual(code, 200, raw)
        validate(CreateEmbeddingResponse, json.loads(raw))
        for method, path, body in (("POST", "/v1/chat/completions", {"model": "nope", "messages": MESSAGES}),
                                   ("POST", "/v1/nope", {}),
                                   ("POST", "/v1/chat/completions", {"model": "alpha", "messages": 1})):
            code, raw = await answer(method, path, body)
            self.assertGreaterEqual(code, 400)
            validate(ErrorObject, json.loads(raw)["error"])
