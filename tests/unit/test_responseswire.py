"""
The Responses translation both ways: request bodies to TabbyAPI's chat completions, and
TabbyAPI's decoded stream to the Responses stream and Response object, every event and object
checked with the C{openai} SDK's own types.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.responseswire import (
    ResponseEncoder,
    ResponsesRequestError,
    previousResponseId,
    sseFrame,
    translateRequest,
)
from tabbyproxy.tabbywire import ChatStreamDecoder, Event, ReasoningDelta, TextDelta, ToolCallArguments, ToolCallStart
from tests.support.responsestypes import parseEvent, parseResponse
from tests.support.wire import namedEvents

# Codex CLI 0.171.0's first request, as captured (keys and ids replaced).
CODEX_CAPTURE = Path(__file__).parent.parent / "support" / "captures" / "codex-0.171.0-responses.json"


def counter() -> Callable[[str], str]:
    """
    Ids numbered in order (C{msg_1}, C{rs_2}), so two encoders of the same stream agree.
    """
    numbers = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(numbers)}"


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    document: dict[str, Any] = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "Qwen"}
    document["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage is not None:
        document["usage"] = usage
    return b"data: " + json.dumps(document).encode() + b"\r\n\r\n"


DONE = b"data: [DONE]\r\n\r\n"
USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}

TEXT_STREAM = b"".join([
    chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop"), chunk(usage=USAGE), DONE,
])
FULL_STREAM = b"".join([
    chunk({"reasoning_content": "Thinking "}), chunk({"reasoning_content": "hard."}),
    chunk({"content": "Let me look."}),
    chunk({"tool_calls": [
        {"index": 0, "id": "call_abc", "type": "function", "function": {"name": "exec_command", "arguments": '{"cmd":'}},
    ]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "ls"}'}}]}),
    chunk({"tool_calls": [
        {"index": 1, "id": "", "type": "function", "function": {"name": "agents__close", "arguments": '{"id": 1}'}},
    ]}, "tool_calls"),
    chunk(usage=USAGE), DONE,
])

TOOLS = [
    {"type": "function", "name": "exec_command", "description": "Run a command.", "strict": False,
     "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}},
    {"type": "namespace", "name": "agents", "description": "Sub-agents.",
     "tools": [{"type": "function", "name": "close", "description": "Close one.", "parameters": None}]},
    {"type": "web_search", "external_web_access": False},
]


def encode(body: dict[str, Any], stream: bytes, splits: list[int] | None = None) -> tuple[list[dict[str, Any]], ResponseEncoder]:
    """
    Every Responses event for TabbyAPI's C{stream} (cut at C{splits}), and the encoder.
    """
    encoder = ResponseEncoder(translateRequest(body), "qwen", 1_700_000_000, newId=counter())
    decoder = ChatStreamDecoder()
    events = encoder.start()
    cuts = [0, *sorted(splits or []), len(stream)]
    for start, end in zip(cuts, cuts[1:]):
        events += encoder.feed(decoder.feed(stream[start:end]))
    assert decoder.complete
    events += encoder.finish()
    return events, encoder


class RequestTranslationTests(SynchronousTestCase):
    def test_stringInput(self) -> None:
        """
        A string C{input} is one user message, C{instructions} the system message before it,
        and TabbyAPI is always asked for a stream with usage.
        """
        request = translateRequest({"input": "Hi", "instructions": "Be brief."})
        self.assertEqual(request.upstream, {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "stream": True, "stream_options": {"include_usage": True},
        })
        self.assertFalse(request.stream)
        self.assertTrue(request.store)
        self.assertEqual(request.items, [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])

    def test_messagesAndParts(self) -> None:
        """
        Leading system and developer messages join C{instructions} in one system message; a
        later developer message stays a system message; text parts join, images become
        C{image_url} parts; an easy message without C{type} is a message too.
        """
        request = translateRequest({"instructions": "Rules.", "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be exact."}]},
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": [
                {"type": "input_text", "text": "What is "}, {"type": "input_text", "text": "this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"},
            ]},
            {"type": "message", "role": "assistant", "id": "msg_1",
             "content": [{"type": "output_text", "text": "A square.", "annotations": []}]},
            {"role": "developer", "content": "Now be brief."},
            {"role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
        ]})
        self.assertEqual(request.upstream["messages"], [
            {"role": "system", "content": "Rules.\n\nBe exact.\n\nUse tools."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is "}, {"type": "text", "text": "this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]},
            {"role": "assistant", "content": "A square."},
            {"role": "system", "content": "Now be brief."},
            {"role": "user", "content": "Thanks"},
        ])

    def test_toolLoopHistory(self) -> None:
        """
        C{function_call} items become the C{tool_calls} of one assistant message (after the
        text the model said with them), C{function_call_output} items C{tool} messages with
        the call's id, and a reasoning item the C{reasoning_content} of what follows it;
        namespaced calls get the name the model was offered.
        """
        request = translateRequest({"input": [
            {"role": "user", "content": "List files"},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Use ls."}],
             "encrypted_content": None},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
            {"type": "function_call", "call_id": "call_1", "name": "exec_command", "arguments": '{"cmd": "ls"}'},
            {"type": "function_call", "call_id": "call_2", "name": "close", "namespace": "agents", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "closed"}]},
            {"type": "reasoning", "id": "rs_2", "summary": [],
             "content": [{"type": "reasoning_text", "text": "Done; "}, {"type": "reasoning_text", "text": "answer."}]},
            {"type": "function_call", "call_id": "call_3", "name": "exec_command", "arguments": '{"cmd": "pwd"}'},
        ]})
        self.assertEqual(request.upstream["messages"], [
            {"role": "user", "content": "List files"},
            {"role": "assistant", "content": "Looking.", "reasoning_content": "Use ls.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "exec_command", "arguments": '{"cmd": "ls"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "agents__close", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"},
            {"role": "tool", "tool_call_id": "call_2", "content": "closed"},
            {"role": "assistant", "content": None, "reasoning_content": "Done; answer.", "tool_calls": [
                {"id": "call_3", "type": "function", "function": {"name": "exec_command", "arguments": '{"cmd": "pwd"}'}},
            ]},
        ])

    def test_tools(self) -> None:
        """
        Function tools become TabbyAPI's function tools, a namespace's functions are offered as
        C{namespace__name}, and hosted tools are dropped and named as ignored; the Response
        object echoes only what the model was offered.
        """
        request = translateRequest({"input": "x", "tools": TOOLS, "parallel_tool_calls": False})
        self.assertEqual(request.upstream["tools"], [
            {"type": "function", "function": {
                "name": "exec_command", "description": "Run a command.",
                "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}},
            {"type": "function", "function": {
                "name": "agents__close", "description": "Sub-agents. Close one.",
                "parameters": {"type": "object", "properties": {}}}},
        ])
        self.assertIs(request.upstream["parallel_tool_calls"], False)
        self.assertEqual(request.namespaces, {"agents__close": ("agents", "close")})
        self.assertEqual(request.ignored, ("tool web_search",))
        self.assertEqual(request.settings["tools"], TOOLS[:2])

    def test_toolChoice(self) -> None:
        """
        C{tool_choice} strings pass as they are, a named function (namespaced too) becomes
        TabbyAPI's named choice, C{allowed_tools} its mode.
        """
        cases: list[tuple[object, object]] = [
            ("auto", "auto"), ("none", "none"), ("required", "required"),
            ({"type": "function", "name": "exec_command"}, {"type": "function", "function": {"name": "exec_command"}}),
            ({"type": "function", "name": "close", "namespace": "agents"},
             {"type": "function", "function": {"name": "agents__close"}}),
            ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "exec_command"}]},
             "required"),
        ]
        for choice, expected in cases:
            request = translateRequest({"input": "x", "tools": TOOLS, "tool_choice": choice})
            self.assertEqual(request.upstream["tool_choice"], expected)
            self.assertEqual(request.settings["tool_choice"], choice)

    def test_samplingAndFormats(self) -> None:
        """
        C{max_output_tokens} is TabbyAPI's C{max_tokens}; C{temperature} and C{top_p} pass;
        C{text.format} C{json_schema} is TabbyAPI's C{json_schema}, C{json_object} its JSON mode.
        """
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        request = translateRequest({
            "input": "x", "max_output_tokens": 64, "temperature": 0.2, "top_p": 0.9,
            "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
        })
        upstream = request.upstream
        self.assertEqual((upstream["max_tokens"], upstream["temperature"], upstream["top_p"]), (64, 0.2, 0.9))
        self.assertEqual(upstream["json_schema"], schema)
        self.assertEqual(translateRequest({"input": "x", "text": {"format": {"type": "json_object"}}}).upstream[
            "response_format"], {"type": "json"})
        self.assertNotIn("response_format", translateRequest({"input": "x", "text": {"format": {"type": "text"}}}).upstream)

    def test_reasoningEffort(self) -> None:
        """
        C{reasoning.effort} C{"none"} turns the template's thinking off, any other effort on;
        no effort (Codex sends only a summary setting) leaves the model's default.
        """
        def thinking(reasoning: dict[str, Any]) -> object:
            return translateRequest({"input": "x", "reasoning": reasoning}).upstream.get("template_vars")

        self.assertEqual(thinking({"effort": "none"}), {"enable_thinking": False})
        self.assertEqual(thinking({"effort": "high", "summary": "auto"}), {"enable_thinking": True})
        self.assertIsNone(thinking({"summary": "auto"}))

    def test_codexFirstRequest(self) -> None:
        """
        Codex CLI's first request is accepted whole: its developer messages become one system
        message, its function and namespace tools are offered, and only its hosted web search
        tool is left out.
        """
        body = json.loads(CODEX_CAPTURE.read_text())["body"]
        body.pop("model")
        request = translateRequest(body)
        self.assertTrue(request.stream)
        self.assertFalse(request.store)
        self.assertEqual(request.ignored, ("tool web_search",))
        self.assertEqual([m["role"] for m in request.upstream["messages"]], ["system", "user", "user"])
        names = [tool["function"]["name"] for tool in request.upstream["tools"]]
        self.assertIn("exec_command", names)
        self.assertIn("multi_agent_v1__spawn_agent", names)
        self.assertEqual(request.upstream["tool_choice"], "auto")
        self.assertNotIn("template_vars", request.upstream)

    def test_unknownFieldsIgnored(self) -> None:
        """
        Fields with no meaning here are accepted and named as ignored, and never reach TabbyAPI.
        """
        request = translateRequest({"input": "x", "include": ["reasoning.encrypted_content"], "store": False,
                                    "prompt_cache_key": "k", "frobnicate": 1})
        self.assertEqual(request.ignored, ("field frobnicate",))
        self.assertEqual(set(request.upstream), {"messages", "stream", "stream_options"})

    def test_badRequests(self) -> None:
        """
        Each malformed or unservable field is refused with a message that names it.
        """
        cases: list[tuple[dict[str, Any], str]] = [
            ({"input": 3}, "input must be a string or a list of items, not a number"),
            ({"input": ["hi"]}, "input[0] must be an object, not a string"),
            ({"input": [{"role": "robot", "content": "x"}]}, 'input[0].role must be user, assistant'),
            ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 'input[0].content[0].type "input_audio"'),
            ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "image_url"),
            ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
            ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id must be a string"),
            ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
            ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference is not supported"),
            ({"input": [{"type": "teleport"}]}, 'input[0].type "teleport" is not an input item type'),
            ({"input": "x", "tools": {}}, "tools must be a list"),
            ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name must be a string"),
            ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}}, 'function "nope", which tools does not hold'),
            ({"input": "x", "tool_choice": {"type": "web_search"}}, "hosted tool"),
            ({"input": "x", "max_output_tokens": "10"}, "max_output_tokens must be a number"),
            ({"input": "x", "stream": "yes"}, "stream must be true or false"),
            ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
            ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
            ({"input": "x", "background": True}, "background responses are not supported"),
            ({"input": "x", "conversation": "conv_1"}, "conversations are not supported"),
            ({"input": "x", "instructions": 5}, "instructions must be a string"),
        ]
        for body, fragment in cases:
            with self.assertRaises(ResponsesRequestError, msg=json.dumps(body)) as caught:
                translateRequest(body)
            self.assertIn(fragment, caught.exception.message)

    def test_previousResponseId(self) -> None:
        """
        C{previous_response_id} is read as a string; its history comes first in the conversation.
        """
        self.assertIsNone(previousResponseId({}))
        self.assertEqual(previousResponseId({"previous_response_id": "resp_1"}), "resp_1")
        self.assertRaises(ResponsesRequestError, previousResponseId, {"previous_response_id": 1})
        history: list[dict[str, Any]] = [{"type": "message", "role": "user", "content": "Hi"},
                   {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]}]
        request = translateRequest({"input": "Again", "instructions": "Now."}, history)
        self.assertEqual(request.upstream["messages"], [
            {"role": "system", "content": "Now."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}])
        self.assertEqual(len(request.items), 3)


class EncoderTests(SynchronousTestCase):
    def test_textStream(self) -> None:
        """
        A text answer is created, in progress, one message with one output_text part and its
        deltas, then completed with usage; every event numbered in order and of the SDK's types.
        """
        events, encoder = encode({"input": "Hi"}, TEXT_STREAM)
        for event in events:
            parseEvent(event)
        self.assertEqual([event["sequence_number"] for event in events], list(range(len(events))))
        self.assertEqual([event["type"] for event in events], [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.completed",
        ])
        self.assertEqual([e["delta"] for e in events if e["type"] == "response.output_text.delta"], ["Hel", "lo"])
        final = parseResponse(events[-1]["response"])
        self.assertEqual((final.status, final.output_text, final.model), ("completed", "Hello", "qwen"))
        self.assertEqual(final.id, events[0]["response"]["id"])
        assert final.usage is not None
        self.assertEqual((final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens), (7, 4, 11))
        self.assertEqual(parseResponse(events[0]["response"]).status, "in_progress")
        self.assertEqual(encoder.response(), events[-1]["response"])

    def test_reasoningTextAndToolCalls(self) -> None:
        """
        Reasoning becomes a reasoning item with summary text, then the text a message, then each
        tool call a function_call item with its arguments streamed; a namespaced call carries
        its namespace, and a call TabbyAPI gave no id gets one.
        """
        events, encoder = encode({"input": "x", "tools": TOOLS}, FULL_STREAM)
        for event in events:
            parseEvent(event)
        added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
        self.assertEqual(added, ["reasoning", "message", "function_call", "function_call"])
        self.assertEqual([e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta"],
                         ["Thinking ", "hard."])
        self.assertEqual([(e["output_index"], e["arguments"]) for e in events
                          if e["type"] == "response.function_call_arguments.done"],
                         [(2, '{"cmd": "ls"}'), (3, '{"id": 1}')])
        final = parseResponse(encoder.response())
        reasoning, message, call, namespaced = final.output
        assert reasoning.type == "reasoning" and message.type == "message"
        assert call.type == "function_call" and namespaced.type == "function_call"
        self.assertEqual(reasoning.summary[0].text, "Thinking hard.")
        self.assertEqual(final.output_text, "Let me look.")
        self.assertEqual((call.call_id, call.name, call.arguments, call.namespace),
                         ("call_abc", "exec_command", '{"cmd": "ls"}', None))
        self.assertEqual((namespaced.name, namespaced.namespace), ("close", "agents"))
        self.assertTrue(namespaced.call_id.startswith("call_"))
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        self.assertEqual(done, encoder.response()["output"])

    def test_lengthIsIncomplete(self) -> None:
        """
        A generation cut at C{max_tokens} ends with C{response.incomplete}, the reason
        C{max_output_tokens}.
        """
        stream = chunk({"content": "Once upon"}) + chunk({}, "length") + chunk(usage=USAGE) + DONE
        events, encoder = encode({"input": "x", "max_output_tokens": 2}, stream)
        self.assertEqual(events[-1]["type"], "response.incomplete")
        parseEvent(events[-1])
        final = parseResponse(events[-1]["response"])
        self.assertEqual(final.status, "incomplete")
        assert final.incomplete_details is not None
        self.assertEqual(final.incomplete_details.reason, "max_output_tokens")
        self.assertEqual(final.max_output_tokens, 2)

    def test_fail(self) -> None:
        """
        A failed generation closes what was open, then sends an C{error} event and
        C{response.failed} with the error; a context overflow has OpenAI's code for it.
        """
        encoder = ResponseEncoder(translateRequest({"input": "x"}), "qwen", 1, newId=counter())
        events = encoder.start() + encoder.feed(ChatStreamDecoder().feed(chunk({"content": "Hal"})))
        events += encoder.fail("Chat completion aborted.")
        for event in events:
            parseEvent(event)
        self.assertEqual([e["type"] for e in events[-4:]],
                         ["response.content_part.done", "response.output_item.done", "error", "response.failed"])
        self.assertEqual(events[-2]["code"], "server_error")
        final = parseResponse(events[-1]["response"])
        self.assertEqual(final.status, "failed")
        assert final.error is not None
        self.assertEqual(final.error.message, "Chat completion aborted.")
        overflow = ResponseEncoder(translateRequest({"input": "x"}), "qwen", 1)
        self.assertEqual(overflow.fail("Prompt length 90 exceeds the available context size of 64 tokens")[0]["code"],
                         "context_length_exceeded")

    def test_nonStreamedReply(self) -> None:
        """
        TabbyAPI's non-streamed reply read by the same decoder gives the same Response.
        """
        reply = {"id": "cmpl-1", "object": "chat.completion", "created": 1, "model": "Qwen",
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "Hello", "reasoning_content": None,
                                          "tool_calls": None}}], "usage": USAGE}
        encoder = ResponseEncoder(translateRequest({"input": "Hi"}), "qwen", 1_700_000_000, newId=counter())
        encoder.start()
        encoder.feed(ChatStreamDecoder().decode(reply))
        encoder.finish()
        _, streamed = encode({"input": "Hi"}, TEXT_STREAM)
        self.assertEqual(encoder.response(), streamed.response())

    def test_sseFrame(self) -> None:
        """
        An event on the wire names its type on an C{event:} line, as OpenAI's do.
        """
        events, _ = encode({"input": "Hi"}, TEXT_STREAM)
        raw = b"".join(sseFrame(event) for event in events)
        self.assertTrue(raw.startswith(b"event: response.created\ndata: {"))
        self.assertEqual(namedEvents(raw), events)

    @given(st.lists(st.integers(min_value=0, max_value=len(FULL_STREAM)), max_size=12))
    def test_anySplitSameEvents(self, splits: list[int]) -> None:
        """
        However TabbyAPI's stream is cut into reads, the Responses events are the same.
        """
        whole, _ = encode({"input": "x", "tools": TOOLS}, FULL_STREAM)
        cut, _ = encode({"input": "x", "tools": TOOLS}, FULL_STREAM, splits)
        self.assertEqual(cut, whole)


# Any text, lone surrogates included (st.text() leaves them out).
ANY_TEXT = st.text(st.characters(exclude_categories=()))


class SSETemplateTests(SynchronousTestCase):
    @given(st.lists(st.tuples(st.sampled_from(["text", "reasoning", "arguments"]), ANY_TEXT), max_size=8), ANY_TEXT)
    def test_sameAsSSEFrame(self, deltas: list[tuple[str, str]], prefix: str) -> None:
        """
        L{ResponseEncoder.feedSSE} writes exactly L{sseFrame} of each of L{ResponseEncoder.feed}'s
        events, whatever the text and the item ids (quotes, backslashes, control characters,
        non-ASCII; a lone surrogate escaped alike), for message, reasoning and function-call
        items in any order, numbered alike, and leaves the encoder as L{ResponseEncoder.feed} does.
        """
        events: list[Event] = []
        calls = 0
        for kind, text in deltas:
            if kind == "arguments":
                if not events or not isinstance(events[-1], (ToolCallStart, ToolCallArguments)):
                    events.append(ToolCallStart(calls, f"c{calls}", "look\u00e9\""))
                    calls += 1
                events.append(ToolCallArguments(calls - 1, text))
            else:
                events.append(TextDelta(text) if kind == "text" else ReasoningDelta(text))

        def ids() -> Callable[[str], str]:
            numbers = itertools.count(1)
            return lambda kind: f"{prefix}{kind}_{next(numbers)}"

        made = [ResponseEncoder(translateRequest({"input": "x"}), "qwen", 1, newId=ids()) for _ in range(2)]
        for encoder in made:
            encoder.start()
        expected = b"".join(sseFrame(event) for event in made[0].feed(events))
        self.assertEqual(made[1].feedSSE(events), expected)
        self.assertEqual(made[1].finish(), made[0].finish())
