"""
What TabbyAPI says on the wire and how to read it: its server-sent event stream, split into the
payloads of its events; its chat (and completions) stream decoded into typed events that every
translated API encodes in its own shape (L{ChatStreamDecoder}); its error bodies (FastAPI's
C{{"detail": ...}}, validation error lists, OpenAI-style documents), turned into one message for
the client; the line of its last output that says why it failed (L{causeLine}); and the framing
of the events the proxy adds to a stream it relays.

The rest of the proxy never parses TabbyAPI's bytes itself.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence, Union

from attrs import frozen
from twisted.logger import Logger


def sseEvent(document: object) -> bytes:
    """
    One server-sent event carrying C{document}, framed as TabbyAPI frames its own.
    """
    return b"data: " + json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\r\n\r\n"


def upstreamErrorMessage(status: int, raw: bytes) -> str:
    """
    What went wrong, from an error TabbyAPI answered (C{{"detail": ...}} from FastAPI, a list of
    validation errors, or an OpenAI-style body).
    """
    try:
        document = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return f"TabbyAPI answered {status}: {text or 'no details'}"
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        detail = document.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(_validationProblem(problem) for problem in detail)
    return f"TabbyAPI answered {status}: {raw.decode('utf-8', 'replace')}"


# Lines of a Python traceback that say where, not what: its frames and their code (indented), its
# header, and the links between chained exceptions.
_TRACEBACK_LINE = re.compile(r"\s|Traceback \(most recent call last\):|The above exception|During handling of the above")
# The line a traceback ends with: the exception and its message.
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure)(?::|$)")
# TabbyAPI's log lines: a time stamp and a level before the message.
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? ([A-Z]+):\s+")
# The folders of an absolute path.
_FOLDERS = re.compile(r"(?<![\w.~])/(?:[^\s/'\"]+/)+")
_MAX_CAUSE = 400


def causeLine(lines: Sequence[str]) -> str | None:
    """
    Why a TabbyAPI child failed, in one line fit for a client, from the last lines it printed:
    the exception its last traceback ends with or its last ERROR line (with the lines its
    console wrapped onto), whichever came last, else its last line; without the time stamp and
    level, and with the folders of absolute paths left out (C{.../config.json}), as they are the
    server's business.  The whole output stays in the log and in C{/status} for the admin.

    @return: C{None} when the child printed nothing.
    """
    chosen: str | None = None
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index]
        if not line.strip() or _TRACEBACK_LINE.match(line):
            continue
        logged = _LOG_LINE.match(line)
        if logged is None and _EXCEPTION_LINE.match(line):
            chosen = line
            break
        if logged is not None and logged.group(1) in ("ERROR", "CRITICAL"):
            wrapped = []
            for following in lines[index + 1:]:
                if not following.strip() or _LOG_LINE.match(following) or _TRACEBACK_LINE.match(following):
                    break
                wrapped.append(following.strip())
            chosen = " ".join([line[logged.end():].strip(), *wrapped])
            break
        if chosen is None:
            chosen = line[logged.end():] if logged is not None else line
    if chosen is None:
        return None
    cause = _FOLDERS.sub(".../", chosen.strip())
    return cause if len(cause) <= _MAX_CAUSE else cause[: _MAX_CAUSE - 3] + "..."


def _validationProblem(problem: object) -> str:
    if not isinstance(problem, dict):
        return str(problem)
    location = ".".join(str(part) for part in problem.get("loc", []) if part != "body")
    return f"{location}: {problem.get('msg', 'invalid')}" if location else str(problem.get("msg"))


class EventDecoder:
    """
    Splits a server-sent event stream into the payloads of its C{data:} lines, however the bytes
    are cut.  Comment lines (TabbyAPI's C{: ping}) and other fields are skipped; C{\\r\\n},
    C{\\r} and C{\\n} all end a line, as TabbyAPI frames with C{\\r\\n}.
    """

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        """
        @return: the payload of each complete C{data:} line in C{data}, in order.
        """
        if self._partial:
            data = self._partial + data
        if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):
            # A lone CR ends a line too.  (A CRLF cut in two reads as CR then LF: the extra
            # empty line is harmless, as empty lines carry no data.)
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        self._partial = lines.pop()
        payloads = []
        for line in lines:
            if line.startswith(b"data:"):
                # TabbyAPI's lines end with CRLF: the CR is still there.
                end = -1 if line.endswith(b"\r") else len(line)
                payloads.append(line[6 if line.startswith(b"data: ") else 5:end])
        return payloads


# ---------------------------------------------------------------------------------------------
# TabbyAPI's generation stream as typed events


@frozen
class TextDelta:
    """
    The next piece of the answer's text.
    """

    text: str


@frozen
class ReasoningDelta:
    """
    The next piece of the model's reasoning (TabbyAPI's C{reasoning_content}).
    """

    text: str


@frozen
class ToolCallStart:
    """
    A tool call begins; its arguments follow as L{ToolCallArguments} with the same C{index}.

    @ivar index: the call's position among the answer's tool calls.
    @ivar callId: TabbyAPI's id for the call, C{""} when it gave none.
    @ivar name: the function called.
    """

    index: int
    callId: str
    name: str


@frozen
class ToolCallArguments:
    """
    The next piece of a tool call's arguments, JSON text.
    """

    index: int
    text: str


@frozen
class Usage:
    """
    The token counts and times of the generation, each C{None} where TabbyAPI did not say.
    """

    promptTokens: int | None
    completionTokens: int | None
    promptTime: float | None = None
    completionTime: float | None = None


@frozen
class Finish:
    """
    Why the generation stopped: C{reason} is TabbyAPI's C{finish_reason} (C{"stop"},
    C{"length"}, C{"tool_calls"}); C{stopString} the stop string that ended it, when TabbyAPI
    said (its C{eos_reason} is C{stop_string}).
    """

    reason: str
    stopString: str | None = None


@frozen
class StreamError:
    """
    TabbyAPI's error event in the middle of a stream; nothing follows it.
    """

    message: str


@frozen
class TokenLogprobs:
    """
    The log probabilities of a chunk's tokens, when the request asked for them.

    @ivar tokens: each token, its log probability, and the most likely tokens at its place
        with theirs (as many as the request asked for).
    """

    tokens: tuple[tuple[str, float, tuple[tuple[str, float], ...]], ...]


Event = Union[TextDelta, ReasoningDelta, TokenLogprobs, ToolCallStart, ToolCallArguments, Usage, Finish, StreamError]

_decodeJSON = json.JSONDecoder().decode


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _logprob(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _logprobTokens(logprobs: Mapping[str, Any]) -> tuple[tuple[str, float, tuple[tuple[str, float], ...]], ...]:
    """
    A choice's C{logprobs} as L{TokenLogprobs.tokens}: chat's C{content} list of
    C{{token, logprob, top_logprobs: [{token, logprob}]}}, or completions' parallel C{tokens},
    C{token_logprobs} and C{top_logprobs} (one C{{token: logprob}} map per token).
    """
    result = []
    content = logprobs.get("content")
    if isinstance(content, list):
        for item in content:
            if not isinstance(item, dict) or not isinstance(item.get("token"), str):
                continue
            value = _logprob(item.get("logprob"))
            if value is None:
                continue
            top = item.get("top_logprobs")
            alternatives = tuple(
                (alternative["token"], float(alternative["logprob"]))
                for alternative in (top if isinstance(top, list) else [])
                if isinstance(alternative, dict) and isinstance(alternative.get("token"), str)
                and _logprob(alternative.get("logprob")) is not None
            )
            result.append((item["token"], value, alternatives))
        return tuple(result)
    tokens, values, tops = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list):
        return ()
    tops = tops if isinstance(tops, list) else []
    for position, (token, value) in enumerate(zip(tokens, values)):
        number = _logprob(value)
        if not isinstance(token, str) or number is None:
            continue
        top = tops[position] if position < len(tops) and isinstance(tops[position], dict) else {}
        alternatives = tuple((name, float(lp)) for name, lp in top.items() if _logprob(lp) is not None)
        result.append((token, number, alternatives))
    return tuple(result)


class ChatStreamDecoder:
    """
    Decodes what TabbyAPI answers a generation request with into L{Event}s: its event stream
    (L{feed}, however the bytes are cut), or one of its chunks or non-streamed replies already
    parsed (L{decode}).  Both generations' shapes are read, HEAD's and 2025-02's (roles in
    deltas, usage in every chunk or in a chunk without choices), chat and completions alike.

    Within one chunk the events come in the order reasoning, text, log probabilities, tool
    calls, finish, usage.
    A tool call's L{ToolCallStart} comes once, the first time its index is seen.

    @ivar complete: whether the stream's C{[DONE]} arrived.
    @ivar error: the message of TabbyAPI's error event, once one arrived; nothing after it is
        decoded.
    """

    log = Logger()

    def __init__(self) -> None:
        self._events = EventDecoder()
        self._toolCalls: set[int] = set()
        self.complete = False
        self.error: str | None = None

    def feed(self, data: bytes) -> list[Event]:
        """
        @return: the events of every complete SSE event in C{data}, in order.
        """
        events: list[Event] = []
        for payload in self._events.feed(data):
            if self.error is not None:
                break
            if not payload.startswith(b"{") and payload.strip() == b"[DONE]":
                self.complete = True
                continue
            try:
                chunk = _decodeJSON(payload.decode("utf-8"))
            except ValueError:
                self.log.warn("Skipped an event from TabbyAPI that is not JSON: {payload!r}", payload=payload[:200])
                continue
            if isinstance(chunk, dict):
                self._decode(chunk, events)
        return events

    def decode(self, chunk: Mapping[str, Any]) -> list[Event]:
        """
        The events of one parsed chunk or non-streamed reply (its C{message} read as a delta).
        """
        events: list[Event] = []
        if self.error is None:
            self._decode(chunk, events)
        return events

    def _decode(self, chunk: Mapping[str, Any], events: list[Event]) -> None:
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            self.error = str(message or "TabbyAPI reported an error")
            events.append(StreamError(self.error))
            return
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if isinstance(choice, dict):
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice.get("message")
                if not isinstance(delta, dict):
                    delta = {}
            reasoning = delta.get("reasoning_content")
            if reasoning and isinstance(reasoning, str):
                events.append(ReasoningDelta(reasoning))
            text = delta.get("content")
            if not isinstance(text, str):
                text = choice.get("text")
            if text and isinstance(text, str):
                events.append(TextDelta(text))
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                tokens = _logprobTokens(logprobs)
                if tokens:
                    events.append(TokenLogprobs(tokens))
            toolCalls = delta.get("tool_calls")
            if toolCalls and isinstance(toolCalls, list):
                self._decodeToolCalls(toolCalls, events)
            reason = choice.get("finish_reason")
            if reason and isinstance(reason, str):
                stopString = choice.get("stop_str") if choice.get("eos_reason") == "stop_string" else None
                events.append(Finish(reason, stopString if isinstance(stopString, str) else None))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            events.append(
                Usage(
                    promptTokens=_count(usage.get("prompt_tokens")),
                    completionTokens=_count(usage.get("completion_tokens")),
                    promptTime=_seconds(usage.get("prompt_time")),
                    completionTime=_seconds(usage.get("completion_time")),
                )
            )

    def _decodeToolCalls(self, toolCalls: list[Any], events: list[Event]) -> None:
        for fragment in toolCalls:
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index")
            if isinstance(index, bool) or not isinstance(index, int):
                # No index (a non-streamed reply): each call is a new one.
                index = len(self._toolCalls)
            function = fragment.get("function")
            if not isinstance(function, dict):
                function = {}
            if index not in self._toolCalls:
                self._toolCalls.add(index)
                callId = fragment.get("id")
                name = function.get("name")
                events.append(
                    ToolCallStart(
                        index,
                        callId if isinstance(callId, str) else "",
                        name if isinstance(name, str) else "",
                    )
                )
            arguments = function.get("arguments")
            if isinstance(arguments, dict):
                arguments = json.dumps(arguments, ensure_ascii=False)
            if arguments and isinstance(arguments, str):
                events.append(ToolCallArguments(index, arguments))
