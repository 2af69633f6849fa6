"""
OpenAI's wire format where TabbyAPI's differs from it, fixed on the way through: the OpenAI
routes relay TabbyAPI's bytes, and L{AnswerRewriter} changes only what OpenAI's clients need
changed.  Every reply and stream chunk names the model the client asked for (TabbyAPI names its
model folder, and its completions chunks say C{model_name}), and the first delta of each choice
of a chat stream carries C{"role": "assistant"} (TabbyAPI's never do; openai-node's stream
helper refuses a choice without one).

The relay is the proxy's hot path, so chunks are not decoded: the C{"model":...} member of the
first chunk is found in its bytes, and every later chunk has those same bytes replaced by the
same replacement, computed once per request.  Only the chunks before every choice has had its
role are decoded and encoded again.  This holds because in JSON text the bytes C{"model":} can
only be a key: inside a string every quote is escaped.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import define, field

_MODEL = b'"model":'
_MODEL_NAME = b'"model_name":'
_BACKSLASH = 0x5C

_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


def _stringEnd(raw: bytes, quote: int) -> int:
    """
    Where the JSON string that opens at C{raw[quote]} ends (just past its closing quote), or -1
    when C{raw} ends first.
    """
    at = quote + 1
    while True:
        end = raw.find(b'"', at)
        if end < 0:
            return -1
        escapes = 0
        while raw[end - 1 - escapes] == _BACKSLASH:
            escapes += 1
        if escapes % 2 == 0:
            return end + 1
        at = end + 1


def memberBytes(raw: bytes, key: bytes) -> bytes | None:
    """
    The bytes of the member C{key} (C{b'"model":'}) and its string value in the JSON text C{raw},
    exactly as written there, or C{None} when there is no such member with a string value.
    """
    start = raw.find(key)
    if start < 0:
        return None
    value = start + len(key)
    while raw[value : value + 1] in (b" ", b"\t"):
        value += 1
    if raw[value : value + 1] != b'"':
        return None
    end = _stringEnd(raw, value)
    return raw[start:end] if end > 0 else None


def renamed(chunk: dict[str, Any], model: str) -> None:
    """
    What L{AnswerRewriter} does to a chunk's model, at the JSON level: C{model} becomes C{model},
    or a C{model_name} (TabbyAPI's completions chunks) is replaced by C{model}.
    """
    if "model" in chunk:
        chunk["model"] = model
    elif "model_name" in chunk:
        del chunk["model_name"]
        chunk["model"] = model


@define
class AnswerRewriter:
    """
    Rewrites one TabbyAPI answer for an OpenAI client, as its bytes arrive: L{feed} each read
    and write what it returns, then write what L{end} returns.

    A stream is passed on whole lines at a time (a line cut by a read waits for its end); a
    reply that is one JSON document is held until it is complete.

    @ivar model: the name to give as C{model}: the one the client asked for.
    @ivar streaming: whether the answer is an event stream (else one JSON document).
    @ivar roles: the choice indexes of a chat stream whose first delta is still to come; empty
        for completions, whose choices have no role.
    """

    model: str
    streaming: bool
    roles: set[int] = field(factory=set)
    _partial: bytes = b""
    _needle: bytes | None = None
    _replacement: bytes = b""

    @classmethod
    def forRequest(cls, model: str, body: dict[str, Any], chat: bool) -> AnswerRewriter:
        """
        The rewriter for the answer to a request C{body}: a stream's chat choices (C{n} of them)
        each get a role.
        """
        streaming = body.get("stream") is True
        count = body.get("n")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 128:
            count = 1
        roles = set(range(count)) if streaming and chat else set()
        return cls(model=model, streaming=streaming, roles=roles)

    def feed(self, data: bytes) -> bytes:
        """
        @return: the bytes to pass on now.
        """
        if self._partial:
            data = self._partial + data
            self._partial = b""
        if not self.streaming:
            self._partial = data
            return b""
        if not data.endswith(b"\n"):
            cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
            data, self._partial = data[:cut], data[cut:]
        if self._needle is None or self.roles:
            return self._inspect(data)
        return data.replace(self._needle, self._replacement)

    def end(self) -> bytes:
        """
        @return: what is left once the answer is complete.
        """
        data, self._partial = self._partial, b""
        if not self.streaming:
            self._learn(data)
            if self._needle is None:
                return data
            return data.replace(self._needle, self._replacement, 1)
        if self._needle is None or self.roles:
            return self._inspect(data)
        return data.replace(self._needle, self._replacement)

    def _learn(self, raw: bytes) -> None:
        """
        Find the bytes that name TabbyAPI's model in C{raw}, the first chunk (or reply) that has
        them, and what replaces them from now on.
        """
        replacement = _MODEL + _encode(self.model).encode("utf-8")
        needle = memberBytes(raw, _MODEL) or memberBytes(raw, _MODEL_NAME)
        if needle is not None:
            self._needle = needle
            self._replacement = replacement

    def _inspect(self, data: bytes) -> bytes:
        """
        Rewrite the lines of C{data} one by one, while the model's bytes are unknown or a
        choice still lacks its role.
        """
        lines = data.splitlines(keepends=True)
        for position, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            if self._needle is None:
                self._learn(line)
            if self.roles:
                lines[position] = self._withRoles(line)
            elif self._needle is not None:
                lines[position] = line.replace(self._needle, self._replacement)
        return b"".join(lines)

    def _withRoles(self, line: bytes) -> bytes:
        """
        C{line}, a C{data:} line, with a role in the delta of each choice seen for the first
        time, and the model renamed; decoded and encoded again, or as it was when it has no
        such choice.
        """
        payload = line[5:].strip()
        try:
            chunk = _decode(payload.decode("utf-8"))
        except ValueError:
            return line
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return line if self._needle is None else line.replace(self._needle, self._replacement)
        changed = False
        for choice in chunk["choices"]:
            index = choice.get("index") if isinstance(choice, dict) else None
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if index not in self.roles or not isinstance(delta, dict):
                continue
            self.roles.discard(index)
            if "role" not in delta:
                choice["delta"] = {"role": "assistant", **delta}
                changed = True
        if not changed:
            return line if self._needle is None else line.replace(self._needle, self._replacement)
        renamed(chunk, self.model)
        ending = line[len(line.rstrip(b"\r\n")) :]
        return b"data: " + _encode(chunk).encode("utf-8") + ending
