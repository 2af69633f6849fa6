"""
Tests for L{tabbyproxy.tabbywire}'s decoder: TabbyAPI's generation stream (both the HEAD and the
2025-02 shapes, chat and completions) and its non-streamed replies become the same typed events,
however the bytes are cut.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.tabbywire import (
    ChatStreamDecoder,
    Event,
    Finish,
    ReasoningDelta,
    StreamError,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
    Usage,
    causeLine,
)


HEAD_STREAM = (
    b": ping - 2026-08-13 18:55:45.123456+00:00\r\n\r\n"
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{"reasoning_content":"Hm, "},"finish_reason":null}],"model":"Qwen3-8B"}\r\n\r\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{"reasoning_content":"weather.","content":"Let me look \xc3\xa9"},'
    b'"finish_reason":null}],"model":"Qwen3-8B"}\r\n\r\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{"tool_calls":[{"id":"call_a","type":"function","function":{"name":"get_weather",'
    b'"arguments":"{\\"city\\": \\"Paris\\"}"},"index":0},{"id":"call_b","type":"function",'
    b'"function":{"name":"get_time","arguments":"{}"},"index":1}]},"finish_reason":null}],'
    b'"model":"Qwen3-8B"}\r\n\r\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":26,"prompt_time":0.125,'
    b'"prompt_tokens_per_sec":208.0,"completion_tokens":9,"completion_time":0.5,'
    b'"completion_tokens_per_sec":"Indeterminate","total_tokens":35,"total_time":0.625},'
    b'"model":"Qwen3-8B"}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)

HEAD_EVENTS: list[Event] = [
    ReasoningDelta("Hm, "),
    ReasoningDelta("weather."),
    TextDelta("Let me look \u00e9"),
    ToolCallStart(0, "call_a", "get_weather"),
    ToolCallArguments(0, '{"city": "Paris"}'),
    ToolCallStart(1, "call_b", "get_time"),
    ToolCallArguments(1, "{}"),
    Finish("tool_calls"),
    Usage(promptTokens=26, completionTokens=9, promptTime=0.125, completionTime=0.5),
]


class StreamTests(SynchronousTestCase):
    """
    L{ChatStreamDecoder.feed} reads TabbyAPI's event stream.
    """

    def test_head(self) -> None:
        """
        A HEAD chat stream gives reasoning, text, tool calls, the finish reason and the usage, in
        that order within a chunk; pings are skipped and C{[DONE]} marks it complete.
        """
        decoder = ChatStreamDecoder()
        self.assertEqual(decoder.feed(HEAD_STREAM), HEAD_EVENTS)
        self.assertTrue(decoder.complete)
        self.assertIsNone(decoder.error)

    @given(st.lists(st.integers(min_value=0, max_value=len(HEAD_STREAM)), max_size=30))
    def test_anySplit(self, cuts: list[int]) -> None:
        """
        However the bytes are cut (inside a CRLF, inside a UTF-8 character), the events are the
        same, and the stream is complete only once C{[DONE]} has been read.
        """
        bounds = sorted({0, len(HEAD_STREAM), *cuts})
        decoder = ChatStreamDecoder()
        events: list[Event] = []
        for start, end in zip(bounds, bounds[1:]):
            events.extend(decoder.feed(HEAD_STREAM[start:end]))
        self.assertEqual(events, HEAD_EVENTS)
        self.assertTrue(decoder.complete)

    def test_incomplete(self) -> None:
        """
        A stream without C{[DONE]} is not complete, and an event cut short is not decoded yet.
        """
        decoder = ChatStreamDecoder()
        self.assertEqual(decoder.feed(HEAD_STREAM[: HEAD_STREAM.index(b"data: [DONE]")]), HEAD_EVENTS)
        self.assertFalse(decoder.complete)
        self.assertEqual(decoder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"x"'), [])

    def test_lineEndings(self) -> None:
        """
        LF and CR line endings work as TabbyAPI's CRLF does, also mixed in one read, and the
        space after C{data:} is optional.
        """
        for separator in (b"\n", b"\r"):
            decoder = ChatStreamDecoder()
            stream = HEAD_STREAM.replace(b"\r\n", separator)
            self.assertEqual(decoder.feed(stream), HEAD_EVENTS)
            self.assertTrue(decoder.complete)
        mixed = b'data: {"choices":[{"text":"a"}]}\r\n\r\ndata:{"choices":[{"text":"b"}]}\r\rdata: {"choices":[{"text":"c"}]}\n\n'
        self.assertEqual(ChatStreamDecoder().feed(mixed), [TextDelta("a"), TextDelta("b"), TextDelta("c")])

    def test_error(self) -> None:
        """
        TabbyAPI's error event becomes L{StreamError} with its message, and nothing after it is
        decoded.
        """
        decoder = ChatStreamDecoder()
        events = decoder.feed(
            b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\r\n\r\n'
            b'data: {"error":{"message":"Chat completion aborted. Please check the server console.",'
            b'"trace":null}}\r\n\r\n'
            b'data: {"choices":[{"index":0,"delta":{"content":"late"}}]}\r\n\r\n'
        )
        message = "Chat completion aborted. Please check the server console."
        self.assertEqual(events, [TextDelta("Hi"), StreamError(message)])
        self.assertEqual(decoder.error, message)
        self.assertEqual(decoder.feed(b"data: [DONE]\r\n\r\n"), [])
        self.assertEqual(decoder.decode({"choices": [{"index": 0, "delta": {"content": "x"}}]}), [])

    def test_notJSON(self) -> None:
        """
        An event that is not JSON is skipped with a warning naming it; the rest is decoded.
        """
        decoder = ChatStreamDecoder()
        with capturedLogs() as events:
            decoded = decoder.feed(b"data: {oops\r\n\r\ndata: [1]\r\n\r\ndata: {\"choices\":[{\"text\":\"a\"}]}\n\n")
        self.assertEqual(decoded, [TextDelta("a")])
        warnings = [event for event in events if event["log_level"] is LogLevel.warn]
        self.assertEqual([event["payload"] for event in warnings], [b"{oops"])

    def test_old(self) -> None:
        """
        A 2025-02 chat stream (roles and null tool calls in deltas, a usage chunk without
        choices) gives the same kind of events.
        """
        decoder = ChatStreamDecoder()
        events = decoder.feed(
            b'data: {"id":"c","choices":[{"index":0,"finish_reason":null,"delta":{"role":"assistant",'
            b'"content":"Hel","tool_calls":null,"tool_calls_json":null},"logprobs":null}],"usage":null}\r\n\r\n'
            b'data: {"id":"c","choices":[{"index":0,"finish_reason":"length","delta":{}}],"usage":null}\r\n\r\n'
            b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":26,"completion_tokens":2,'
            b'"total_tokens":28}}\r\n\r\n'
            b"data: [DONE]\r\n\r\n"
        )
        self.assertEqual(events, [TextDelta("Hel"), Finish("length"), Usage(26, 2)])

    def test_completions(self) -> None:
        """
        A completions stream's C{text} is the answer's text.
        """
        decoder = ChatStreamDecoder()
        events = decoder.feed(
            b'data: {"object":"text_completion","choices":[{"index":0,"text":"Once","finish_reason":null}],'
            b'"model_name":"m"}\r\n\r\n'
            b'data: {"object":"text_completion","choices":[{"index":0,"text":"","finish_reason":"stop"}],'
            b'"model_name":"m"}\r\n\r\n'
        )
        self.assertEqual(events, [TextDelta("Once"), Finish("stop")])

    def test_fragmentedToolCall(self) -> None:
        """
        A tool call streamed in OpenAI-style fragments starts once and carries each fragment
        of its arguments; object arguments become JSON text.
        """
        decoder = ChatStreamDecoder()

        def fragment(call: dict[str, object]) -> list[Event]:
            return decoder.decode({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})

        self.assertEqual(fragment({"index": 0, "id": "x", "function": {"name": "f", "arguments": ""}}),
                         [ToolCallStart(0, "x", "f")])
        self.assertEqual(fragment({"index": 0, "function": {"arguments": '{"a": '}}),
                         [ToolCallArguments(0, '{"a": ')])
        self.assertEqual(fragment({"index": 1, "function": {"name": "g", "arguments": {"b": 2}}}),
                         [ToolCallStart(1, "", "g"), ToolCallArguments(1, '{"b": 2}')])

    def test_wrongTypes(self) -> None:
        """
        Fields of the wrong type are skipped, not raised: text that is not a string, an empty
        finish reason, tool calls that are not objects, usage counts that are not numbers.
        """
        decoder = ChatStreamDecoder()
        chunk = {
            "choices": [{"index": 0, "delta": {"content": 3, "tool_calls": ["x", {"index": True}]},
                         "finish_reason": ""}],
            "usage": {"prompt_tokens": "many", "completion_tokens": True},
        }
        self.assertEqual(decoder.decode(chunk), [ToolCallStart(0, "", ""), Usage(None, None)])


class ReplyTests(SynchronousTestCase):
    """
    L{ChatStreamDecoder.decode} reads a non-streamed reply as one chunk.
    """

    def test_reply(self) -> None:
        """
        A HEAD reply's message gives its reasoning, text and tool calls (positions as indices),
        its finish reason with the stop string that ended it, and its usage.
        """
        reply = {
            "id": "cmpl-1",
            "choices": [{
                "index": 0, "finish_reason": "stop", "eos_reason": "stop_string", "stop_str": "END",
                "message": {"role": "assistant", "content": "Hi", "reasoning_content": "Think.",
                            "tool_calls": [{"id": "call_1", "type": "function", "index": None,
                                            "function": {"name": "f", "arguments": "{}"}},
                                           {"id": "call_2", "type": "function", "index": None,
                                            "function": {"name": "g", "arguments": "[]"}}],
                            "tool_call_id": None},
                "logprobs": None,
            }],
            "created": 1, "model": "m", "object": "chat.completion",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2.0, "total_tokens": 5},
        }
        self.assertEqual(
            ChatStreamDecoder().decode(reply),
            [ReasoningDelta("Think."), TextDelta("Hi"), ToolCallStart(0, "call_1", "f"), ToolCallArguments(0, "{}"),
             ToolCallStart(1, "call_2", "g"), ToolCallArguments(1, "[]"), Finish("stop", "END"), Usage(3, 2)],
        )

    def test_stopToken(self) -> None:
        """
        A reply that ended on a stop token names no stop string, and without usage it gives
        none.
        """
        reply = {"choices": [{"finish_reason": "stop", "eos_reason": "stop_token", "stop_str": "<|im_end|>",
                              "message": {"content": None}}], "usage": None}
        self.assertEqual(ChatStreamDecoder().decode(reply), [Finish("stop")])


# TabbyAPI's output when a model folder lacks config.json (reference/tabbyapi-captures/load_failure.log),
# with its placeholders for the server's folders made real.
LOAD_FAILURE = """\
2026-11-26 05:39:44.310 INFO:     Configured backend: cudaMallocAsync
2026-11-26 05:39:44.310 WARNING:  If you aren't a developer, please keep this
off!
Traceback (most recent call last):
  File "/srv/tabbyAPI/common/transformers_utils.py", line 136, in from_directory
    self.hf_config = await HuggingFaceConfig.from_directory(model_directory)
                     ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
FileNotFoundError: [Errno 2] No such file or directory: '/srv/tabbyAPI/models/tiny-model/config.json'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/srv/tabbyAPI/main.py", line 209, in <module>
    entrypoint()
  File "/srv/tabbyAPI/common/transformers_utils.py", line 138, in from_directory
    raise ValueError(f"Failed to load config.json from {model_directory}") from exc
ValueError: Failed to load config.json from /srv/tabbyAPI/models/tiny-model""".splitlines()


class CauseLineTests(SynchronousTestCase):
    def test_tracebackEndsWithTheCause(self) -> None:
        """
        After a traceback, the cause is the exception it ends with, without the folders of
        the server's paths.
        """
        self.assertEqual(causeLine(LOAD_FAILURE), "ValueError: Failed to load config.json from .../tiny-model")

    def test_errorLineWithItsWrappedRest(self) -> None:
        """
        An ERROR line after the last traceback is the cause, without its time stamp, joined with
        the lines the console wrapped it onto; later INFO lines are not.
        """
        lines = [*LOAD_FAILURE, "2026-11-26 05:39:45.001 ERROR:    Port 5000 is in use by another", "program",
                 "2026-11-26 05:39:45.002 INFO:     Shutting down"]
        self.assertEqual(causeLine(lines), "Port 5000 is in use by another program")

    def test_otherwiseTheLastLine(self) -> None:
        """
        Without an exception or an error, the cause is the last line; with no output, none.
        """
        self.assertEqual(causeLine(["2026-11-26 05:39:44.310 INFO:     Loading /srv/models/Qwen", "  "]),
                         "Loading .../Qwen")
        self.assertIsNone(causeLine([]))
