"""
The byte-level rewriting of TabbyAPI's answers for OpenAI clients, checked against the same
change made on decoded JSON.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.openaiwire import AnswerRewriter, memberBytes, renamed

# Text that looks like the bytes the rewriter looks for, to tempt it.
_TRICKY = st.sampled_from(['"model":"Folder"', '\\"model\\":', '"model_name":', "\\", '"', "\u00e9", "\r\n", "data: {"])
_TEXT = st.lists(st.one_of(st.text(st.characters(exclude_categories=["Cs"]), max_size=6), _TRICKY), max_size=5).map("".join)


@st.composite
def _streams(draw: Any) -> tuple[list[dict[str, Any]], str, bool, int]:
    """
    A TabbyAPI stream (its chunks decoded), the model asked for, chat or completions, and C{n}.
    """
    chat = draw(st.booleans())
    count = draw(st.integers(min_value=1, max_value=3))
    folder = draw(_TEXT)
    key = "model" if chat or draw(st.booleans()) else "model_name"
    chunks = []
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        index = draw(st.integers(min_value=0, max_value=count - 1))
        text = draw(_TEXT)
        if chat:
            delta: dict[str, Any] = draw(st.sampled_from([{"content": text}, {"reasoning_content": text}, {}]))
            if draw(st.integers(min_value=0, max_value=5)) == 0:
                delta = {"role": "assistant", **delta}
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": None}
        chunks.append({"id": "chatcmpl-1", "object": "chunk", "created": 1, "choices": [choice], key: folder})
    if draw(st.booleans()):
        chunks.append({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 1}, key: folder})
    if draw(st.booleans()):
        chunks.append({"error": {"message": draw(_TEXT), "trace": None}})
    return chunks, draw(_TEXT), chat, count


def _expected(chunks: list[dict[str, Any]], model: str, chat: bool, count: int) -> list[dict[str, Any]]:
    """
    The chunks as the client should get them, changed at the JSON level.
    """
    pending = set(range(count)) if chat else set()
    result = []
    for chunk in copy.deepcopy(chunks):
        if "error" not in chunk:
            renamed(chunk, model)
        for choice in chunk.get("choices", []):
            if choice["index"] in pending:
                pending.discard(choice["index"])
                if "role" not in choice["delta"]:
                    choice["delta"] = {"role": "assistant", **choice["delta"]}
        result.append(chunk)
    return result


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    return [*pieces, data[start:]]


class AnswerRewriterTests(SynchronousTestCase):
    @given(_streams(), st.booleans(), st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
    def test_streamMatchesTheJSONLevelChange(
        self, stream: tuple[list[dict[str, Any]], str, bool, int], asciiOnly: bool, cuts: list[int]
    ) -> None:
        """
        However TabbyAPI encodes its chunks and however the reads cut them, the rewritten stream
        decodes to the chunks changed at the JSON level: every chunk names the model asked for
        (C{model_name} becomes C{model}), and the first delta of each choice has a role.
        """
        chunks, model, chat, count = stream
        separators = (",", ":") if asciiOnly else (", ", ": ")
        raw = b"".join(
            b"data: " + json.dumps(chunk, ensure_ascii=asciiOnly, separators=separators).encode("utf-8")
            + b"\r\n\r\n" for chunk in chunks
        ) + b": ping\r\n\r\ndata: [DONE]\r\n\r\n"
        body: dict[str, Any] = {"stream": True, "n": count}
        rewriter = AnswerRewriter.forRequest(model, body, chat)
        written = b"".join(rewriter.feed(piece) for piece in _cut(raw, cuts)) + rewriter.end()
        # Split by bytes: str.splitlines would also split at the separators Unicode adds.
        payloads = [line[len(b"data: "):] for line in written.split(b"\r\n") if line.startswith(b"data: ")]
        self.assertEqual(payloads[-1], b"[DONE]")
        decoded = [json.loads(payload) for payload in payloads[:-1]]
        self.assertEqual(decoded, _expected(chunks, model, chat, count))
        self.assertIn(b": ping\r\n\r\n", written)

    def test_laterChunksAreNotDecoded(self) -> None:
        """
        Once every choice has its role, a chunk's bytes are only replaced, never re-encoded:
        TabbyAPI's own spacing and escapes stay as they were.
        """
        rewriter = AnswerRewriter.forRequest("mine", {"stream": True}, chat=True)
        first = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"model":"Folder"}\r\n\r\n'
        later = b'data: {"choices": [{"index": 0, "delta": {"content": "\\u00e9"}}], "model":"Folder"}\r\n\r\n'
        self.assertIn(b'"role":"assistant"', rewriter.feed(first))
        self.assertEqual(rewriter.feed(later), later.replace(b'"model":"Folder"', b'"model":"mine"'))

    def test_replyIsOneDocument(self) -> None:
        """
        A non-streamed reply is held until complete and gets the model asked for; its message
        already has its role.
        """
        rewriter = AnswerRewriter.forRequest("qwen", {}, chat=True)
        reply = b'{"id":"cmpl-1","choices":[{"message":{"role":"assistant","content":"\\"model\\":\\"x\\""}}],"model":"Qwen-exl3"}'
        self.assertEqual(rewriter.feed(reply[:30]) + rewriter.feed(reply[30:]), b"")
        self.assertEqual(json.loads(rewriter.end()), {**json.loads(reply), "model": "qwen"})

    def test_memberBytes(self) -> None:
        """
        The member is found with its string value exactly as written, escapes included.
        """
        self.assertEqual(memberBytes(b'{"a":1,"model": "x\\\\\\"y","b":2}', b'"model":'), b'"model": "x\\\\\\"y"')
        self.assertIsNone(memberBytes(b'{"model":null}', b'"model":'))
        self.assertIsNone(memberBytes(b'{"model":"cut', b'"model":'))
