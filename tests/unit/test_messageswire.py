"""
Anthropic's Messages API translated to TabbyAPI's chat completions and back: the request
mapping, field by field, and the encoder of TabbyAPI's events, whose stream must not depend on
how TabbyAPI's bytes were cut.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.messageswire import MessageEncoder, MessagesRequestError, signatureOf, translateRequest
from tabbyproxy.responseswire import sseFrame
from tabbyproxy.tabbywire import ChatStreamDecoder, Event, ReasoningDelta, TextDelta, ToolCallArguments, ToolCallStart
from tests.support.messagestypes import parseEvent, parseMessage

CLAUDE_CAPTURE = Path(__file__).parent.parent / "support" / "captures" / "claude-code-2.1.197-messages.json"
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def ids() -> Any:
    counter = iter(range(1000))
    return lambda prefix: f"{prefix}_{next(counter)}"


class RequestTests(SynchronousTestCase):
    def test_plainConversation(self) -> None:
        """
        C{system} blocks become one system message first; text blocks are joined into string
        content; a mid-conversation system message stays where it is; sampling fields map and
        C{stop_sequences} become C{stop}; TabbyAPI is always asked for a stream with usage.
        """
        translated = translateRequest({
            "system": [{"type": "text", "text": "Be ", "cache_control": {"type": "ephemeral"}},
                       {"type": "text", "text": "brief."}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"},
                {"role": "system", "content": "Mind the tools."},
            ],
            "max_tokens": 100, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop_sequences": ["END"],
            "stream": True,
        })
        self.assertEqual(translated.upstream, {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"},
                         {"role": "system", "content": "Mind the tools."}],
            "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": 100, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop": ["END"],
        })
        self.assertTrue(translated.stream)
        self.assertEqual(translated.ignored, ())

    def test_toolsAndResults(self) -> None:
        """
        Tools become function tools (server tools dropped); an assistant's thinking and
        tool_use become its reasoning and tool calls; a user's tool_result becomes a tool
        message with the call's id (an error marked), before the rest of the user's turn.
        """
        translated = translateRequest({
            "tools": [WEATHER, {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Two calls.", "signature": "s"},
                    {"type": "redacted_thinking", "data": "xx"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                     "content": [{"type": "text", "text": "no data"}]},
                    {"type": "text", "text": "Thanks"}]},
            ],
        })
        upstream = translated.upstream
        self.assertEqual(upstream["tools"], [{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER["input_schema"]}}])
        self.assertEqual((upstream["tool_choice"], upstream["parallel_tool_calls"]),
                         ({"type": "function", "function": {"name": "get_weather"}}, False))
        self.assertEqual(upstream["messages"][1:], [
            {"role": "assistant", "content": None, "reasoning_content": "Two calls.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no data"},
            {"role": "user", "content": "Thanks"},
        ])
        self.assertEqual(translated.ignored, ("tool web_search_20250305",))

    def test_choicesAndThinking(self) -> None:
        """
        C{tool_choice} auto/any/none map to auto/required/none; C{output_config.format}
        becomes TabbyAPI's json_schema; C{thinking} switches the template's C{enable_thinking}
        and passes a budget; images become image_url parts.
        """
        def upstream(**fields: Any) -> dict[str, Any]:
            return translateRequest({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                                     **fields}).upstream

        for kind, expected in (("auto", "auto"), ("any", "required"), ("none", "none")):
            self.assertEqual(upstream(tool_choice={"type": kind})["tool_choice"], expected)
        self.assertEqual(upstream(thinking={"type": "disabled"})["template_vars"], {"enable_thinking": False})
        self.assertEqual(upstream(thinking={"type": "adaptive"})["template_vars"], {"enable_thinking": True})
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        self.assertEqual(upstream(output_config={"format": {"type": "json_schema", "schema": schema}})["json_schema"],
                         schema)
        enabled = upstream(thinking={"type": "enabled", "budget_tokens": 2048})
        self.assertEqual((enabled["template_vars"], enabled["reasoning_budget_tokens"]),
                         ({"enable_thinking": True}, 2048))
        image = translateRequest({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
            {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1/a.png"}},
            {"type": "text", "text": "What is it?"}]}]}).upstream["messages"]
        self.assertEqual(image, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/a.png"}},
            {"type": "text", "text": "What is it?"}]}])

    def test_ignoredFields(self) -> None:
        """
        Fields with no TabbyAPI meaning (what Claude Code sends) are accepted and named.
        """
        translated = translateRequest({
            "messages": [{"role": "user", "content": "x"}], "metadata": {"user_id": "u"},
            "context_management": {"edits": []}, "output_config": {"effort": "high"}, "service_tier": "auto",
        })
        self.assertEqual(translated.ignored, ("field metadata", "field context_management", "field service_tier",
                                              "field output_config.effort"))
        self.assertNotIn("metadata", translated.upstream)

    def test_capturedClaudeCode(self) -> None:
        """
        Claude Code's first request, as captured, translates: every tool offered, the system
        prompt first, the mid-conversation system message kept.
        """
        body = json.loads(CLAUDE_CAPTURE.read_text())["body"]
        body.pop("model")
        upstream = translateRequest(body).upstream
        self.assertEqual(len(upstream["tools"]), len(body["tools"]))
        self.assertEqual([m["role"] for m in upstream["messages"]], ["system", "user", "system"])
        self.assertTrue(upstream["messages"][1]["content"].endswith("say hi"))

    def test_badFields(self) -> None:
        """
        Malformed fields are refused with a message naming the field.
        """
        cases: list[tuple[dict[str, Any], str]] = [
            ({"messages": "hi"}, "messages: must be a list"),
            ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
            ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
            ({"messages": [], "max_tokens": "many"}, "max_tokens"),
            ({"messages": [], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
            ({"messages": [], "thinking": {"type": "maybe"}}, "thinking.type"),
            ({"messages": [], "output_config": {"format": {"type": "xml"}}}, "output_config.format.type"),
            ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "tool_use_id"),
        ]
        for body, fragment in cases:
            with self.assertRaises(MessagesRequestError) as raised:
                translateRequest(body)
            self.assertIn(fragment, raised.exception.message)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, int] | None = None,
          **extra: Any) -> bytes:
    document: dict[str, Any] = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "Qwen",
                                "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish, **extra}]}
    if usage is not None:
        document["usage"] = usage
    return b"data: " + json.dumps(document).encode() + b"\r\n\r\n"


# TabbyAPI's stream with reasoning, text and a whole tool call in the last chunk, then usage.
STREAM = b"".join([
    chunk({"reasoning_content": "Think"}), chunk({"reasoning_content": "ing."}),
    chunk({"content": "Let me "}), chunk({"content": "check."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}),
    chunk({}, "tool_calls", usage={"prompt_tokens": 12, "completion_tokens": 7}),
    b"data: [DONE]\r\n\r\n",
])


def encode(pieces: list[bytes]) -> tuple[list[dict[str, Any]], MessageEncoder]:
    encoder = MessageEncoder("qwen", newId=ids())
    decoder = ChatStreamDecoder()
    events = encoder.start()
    for piece in pieces:
        events.extend(encoder.feed(decoder.feed(piece)))
    events.extend(encoder.finish())
    return events, encoder


class EncoderTests(SynchronousTestCase):
    def test_events(self) -> None:
        """
        The stream is message_start and a ping, a thinking block (closed with its signature), a
        text block, a tool_use block with its JSON input, then message_delta with tool_use as
        the reason and the usage, and message_stop; the SDK's types parse every event, and the
        final Message holds the same blocks.
        """
        events, encoder = encode([STREAM])
        for event in events:
            parseEvent(event)
        self.assertEqual([(e["type"], e.get("delta", {}).get("type") or e.get("delta", {}).get("stop_reason"))
                          for e in events], [
            ("message_start", None), ("ping", None),
            ("content_block_start", None), ("content_block_delta", "thinking_delta"),
            ("content_block_delta", "thinking_delta"), ("content_block_delta", "signature_delta"),
            ("content_block_stop", None),
            ("content_block_start", None), ("content_block_delta", "text_delta"), ("content_block_delta", "text_delta"),
            ("content_block_stop", None),
            ("content_block_start", None), ("content_block_delta", "input_json_delta"), ("content_block_stop", None),
            ("message_delta", "tool_use"), ("message_stop", None),
        ])
        self.assertEqual(events[-2]["usage"]["output_tokens"], 7)
        message = parseMessage(encoder.message())
        self.assertEqual(message.stop_reason, "tool_use")
        self.assertEqual([block.type for block in message.content], ["thinking", "text", "tool_use"])
        thinking, text, call = encoder.message()["content"]
        self.assertEqual((thinking["thinking"], thinking["signature"]), ("Thinking.", signatureOf("Thinking.")))
        self.assertEqual(text["text"], "Let me check.")
        self.assertEqual((call["id"], call["name"], call["input"]), ("toolu_1", "get_weather", {"city": "Paris"}))
        self.assertEqual((message.usage.input_tokens, message.usage.output_tokens), (12, 7))

    def test_stopReasons(self) -> None:
        """
        TabbyAPI's C{length} is C{max_tokens}; a stop string is C{stop_sequence} with the
        string; a plain stop is C{end_turn}.
        """
        cases = [
            (chunk({"content": "x"}, "length"), "max_tokens", None),
            (chunk({"content": "x"}, "stop", eos_reason="stop_string", stop_str="END"), "stop_sequence", "END"),
            (chunk({"content": "x"}, "stop"), "end_turn", None),
        ]
        for data, reason, sequence in cases:
            events, encoder = encode([data + b"data: [DONE]\r\n\r\n"])
            self.assertEqual(events[-2]["delta"], {"stop_reason": reason, "stop_sequence": sequence})
            self.assertEqual((encoder.message()["stop_reason"], encoder.message()["stop_sequence"]), (reason, sequence))

    def test_fail(self) -> None:
        """
        A failure is Anthropic's error event, which the SDK's error type reads.
        """
        [event] = MessageEncoder.fail("boom", "overloaded_error")
        parseEvent(event)
        self.assertEqual(event, {"type": "error", "error": {"type": "overloaded_error", "message": "boom"}})

    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
    def test_anySplit(self, cuts: list[int]) -> None:
        """
        However TabbyAPI's bytes are cut, the Messages events say the same: the same blocks
        with the same text (deltas joined), the same ends, the same Message.
        """
        whole, wholeEncoder = encode([STREAM])
        points = sorted(set(cuts))
        pieces = [STREAM[start:end] for start, end in zip([0, *points], [*points, len(STREAM)])]
        split, splitEncoder = encode(pieces)
        self.assertEqual(joined(split), joined(whole))
        self.assertEqual(splitEncoder.message(), wholeEncoder.message())


# Any text, lone surrogates included (st.text() leaves them out).
ANY_TEXT = st.text(st.characters(exclude_categories=()))


class SSETemplateTests(SynchronousTestCase):
    @given(st.lists(st.tuples(st.sampled_from(["text", "thinking", "arguments"]), ANY_TEXT), max_size=8))
    def test_sameAsSSEFrame(self, deltas: list[tuple[str, str]]) -> None:
        """
        L{MessageEncoder.feedSSE} writes exactly L{sseFrame} of each of L{MessageEncoder.feed}'s
        events, whatever the text (quotes, backslashes, control characters, non-ASCII; a lone
        surrogate escaped alike), for text, thinking and tool-call blocks in any order, and
        leaves the encoder as L{MessageEncoder.feed} does.
        """
        events: list[Event] = []
        for kind, text in deltas:
            if kind == "arguments":
                if not any(isinstance(event, ToolCallStart) for event in events):
                    events.append(ToolCallStart(0, "c0", "look\u00e9\""))
                events.append(ToolCallArguments(0, text))
            else:
                events.append(TextDelta(text) if kind == "text" else ReasoningDelta(text))
        made = [MessageEncoder("qwen\u00e9", newId=ids()) for _ in range(2)]
        for encoder in made:
            encoder.start()
        expected = b"".join(sseFrame(event) for event in made[0].feed(events))
        self.assertEqual(made[1].feedSSE(events), expected)
        self.assertEqual(made[1].finish(), made[0].finish())
        self.assertEqual(made[1].message(), made[0].message())

def joined(events: list[dict[str, Any]]) -> list[Any]:
    """
    The events with consecutive deltas of one block joined, which a split may cut differently.
    """
    out: list[Any] = []
    for event in events:
        delta = event.get("delta", {})
        kind = delta.get("type") if event["type"] == "content_block_delta" else None
        field = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}.get(kind or "")
        if field and out and isinstance(out[-1], list) and out[-1][0] == (event["index"], kind):
            out[-1][1] += delta[field]
        elif field:
            out.append([(event["index"], kind), delta[field]])
        else:
            out.append(event)
    return out
