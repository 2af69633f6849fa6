"""
Tests for L{tabbyproxy.ollamawire}: Ollama requests to TabbyAPI bodies, TabbyAPI's streamed chunks
(both the HEAD and the 2025-02 shapes) to Ollama's NDJSON objects, and model descriptions.
"""

from __future__ import annotations

import base64
import json
import math
import re
from datetime import datetime
from typing import Any, cast

import ollama
from attrs import define, field
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.routes.common import errorLine
from tabbyproxy.ollamawire import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    PROMPT_TOO_LONG,
    SAMPLER_NAMES,
    OllamaRequestError,
    StreamTranslator,
    UpstreamError,
    canDrop,
    chatRequest,
    contextExcess,
    embedDimensions,
    embeddingsPrompt,
    embeddingsReply,
    embedInputs,
    embedReply,
    encodedLength,
    encodeRequest,
    fittingStart,
    generateRequest,
    historyCallId,
    imageDataURI,
    isEmptyRequest,
    keptMessages,
    loadReply,
    mapOptions,
    normalized,
    ollamaTimestamp,
    promptTooLong,
    unloadReply,
    upstreamEmbeddings,
)
from tabbyproxy.tabbywire import (
    ChatStreamDecoder,
    Event,
    ReasoningDelta,
    TextDelta,
    TokenLogprobs,
    ToolCallArguments,
    ToolCallStart,
)
from tests.support.wire import sseDocuments


STARTED = 1691176960.0
"""2023-08-04T19:22:40Z, when the requests in these tests arrive."""


HEAD_CHAT = (
    b'data: {"id":"chatcmpl-5f2a","object":"chat.completion.chunk","created":1755100000,'
    b'"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}],"model":"Qwen3-8B"}'
    b"\r\n\r\n"
    b'data: {"id":"chatcmpl-5f2a","object":"chat.completion.chunk","created":1755100000,'
    b'"choices":[{"index":0,"delta":{"content":"lo"}}],"model":"Qwen3-8B"}\r\n\r\n'
    b'data: {"id":"chatcmpl-5f2a","object":"chat.completion.chunk","created":1755100000,'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":26,'
    b'"prompt_time":0.125,"prompt_tokens_per_sec":208.0,"completion_tokens":2,'
    b'"completion_time":0.5,"completion_tokens_per_sec":"Indeterminate","total_tokens":28,'
    b'"total_time":0.625},"model":"Qwen3-8B"}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)

OLD_CHAT = (
    b'data: {"id":"chatcmpl-9c1","choices":[{"index":0,"finish_reason":null,"delta":'
    b'{"role":"assistant","content":"Hel","tool_calls":null,"tool_calls_json":null},'
    b'"logprobs":null}],"created":1740300000,"model":"Llama-3-8B-exl2","object":'
    b'"chat.completion.chunk","usage":null}\r\n\r\n'
    b'data: {"id":"chatcmpl-9c1","choices":[{"index":0,"finish_reason":null,"delta":'
    b'{"role":"assistant","content":"lo","tool_calls":null,"tool_calls_json":null},'
    b'"logprobs":null}],"created":1740300000,"model":"Llama-3-8B-exl2","object":'
    b'"chat.completion.chunk","usage":null}\r\n\r\n'
    b'data: {"id":"chatcmpl-9c1","choices":[{"index":0,"finish_reason":"length","delta":{},'
    b'"logprobs":null}],"created":1740300000,"model":"Llama-3-8B-exl2","object":'
    b'"chat.completion.chunk","usage":null}\r\n\r\n'
    b'data: {"id":"chatcmpl-9c1","choices":[],"created":1740300000,"model":"Llama-3-8B-exl2",'
    b'"object":"chat.completion.chunk","usage":{"prompt_tokens":26,"completion_tokens":2,'
    b'"total_tokens":28}}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)

HEAD_COMPLETIONS = (
    b'data: {"id":"chatcmpl-77","object":"text_completion","choices":[{"index":0,"text":"Once",'
    b'"finish_reason":null}],"created":1755100000,"model_name":"Qwen3-8B"}\r\n\r\n'
    b'data: {"id":"chatcmpl-77","object":"text_completion","choices":[{"index":0,'
    b'"text":" upon","finish_reason":null}],"created":1755100000,"model_name":"Qwen3-8B"}\r\n\r\n'
    b'data: {"id":"chatcmpl-77","object":"text_completion","choices":[{"index":0,"text":"",'
    b'"finish_reason":"length"}],"created":1755100000,"model_name":"Qwen3-8B","usage":'
    b'{"prompt_tokens":4,"prompt_time":0.25,"completion_tokens":2,"completion_time":0.75,'
    b'"total_tokens":6,"total_time":1.0}}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)

OLD_COMPLETIONS = (
    b'data: {"id":"cmpl-1","choices":[{"index":0,"finish_reason":null,"logprobs":null,'
    b'"text":"Once"}],"created":1740300000,"model":"Llama-3-8B-exl2","object":"text_completion",'
    b'"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}\r\n\r\n'
    b'data: {"id":"cmpl-1","choices":[{"index":0,"finish_reason":"stop","logprobs":null,'
    b'"text":" upon"}],"created":1740300000,"model":"Llama-3-8B-exl2","object":"text_completion",'
    b'"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)

HEAD_REASONING = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{"reasoning_content":"Think"},"finish_reason":null}],"model":"m"}\r\n\r\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{"reasoning_content":"ing."},"finish_reason":null}],"model":"m"}\r\n\r\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{"content":"Hi"},"finish_reason":"stop"}],"model":"m"}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)

HEAD_TOOLS = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{"tool_calls":[{"id":"call_upstream1","type":"function","function":{"name":'
    b'"get_weather","arguments":"{\\"city\\": \\"Tokyo\\"}"}},{"id":"call_upstream2","type":'
    b'"function","function":{"name":"get_time","arguments":"{\\"zone\\": \\"JST\\"}"}}]}}],'
    b'"model":"m"}\r\n\r\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"choices":[{"index":0,'
    b'"delta":{},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":50,"prompt_time":0.5,'
    b'"completion_tokens":20,"completion_time":1.0,"total_tokens":70,"total_time":1.5},'
    b'"model":"m"}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode("ascii")
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 20).decode("ascii")
GIF = base64.b64encode(b"GIF89a" + b"\0" * 20).decode("ascii")
WEBP = base64.b64encode(b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 20).decode("ascii")
OTHER = base64.b64encode(b"just some bytes").decode("ascii")


@define
class Translation:
    """
    A L{StreamTranslator} fed TabbyAPI's chunks through a L{ChatStreamDecoder}, as the route
    feeds it.
    """

    translator: StreamTranslator
    decoder: ChatStreamDecoder = field(factory=ChatStreamDecoder)

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        return self.translator.feed(self.decoder.decode(chunk))

    def finish(self) -> dict[str, Any]:
        return self.translator.finish()

    def aggregate(self) -> dict[str, Any]:
        return self.translator.aggregate()


def translator(what: str = "chat", loadDuration: float = 2.0) -> tuple[Translation, Clock]:
    """
    A translator for a request that arrived at L{STARTED} and waited C{loadDuration} seconds
    for its model, and the clock it reads, now just after the load.
    """
    clock = Clock()
    clock.advance(STARTED + loadDuration)
    assert what in ("chat", "generate")
    return (
        Translation(
            StreamTranslator(
                what="chat" if what == "chat" else "generate",
                modelName="qwen:latest",
                clock=clock.seconds,
                startedAt=STARTED,
                loadDuration=loadDuration,
            )
        ),
        clock,
    )


def feedAll(
    translate: Translation, clock: Clock, stream: bytes, step: float = 0.25
) -> list[dict[str, Any]]:
    """
    Feed every event of C{stream}, C{step} seconds apart, and collect the lines to write.
    """
    lines = []
    for event in sseDocuments(stream):
        clock.advance(step)
        lines.extend(translate.feed(event))
    return lines


class TimestampTests(SynchronousTestCase):
    """
    L{ollamaTimestamp} writes times as Go does.
    """

    def test_fraction(self) -> None:
        """
        Fractions keep their significant digits only, and UTC is C{Z}.
        """
        self.assertEqual(ollamaTimestamp(1691176965.5), "2023-08-04T19:22:45.5Z")
        self.assertEqual(ollamaTimestamp(1691176965.25), "2023-08-04T19:22:45.25Z")

    def test_wholeSecond(self) -> None:
        """
        A whole second keeps nine zeros, so fixed-pattern date parsers (OllamaKit's
        C{ss.SSSSSSSSS}) find a fraction.
        """
        self.assertEqual(ollamaTimestamp(0), "1970-01-01T00:00:00.000000000Z")
        self.assertEqual(ollamaTimestamp(1691176965), "2023-08-04T19:22:45.000000000Z")

    def test_nanoseconds(self) -> None:
        """
        Up to nine fractional digits are written.
        """
        self.assertEqual(ollamaTimestamp(1.000000001), "1970-01-01T00:00:01.000000001Z")

    def test_farFuture(self) -> None:
        """
        Dates centuries ahead, as shown for "forever", are written too.
        """
        self.assertTrue(ollamaTimestamp(1e10).startswith("2286-11-20T"))

    @given(st.floats(min_value=0, max_value=253402300799, allow_nan=False))
    def test_roundTrip(self, seconds: float) -> None:
        """
        Every timestamp has Go's shape and, cut to microseconds, parses back to the same time.
        """
        text = ollamaTimestamp(seconds)
        self.assertRegex(text, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.(\d{0,8}[1-9]|000000000)Z$")
        match = re.fullmatch(r"(.*?)(?:\.(\d+))?Z", text)
        assert match is not None
        micros = (match.group(2) or "").ljust(6, "0")[:6]
        parsed = datetime.fromisoformat(f"{match.group(1)}.{micros}+00:00")
        self.assertLessEqual(abs(parsed.timestamp() - seconds), 2e-6 + seconds * 1e-15)


class OptionTests(SynchronousTestCase):
    """
    L{mapOptions} turns Ollama's C{options} into TabbyAPI sampler fields.
    """

    def test_table(self) -> None:
        """
        Every option with a TabbyAPI equivalent arrives under TabbyAPI's name.
        """
        mapped = mapOptions(
            {
                "temperature": 0.7,
                "top_k": 20,
                "top_p": 0.8,
                "min_p": 0.05,
                "typical_p": 0.9,
                "num_predict": 128,
                "stop": ["<|im_end|>", "\n\n"],
                "seed": 42,
                "repeat_penalty": 1.1,
                "repeat_last_n": 64,
                "presence_penalty": 0.5,
                "frequency_penalty": 0.25,
                "mirostat": 2,
                "mirostat_tau": 5.0,
                "mirostat_eta": 0.1,
                "tfs_z": 0.95,
            }
        )
        self.assertEqual(
            mapped.sampler,
            {
                "temperature": 0.7,
                "top_k": 20,
                "top_p": 0.8,
                "min_p": 0.05,
                "typical": 0.9,
                "max_tokens": 128,
                "stop": ["<|im_end|>", "\n\n"],
                "seed": 42,
                "repetition_penalty": 1.1,
                "penalty_range": 64,
                "presence_penalty": 0.5,
                "frequency_penalty": 0.25,
                "mirostat_mode": 2,
                "mirostat_tau": 5.0,
                "mirostat_eta": 0.1,
                "tfs": 0.95,
            },
        )
        self.assertEqual(mapped.ignored, {})

    def test_ignored(self) -> None:
        """
        Runner options and unknown keys are reported, not forwarded.
        """
        options = {
            "num_ctx": 8192,
            "num_gpu": 99,
            "num_thread": 8,
            "num_batch": 512,
            "main_gpu": 0,
            "use_mmap": True,
            "numa": False,
            "num_keep": 5,
            "penalize_newline": True,
            "low_vram": False,
            "whatever": {"x": 1},
            "temperature": 0.5,
        }
        mapped = mapOptions(options)
        self.assertEqual(mapped.sampler, {"temperature": 0.5})
        del options["temperature"]
        self.assertEqual(mapped.ignored, options)

    def test_numPredictUnlimited(self) -> None:
        """
        C{num_predict} of 0, -1 (no limit) or -2 (fill the context) sends no C{max_tokens}.
        """
        for value in (0, -1, -2):
            self.assertEqual(mapOptions({"num_predict": value}).sampler, {})

    def test_negativePenaltiesClamped(self) -> None:
        """
        Negative presence and frequency penalties, which TabbyAPI refuses, become 0.
        """
        mapped = mapOptions({"presence_penalty": -1, "frequency_penalty": -0.5})
        self.assertEqual(mapped.sampler, {"presence_penalty": 0.0, "frequency_penalty": 0.0})

    def test_ranges(self) -> None:
        """
        Values outside TabbyAPI's ranges are brought into them; a random seed and a
        non-positive repetition penalty are not forwarded.
        """
        mapped = mapOptions(
            {"temperature": 12, "top_p": 1.5, "top_k": -1, "repeat_last_n": -5, "seed": -1,
             "repeat_penalty": 0}
        )
        self.assertEqual(
            mapped.sampler, {"temperature": 10.0, "top_p": 1.0, "top_k": 0, "penalty_range": -1}
        )
        self.assertEqual(mapped.ignored, {"seed": -1, "repeat_penalty": 0})

    def test_coercion(self) -> None:
        """
        Integer options take any number (truncated, like Go); float options take integers;
        C{stop} takes a single string; C{null} counts as absent.
        """
        mapped = mapOptions({"top_k": 40.0, "temperature": 1, "stop": "END", "top_p": None})
        self.assertEqual(mapped.sampler, {"top_k": 40, "temperature": 1.0, "stop": ["END"]})
        self.assertIsInstance(mapped.sampler["top_k"], int)
        self.assertIsInstance(mapped.sampler["temperature"], float)

    def test_wrongTypes(self) -> None:
        """
        A known option of the wrong type is an error in Ollama's words.
        """
        cases = {
            "temperature": ("hot", 'option "temperature" must be of type float'),
            "top_k": (True, 'option "top_k" must be of type integer'),
            "stop": ([1, 2], 'option "stop" must be of type array of strings'),
            "use_mmap": (1, 'option "use_mmap" must be of type boolean'),
        }
        for key, (value, message) in cases.items():
            error = self.assertRaises(OllamaRequestError, mapOptions, {key: value})
            self.assertEqual(str(error), message)

    def test_notAnObject(self) -> None:
        """
        C{options} must be an object; absent is fine.
        """
        self.assertRaises(OllamaRequestError, mapOptions, [1])
        self.assertEqual(mapOptions(None).sampler, {})

    @given(
        st.one_of(
            st.dictionaries(
                st.one_of(st.sampled_from(sorted(SAMPLER_NAMES) + ["num_ctx", "use_mmap"]),
                          st.text(max_size=8)),
                st.recursive(
                    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=5,
                ),
                max_size=6,
            ),
            st.integers(),
            st.text(),
            st.lists(st.integers()),
        )
    )
    def test_arbitrary(self, options: object) -> None:
        """
        On any JSON-like input, the only failure is L{OllamaRequestError}, only TabbyAPI names
        are forwarded, and every key without a TabbyAPI equivalent is reported, not forwarded.
        """
        try:
            mapped = mapOptions(options)
        except OllamaRequestError:
            return
        self.assertLessEqual(set(mapped.sampler), set(SAMPLER_NAMES.values()))
        assert isinstance(options, dict)
        for key, value in options.items():
            if key not in SAMPLER_NAMES and value is not None:
                self.assertIn(key, mapped.ignored)
        json.dumps(mapped.sampler, allow_nan=False)


class ChatRequestTests(SynchronousTestCase):
    """
    L{chatRequest} builds TabbyAPI's C{/v1/chat/completions} body.
    """

    def test_plain(self) -> None:
        """
        Messages pass with lower-cased roles; the upstream request always streams with usage;
        C{model}, C{keep_alive} and C{stream} are left to the route.
        """
        request = chatRequest(
            {
                "model": "qwen",
                "stream": False,
                "keep_alive": "5m",
                "messages": [
                    {"role": "System", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ],
                "options": {"temperature": 0.2, "num_ctx": 4096},
            }
        )
        self.assertEqual(request.path, CHAT_PATH)
        self.assertEqual(
            request.body,
            {
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": 0.2,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ],
            },
        )
        self.assertEqual(request.ignoredOptions, {"num_ctx": 4096})

    def test_formatJSON(self) -> None:
        """
        C{format: "json"} is TabbyAPI's C{response_format: {"type": "json"}}.
        """
        body = chatRequest({"messages": [], "format": "json"}).body
        self.assertEqual(body["response_format"], {"type": "json"})
        self.assertNotIn("json_schema", body)

    def test_formatSchema(self) -> None:
        """
        A schema in C{format} is TabbyAPI's top-level C{json_schema}, unwrapped.
        """
        schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
        body = chatRequest({"messages": [], "format": schema}).body
        self.assertEqual(body["json_schema"], schema)
        self.assertNotIn("response_format", body)

    def test_formatBad(self) -> None:
        """
        Any other C{format} is an error; an empty one is none.
        """
        self.assertRaises(OllamaRequestError, chatRequest, {"format": "yaml"})
        self.assertRaises(OllamaRequestError, chatRequest, {"format": 3})
        self.assertNotIn("response_format", chatRequest({"format": ""}).body)

    def test_think(self) -> None:
        """
        C{think} switches the template's C{enable_thinking}; a level means on.
        """
        for value, enabled in ((True, True), (False, False), ("low", True), ("high", True)):
            body = chatRequest({"messages": [], "think": value}).body
            self.assertEqual(body["template_vars"], {"enable_thinking": enabled})
        self.assertNotIn("template_vars", chatRequest({"messages": []}).body)
        self.assertRaises(OllamaRequestError, chatRequest, {"think": "very"})

    def test_images(self) -> None:
        """
        A message's images become OpenAI C{image_url} parts with typed data URIs.
        """
        body = chatRequest(
            {"messages": [{"role": "user", "content": "What is this?", "images": [PNG, JPEG]}]}
        ).body
        self.assertEqual(
            body["messages"][0]["content"],
            [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}},
            ],
        )

    def test_imageTypes(self) -> None:
        """
        PNG, JPEG, GIF and WebP are recognised by their first bytes; anything else is JPEG.
        """
        self.assertTrue(imageDataURI(GIF).startswith("data:image/gif;base64,"))
        self.assertTrue(imageDataURI(WEBP).startswith("data:image/webp;base64,"))
        self.assertTrue(imageDataURI(OTHER).startswith("data:image/jpeg;base64,"))
        self.assertEqual(imageDataURI("data:image/png;base64,AAAA"), "data:image/png;base64,AAAA")

    def test_badImage(self) -> None:
        """
        An image that is not base64 is the client's error.
        """
        error = self.assertRaises(
            OllamaRequestError,
            chatRequest,
            {"messages": [{"role": "user", "content": "x", "images": ["not base64!"]}]},
        )
        self.assertIn("messages[0].images[0]", str(error))

    def test_tools(self) -> None:
        """
        Ollama's tools are OpenAI's, parameters included.
        """
        tool = {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
        body = chatRequest({"messages": [{"role": "user", "content": "?"}], "tools": [tool]}).body
        self.assertEqual(body["tools"], [tool])

    def test_toolCallsAndResults(self) -> None:
        """
        Tool calls in the history get string arguments and ids, and each tool result names the
        call it answers by the tool's name, in order.
        """
        body = chatRequest(
            {
                "messages": [
                    {"role": "user", "content": "Weather in Tokyo and Paris?"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
                            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                        ],
                    },
                    {"role": "tool", "content": "22C", "tool_name": "get_weather"},
                    {"role": "tool", "content": "15C", "tool_name": "get_weather"},
                ]
            }
        ).body
        calls = body["messages"][1]["tool_calls"]
        tokyo, paris = historyCallId(1, 0), historyCallId(1, 1)
        self.assertNotEqual(tokyo, paris)
        self.assertEqual(
            calls,
            [
                {"id": tokyo, "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
                {"id": paris, "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            ],
        )
        self.assertEqual(
            body["messages"][2], {"role": "tool", "content": "22C", "tool_call_id": tokyo}
        )
        self.assertEqual(body["messages"][3]["tool_call_id"], paris)

    def test_toolIdsMatchReply(self) -> None:
        """
        The ids in a streamed tool call reply are kept when the client sends the calls back, and
        its tool results get them.
        """
        translate, clock = translator()
        replied = feedAll(translate, clock, HEAD_TOOLS)[0]["message"]["tool_calls"]
        body = chatRequest(
            {
                "messages": [
                    {"role": "user", "content": "?"},
                    {"role": "assistant", "content": "", "tool_calls": replied},
                    {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
                    {"role": "tool", "content": "9:00", "tool_name": "get_time"},
                ]
            }
        ).body
        self.assertEqual([c["id"] for c in body["messages"][1]["tool_calls"]], [c["id"] for c in replied])
        self.assertEqual(body["messages"][2]["tool_call_id"], replied[0]["id"])
        self.assertEqual(body["messages"][3]["tool_call_id"], replied[1]["id"])

    def test_sameCallInEveryRoundGetsNewIds(self) -> None:
        """
        The same tool call, made round after round of a tool loop, has a new random id each time
        (Ollama's C{call_} and 8 characters), and so does every call of one reply.
        """
        ids: list[str] = []
        for _ in range(4):
            translate, clock = translator()
            ids.extend(c["id"] for c in feedAll(translate, clock, HEAD_TOOLS)[0]["message"]["tool_calls"])
        for callId in ids:
            self.assertRegex(callId, r"^call_[0-9a-f]{8}$")
        self.assertEqual(len(set(ids)), 8)

    def test_historyWithoutIdsHasNoDuplicates(self) -> None:
        """
        A tool loop sent back without ids, the same call in two rounds: each call gets an id of
        its own, and each result the id of the call it answers.
        """
        call = {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
        body = chatRequest(
            {
                "messages": [
                    {"role": "user", "content": "?"},
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": "rain"},
                ]
            }
        ).body
        first, second = (body["messages"][i]["tool_calls"][0]["id"] for i in (1, 3))
        self.assertNotEqual(first, second)
        self.assertEqual([body["messages"][i]["tool_call_id"] for i in (2, 4)], [first, second])
        earlier = chatRequest({"messages": [
            {"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]}).body
        self.assertEqual(earlier["messages"][1]["tool_calls"][0]["id"], first)

    def test_toolCallIdGiven(self) -> None:
        """
        A client's own tool call ids and C{tool_call_id}s are kept.
        """
        body = chatRequest(
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [
                        {"id": "call_mine", "function": {"name": "f", "arguments": {}}}]},
                    {"role": "tool", "content": "ok", "tool_call_id": "call_mine"},
                ]
            }
        ).body
        self.assertEqual(body["messages"][0]["tool_calls"][0]["id"], "call_mine")
        self.assertEqual(body["messages"][0]["tool_calls"][0]["function"]["arguments"], "{}")
        self.assertEqual(body["messages"][1]["tool_call_id"], "call_mine")

    def test_thinkingInHistory(self) -> None:
        """
        An assistant message's C{thinking} goes back as C{reasoning_content}.
        """
        body = chatRequest(
            {"messages": [{"role": "assistant", "content": "4", "thinking": "2+2"}]}
        ).body
        self.assertEqual(
            body["messages"][0], {"role": "assistant", "content": "4", "reasoning_content": "2+2"}
        )

    def test_badInput(self) -> None:
        """
        Fields of the wrong type are the client's errors, with a message naming the field.
        """
        cases = [
            ({"messages": "hi"}, "messages must be an array"),
            ({"messages": ["hi"]}, "messages[0] must be an object"),
            ({"messages": [{"content": "x"}]}, "messages[0].role must be a string"),
            ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be"),
            ({"messages": [{"role": "assistant", "tool_calls": [{"function": "f"}]}]},
             "messages[0].tool_calls[0]"),
            ({"tools": [{"name": "f"}]}, "tools[0]"),
            ({"options": {"top_k": "many"}}, 'option "top_k" must be of type integer'),
        ]
        for body, message in cases:
            error = self.assertRaises(OllamaRequestError, chatRequest, body)
            self.assertIn(message, str(error))


class GenerateRequestTests(SynchronousTestCase):
    """
    L{generateRequest} builds a TabbyAPI chat request for templated prompts and a
    C{/v1/completions} request for raw text and fill-in-the-middle.
    """

    def test_prompt(self) -> None:
        """
        By default the prompt is one user message to the chat endpoint, with options,
        streaming and usage, and the profile's system prompt belongs in front.
        """
        request = generateRequest(
            {"model": "q", "prompt": "Once", "options": {"num_predict": 5}, "format": "json"}
        )
        self.assertEqual(request.path, CHAT_PATH)
        self.assertTrue(request.profileSystem)
        self.assertEqual(
            request.body,
            {
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 5,
                "response_format": {"type": "json"},
                "messages": [{"role": "user", "content": "Once"}],
            },
        )

    def test_system(self) -> None:
        """
        C{system} becomes a system message before the prompt.
        """
        body = generateRequest({"prompt": "Hi", "system": "Be brief."}).body
        self.assertEqual(
            body["messages"],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        )

    def test_raw(self) -> None:
        """
        C{raw} sends the prompt as it is to C{/v1/completions}: no system text, no profile
        system prompt.
        """
        request = generateRequest({"prompt": "<s>[INST]Hi", "system": "Be brief.", "raw": True})
        self.assertEqual(request.path, COMPLETIONS_PATH)
        self.assertFalse(request.profileSystem)
        self.assertEqual(
            request.body,
            {"stream": True, "stream_options": {"include_usage": True}, "prompt": "<s>[INST]Hi"},
        )

    def test_suffixAndTemplate(self) -> None:
        """
        C{suffix} and C{template} are checked and not sent (the route refuses a C{suffix}).
        """
        request = generateRequest({"prompt": "def f(", "suffix": "", "template": "{{ .Prompt }}"})
        self.assertEqual(request.path, CHAT_PATH)
        self.assertNotIn("suffix", request.body)
        self.assertNotIn("template", request.body)
        for name in ("suffix", "template"):
            self.assertRaises(OllamaRequestError, generateRequest, {"prompt": "x", name: 1})

    def test_images(self) -> None:
        """
        With images the request goes to the chat endpoint, as a system and a user message.
        """
        request = generateRequest({"prompt": "What?", "system": "Terse.", "images": [PNG]})
        self.assertEqual(request.path, CHAT_PATH)
        self.assertEqual(
            request.body["messages"],
            [
                {"role": "system", "content": "Terse."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ]},
            ],
        )
        self.assertNotIn("prompt", request.body)

    def test_badInput(self) -> None:
        """
        Wrong types for known fields are the client's errors.
        """
        body: dict[str, Any]
        for body in ({"prompt": 3}, {"system": []}, {"raw": "yes"}, {"images": "abc"},
                     {"think": 1}):
            self.assertRaises(OllamaRequestError, generateRequest, body)

    def test_emptyRequests(self) -> None:
        """
        No prompt, or no messages, is a request to load the model.
        """
        self.assertTrue(isEmptyRequest("generate", {"model": "x", "prompt": ""}))
        self.assertTrue(isEmptyRequest("chat", {"model": "x"}))
        self.assertFalse(isEmptyRequest("chat", {"messages": [{"role": "user"}]}))
        self.assertFalse(isEmptyRequest("generate", {"prompt": "hi"}))


class StreamTranslatorTests(SynchronousTestCase):
    """
    L{StreamTranslator} turns TabbyAPI's chunks into Ollama's NDJSON lines.
    """

    def test_headChat(self) -> None:
        """
        A HEAD chat stream gives one line per piece of text and a final line with nanosecond
        metrics from TabbyAPI's usage.
        """
        translate, clock = translator()
        lines = feedAll(translate, clock, HEAD_CHAT)
        self.assertEqual(
            lines,
            [
                {"model": "qwen:latest", "created_at": "2023-08-04T19:22:42.25Z",
                 "message": {"role": "assistant", "content": "Hel"}, "done": False},
                {"model": "qwen:latest", "created_at": "2023-08-04T19:22:42.5Z",
                 "message": {"role": "assistant", "content": "lo"}, "done": False},
            ],
        )
        clock.advance(0.25)
        self.assertEqual(
            translate.finish(),
            {
                "model": "qwen:latest",
                "created_at": "2023-08-04T19:22:43.000000000Z",
                "message": {"role": "assistant", "content": ""},
                "done_reason": "stop",
                "done": True,
                "total_duration": 3_000_000_000,
                "load_duration": 2_000_000_000,
                "prompt_eval_count": 26,
                "prompt_eval_duration": 125_000_000,
                "eval_count": 2,
                "eval_duration": 500_000_000,
            },
        )

    def test_oldChat(self) -> None:
        """
        A 2025-02 chat stream (roles in deltas, null tool calls, a usage chunk without choices)
        gives the same lines; without times in the usage, durations come from the clock.
        """
        translate, clock = translator(loadDuration=0.0)
        lines = feedAll(translate, clock, OLD_CHAT)
        self.assertEqual(
            [line["message"] for line in lines],
            [{"role": "assistant", "content": "Hel"}, {"role": "assistant", "content": "lo"}],
        )
        final = translate.finish()
        self.assertEqual(final["done_reason"], "length")
        self.assertEqual(final["prompt_eval_count"], 26)
        self.assertEqual(final["eval_count"], 2)
        self.assertEqual(final["total_duration"], 1_000_000_000)
        self.assertEqual(final["load_duration"], 0)
        # the first text came 0.25 s after the request, the last line 0.75 s after that
        self.assertEqual(final["prompt_eval_duration"], 250_000_000)
        self.assertEqual(final["eval_duration"], 750_000_000)

    def test_headCompletions(self) -> None:
        """
        A HEAD completions stream (C{model_name}, C{text}) gives generate's lines and an empty
        final C{response}.
        """
        translate, clock = translator("generate")
        lines = feedAll(translate, clock, HEAD_COMPLETIONS)
        self.assertEqual(
            lines,
            [
                {"model": "qwen:latest", "created_at": "2023-08-04T19:22:42.25Z",
                 "response": "Once", "done": False},
                {"model": "qwen:latest", "created_at": "2023-08-04T19:22:42.5Z",
                 "response": " upon", "done": False},
            ],
        )
        final = translate.finish()
        self.assertEqual(
            final,
            {
                "model": "qwen:latest",
                "created_at": "2023-08-04T19:22:42.75Z",
                "response": "",
                "done": True,
                "done_reason": "length",
                "total_duration": 2_750_000_000,
                "load_duration": 2_000_000_000,
                "prompt_eval_count": 4,
                "prompt_eval_duration": 250_000_000,
                "eval_count": 2,
                "eval_duration": 750_000_000,
            },
        )

    def test_oldCompletions(self) -> None:
        """
        A 2025-02 completions stream, with usage in every chunk, counts from the last usage.
        """
        translate, clock = translator("generate")
        lines = feedAll(translate, clock, OLD_COMPLETIONS)
        self.assertEqual([line["response"] for line in lines], ["Once", " upon"])
        final = translate.finish()
        self.assertEqual((final["eval_count"], final["prompt_eval_count"]), (2, 4))
        self.assertEqual(final["done_reason"], "stop")

    def test_reasoning(self) -> None:
        """
        C{reasoning_content} arrives as C{thinking}; without usage, lines are counted.
        """
        translate, clock = translator()
        lines = feedAll(translate, clock, HEAD_REASONING)
        self.assertEqual(
            [line["message"] for line in lines],
            [
                {"role": "assistant", "content": "", "thinking": "Think"},
                {"role": "assistant", "content": "", "thinking": "ing."},
                {"role": "assistant", "content": "Hi"},
            ],
        )
        self.assertEqual(translate.finish()["eval_count"], 3)
        whole = translate.aggregate()
        self.assertEqual(
            whole["message"], {"role": "assistant", "content": "Hi", "thinking": "Thinking."}
        )

    def test_reasoningGenerate(self) -> None:
        """
        On generate, reasoning is a top-level C{thinking}.
        """
        translate, clock = translator("generate")
        lines = feedAll(translate, clock, HEAD_REASONING)
        self.assertEqual(lines[0]["thinking"], "Think")
        self.assertEqual(lines[0]["response"], "")
        whole = translate.aggregate()
        self.assertEqual((whole["response"], whole["thinking"]), ("Hi", "Thinking."))

    def test_toolCalls(self) -> None:
        """
        Tool calls come in a non-final line with object arguments, indices and made-up ids;
        the final line says C{stop}.
        """
        translate, clock = translator()
        lines = feedAll(translate, clock, HEAD_TOOLS)
        ids = [call.pop("id") for call in lines[0]["message"]["tool_calls"]]
        self.assertEqual(len(set(ids)), 2)
        self.assertEqual(
            lines,
            [
                {
                    "model": "qwen:latest",
                    "created_at": "2023-08-04T19:22:42.25Z",
                    "message": {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {"function": {"index": 0, "name": "get_weather",
                                          "arguments": {"city": "Tokyo"}}},
                            {"function": {"index": 1, "name": "get_time",
                                          "arguments": {"zone": "JST"}}},
                        ],
                    },
                    "done": False,
                }
            ],
        )
        final = translate.finish()
        self.assertEqual(final["done_reason"], "stop")
        self.assertEqual(final["message"], {"role": "assistant", "content": ""})
        aggregated = translate.aggregate()["message"]["tool_calls"]
        self.assertEqual([call.pop("id") for call in aggregated], ids)
        self.assertEqual(aggregated, lines[0]["message"]["tool_calls"])

    def test_fragmentedToolCall(self) -> None:
        """
        A tool call streamed in OpenAI-style fragments is written once, when complete.
        """
        translate, clock = translator()

        def fragment(call: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            return {"choices": [{"index": 0, "delta": {"tool_calls": [call]},
                                 "finish_reason": reason}]}

        first = translate.feed(fragment({"index": 0, "id": "x", "function": {
            "name": "f", "arguments": ""}}))
        second = translate.feed(fragment({"index": 0, "function": {"arguments": '{"a": '}}))
        third = translate.feed(fragment({"index": 0, "function": {"arguments": "1}"}}))
        self.assertEqual((first, second), ([], []))
        self.assertEqual(third[0]["message"]["tool_calls"][0]["function"]["arguments"], {"a": 1})
        self.assertEqual(translate.feed({"choices": [{"index": 0, "delta": {},
                                                      "finish_reason": "tool_calls"}]}), [])

    def test_emptyDeltas(self) -> None:
        """
        Chunks without text give no line at all.
        """
        translate, clock = translator()
        chunk: dict[str, Any]
        for chunk in (
            {"choices": [{"index": 0, "delta": {}}]},
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"index": 0, "delta": {"content": None, "tool_calls": None}}]},
            {"choices": []},
            {"choices": [{"index": 0, "text": ""}]},
        ):
            self.assertEqual(translate.feed(chunk), [])

    def test_upstreamError(self) -> None:
        """
        TabbyAPI's mid-stream error event gives no line: the decoder keeps its message for the
        route's last line, and nothing after it is translated.
        """
        translate, clock = translator()
        self.assertEqual(translate.feed({"error": {"message": "Chat completion aborted.", "trace": None}}), [])
        self.assertEqual(translate.feed({"choices": [{"index": 0, "delta": {"content": "late"}}]}), [])
        error = translate.decoder.error
        assert error is not None
        self.assertEqual(errorLine(error), {"error": "Chat completion aborted."})

    def test_aggregate(self) -> None:
        """
        For C{stream: false}, one object holds the whole text and the metrics.
        """
        translate, clock = translator()
        feedAll(translate, clock, HEAD_CHAT)
        whole = translate.aggregate()
        self.assertEqual(whole["message"], {"role": "assistant", "content": "Hello"})
        self.assertEqual(whole["done"], True)
        self.assertEqual(whole["eval_duration"], 500_000_000)
        translate, clock = translator("generate")
        feedAll(translate, clock, HEAD_COMPLETIONS)
        self.assertEqual(translate.aggregate()["response"], "Once upon")

    def test_noOutput(self) -> None:
        """
        A stream that ends with nothing still gives a well-formed final line.
        """
        translate, clock = translator()
        final = translate.finish()
        self.assertEqual(final["done_reason"], "stop")
        self.assertEqual(final["eval_count"], 0)
        self.assertEqual(final["eval_duration"], 0)

    @given(
        st.text(),
        st.lists(st.integers(min_value=0, max_value=200), max_size=20),
        st.sampled_from(["head-chat", "old-chat", "head-generate", "old-generate"]),
    )
    def test_anySplit(self, text: str, cuts: list[int], shape: str) -> None:
        """
        However the text is cut into chunks, the lines' text joins back into it.
        """
        bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cuts)})
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        what = "chat" if shape.endswith("chat") else "generate"
        translate, clock = translator(what)
        lines = []
        chunk: dict[str, Any]
        for piece in pieces:
            if shape == "head-chat":
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            elif shape == "old-chat":
                chunk = {"choices": [{"index": 0, "finish_reason": None, "delta": {
                    "role": "assistant", "content": piece, "tool_calls": None}}], "usage": None}
            elif shape == "head-generate":
                chunk = {"choices": [{"index": 0, "text": piece}], "model_name": "m"}
            else:
                chunk = {"choices": [{"index": 0, "text": piece}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
            lines.extend(translate.feed(chunk))
        key = "message" if what == "chat" else "response"
        joined = "".join(
            line["message"]["content"] if what == "chat" else line["response"] for line in lines
        )
        self.assertEqual(joined, text)
        self.assertTrue(all(line["done"] is False and key in line for line in lines))
        whole = translate.aggregate()
        self.assertEqual(whole["message"]["content"] if what == "chat" else whole["response"],
                         text)


class NDJSONTemplateTests(SynchronousTestCase):
    @given(
        st.text(),
        st.lists(st.tuples(st.sampled_from(["text", "reasoning"]), st.text()), max_size=8),
        st.sampled_from(["chat", "generate"]),
        st.booleans(),
    )
    def test_sameAsJSONDumps(self, model: str, deltas: list[tuple[str, str]], what: str, toolCall: bool) -> None:
        """
        L{StreamTranslator.feedNDJSON} writes exactly the compact C{json.dumps} of each of
        L{StreamTranslator.feed}'s objects and a newline, whatever the model name and the text
        (quotes, backslashes, control characters, non-ASCII, lone surrogates), for text,
        reasoning and tool-call lines, and counts the lines the same way.
        """
        events: list[Event] = [TextDelta(text) if kind == "text" else ReasoningDelta(text) for kind, text in deltas]
        if toolCall:
            events += [ToolCallStart(0, "c0", "look\u00e9\""), ToolCallArguments(0, '{"q": "\\n\u2028"}')]
        made = [StreamTranslator(what=cast(Any, what), modelName=model, clock=lambda: STARTED + 1.5, startedAt=STARTED,
                                 callIds=lambda: "call_0")
                for _ in range(2)]
        expected = b"".join(json.dumps(line, separators=(",", ":")).encode("utf-8") + b"\n"
                            for line in made[0].feed(events))
        self.assertEqual(made[1].feedNDJSON(events), expected)
        self.assertEqual(made[1].finish(), made[0].finish())


    """
    The C{/api/embed} and C{/api/embeddings} translation.
    """

    def test_inputs(self) -> None:
        """
        C{input} is one string or a list of strings; empty or absent means only load.
        """
        self.assertEqual(embedInputs({"input": "a"}), ["a"])
        self.assertEqual(embedInputs({"input": ["a", ""]}), ["a", ""])
        empty: list[dict[str, Any]] = [{}, {"input": ""}, {"input": []}, {"input": None}]
        for body in empty:
            self.assertEqual(embedInputs(body), [])
        for bad in (3, [1], {"text": "a"}, ["a", None]):
            self.assertRaises(OllamaRequestError, embedInputs, {"input": bad})
        self.assertEqual(embeddingsPrompt({"prompt": "a"}), ["a"])
        self.assertEqual(embeddingsPrompt({}), [])
        self.assertRaises(OllamaRequestError, embeddingsPrompt, {"prompt": ["a"]})

    def test_dimensions(self) -> None:
        """
        C{dimensions} is a positive integer, or absent (0 counts as absent).
        """
        self.assertEqual(embedDimensions({"dimensions": 256}), 256)
        self.assertIsNone(embedDimensions({}))
        self.assertIsNone(embedDimensions({"dimensions": 0}))
        for bad in (-1, 1.5, "8", True):
            self.assertRaises(OllamaRequestError, embedDimensions, {"dimensions": bad})

    def test_upstreamAnswer(self) -> None:
        """
        TabbyAPI's vectors come back in input order by their C{index}, with the prompt token
        count; an answer with the wrong number of vectors, or not vectors, is an upstream error.
        """
        document = {"data": [{"index": 1, "embedding": [2, 0.5]}, {"index": 0, "embedding": [1.0]}],
                    "usage": {"prompt_tokens": 4}}
        self.assertEqual(upstreamEmbeddings(document, 2), ([[1.0], [2.0, 0.5]], 4))
        self.assertEqual(upstreamEmbeddings({"data": [{"embedding": []}]}, 1), ([[]], 0))
        answers: list[tuple[object, int]] = [
            ({"data": []}, 1), ({"data": [{"embedding": "AAAA"}]}, 1), ([], 1), ({"detail": "x"}, 1),
            ({"data": [{"index": 0, "embedding": [1]}, {"index": 0, "embedding": [2]}]}, 2),
        ]
        for bad, count in answers:
            self.assertRaises(UpstreamError, upstreamEmbeddings, bad, count)

    def test_replies(self) -> None:
        """
        /api/embed answers normalized vectors (cut to C{dimensions} first) with nanosecond
        durations; /api/embeddings answers the one vector as it is.
        """
        self.assertEqual(
            embedReply("bge:latest", [[3.0, 4.0, 12.0]], 0.5, 0.25, 3, dimensions=2),
            {"model": "bge:latest", "embeddings": [[0.6, 0.8]], "total_duration": 500_000_000,
             "load_duration": 250_000_000, "prompt_eval_count": 3},
        )
        self.assertEqual(embeddingsReply([[3.0, 4.0]]), {"embedding": [3.0, 4.0]})
        self.assertEqual(embeddingsReply([]), {"embedding": []})
        self.assertEqual(normalized([0.0, 0.0]), [0.0, 0.0])

    @given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=64))
    def test_normalizedLength(self, vector: list[float]) -> None:
        """
        A normalized vector has length 1, however small or large its values, unless it was all
        zeros; no value changes sign.
        """
        result = normalized(vector)
        self.assertEqual(len(result), len(vector))
        if any(vector):
            self.assertAlmostEqual(math.sqrt(math.fsum(value * value for value in result)), 1.0, places=9)
            for original, scaled in zip(vector, result):
                self.assertGreaterEqual(original * scaled, 0.0)
        else:
            self.assertEqual(result, vector)


class LogprobsTests(SynchronousTestCase):
    """
    C{logprobs} and C{top_logprobs} both ways (issue 11, item 8).
    """

    def test_request(self) -> None:
        """
        Chat and templated generate ask TabbyAPI for C{logprobs} and C{top_logprobs}; raw
        generate (completions) for one number, at least 1; nothing without C{logprobs}; a
        C{top_logprobs} outside 0-20 is Ollama's error.
        """
        user = [{"role": "user", "content": "x"}]
        body = chatRequest({"messages": user, "logprobs": True, "top_logprobs": 3}).body
        self.assertEqual((body["logprobs"], body["top_logprobs"]), (True, 3))
        body = generateRequest({"prompt": "x", "logprobs": True}).body
        self.assertEqual((body["logprobs"], body["top_logprobs"]), (True, 0))
        self.assertEqual(generateRequest({"prompt": "x", "raw": True, "logprobs": True}).body["logprobs"], 1)
        self.assertEqual(generateRequest({"prompt": "x", "raw": True, "logprobs": True, "top_logprobs": 5}).body["logprobs"], 5)
        self.assertNotIn("logprobs", chatRequest({"messages": user, "top_logprobs": 2}).body)
        for bad in (-1, 21, 2.5, True, "3"):
            with self.assertRaises(OllamaRequestError) as caught:
                chatRequest({"messages": user, "logprobs": True, "top_logprobs": bad})
            self.assertEqual(str(caught.exception), "top_logprobs must be between 0 and 20")

    def test_chatAnswer(self) -> None:
        """
        TabbyAPI's chat logprobs come back on the line of their text as Ollama's entries
        (token, logprob, UTF-8 bytes, top_logprobs cut to what was asked), and all of them in
        the C{stream: false} answer; the ollama package's own types accept both.
        """
        translate, clock = translator()
        translate.translator.topLogprobs = 1
        top = [{"token": "H\u00e9", "logprob": -0.1}, {"token": "Yo", "logprob": -2.5}]
        lines = translate.feed({"choices": [{"index": 0, "delta": {"content": "H\u00e9"}, "logprobs": {
            "content": [{"token": "H\u00e9", "logprob": -0.1, "top_logprobs": top}]}}]})
        lines += translate.feed({"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop",
                                              "logprobs": {"content": [{"token": "!", "logprob": -1}]}}]})
        first = {"token": "H\u00e9", "logprob": -0.1, "bytes": [72, 195, 169],
                 "top_logprobs": [{"token": "H\u00e9", "logprob": -0.1, "bytes": [72, 195, 169]}]}
        second = {"token": "!", "logprob": -1.0, "bytes": [33]}
        self.assertEqual([line["logprobs"] for line in lines], [[first], [second]])
        whole = translate.aggregate()
        self.assertEqual(whole["logprobs"], [first, second])
        for line in [*lines, whole]:
            ollama.ChatResponse.model_validate(line, strict=True)
        self.assertNotIn("logprobs", translate.finish())

    def test_completionsAnswer(self) -> None:
        """
        Completions' parallel lists (raw generate) become the same entries; without
        C{top_logprobs} asked, entries have none.
        """
        translate, clock = translator("generate")
        [line] = translate.feed({"choices": [{"index": 0, "text": "Once", "logprobs": {
            "tokens": ["Once"], "token_logprobs": [-0.5], "top_logprobs": [{"Once": -0.5, "Twice": -3.0}],
            "text_offset": [0]}}]})
        self.assertEqual(line["logprobs"], [{"token": "Once", "logprob": -0.5, "bytes": [79, 110, 99, 101]}])
        ollama.GenerateResponse.model_validate(line, strict=True)
        self.assertEqual(ChatStreamDecoder().decode({"choices": [{"index": 0, "text": "x", "logprobs": {
            "tokens": ["x"], "token_logprobs": [-1], "top_logprobs": [{"x": -1, "y": -2}]}}]})[1],
            TokenLogprobs((("x", -1.0, (("x", -1.0), ("y", -2.0))),)))

    def test_ndjsonSameAsObjects(self) -> None:
        """
        A line with logprobs is written exactly as its object, on the template path too.
        """
        made = [translator()[0].translator for _ in range(2)]
        events = ChatStreamDecoder().decode({"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {
            "content": [{"token": "a", "logprob": -0.25}]}}]})
        expected = b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in made[0].feed(events))
        self.assertEqual(made[1].feedNDJSON(events), expected)


class EmptyRequestReplyTests(SynchronousTestCase):
    """
    L{loadReply} and L{unloadReply} answer requests without a prompt.
    """

    def test_chat(self) -> None:
        """
        Chat's replies carry an empty assistant message.
        """
        clock = Clock()
        clock.advance(STARTED)
        self.assertEqual(
            loadReply("chat", "qwen", clock.seconds),
            {"model": "qwen", "created_at": "2023-08-04T19:22:40.000000000Z",
             "message": {"role": "assistant", "content": ""}, "done_reason": "load",
             "done": True},
        )
        self.assertEqual(unloadReply("chat", "qwen", clock.seconds)["done_reason"], "unload")

    def test_generate(self) -> None:
        """
        Generate's replies carry an empty response.
        """
        clock = Clock()
        self.assertEqual(
            unloadReply("generate", "qwen:latest", clock.seconds),
            {"model": "qwen:latest", "created_at": "1970-01-01T00:00:00.000000000Z", "response": "",
             "done": True, "done_reason": "unload"},
        )


class TruncationTests(SynchronousTestCase):
    """
    What the routes use to cut a conversation too long for the context as Ollama does
    (issue 11, item 7).
    """

    CHAT = [
        {"role": "system", "content": "s1"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "system", "content": "s2"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "u3"},
    ]

    def test_truncateFlag(self) -> None:
        """
        C{truncate} is on unless the body says false, on chat and generate, raw or not; it must
        be a boolean.
        """
        user = [{"role": "user", "content": "x"}]
        self.assertTrue(chatRequest({"messages": user}).truncate)
        self.assertTrue(chatRequest({"messages": user, "truncate": None}).truncate)
        self.assertFalse(chatRequest({"messages": user, "truncate": False}).truncate)
        self.assertFalse(generateRequest({"prompt": "x", "truncate": False}).truncate)
        self.assertFalse(generateRequest({"prompt": "x", "raw": True, "truncate": False}).truncate)
        with self.assertRaises(OllamaRequestError) as raised:
            chatRequest({"messages": user, "truncate": 0})
        self.assertEqual(str(raised.exception), "truncate must be a boolean, not a number")

    def test_contextExcess(self) -> None:
        """
        Both of TabbyAPI's refusals say by how many tokens the prompt must shrink; other
        messages are not refusals of the context.
        """
        self.assertEqual(contextExcess("Prompt length 9000 exceeds the available context size of 8192 tokens"), 808)
        self.assertEqual(contextExcess("Initial job allocation requires 8448 cache tokens, which exceeds the "
                                       "available context size of 8192 tokens"), 256)
        self.assertIsNone(contextExcess("Chat completions are disabled because a prompt template is not set."))
        self.assertIsNone(contextExcess("x. The request exceeds the available context size."))

    def test_keptMessages(self) -> None:
        """
        Ollama's rule: the system messages before the cut, then everything from it; a cut just
        after a system message keeps the same messages as one before it.
        """
        contents = [[message["content"] for message in keptMessages(self.CHAT, start)] for start in range(7)]
        self.assertEqual(contents, [
            ["s1", "u1", "a1", "s2", "u2", "a2", "u3"],
            ["s1", "u1", "a1", "s2", "u2", "a2", "u3"],
            ["s1", "a1", "s2", "u2", "a2", "u3"],
            ["s1", "s2", "u2", "a2", "u3"],
            ["s1", "s2", "u2", "a2", "u3"],
            ["s1", "s2", "a2", "u3"],
            ["s1", "s2", "u3"],
        ])
        self.assertTrue(canDrop(self.CHAT))
        self.assertFalse(canDrop([{"role": "system", "content": "s"}, {"role": "user", "content": "long"}]))
        self.assertFalse(canDrop([{"role": "user", "content": "long"}]))

    def count(self, calls: list[int]) -> Any:
        async def count(messages: Any) -> int:
            calls.append(len(messages))
            return sum(10 if message["role"] == "system" else 100 for message in messages)
        return count

    def fittingStart(self, limit: int, messages: Any = None) -> tuple[int | None, list[int]]:
        calls: list[int] = []
        start = self.successResultOf(Deferred.fromCoroutine(
            fittingStart(self.CHAT if messages is None else messages, limit, self.count(calls))))
        return start, calls

    def test_fittingStart(self) -> None:
        """
        The first start whose messages fit, as Ollama's linear search finds it, with a count per
        halving; C{None} when even the system messages and the latest do not fit.
        """
        # The whole is 520 tokens; each start as Ollama's loop sees it.
        totals = [520, 520, 420, 320, 320, 220, 120]
        for limit in (519, 420, 419, 320, 250, 220, 120):
            expected = next(start for start in range(1, 7) if totals[start] <= limit)
            start, calls = self.fittingStart(limit)
            self.assertEqual(start, expected, limit)
            self.assertLessEqual(len(calls), 4)
        self.assertEqual(self.fittingStart(119)[0], None)
        self.assertEqual(self.fittingStart(1000, self.CHAT[:1])[0], None)

    def test_encodeRequest(self) -> None:
        """
        The encode body counts the messages as the chat request templates them: its
        template_vars, with its tools among them.
        """
        body = chatRequest({"messages": self.CHAT, "think": True, "tools": [
            {"type": "function", "function": {"name": "f"}}]}).body
        self.assertEqual(encodeRequest(body, self.CHAT[-1:]), {
            "text": self.CHAT[-1:],
            "template_vars": {"enable_thinking": True, "tools": [{"type": "function", "function": {"name": "f"}}]}})
        self.assertEqual(encodeRequest({"messages": self.CHAT}, self.CHAT), {"text": self.CHAT})
        self.assertEqual(encodedLength({"tokens": [1, 2], "length": 2}), 2)
        self.assertEqual(encodedLength({"tokens": [1, 2, 3]}), 3)
        self.assertRaises(UpstreamError, encodedLength, {"detail": "x"})
        self.assertIn("TabbyAPI: Prompt length 9", promptTooLong("Prompt length 9"))
        self.assertTrue(promptTooLong("x").startswith(PROMPT_TOO_LONG))
