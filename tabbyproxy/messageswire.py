"""
Anthropic's Messages API (C{POST /v1/messages}, what Claude Code and the C{anthropic} SDK's
C{client.messages} speak) translated to and from TabbyAPI's chat completions, as pure functions
and one encoder.

L{translateRequest} turns a Messages body into a TabbyAPI C{/v1/chat/completions} body:

  - C{system} (a string or text blocks) becomes the first system message; a C{role: "system"}
    message later in C{messages} (Claude Code sends them) stays a system message there.
  - C{messages} hold a string or blocks: C{text}; C{image} (a base64 or URL source) as an
    C{image_url} part; an assistant's C{tool_use} as its C{tool_calls} (C{input} as JSON
    arguments); a user's C{tool_result} (a string or blocks, C{is_error}) as a C{role: "tool"}
    message with the matching C{tool_call_id}; C{thinking} as the assistant's
    C{reasoning_content}, C{redacted_thinking} dropped.  C{cache_control} is ignored everywhere.
  - C{tools} (C{name}, C{description}, C{input_schema}) become function tools; Anthropic's own
    server tools (a C{type} such as C{web_search_20250305}) are dropped: the model is never
    offered them.  C{tool_choice} C{auto}/C{any}/C{tool}/C{none} becomes C{auto}/C{required}/the
    named function/C{none}, C{disable_parallel_tool_use} C{parallel_tool_calls: false}.
  - C{max_tokens}, C{stop_sequences} (as C{stop}), C{temperature}, C{top_p}, C{top_k};
    C{thinking} C{enabled} (with C{budget_tokens}) or C{adaptive} turns the template's
    C{enable_thinking} on, C{disabled} off; C{output_config.format} (a JSON schema) becomes
    TabbyAPI's C{json_schema}.
  - C{metadata}, C{context_management}, C{output_config.effort}, C{service_tier}, C{container},
    C{mcp_servers} and any other field have no TabbyAPI meaning: accepted, named in
    L{MessagesRequest.ignored} for a debug log.

L{MessageEncoder} turns TabbyAPI's decoded stream (L{tabbyproxy.tabbywire} events) into the
Messages stream (C{message_start}, content blocks, C{message_delta}, C{message_stop}) and builds
the final Message, which is also the non-streamed answer: both come from the same events, so
the streamed and the non-streamed content agree.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring as _jsonString
from typing import Any, Callable, Iterable, Mapping

from attrs import define, field, frozen

from tabbyproxy.jsontypes import describeJSON
from tabbyproxy.responseswire import jsonBytes, randomId, sseFrame
from tabbyproxy.tabbywire import (
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallArguments,
    ToolCallStart,
    Usage,
)

CHAT_PATH = "/v1/chat/completions"
ENCODE_PATH = "/v1/token/encode"

# What the proxy reads; every other field is accepted and named in MessagesRequest.ignored.
_READ = frozenset({
    "model", "messages", "system", "tools", "tool_choice", "max_tokens", "stop_sequences",
    "temperature", "top_p", "top_k", "thinking", "stream", "keep_alive", "output_config",
})

PING = {"type": "ping"}


class MessagesRequestError(Exception):
    """
    A Messages body the proxy cannot serve: Anthropic's C{invalid_request_error}.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@frozen
class MessagesRequest:
    """
    A Messages request, translated.

    @ivar upstream: the TabbyAPI chat completions body (always a stream, with usage).
    @ivar ignored: what the request held that TabbyAPI has no meaning for, for a debug log.
    """

    upstream: dict[str, Any]
    stream: bool
    ignored: tuple[str, ...]


def translateRequest(body: Mapping[str, Any]) -> MessagesRequest:
    """
    A Messages body (its C{model} already taken) as a TabbyAPI chat completions request.

    @raise MessagesRequestError: for fields of the wrong type.
    """
    ignored = [f"field {key}" for key in body if key not in _READ]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise MessagesRequestError(f"stream: must be true or false, not {describeJSON(stream)}")
    upstream: dict[str, Any] = {
        "messages": chatMessages(body, ignored), "stream": True, "stream_options": {"include_usage": True},
    }
    tools = _tools(body.get("tools"), ignored)
    if tools:
        upstream["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None:
        upstream.update(_toolChoice(choice, {tool["function"]["name"] for tool in tools}))
    for name, target in (("max_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("top_k", "top_k")):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MessagesRequestError(f"{name}: must be a number, not {describeJSON(value)}")
        upstream[target] = value
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
            raise MessagesRequestError("stop_sequences: must be a list of strings")
        if stops:
            upstream["stop"] = stops
    upstream.update(_thinking(body.get("thinking")))
    upstream.update(_outputFormat(body.get("output_config"), ignored))
    return MessagesRequest(upstream=upstream, stream=stream, ignored=tuple(ignored))


def chatMessages(body: Mapping[str, Any], ignored: list[str]) -> list[dict[str, Any]]:
    """
    The chat messages of a Messages body's C{system} and C{messages} (also what
    C{count_tokens} counts).

    @raise MessagesRequestError: for a malformed message or block.
    """
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = _systemText(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
    history = body.get("messages")
    if not isinstance(history, list):
        raise MessagesRequestError(f"messages: must be a list of messages, not {describeJSON(history)}")
    for index, message in enumerate(history):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise MessagesRequestError(f"{where}: must be an object, not {describeJSON(message)}")
        role = message.get("role")
        content = message.get("content")
        if role == "user":
            messages.extend(_userMessages(content, where, ignored))
        elif role == "assistant":
            messages.append(_assistantMessage(content, where, ignored))
        elif role == "system":
            messages.append({"role": "system", "content": _systemText(content, f"{where}.content")})
        else:
            raise MessagesRequestError(f"{where}.role: must be \"user\" or \"assistant\", not {json.dumps(role)}")
    return messages


def _blocks(content: object, where: str) -> list[dict[str, Any]]:
    """
    A message's content as blocks: a string is one text block.
    """
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise MessagesRequestError(f"{where}: must be a string or a list of content blocks, not {describeJSON(content)}")
    for index, block in enumerate(content):
        if not isinstance(block, dict):
            raise MessagesRequestError(f"{where}.{index}: must be a content block, not {describeJSON(block)}")
        if not isinstance(block.get("type"), str):
            raise MessagesRequestError(f"{where}.{index}.type: is required")
    return content


def _blockText(block: Mapping[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise MessagesRequestError(f"{where}.text: must be a string, not {describeJSON(text)}")
    return text


def _systemText(content: object, where: str) -> str:
    return "".join(_blockText(block, f"{where}.{index}") for index, block in enumerate(_blocks(content, where))
                   if block["type"] == "text")


def _image(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise MessagesRequestError(f"{where}.source: must be an object")
    kind = source.get("type")
    url: object
    if kind == "base64":
        mediaType, data = source.get("media_type"), source.get("data")
        if not isinstance(mediaType, str) or not isinstance(data, str):
            raise MessagesRequestError(f"{where}.source: a base64 image needs media_type and data strings")
        url = f"data:{mediaType};base64,{data}"
    elif kind == "url":
        url = source.get("url")
    else:
        raise MessagesRequestError(f"{where}.source.type: must be \"base64\" or \"url\", not {json.dumps(kind)}")
    if not isinstance(url, str):
        raise MessagesRequestError(f"{where}.source.url: must be a string")
    return {"type": "image_url", "image_url": {"url": url}}


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """
    Chat content: a string when there is only text (what every chat template reads), else parts.
    """
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _userMessages(content: object, where: str, ignored: list[str]) -> list[dict[str, Any]]:
    """
    A user turn: its tool results as tool messages, in order, and its other blocks as one user
    message after them.
    """
    messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(_blocks(content, f"{where}.content")):
        here = f"{where}.content.{index}"
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": _blockText(block, here)})
        elif kind == "image":
            parts.append(_image(block, here))
        elif kind == "tool_result":
            callId = block.get("tool_use_id")
            if not isinstance(callId, str) or not callId:
                raise MessagesRequestError(f"{here}.tool_use_id: must be a string")
            result = _toolResultText(block.get("content"), here, ignored)
            if block.get("is_error") is True:
                result = f"Error: {result}"
            messages.append({"role": "tool", "tool_call_id": callId, "content": result})
        else:
            ignored.append(f"{kind} block")
    if parts:
        messages.append({"role": "user", "content": _content(parts)})
    return messages


def _toolResultText(content: object, where: str, ignored: list[str]) -> str:
    if content is None:
        return ""
    texts = []
    for index, block in enumerate(_blocks(content, f"{where}.content")):
        if block["type"] == "text":
            texts.append(_blockText(block, f"{where}.content.{index}"))
        else:
            ignored.append(f"{block['type']} block in a tool result")
    return "\n".join(texts)


def _assistantMessage(content: object, where: str, ignored: list[str]) -> dict[str, Any]:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(_blocks(content, f"{where}.content")):
        here = f"{where}.content.{index}"
        kind = block["type"]
        if kind == "text":
            texts.append(_blockText(block, here))
        elif kind == "thinking":
            thinking = block.get("thinking")
            if isinstance(thinking, str):
                reasoning.append(thinking)
        elif kind == "tool_use":
            callId, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(callId, str) or not isinstance(name, str):
                raise MessagesRequestError(f"{here}: a tool_use block needs id and name strings")
            if not isinstance(arguments, dict):
                raise MessagesRequestError(f"{here}.input: must be an object, not {describeJSON(arguments)}")
            calls.append({"id": callId, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
        elif kind != "redacted_thinking":
            ignored.append(f"{kind} block")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(value: object, ignored: list[str]) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MessagesRequestError(f"tools: must be a list of tools, not {describeJSON(value)}")
    tools = []
    for index, tool in enumerate(value):
        where = f"tools.{index}"
        if not isinstance(tool, dict):
            raise MessagesRequestError(f"{where}: must be an object, not {describeJSON(tool)}")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            ignored.append(f"tool {kind}")
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise MessagesRequestError(f"{where}.name: must be a string")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise MessagesRequestError(f"{where}.input_schema: must be a JSON schema object")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        description = tool.get("description")
        if isinstance(description, str) and description:
            function["description"] = description
        tools.append({"type": "function", "function": function})
    return tools


def _toolChoice(value: object, offered: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MessagesRequestError(f"tool_choice: must be an object, not {describeJSON(value)}")
    kind = value.get("type")
    choice: object
    if kind == "auto":
        choice = "auto"
    elif kind == "any":
        choice = "required"
    elif kind == "none":
        choice = "none"
    elif kind == "tool":
        name = value.get("name")
        if not isinstance(name, str) or name not in offered:
            raise MessagesRequestError(f"tool_choice.name: {json.dumps(name)} is not one of the tools")
        choice = {"type": "function", "function": {"name": name}}
    else:
        raise MessagesRequestError('tool_choice.type: must be "auto", "any", "tool" or "none"')
    translated: dict[str, Any] = {"tool_choice": choice}
    if value.get("disable_parallel_tool_use") is True:
        translated["parallel_tool_calls"] = False
    return translated


def _outputFormat(value: object, ignored: list[str]) -> dict[str, Any]:
    """
    C{output_config.format}, Anthropic's structured output, as TabbyAPI's C{json_schema}; its
    C{effort} has no TabbyAPI meaning.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MessagesRequestError(f"output_config: must be an object, not {describeJSON(value)}")
    ignored.extend(f"field output_config.{key}" for key in value if key != "format")
    outputFormat = value.get("format")
    if outputFormat is None:
        return {}
    if not isinstance(outputFormat, dict) or outputFormat.get("type") != "json_schema":
        raise MessagesRequestError('output_config.format.type: must be "json_schema"')
    schema = outputFormat.get("schema")
    if not isinstance(schema, dict):
        raise MessagesRequestError("output_config.format.schema: must be a JSON schema object")
    return {"json_schema": schema}


def _thinking(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MessagesRequestError(f"thinking: must be an object, not {describeJSON(value)}")
    kind = value.get("type")
    if kind == "disabled":
        return {"template_vars": {"enable_thinking": False}}
    if kind == "adaptive":
        return {"template_vars": {"enable_thinking": True}}
    if kind == "enabled":
        translated: dict[str, Any] = {"template_vars": {"enable_thinking": True}}
        budget = value.get("budget_tokens")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int):
                raise MessagesRequestError(f"thinking.budget_tokens: must be an integer, not {describeJSON(budget)}")
            translated["reasoning_budget_tokens"] = budget
        return translated
    raise MessagesRequestError('thinking.type: must be "enabled", "adaptive" or "disabled"')


# ---------------------------------------------------------------------------------------------
# The answer


def signatureOf(thinking: str) -> str:
    """
    The signature of a thinking block: Anthropic's is opaque, and clients only send it back.
    """
    return hashlib.sha256(thinking.encode("utf-8")).hexdigest()


@define
class _Block:
    """
    One content block under way: its index, its document, and its text (or JSON) so far.
    """

    index: int
    kind: str
    block: dict[str, Any]
    parts: list[str] = field(factory=list)


# What the encoder makes of a batch of events: the events, with each delta of text, thinking or
# a tool call's JSON as its block's index, the delta's type, its field and its text (see
# MessageEncoder._translate).
_Pieces = list[dict[str, Any] | tuple[int, str, str, str]]


@define
class MessageEncoder:
    """
    TabbyAPI's decoded stream as the Messages stream, and the final Message.

    Call L{start} first, L{feed} with each batch of events, then L{finish} (or L{fail}); each
    returns the Messages events to send.  L{message} is the Message as it stands: the
    non-streamed answer once L{finish} was called.

    Blocks come in the order the model produced them: a thinking block while TabbyAPI sends
    reasoning, a text block while it sends text, a C{tool_use} block per tool call.
    """

    model: str
    newId: Callable[[str], str] = randomId
    messageId: str = ""
    content: list[dict[str, Any]] = field(factory=list)
    inputTokens: int = 0
    outputTokens: int = 0
    finishReason: str | None = None
    stopSequence: str | None = None
    _open: _Block | None = None
    _calls: dict[int, _Block] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not self.messageId:
            self.messageId = self.newId("msg")

    def stopReason(self) -> str | None:
        if self.finishReason is None:
            return None
        if self._calls or self.finishReason == "tool_calls":
            return "tool_use"
        if self.finishReason == "length":
            return "max_tokens"
        if self.stopSequence is not None:
            return "stop_sequence"
        return "end_turn"

    def _usage(self) -> dict[str, Any]:
        return {"input_tokens": self.inputTokens, "output_tokens": self.outputTokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}

    def message(self) -> dict[str, Any]:
        """
        The Message: its content so far, why it stopped, and its usage.
        """
        return {
            "id": self.messageId, "type": "message", "role": "assistant", "model": self.model,
            "content": [dict(block) for block in self.content], "stop_reason": self.stopReason(),
            "stop_sequence": self.stopSequence, "usage": self._usage(),
        }

    def start(self) -> list[dict[str, Any]]:
        """
        C{message_start}, then a C{ping} as Anthropic sends.
        """
        return [{"type": "message_start", "message": self.message()}, dict(PING)]

    def feed(self, events: Iterable[Event]) -> list[dict[str, Any]]:
        """
        The Messages events for TabbyAPI's C{events}.  A L{StreamError} is left to L{fail}.
        """
        return [self._delta(piece[0], {"type": piece[1], piece[2]: piece[3]}) if isinstance(piece, tuple) else piece
                for piece in self._translate(events)]

    def feedSSE(self, events: Iterable[Event]) -> bytes:
        """
        L{feed}'s events as SSE frames, exactly as L{sseFrame} writes them; the deltas of text,
        thinking and tool calls' JSON, one per token, are filled into a template instead of
        building and encoding an object for each.
        """
        frames = []
        for piece in self._translate(events):
            if isinstance(piece, tuple):
                index, kind, name, text = piece
                frames.append(jsonBytes(f'event: content_block_delta\ndata: {{"type":"content_block_delta","index":{index},'
                                        f'"delta":{{"type":"{kind}","{name}":{_jsonString(text)}}}}}\n\n'))
            else:
                frames.append(sseFrame(piece))
        return b"".join(frames)

    def _translate(self, events: Iterable[Event]) -> _Pieces:
        """
        L{feed}'s events, with each delta of text, thinking or a tool call's JSON as its block's
        index, the delta's type, its field and the text, to be made into an event or a frame.
        """
        out: _Pieces = []
        for event in events:
            if isinstance(event, TextDelta):
                block = self._block("text", {"type": "text", "text": ""}, out)
                block.parts.append(event.text)
                out.append((block.index, "text_delta", "text", event.text))
            elif isinstance(event, ReasoningDelta):
                block = self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
                block.parts.append(event.text)
                out.append((block.index, "thinking_delta", "thinking", event.text))
            elif isinstance(event, ToolCallStart):
                self._close(out.append)
                block = self._openBlock("tool_use", {"type": "tool_use", "id": self.newId("toolu"),
                                                     "name": event.name, "input": {}}, out)
                self._calls[event.index] = block
            elif isinstance(event, ToolCallArguments):
                call = self._calls.get(event.index)
                if call is not None:
                    call.parts.append(event.text)
                    if call is self._open:
                        out.append((call.index, "input_json_delta", "partial_json", event.text))
                    else:
                        # Arguments of a call already closed: kept for the Message, as no
                        # event can reach a closed block.
                        call.block["input"] = _arguments(call.parts)
            elif isinstance(event, Usage):
                self.inputTokens = event.promptTokens or 0
                self.outputTokens = event.completionTokens or 0
            elif isinstance(event, Finish):
                self.finishReason = event.reason
                self.stopSequence = event.stopString
        return out

    def finish(self) -> list[dict[str, Any]]:
        """
        The open block closed, then C{message_delta} with why it stopped, and C{message_stop}.
        """
        out: list[dict[str, Any]] = []
        self._close(out.append)
        if self.finishReason is None:
            self.finishReason = "stop"
        out.append({"type": "message_delta",
                    "delta": {"stop_reason": self.stopReason(), "stop_sequence": self.stopSequence},
                    "usage": self._usage()})
        out.append({"type": "message_stop"})
        return out

    @staticmethod
    def fail(message: str, kind: str = "api_error") -> list[dict[str, Any]]:
        """
        The generation failed with C{message}: an C{error} event, the last of the stream.
        """
        return [{"type": "error", "error": {"type": kind, "message": message}}]

    # -- blocks

    def _openBlock(self, kind: str, document: dict[str, Any], out: _Pieces) -> _Block:
        block = self._open = _Block(len(self.content), kind, document)
        self.content.append(document)
        out.append({"type": "content_block_start", "index": block.index, "content_block": dict(document)})
        return block

    def _block(self, kind: str, document: dict[str, Any], out: _Pieces) -> _Block:
        if self._open is not None and self._open.kind == kind:
            return self._open
        self._close(out.append)
        return self._openBlock(kind, document, out)

    @staticmethod
    def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": index, "delta": delta}

    def _close(self, emit: Callable[[dict[str, Any]], object]) -> None:
        block, self._open = self._open, None
        if block is None:
            return
        text = "".join(block.parts)
        if block.kind == "text":
            block.block["text"] = text
        elif block.kind == "thinking":
            signature = signatureOf(text)
            block.block.update(thinking=text, signature=signature)
            emit(self._delta(block.index, {"type": "signature_delta", "signature": signature}))
        else:
            block.block["input"] = _arguments(block.parts)
        self.content[block.index] = block.block
        emit({"type": "content_block_stop", "index": block.index})


def _arguments(parts: list[str]) -> dict[str, Any]:
    """
    A tool call's arguments as the object C{tool_use.input} holds; what is not a JSON object is
    kept whole under C{"arguments"}, so nothing the model said is lost.
    """
    text = "".join(parts)
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": value}
