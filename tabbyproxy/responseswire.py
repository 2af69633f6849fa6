"""
OpenAI's Responses API (C{POST /v1/responses}, what Codex CLI and C{client.responses} speak)
translated to and from TabbyAPI's chat completions, as pure functions and one encoder.

L{translateRequest} turns a Responses body into a TabbyAPI C{/v1/chat/completions} body:

  - C{instructions} and the leading C{system}/C{developer} messages become one system message
    (chat templates often allow a system message only first); later ones stay system messages.
  - C{input} is a string (one user message) or items: C{message} items with string content or
    C{input_text}/C{output_text}/C{input_image} parts; C{function_call} items become the
    C{tool_calls} of an assistant message and C{function_call_output} items C{role: "tool"}
    messages with the matching C{tool_call_id}; C{reasoning} items become the
    C{reasoning_content} of the assistant message that follows them.  Items of types TabbyAPI
    has no meaning for (a hosted tool's call, say) are skipped and named in
    L{ResponsesRequest.ignored}.
  - C{tools} of C{type: "function"} become function tools, and the functions of a
    C{type: "namespace"} tool become function tools named C{namespace__name} (calls are
    reported back with their C{namespace}); hosted tools (C{web_search}, C{custom},
    C{local_shell}, ...) are dropped and named in C{ignored}: the model is never offered them.
  - C{tool_choice}, C{parallel_tool_calls}, C{max_output_tokens} (as C{max_tokens}),
    C{temperature}, C{top_p}; C{text.format} C{json_schema} as TabbyAPI's C{json_schema},
    C{json_object} as its JSON mode; C{reasoning.effort} as C{template_vars.enable_thinking}
    (C{"none"} turns thinking off, any other effort on, no effort leaves the model's default).
  - C{store}, C{include}, C{metadata}, C{prompt_cache_key}, C{user} and the rest of what
    clients send with no TabbyAPI meaning are accepted; C{background}, C{conversation} and
    C{prompt} need what the proxy does not have and are refused.

L{ResponseEncoder} turns TabbyAPI's decoded stream (L{tabbyproxy.tabbywire} events) into the
Responses stream, every event with its C{sequence_number}, and builds the final C{response}
object, which is also the non-streamed answer: both come from the same events, so the streamed
and the non-streamed text agree.
"""

from __future__ import annotations

import json
import uuid
from json.encoder import encode_basestring as _jsonString
from typing import Any, Callable, Iterable, Mapping

from attrs import define, field, frozen

from tabbyproxy.jsontypes import describeJSON
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

NAMESPACE_SEPARATOR = "__"
"""Between a namespace tool's name and one of its functions' names, in the name the model sees."""

# Accepted, echoed where the Response object has a place for them, and otherwise of no
# meaning to TabbyAPI.
_ACCEPTED = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "temperature", "top_p", "text", "reasoning", "stream", "store",
    "previous_response_id", "keep_alive",
    "include", "metadata", "prompt_cache_key", "prompt_cache_retention", "client_metadata",
    "user", "safety_identifier", "service_tier", "truncation", "stream_options",
    "top_logprobs", "max_tool_calls", "background", "context_management",
})

# Item types that only hosted tools produce: nothing the model here could have called.
_HOSTED_ITEMS = frozenset({
    "web_search_call", "file_search_call", "computer_call", "computer_call_output",
    "code_interpreter_call", "image_generation_call", "local_shell_call",
    "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call",
    "apply_patch_call_output", "mcp_call", "mcp_list_tools", "mcp_approval_request",
    "mcp_approval_response", "custom_tool_call", "custom_tool_call_output", "compaction",
    "tool_search_call", "tool_search_output",
})

_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})


class ResponsesRequestError(Exception):
    """
    A Responses body the proxy cannot serve; C{param} names the field, as OpenAI's errors do.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@frozen
class ResponsesRequest:
    """
    A Responses request, translated.

    @ivar upstream: the TabbyAPI chat completions body (always a stream, with usage).
    @ivar settings: the request's settings as the Response object echoes them.
    @ivar items: the conversation as Responses items, the history of C{previous_response_id}
        first: what a stored response is continued from.
    @ivar namespaces: the name the model sees for each namespaced function, to its namespace
        and own name.
    @ivar ignored: what the request held that TabbyAPI has no meaning for, for a debug log.
    """

    upstream: dict[str, Any]
    settings: dict[str, Any]
    stream: bool
    store: bool
    items: list[dict[str, Any]]
    namespaces: Mapping[str, tuple[str, str]]
    ignored: tuple[str, ...]


def previousResponseId(body: Mapping[str, Any]) -> str | None:
    """
    The C{previous_response_id} of a body, C{None} when it has none.

    @raise ResponsesRequestError: when it is not a string.
    """
    value = body.get("previous_response_id")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ResponsesRequestError(f"previous_response_id must be a string, not {describeJSON(value)}",
                                    "previous_response_id")
    return value


def translateRequest(body: Mapping[str, Any], history: Iterable[dict[str, Any]] = ()) -> ResponsesRequest:
    """
    A Responses body (its C{model} already taken) as a TabbyAPI chat completions request.

    @param history: the items of the response C{previous_response_id} names, with its output.
    @raise ResponsesRequestError: for fields of the wrong type or that the proxy cannot serve.
    """
    ignored = [f"field {key}" for key in body if key not in _ACCEPTED]
    _refuseUnservable(body)
    stream = _flag(body, "stream", False)
    store = _flag(body, "store", True)
    parallel = _flag(body, "parallel_tool_calls", True)
    items = [*history, *_inputItems(body.get("input"))]
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, (str, list)):
        raise ResponsesRequestError(
            f"instructions must be a string or a list of items, not {describeJSON(instructions)}", "instructions"
        )
    system: list[str] = []
    if isinstance(instructions, str) and instructions:
        system.append(instructions)
    instructionItems = _inputItems(instructions) if isinstance(instructions, list) else []
    messages = _messages([*instructionItems, *items], system, ignored)
    tools, echoedTools, namespaces = _tools(body.get("tools"), ignored)
    upstream: dict[str, Any] = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    if tools:
        upstream["tools"] = tools
        upstream["parallel_tool_calls"] = parallel
    toolChoice = body.get("tool_choice")
    if toolChoice is not None:
        upstream["tool_choice"] = _toolChoice(toolChoice, namespaces, {t["function"]["name"] for t in tools})
    for name, target in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ResponsesRequestError(f"{name} must be a number, not {describeJSON(value)}", name)
        upstream[target] = value
    text = _object(body, "text")
    upstream.update(_format(text))
    reasoning = _object(body, "reasoning")
    upstream.update(_thinking(reasoning))
    settings = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "parallel_tool_calls": parallel,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": store,
        "temperature": body.get("temperature"),
        "text": {**text, "format": text.get("format") or {"type": "text"}},
        "tool_choice": toolChoice if toolChoice is not None else "auto",
        "tools": echoedTools,
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
    }
    return ResponsesRequest(
        upstream=upstream, settings=settings, stream=stream, store=store, items=items,
        namespaces=namespaces, ignored=tuple(ignored),
    )


def _refuseUnservable(body: Mapping[str, Any]) -> None:
    if body.get("background") is True:
        raise ResponsesRequestError("background responses are not supported by tabbyproxy: stream instead",
                                    "background")
    if body.get("conversation") is not None:
        raise ResponsesRequestError(
            "conversations are not supported by tabbyproxy: send the history in input, or use previous_response_id",
            "conversation",
        )
    if body.get("prompt") is not None:
        raise ResponsesRequestError("stored prompts are not supported by tabbyproxy: send instructions instead",
                                    "prompt")


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ResponsesRequestError(f"{name} must be true or false, not {describeJSON(value)}", name)
    return value


def _object(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ResponsesRequestError(f"{name} must be an object, not {describeJSON(value)}", name)
    return value


def _inputItems(value: object) -> list[dict[str, Any]]:
    """
    C{input} as a list of items: a string is one user message.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise ResponsesRequestError(f"input must be a string or a list of items, not {describeJSON(value)}", "input")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ResponsesRequestError(f"input[{index}] must be an object, not {describeJSON(item)}", "input")
    return list(value)


def _messages(items: list[dict[str, Any]], system: list[str], ignored: list[str]) -> list[dict[str, Any]]:
    """
    Chat messages for Responses items, after a system message of C{system} and the leading
    system and developer messages.
    """
    messages: list[dict[str, Any]] = []
    reasoning: list[str] = []
    leading = True
    for index, item in enumerate(items):
        where = f"input[{index}]"
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = "message"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ResponsesRequestError(
                    f"{where}.role must be user, assistant, system or developer, not {json.dumps(role)}", "input"
                )
            content = _content(item.get("content"), where)
            if role in ("system", "developer"):
                if leading:
                    system.append(_plainText(content))
                    continue
                messages.append({"role": "system", "content": content})
            elif role == "assistant":
                message: dict[str, Any] = {"role": "assistant", "content": _plainText(content)}
                if reasoning:
                    message["reasoning_content"] = "".join(reasoning)
                    reasoning.clear()
                messages.append(message)
            else:
                messages.append({"role": "user", "content": content})
            leading = False
        elif kind == "function_call":
            call = _toolCall(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not reasoning:
                last.setdefault("tool_calls", []).append(call)
            else:
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning:
                    message["reasoning_content"] = "".join(reasoning)
                    reasoning.clear()
                messages.append(message)
            leading = False
        elif kind == "function_call_output":
            callId = item.get("call_id")
            if not isinstance(callId, str) or not callId:
                raise ResponsesRequestError(f"{where}.call_id must be a string", "input")
            messages.append({"role": "tool", "tool_call_id": callId, "content": _toolOutput(item.get("output"), where)})
            leading = False
        elif kind == "reasoning":
            reasoning.extend(_reasoningText(item))
        elif kind == "item_reference":
            raise ResponsesRequestError(
                f"{where}: item_reference is not supported by tabbyproxy: send the item itself", "input"
            )
        elif isinstance(kind, str) and kind in _HOSTED_ITEMS:
            ignored.append(f"input item {kind}")
        else:
            raise ResponsesRequestError(f"{where}.type {json.dumps(kind)} is not an input item type", "input")
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(part for part in system if part)})
    return messages


def _content(content: object, where: str) -> str | list[dict[str, Any]]:
    """
    A message's content: a string, or chat parts when it holds images.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ResponsesRequestError(f"{where}.content must be a string or a list of parts, not {describeJSON(content)}",
                                    "input")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        here = f"{where}.content[{index}]"
        if not isinstance(part, dict):
            raise ResponsesRequestError(f"{here} must be an object, not {describeJSON(part)}", "input")
        kind = part.get("type")
        if kind in _TEXT_PARTS or kind == "refusal":
            text = part.get("text") if kind != "refusal" else part.get("refusal")
            if not isinstance(text, str):
                raise ResponsesRequestError(f"{here}.text must be a string", "input")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise ResponsesRequestError(
                    f"{here}: only images given by image_url (a URL or a data: URI) are supported", "input"
                )
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "input_file":
            raise ResponsesRequestError(f"{here}: input_file is not supported by tabbyproxy", "input")
        else:
            raise ResponsesRequestError(f"{here}.type {json.dumps(kind)} is not a content part type", "input")
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _plainText(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part["type"] == "text")


def _toolCall(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    callId, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    if not isinstance(callId, str) or not callId:
        raise ResponsesRequestError(f"{where}.call_id must be a string", "input")
    if not isinstance(name, str) or not name:
        raise ResponsesRequestError(f"{where}.name must be a string", "input")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(arguments, str):
        raise ResponsesRequestError(f"{where}.arguments must be a string of JSON", "input")
    namespace = item.get("namespace")
    if isinstance(namespace, str) and namespace:
        name = namespace + NAMESPACE_SEPARATOR + name
    return {"id": callId, "type": "function", "function": {"name": name, "arguments": arguments}}


def _toolOutput(output: object, where: str) -> str | list[dict[str, Any]]:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return _content(output, f"{where}.output")
    raise ResponsesRequestError(f"{where}.output must be a string or a list of parts, not {describeJSON(output)}",
                                "input")


def _reasoningText(item: Mapping[str, Any]) -> list[str]:
    texts: list[str] = []
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list):
            texts.extend(str(part.get("text", "")) for part in parts if isinstance(part, dict))
        if texts:
            # The full reasoning when the client kept it, else its summary.
            break
    return texts


def _tools(value: object, ignored: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, tuple[str, str]]]:
    """
    The function tools for TabbyAPI, the tools the Response object echoes, and the namespaced
    functions' names.
    """
    if value is None:
        return [], [], {}
    if not isinstance(value, list):
        raise ResponsesRequestError(f"tools must be a list, not {describeJSON(value)}", "tools")
    tools: list[dict[str, Any]] = []
    echoed: list[dict[str, Any]] = []
    namespaces: dict[str, tuple[str, str]] = {}
    for index, tool in enumerate(value):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise ResponsesRequestError(f"{where} must be an object, not {describeJSON(tool)}", "tools")
        kind = tool.get("type")
        if kind == "function":
            tools.append(_function(tool, where))
            echoed.append(tool)
        elif kind == "namespace":
            namespace = tool.get("name")
            if not isinstance(namespace, str) or not namespace:
                raise ResponsesRequestError(f"{where}.name must be a string", "tools")
            members = tool.get("tools")
            if not isinstance(members, list):
                raise ResponsesRequestError(f"{where}.tools must be a list", "tools")
            kept = []
            for position, member in enumerate(members):
                here = f"{where}.tools[{position}]"
                if not isinstance(member, dict) or member.get("type") != "function":
                    ignored.append(f"tool {namespace}.{member.get('type') if isinstance(member, dict) else member}")
                    continue
                function = _function(member, here)
                flat = namespace + NAMESPACE_SEPARATOR + function["function"]["name"]
                namespaces[flat] = (namespace, function["function"]["name"])
                description = " ".join(
                    part for part in (tool.get("description"), function["function"].get("description"))
                    if isinstance(part, str) and part
                )
                function["function"]["name"] = flat
                if description:
                    function["function"]["description"] = description
                tools.append(function)
                kept.append(member)
            if kept:
                echoed.append({**tool, "tools": kept})
        else:
            ignored.append(f"tool {kind}")
    return tools, echoed, namespaces


def _function(tool: Mapping[str, Any], where: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise ResponsesRequestError(f"{where}.name must be a string", "tools")
    parameters = tool.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ResponsesRequestError(f"{where}.parameters must be a JSON schema object", "tools")
    function: dict[str, Any] = {"name": name, "parameters": parameters}
    description = tool.get("description")
    if isinstance(description, str) and description:
        function["description"] = description
    return {"type": "function", "function": function}


def _toolChoice(value: object, namespaces: Mapping[str, tuple[str, str]], offered: set[str]) -> object:
    if value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "function":
            name = value.get("name")
            namespace = value.get("namespace")
            if isinstance(namespace, str) and namespace and isinstance(name, str):
                name = namespace + NAMESPACE_SEPARATOR + name
            if not isinstance(name, str) or name not in offered:
                raise ResponsesRequestError(f"tool_choice names the function {json.dumps(name)}, which tools does not hold",
                                            "tool_choice")
            return {"type": "function", "function": {"name": name}}
        if kind == "allowed_tools":
            mode = value.get("mode")
            if mode not in ("auto", "required"):
                raise ResponsesRequestError('tool_choice.mode must be "auto" or "required"', "tool_choice")
            return mode
        raise ResponsesRequestError(
            f"tool_choice {json.dumps(kind)} names a hosted tool that tabbyproxy does not offer", "tool_choice"
        )
    raise ResponsesRequestError('tool_choice must be "auto", "none", "required" or a function', "tool_choice")


def _format(text: Mapping[str, Any]) -> dict[str, Any]:
    value = text.get("format")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ResponsesRequestError(f"text.format must be an object, not {describeJSON(value)}", "text.format")
    kind = value.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json"}}
    if kind == "json_schema":
        schema = value.get("schema")
        if not isinstance(schema, dict):
            raise ResponsesRequestError("text.format.schema must be a JSON schema object", "text.format")
        return {"json_schema": schema}
    raise ResponsesRequestError('text.format.type must be "text", "json_object" or "json_schema"', "text.format")


def _thinking(reasoning: Mapping[str, Any]) -> dict[str, Any]:
    effort = reasoning.get("effort")
    if effort is None:
        return {}
    if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
        raise ResponsesRequestError(
            'reasoning.effort must be "none", "minimal", "low", "medium", "high" or "xhigh"', "reasoning.effort"
        )
    return {"template_vars": {"enable_thinking": effort != "none"}}


# ---------------------------------------------------------------------------------------------
# The answer


def randomId(prefix: str) -> str:
    """
    A new id: C{prefix}, an underscore and 32 hex digits (C{resp_...}, C{msg_...}).
    """
    return f"{prefix}_{uuid.uuid4().hex}"


def jsonBytes(text: str) -> bytes:
    """
    JSON text written with C{ensure_ascii=False}, in UTF-8.  A lone UTF-16 surrogate (one
    TabbyAPI sent as C{"\\ud800"}) has no UTF-8: it is written as that escape again, which is what
    C{json.dumps} writes for it, so that the frame is still valid JSON and nothing fails.
    """
    return text.encode("utf-8", "backslashreplace")


def sseFrame(event: Mapping[str, Any]) -> bytes:
    """
    One Responses event on the wire: its C{event:} line names its type, as OpenAI's do.
    """
    return (
        b"event: " + str(event["type"]).encode("ascii") + b"\ndata: "
        + jsonBytes(json.dumps(event, ensure_ascii=False, separators=(",", ":"))) + b"\n\n"
    )


def errorCode(message: str) -> str:
    """
    OpenAI's error code for a generation that failed with C{message}: agents such as Codex
    compact their history on C{context_length_exceeded}.
    """
    if "exceeds the available context size" in message or "context length" in message.lower():
        return "context_length_exceeded"
    return "server_error"


@define
class _Item:
    """
    One output item under way: its document (C{item}), where it is, and its text so far.
    """

    outputIndex: int
    item: dict[str, Any]
    text: list[str] = field(factory=list)

    @property
    def id(self) -> str:
        itemId: str = self.item["id"]
        return itemId


# What the encoder makes of a batch of events: the events, with each delta of text, reasoning
# or a function call's arguments as its kind, sequence number, item id, output index and text (see
# ResponseEncoder._deltaEvent), to be made into an event or a frame.
_Pieces = list[dict[str, Any] | tuple[str, int, str, int, str]]


@define
class ResponseEncoder:
    """
    TabbyAPI's decoded stream as the Responses stream, and the final Response object.

    Call L{start} first, L{feed} with each batch of events, then L{finish} (or L{fail}); each
    returns the Responses events to send, numbered in order.  L{response} is the Response
    object as it stands: the non-streamed answer once L{finish} was called.

    Items come in the order the model produced them: a reasoning item while TabbyAPI sends
    reasoning, a message while it sends text, a function call per tool call.  A finish of
    C{length} makes the response C{incomplete} with C{max_output_tokens} as the reason.
    """

    request: ResponsesRequest
    model: str
    createdAt: int
    newId: Callable[[str], str] = randomId
    responseId: str = ""
    status: str = "in_progress"
    output: list[dict[str, Any]] = field(factory=list)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finishReason: str | None = None
    _sequence: int = 0
    _reasoning: _Item | None = None
    _message: _Item | None = None
    _calls: dict[int, _Item] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not self.responseId:
            self.responseId = self.newId("resp")

    def response(self) -> dict[str, Any]:
        """
        The Response object: what the request set, and the output so far.
        """
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        return {
            "id": self.responseId,
            "object": "response",
            "created_at": self.createdAt,
            "status": self.status,
            "background": False,
            "error": self.error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": [dict(item) for item in self.output],
            "usage": self.usage,
            **self.request.settings,
        }

    def start(self) -> list[dict[str, Any]]:
        """
        C{response.created} and C{response.in_progress}.
        """
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]

    def feed(self, events: Iterable[Event]) -> list[dict[str, Any]]:
        """
        The Responses events for TabbyAPI's C{events}.  A L{tabbyproxy.tabbywire.StreamError} is left to L{fail}.
        """
        return self._events(self._translate(events))

    def feedSSE(self, events: Iterable[Event]) -> bytes:
        """
        L{feed}'s events as SSE frames, exactly as L{sseFrame} writes them; the deltas of text,
        reasoning and function calls' arguments, one per token, are filled into a template
        instead of building and encoding an object for each.
        """
        frames = []
        for piece in self._translate(events):
            if not isinstance(piece, tuple):
                frames.append(sseFrame(piece))
                continue
            kind, sequence, itemId, outputIndex, text = piece
            if kind == "text":
                frame = (f'event: response.output_text.delta\ndata: {{"type":"response.output_text.delta",'
                         f'"sequence_number":{sequence},"item_id":{_jsonString(itemId)},"output_index":{outputIndex},'
                         f'"content_index":0,"delta":{_jsonString(text)},"logprobs":[]}}\n\n')
            elif kind == "reasoning":
                frame = (f'event: response.reasoning_summary_text.delta\ndata: {{"type":'
                         f'"response.reasoning_summary_text.delta","sequence_number":{sequence},"item_id":'
                         f'{_jsonString(itemId)},"output_index":{outputIndex},"summary_index":0,'
                         f'"delta":{_jsonString(text)}}}\n\n')
            else:
                frame = (f'event: response.function_call_arguments.delta\ndata: {{"type":'
                         f'"response.function_call_arguments.delta","sequence_number":{sequence},"item_id":'
                         f'{_jsonString(itemId)},"output_index":{outputIndex},"delta":{_jsonString(text)}}}\n\n')
            frames.append(jsonBytes(frame))
        return b"".join(frames)

    def _translate(self, events: Iterable[Event]) -> _Pieces:
        """
        L{feed}'s events, with each delta of text, reasoning or arguments as what L{_deltaEvent}
        makes it from.
        """
        out: _Pieces = []
        for event in events:
            if isinstance(event, TextDelta):
                self._closeReasoning(out)
                self._closeCalls(out)
                self._text(event.text, out)
            elif isinstance(event, ReasoningDelta):
                self._closeMessage(out)
                self._closeCalls(out)
                self._reasoningText(event.text, out)
            elif isinstance(event, ToolCallStart):
                self._closeReasoning(out)
                self._closeMessage(out)
                self._startCall(event, out)
            elif isinstance(event, ToolCallArguments):
                call = self._calls.get(event.index)
                if call is not None:
                    self._delta("arguments", call, event.text, out)
            elif isinstance(event, Usage):
                inputTokens = event.promptTokens or 0
                outputTokens = event.completionTokens or 0
                self.usage = {
                    "input_tokens": inputTokens,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": outputTokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": inputTokens + outputTokens,
                }
            elif isinstance(event, Finish):
                self.finishReason = event.reason
        return out

    def finish(self) -> list[dict[str, Any]]:
        """
        Every item still open closed, then C{response.completed} (or C{response.incomplete}).
        """
        out: _Pieces = []
        self.status = "incomplete" if self.finishReason == "length" else "completed"
        self._closeAll(out, status=self.status)
        out.append(self._event(f"response.{self.status}", response=self.response()))
        return self._events(out)

    def fail(self, message: str, code: str | None = None) -> list[dict[str, Any]]:
        """
        The generation failed with C{message}: an C{error} event, then C{response.failed}.
        """
        out: _Pieces = []
        self._closeAll(out, status="incomplete")
        code = code or errorCode(message)
        self.status = "failed"
        self.error = {"code": code, "message": message}
        out.append(self._event("error", code=code, message=message, param=None))
        out.append(self._event("response.failed", response=self.response()))
        return self._events(out)

    # -- items

    @staticmethod
    def _events(pieces: _Pieces) -> list[dict[str, Any]]:
        return [ResponseEncoder._deltaEvent(*piece) if isinstance(piece, tuple) else piece for piece in pieces]

    @staticmethod
    def _deltaEvent(kind: str, sequence: int, itemId: str, outputIndex: int, text: str) -> dict[str, Any]:
        """
        The delta event of a piece of text (C{kind} C{"text"}), reasoning (C{"reasoning"}) or a
        function call's arguments (C{"arguments"}).
        """
        if kind == "text":
            return {"type": "response.output_text.delta", "sequence_number": sequence, "item_id": itemId,
                    "output_index": outputIndex, "content_index": 0, "delta": text, "logprobs": []}
        if kind == "reasoning":
            return {"type": "response.reasoning_summary_text.delta", "sequence_number": sequence, "item_id": itemId,
                    "output_index": outputIndex, "summary_index": 0, "delta": text}
        return {"type": "response.function_call_arguments.delta", "sequence_number": sequence, "item_id": itemId,
                "output_index": outputIndex, "delta": text}

    def _delta(self, kind: str, item: _Item, text: str, out: _Pieces) -> None:
        item.text.append(text)
        out.append((kind, self._sequence, item.id, item.outputIndex, text))
        self._sequence += 1

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _open(self, item: dict[str, Any], out: _Pieces) -> _Item:
        opened = _Item(len(self.output), item)
        self.output.append(item)
        out.append(self._event("response.output_item.added", output_index=opened.outputIndex, item=dict(item)))
        return opened

    def _done(self, item: _Item, out: _Pieces) -> None:
        self.output[item.outputIndex] = item.item
        out.append(self._event("response.output_item.done", output_index=item.outputIndex, item=item.item))

    def _text(self, text: str, out: _Pieces) -> None:
        message = self._message
        if message is None:
            message = self._message = self._open(
                {"id": self.newId("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                 "content": []}, out)
            out.append(self._event("response.content_part.added", item_id=message.id,
                                   output_index=message.outputIndex, content_index=0,
                                   part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        self._delta("text", message, text, out)

    def _closeMessage(self, out: _Pieces, status: str = "completed") -> None:
        message, self._message = self._message, None
        if message is None:
            return
        text = "".join(message.text)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        out.append(self._event("response.output_text.done", item_id=message.id, output_index=message.outputIndex,
                               content_index=0, text=text, logprobs=[]))
        out.append(self._event("response.content_part.done", item_id=message.id, output_index=message.outputIndex,
                               content_index=0, part=part))
        message.item = {**message.item, "status": status, "content": [part]}
        self._done(message, out)

    def _reasoningText(self, text: str, out: _Pieces) -> None:
        reasoning = self._reasoning
        if reasoning is None:
            reasoning = self._reasoning = self._open({"id": self.newId("rs"), "type": "reasoning", "summary": []}, out)
            out.append(self._event("response.reasoning_summary_part.added", item_id=reasoning.id,
                                   output_index=reasoning.outputIndex, summary_index=0,
                                   part={"type": "summary_text", "text": ""}))
        self._delta("reasoning", reasoning, text, out)

    def _closeReasoning(self, out: _Pieces, status: str = "completed") -> None:
        reasoning, self._reasoning = self._reasoning, None
        if reasoning is None:
            return
        text = "".join(reasoning.text)
        part = {"type": "summary_text", "text": text}
        out.append(self._event("response.reasoning_summary_text.done", item_id=reasoning.id,
                               output_index=reasoning.outputIndex, summary_index=0, text=text))
        out.append(self._event("response.reasoning_summary_part.done", item_id=reasoning.id,
                               output_index=reasoning.outputIndex, summary_index=0, part=part))
        reasoning.item = {**reasoning.item, "summary": [part], "status": status}
        self._done(reasoning, out)

    def _startCall(self, start: ToolCallStart, out: _Pieces) -> None:
        item: dict[str, Any] = {
            "id": self.newId("fc"), "type": "function_call", "status": "in_progress",
            "call_id": start.callId or self.newId("call"), "name": start.name, "arguments": "",
        }
        split = self.request.namespaces.get(start.name)
        if split is not None:
            item["namespace"], item["name"] = split
        self._calls[start.index] = self._open(item, out)

    def _closeCalls(self, out: _Pieces, status: str = "completed") -> None:
        calls, self._calls = self._calls, {}
        for call in calls.values():
            arguments = "".join(call.text)
            out.append(self._event("response.function_call_arguments.done", item_id=call.id,
                                   output_index=call.outputIndex, name=call.item["name"], arguments=arguments))
            call.item = {**call.item, "arguments": arguments, "status": status}
            self._done(call, out)

    def _closeAll(self, out: _Pieces, status: str = "completed") -> None:
        # In output order, so the done events come as the items were added.
        closers = sorted(
            [(item.outputIndex, closer) for item, closer in (
                (self._reasoning, self._closeReasoning), (self._message, self._closeMessage),
                (next(iter(self._calls.values()), None), self._closeCalls),
            ) if item is not None],
            key=lambda pair: pair[0],
        )
        for _, closer in closers:
            closer(out, status)
