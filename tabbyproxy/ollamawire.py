"""
The Ollama wire format and its translation to and from TabbyAPI's OpenAI-style API, as pure
functions: Ollama request bodies become TabbyAPI request bodies, and the events of TabbyAPI's
stream (L{tabbyproxy.tabbywire}'s) become Ollama's NDJSON objects.  Nothing here does I/O; the model descriptions of C{/api/tags},
C{/api/show} and C{/api/ps}, which read model folders, are L{tabbyproxy.modelinfo}'s.

Choices made where Ollama and TabbyAPI do not line up one to one:
  - C{think} becomes C{template_vars: {"enable_thinking": bool}} (a level string means C{True}).
    TabbyAPI reads C{template_vars} in both generations; C{chat_template_kwargs} is only an alias.
  - Negative C{presence_penalty}/C{frequency_penalty} (allowed by Ollama, refused by TabbyAPI with
    422) are clamped to C{0.0}, the nearest value TabbyAPI accepts.
  - C{/api/generate} goes to C{/v1/chat/completions} as one user message (after a system message
    when C{system} is given), so an instruct model gets its chat template, as Ollama applies the
    model's template; the route adds the profile's system prompt as for chat.  With C{raw: true}
    it goes to C{/v1/completions} instead, the prompt as it is, without C{system} (Ollama ignores
    it in raw mode too) or the profile's system prompt.  Images always take the chat route, the
    only one that takes them.  C{template} (a Go template) cannot be applied and is ignored, and
    so is C{suffix}, which the route refuses (TabbyAPI does not use it).
  - Tool call ids in replies are random per call (C{call_} and 8 hex digits), as Ollama's are, so
    the same call in the next round of a tool loop gets a new id.  A call the client sends back
    without its id gets one from its place in the history (C{call_<message>_<call>}), the same in
    every request of the conversation and never shared by two calls; each tool result gets the id
    of the call it answers.  No state is kept.
  - A conversation too long for the context loses its oldest messages, by Ollama's rule (the
    system messages and the latest message stay; L{keptMessages}), unless C{truncate: false}.
    The route learns that it is too long from TabbyAPI's refusal, and by how much
    (L{contextExcess}); TabbyAPI's tokenizer counts the candidates.  Ollama also counts 768
    tokens per image for models with a vision projector: TabbyAPI's count includes the images'
    own tokens, so no estimate is needed.  What still does not fit (a latest message too long
    alone, a C{/api/generate} prompt, which is always the latest message) is Ollama's 400
    without context shift; Ollama's default context shift instead cuts the middle of the
    prompt's tokens, which TabbyAPI cannot do to a templated prompt per request.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import secrets
from datetime import datetime, timedelta, timezone
from json.encoder import encode_basestring_ascii as _jsonString
from typing import Any, Awaitable, Callable, Iterable, Literal, Mapping, Sequence

from attrs import define, field, frozen

from tabbyproxy.jsontypes import describeJSON
from tabbyproxy.tabbywire import (
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    TokenLogprobs,
    ToolCallArguments,
    ToolCallStart,
    Usage,
)


What = Literal["chat", "generate"]

# Compact JSON, ASCII only, as the routes write it (one encoder, built once).
_encodeCompact = json.JSONEncoder(separators=(",", ":")).encode
Clock = Callable[[], float]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
ENCODE_PATH = "/v1/token/encode"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

FOREVER_EXPIRES_AT = (datetime(2318, 1, 1, tzinfo=timezone.utc) - _EPOCH).total_seconds()
"""
What C{/api/ps} shows as C{expires_at} for a model kept loaded forever: Ollama shows now plus
the longest Go duration (about 292 years), so a date in the 2300s is what clients have seen.
"""


class OllamaRequestError(ValueError):
    """
    An Ollama request body that cannot be translated; the message is fit for the client (HTTP 400).
    """


class UpstreamError(Exception):
    """
    TabbyAPI answered something the Ollama routes cannot use (embeddings that are not vectors).
    """


def ollamaTimestamp(seconds: float) -> str:
    """
    Seconds since the epoch as Ollama writes times: RFC 3339 in UTC with up to nine fractional
    digits, trailing zeros trimmed, and C{Z}, e.g. C{"2023-08-04T19:22:45.499127Z"}.

    Unlike Go, a whole second keeps nine zeros (C{"...:45.000000000Z"}): OllamaKit (Enchanted,
    Ollamac) parses dates with the fixed pattern C{ss.SSSSSSSSS}, which needs a fraction, and
    whole seconds are common here (the "forever" date, files with whole-second times).
    """
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole += 1
        nanos -= 1_000_000_000
    fraction = f"{nanos:09d}".rstrip("0") or "000000000"
    return _secondText(whole) + "." + fraction + "Z"


@functools.lru_cache(maxsize=4)
def _secondText(whole: int) -> str:
    # Every streamed line carries a time stamp; the date and time of day change once a second,
    # and formatting them was a seventh of the Ollama path's cost.
    return (_EPOCH + timedelta(seconds=whole)).strftime("%Y-%m-%dT%H:%M:%S")


# ---------------------------------------------------------------------------------------------
# Options

_FLOAT, _INT, _BOOL, _STRINGS = "float", "integer", "boolean", "array of strings"

_OPTION_TYPES: Mapping[str, str] = {
    # mapped to TabbyAPI
    "temperature": _FLOAT,
    "top_k": _INT,
    "top_p": _FLOAT,
    "min_p": _FLOAT,
    "typical_p": _FLOAT,
    "num_predict": _INT,
    "stop": _STRINGS,
    "seed": _INT,
    "repeat_penalty": _FLOAT,
    "repeat_last_n": _INT,
    "presence_penalty": _FLOAT,
    "frequency_penalty": _FLOAT,
    "mirostat": _INT,
    "mirostat_tau": _FLOAT,
    "mirostat_eta": _FLOAT,
    "tfs_z": _FLOAT,
    # runner options with no per-request TabbyAPI equivalent
    "num_ctx": _INT,
    "num_batch": _INT,
    "num_gpu": _INT,
    "main_gpu": _INT,
    "num_thread": _INT,
    "num_keep": _INT,
    "use_mmap": _BOOL,
    "use_mlock": _BOOL,
    "numa": _BOOL,
    "low_vram": _BOOL,
    "f16_kv": _BOOL,
    "vocab_only": _BOOL,
    "logits_all": _BOOL,
    "embedding_only": _BOOL,
    "penalize_newline": _BOOL,
    "rope_frequency_base": _FLOAT,
    "rope_frequency_scale": _FLOAT,
}

SAMPLER_NAMES: Mapping[str, str] = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical",
    "num_predict": "max_tokens",
    "stop": "stop",
    "seed": "seed",
    "repeat_penalty": "repetition_penalty",
    "repeat_last_n": "penalty_range",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "tfs_z": "tfs",
}
"""
Each Ollama option that TabbyAPI understands, and TabbyAPI's name for it.
"""


@frozen
class MappedOptions:
    """
    An Ollama C{options} object split in two.

    @ivar sampler: TabbyAPI sampler fields to put in the upstream body.
    @ivar ignored: the options that are not forwarded, as the client sent them: runner options
        (C{num_ctx}, C{num_gpu}, ...), unknown keys, and values TabbyAPI has no use for
        (C{seed} < 0, C{repeat_penalty} <= 0).  For the route's debug log.
    """

    sampler: dict[str, Any]
    ignored: dict[str, Any]


def _optionValue(key: str, value: object, kind: str) -> Any:
    wrongType = OllamaRequestError(f'option "{key}" must be of type {kind}')
    if kind == _BOOL:
        if not isinstance(value, bool):
            raise wrongType
        return value
    if kind == _STRINGS:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise wrongType
        return list(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrongType
    try:
        number = float(value)
    except OverflowError:
        raise OllamaRequestError(f'option "{key}" is out of range') from None
    if not math.isfinite(number):
        raise OllamaRequestError(f'option "{key}" must be a finite number')
    if kind == _INT:
        return int(value)
    return number


def mapOptions(options: object) -> MappedOptions:
    """
    Translate Ollama's C{options} into TabbyAPI sampler fields.

    Renamed on the way: C{num_predict} -> C{max_tokens} (left out when <= 0, Ollama's "no
    limit"), C{repeat_penalty} -> C{repetition_penalty} (dropped when <= 0), C{repeat_last_n} ->
    C{penalty_range} (negative means the whole context in both), C{tfs_z} -> C{tfs},
    C{typical_p} -> C{typical}, C{mirostat} -> C{mirostat_mode}.  Clamped into TabbyAPI's ranges,
    which would otherwise answer 422: negative C{presence_penalty}/C{frequency_penalty} become
    C{0.0}, C{temperature} is kept within 0-10, C{top_p} and C{min_p} within 0-1, negative
    C{top_k} becomes 0 (off).  C{seed} is forwarded when >= 0 (Ollama's -1 means random).  A
    C{null} value counts as absent; C{stop} may also be one string.

    @raise OllamaRequestError: when C{options} is not an object or a known option (forwarded or
        not) has the wrong type, with Ollama's message C{option "x" must be of type ...}.
    """
    if options is None:
        return MappedOptions(sampler={}, ignored={})
    if not isinstance(options, dict):
        raise OllamaRequestError("options must be an object")
    sampler: dict[str, Any] = {}
    ignored: dict[str, Any] = {}
    for key, raw in options.items():
        if raw is None:
            continue
        kind = _OPTION_TYPES.get(key)
        value = raw if kind is None else _optionValue(key, raw, kind)
        if key not in SAMPLER_NAMES:
            ignored[key] = raw
            continue
        if key == "num_predict" and value <= 0:
            continue
        if (key == "seed" and value < 0) or (key == "repeat_penalty" and value <= 0):
            ignored[key] = raw
            continue
        if key in ("presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta"):
            value = max(0.0, value)
        elif key == "temperature":
            value = min(10.0, max(0.0, value))
        elif key in ("top_p", "min_p", "typical_p", "tfs_z"):
            value = min(1.0, max(0.0, value))
        elif key in ("top_k", "mirostat"):
            value = max(0, value)
        elif key == "repeat_last_n" and value < 0:
            value = -1
        sampler[SAMPLER_NAMES[key]] = value
    return MappedOptions(sampler=sampler, ignored=ignored)


# ---------------------------------------------------------------------------------------------
# Requests


@frozen
class UpstreamRequest:
    """
    What to send TabbyAPI for one Ollama request.

    @ivar path: C{/v1/chat/completions} or C{/v1/completions}.
    @ivar body: the JSON body, always streaming with usage; without C{model}, profile defaults
        or C{keep_alive}, which the route adds or handles.  The route may add to it.
    @ivar ignoredOptions: L{MappedOptions.ignored}, for the route's debug log.
    @ivar profileSystem: whether the profile's system prompt (and time stamp) belongs in front
        of C{body["messages"]}: true for chat-templated requests, false for raw text.
    @ivar truncate: Ollama's C{truncate}: whether a conversation too long for the context loses
        its oldest messages (L{keptMessages}) rather than failing.
    """

    path: str
    body: dict[str, Any]
    ignoredOptions: Mapping[str, Any]
    profileSystem: bool = False
    truncate: bool = True


def isEmptyRequest(what: What, body: Mapping[str, Any]) -> bool:
    """
    Whether an Ollama request only asks to load (or, with C{keep_alive: 0}, unload) the model:
    C{messages} empty or absent on chat, C{prompt} empty or absent on generate.
    """
    if what == "chat":
        return not body.get("messages")
    return not body.get("prompt")


def _string(body: Mapping[str, Any], key: str, where: str = "") -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise OllamaRequestError(f"{where}{key} must be a string, not {describeJSON(value)}")
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OllamaRequestError(f"{key} must be a boolean, not {describeJSON(value)}")
    return value


def _truncate(body: Mapping[str, Any]) -> bool:
    value = body.get("truncate")
    if value is None:
        return True  # Ollama truncates unless told not to.
    if not isinstance(value, bool):
        raise OllamaRequestError(f"truncate must be a boolean, not {describeJSON(value)}")
    return value


def _list(value: object, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise OllamaRequestError(f"{name} must be an array, not {describeJSON(value)}")
    return value


_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def imageDataURI(image: object, name: str = "image") -> str:
    """
    An Ollama image (base64 without a header) as a C{data:} URI for an OpenAI C{image_url} part.
    The type is sniffed from the decoded bytes (PNG, JPEG, GIF, WebP), JPEG when unknown.  A
    value that is already a C{data:} URI is kept.

    @raise OllamaRequestError: when the value is not a base64 string.
    """
    if not isinstance(image, str) or not image:
        raise OllamaRequestError(f"{name} must be a base64 string, not {describeJSON(image)}")
    if image.startswith("data:"):
        return image
    cleaned = "".join(image.split())
    try:
        decoded = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise OllamaRequestError(f"{name} is not valid base64") from None
    mediaType = "image/jpeg"
    for signature, candidate in _IMAGE_SIGNATURES:
        if decoded.startswith(signature):
            mediaType = candidate
            break
    else:
        if decoded[:4] == b"RIFF" and decoded[8:12] == b"WEBP":
            mediaType = "image/webp"
    return f"data:{mediaType};base64,{cleaned}"


def _content(text: str, images: list[Any], where: str) -> str | list[dict[str, Any]]:
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for index, image in enumerate(images):
        url = imageDataURI(image, f"{where}images[{index}]")
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def newToolCallId() -> str:
    """
    The id of a tool call in a reply: C{call_} and 8 random hex digits, new for every call.
    """
    return "call_" + secrets.token_hex(4)


def historyCallId(message: int, call: int) -> str:
    """
    The id of a tool call the client sent back without one: from the positions of its message in
    the history and of the call in that message, so it is the same in every later request.
    """
    return f"call_{message}_{call}"


def _requestToolCalls(calls: list[Any], message: int) -> list[dict[str, Any]]:
    where = f"messages[{message}]."
    result = []
    for position, call in enumerate(calls):
        here = f"{where}tool_calls[{position}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise OllamaRequestError(f"{here} must be an object with a function")
        function = call["function"]
        name = function.get("name")
        if not isinstance(name, str):
            raise OllamaRequestError(f"{here}.function.name must be a string")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = {}
        argumentsText = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        callId = call.get("id")
        if not isinstance(callId, str) or not callId:
            callId = historyCallId(message, position)
        result.append(
            {
                "id": callId,
                "type": "function",
                "function": {"name": name, "arguments": argumentsText},
            }
        )
    return result


def _chatMessages(messages: list[Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    # (id, name) of the latest assistant tool calls that no tool message has answered yet
    pending: list[tuple[str, str]] = []
    for position, message in enumerate(messages):
        where = f"messages[{position}]."
        if not isinstance(message, dict):
            raise OllamaRequestError(f"messages[{position}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise OllamaRequestError(f"{where}role must be a string")
        role = role.lower()
        text = _string(message, "content", where)
        images = _list(message.get("images"), f"{where}images")
        converted: dict[str, Any] = {"role": role, "content": _content(text, images, where)}
        thinking = _string(message, "thinking", where)
        if thinking and role == "assistant":
            converted["reasoning_content"] = thinking
        calls = _list(message.get("tool_calls"), f"{where}tool_calls")
        if calls:
            converted["tool_calls"] = _requestToolCalls(calls, position)
            pending = [(c["id"], c["function"]["name"]) for c in converted["tool_calls"]]
        if role == "tool":
            converted["tool_call_id"] = _answeredCall(
                pending,
                _string(message, "tool_call_id", where),
                _string(message, "tool_name", where),
                position,
            )
        result.append(converted)
    return result


def _answeredCall(pending: list[tuple[str, str]], callId: str, name: str, position: int) -> str:
    """
    The id of the call a tool message answers, and forget that call: the given id, else the
    oldest unanswered call of that name (of any name when none is given).
    """
    for index, (candidateId, candidateName) in enumerate(pending):
        if (callId and candidateId == callId) or (
            not callId and (not name or candidateName == name)
        ):
            del pending[index]
            return candidateId
    return callId or historyCallId(position, 0)


def _format(body: Mapping[str, Any]) -> dict[str, Any]:
    value = body.get("format")
    if value is None or value == "":
        return {}
    if value == "json":
        return {"response_format": {"type": "json"}}
    if isinstance(value, dict):
        return {"json_schema": value}
    raise OllamaRequestError('format must be "json" or a JSON schema object')


def _think(body: Mapping[str, Any]) -> dict[str, Any]:
    value = body.get("think")
    if value is None:
        return {}
    if isinstance(value, bool):
        enabled = value
    elif value in ("low", "medium", "high", "max"):
        enabled = True
    else:
        raise OllamaRequestError('think must be true, false, "low", "medium" or "high"')
    return {"template_vars": {"enable_thinking": enabled}}


def _tools(value: object) -> list[dict[str, Any]]:
    tools = []
    for index, tool in enumerate(_list(value, "tools")):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise OllamaRequestError(f"tools[{index}] must be an object with a function")
        if not isinstance(tool["function"].get("name"), str):
            raise OllamaRequestError(f"tools[{index}].function.name must be a string")
        tools.append({**tool, "type": tool.get("type") or "function"})
    return tools


def topLogprobs(body: Mapping[str, Any]) -> int:
    """
    C{top_logprobs}: how many of the likeliest tokens to give at each place (0 when absent).

    @raise OllamaRequestError: outside 0-20, in Ollama's words.
    """
    value = body.get("top_logprobs")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise OllamaRequestError("top_logprobs must be between 0 and 20")
    return value


def _logprobs(body: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    top = topLogprobs(body)
    if not _flag(body, "logprobs"):
        return {}
    if chat:
        return {"logprobs": True, "top_logprobs": top}
    # Completions take one number: how many likeliest tokens, 1 at least to get any.
    return {"logprobs": max(top, 1)}


def _common(body: Mapping[str, Any]) -> tuple[dict[str, Any], MappedOptions]:
    if not isinstance(body, Mapping):
        raise OllamaRequestError("the request body must be a JSON object")
    options = mapOptions(body.get("options"))
    upstream: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    upstream.update(options.sampler)
    upstream.update(_format(body))
    return upstream, options


def chatRequest(body: Mapping[str, Any]) -> UpstreamRequest:
    """
    An Ollama C{/api/chat} body as a TabbyAPI C{/v1/chat/completions} request: messages (images
    as data URI parts, tool calls with string arguments and ids, tool results with the
    C{tool_call_id} of the call they answer, C{thinking} as C{reasoning_content}), C{tools},
    C{options}, C{format}, C{think}, C{logprobs} and C{top_logprobs}.

    @raise OllamaRequestError: for fields of the wrong type or bad values.
    """
    upstream, options = _common(body)
    upstream["messages"] = _chatMessages(_list(body.get("messages"), "messages"))
    upstream.update(_logprobs(body, chat=True))
    tools = _tools(body.get("tools"))
    if tools:
        upstream["tools"] = tools
    upstream.update(_think(body))
    return UpstreamRequest(
        path=CHAT_PATH, body=upstream, ignoredOptions=options.ignored, profileSystem=True,
        truncate=_truncate(body),
    )


def generateRequest(body: Mapping[str, Any]) -> UpstreamRequest:
    """
    An Ollama C{/api/generate} body as a TabbyAPI request.

    Templated (the default): a C{/v1/chat/completions} request with C{system} as a system
    message and the prompt (and images) as one user message, for the model's chat template;
    the profile's system prompt belongs in front.  With C{raw: true} (and no images): a
    C{/v1/completions} request with the prompt as it is.  Both carry C{options}, C{format},
    C{think}, C{logprobs} and C{top_logprobs}; C{template} and C{suffix} are checked but ignored.

    @raise OllamaRequestError: for fields of the wrong type or bad values.
    """
    upstream, options = _common(body)
    prompt = _string(body, "prompt")
    system = _string(body, "system")
    _string(body, "suffix")
    _string(body, "template")
    raw = _flag(body, "raw")
    truncate = _truncate(body)
    images = _list(body.get("images"), "images")
    upstream.update(_think(body))
    upstream.update(_logprobs(body, chat=bool(images or not raw)))
    if images or not raw:
        messages: list[dict[str, Any]] = []
        if system and not raw:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": _content(prompt, images, "")})
        upstream["messages"] = messages
        return UpstreamRequest(
            path=CHAT_PATH, body=upstream, ignoredOptions=options.ignored, profileSystem=not raw,
            truncate=truncate,
        )
    upstream["prompt"] = prompt
    return UpstreamRequest(path=COMPLETIONS_PATH, body=upstream, ignoredOptions=options.ignored,
                           truncate=truncate)


# ---------------------------------------------------------------------------------------------
# Conversations longer than the context

_PROMPT_TOO_LONG = re.compile(r"Prompt length (\d+) exceeds the available context size of (\d+) tokens")
_ALLOCATION_TOO_LARGE = re.compile(
    r"Initial job allocation requires (\d+) cache tokens, which exceeds the available context size of (\d+) tokens"
)

PROMPT_TOO_LONG = (
    "the prompt is longer than the context length currently available to the model; shorten the "
    "prompt, adjust the context length in settings, or use a model with a longer context length"
)
"""
Ollama's answer (400) to a prompt that does not fit the context even truncated.
"""


def contextExcess(message: str) -> int | None:
    """
    By how many tokens TabbyAPI found a prompt too long, from its refusal (400
    C{context_length_exceeded}, C{validate_context_requirements} in its common/errors.py), or
    C{None} when C{message} is not such a refusal.

    TabbyAPI checks two limits, and names the first that fails: the prompt against
    C{max_seq_len}, then the cache its first job allocates against the cache size (the prompt
    and one chunk with output chunking, its default; the prompt and C{max_tokens} without).
    Either way the prompt must shrink by the difference, so the room an answer needs is
    TabbyAPI's own rule rather than a guess.
    """
    for pattern in (_PROMPT_TOO_LONG, _ALLOCATION_TOO_LARGE):
        found = pattern.search(message)
        if found is not None:
            return max(1, int(found.group(1)) - int(found.group(2)))
    return None


def keptMessages(messages: Sequence[Mapping[str, Any]], start: int) -> list[Mapping[str, Any]]:
    """
    The messages a conversation keeps when its oldest are dropped from C{start} on, by Ollama's
    rule (C{chatPrompt} in its server/prompt.go): the system messages before C{start}, in
    order, then every message from C{start}.
    """
    return [message for message in messages[:start] if message.get("role") == "system"] + list(messages[start:])


def canDrop(messages: Sequence[Mapping[str, Any]]) -> bool:
    """
    Whether Ollama's rule can make a conversation shorter: it has a message before the latest
    that is not a system message.
    """
    return any(message.get("role") != "system" for message in messages[:-1])


Counter = Callable[[Sequence[Mapping[str, Any]]], Awaitable[int]]


async def fittingStart(messages: Sequence[Mapping[str, Any]], limit: int, count: Counter) -> int | None:
    """
    Where Ollama's rule starts a conversation that is too long whole: the first C{start} (from
    1) whose L{keptMessages} count at most C{limit} tokens, or C{None} when even the system
    messages and the latest message do not fit.

    Ollama tries each start in turn; a conversation loses tokens with every message it drops,
    so halving finds the same start with a count per halving (each a request to TabbyAPI's
    tokenizer) instead of one per message.

    @param count: the tokens of some messages (TabbyAPI's C{/v1/token/encode} of them).
    """
    last = len(messages) - 1
    if last < 1:
        return None
    fits: dict[int, bool] = {}

    async def fitting(start: int) -> bool:
        if start not in fits:
            fits[start] = await count(keptMessages(messages, start)) <= limit
        return fits[start]

    low, high = 1, last
    while low < high:
        middle = (low + high) // 2
        if await fitting(middle):
            high = middle
        else:
            low = middle + 1
    return low if await fitting(low) else None


def encodeRequest(body: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    The C{/v1/token/encode} body that counts C{messages} as the chat request C{body} templates
    them: TabbyAPI renders a list of messages with the model's chat template and C{template_vars},
    where the chat route puts C{tools} too (the encode route has no C{tools} of its own).
    """
    templateVars = dict(body.get("template_vars") or {})
    if body.get("tools"):
        templateVars["tools"] = body["tools"]
    request: dict[str, Any] = {"text": list(messages)}
    if templateVars:
        request["template_vars"] = templateVars
    return request


def encodedLength(document: object) -> int:
    """
    The token count of TabbyAPI's C{/v1/token/encode} answer, C{{"tokens": [...], "length": n}}.

    @raise UpstreamError: when the answer is not one.
    """
    if isinstance(document, dict):
        length = document.get("length")
        if isinstance(length, int) and not isinstance(length, bool):
            return length
        if isinstance(document.get("tokens"), list):
            return len(document["tokens"])
    raise UpstreamError(f"TabbyAPI's token count is not one: {str(document)[:200]}")


def promptTooLong(refusal: str) -> str:
    """
    The error for a prompt that does not fit even truncated: Ollama's words, with TabbyAPI's
    figures for the whole prompt.
    """
    return f"{PROMPT_TOO_LONG} (TabbyAPI: {refusal})"


# ---------------------------------------------------------------------------------------------
# Responses


def _emptyReply(what: What, modelName: str, clock: Clock, reason: str) -> dict[str, Any]:
    reply: dict[str, Any] = {"model": modelName, "created_at": ollamaTimestamp(clock())}
    if what == "chat":
        reply["message"] = {"role": "assistant", "content": ""}
        reply["done_reason"] = reason
        reply["done"] = True
    else:
        reply["response"] = ""
        reply["done"] = True
        reply["done_reason"] = reason
    return reply


def loadReply(what: What, modelName: str, clock: Clock) -> dict[str, Any]:
    """
    The one object answering an empty request that loaded the model (C{done_reason: "load"}).
    """
    return _emptyReply(what, modelName, clock, "load")


def unloadReply(what: What, modelName: str, clock: Clock) -> dict[str, Any]:
    """
    The one object answering an empty request with C{keep_alive: 0} (C{done_reason: "unload"}).
    """
    return _emptyReply(what, modelName, clock, "unload")


def _nanoseconds(seconds: float) -> int:
    return max(0, int(round(seconds * 1e9)))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@define
class _ToolCall:
    callId: str
    name: str = ""
    arguments: str = ""
    emitted: bool = False

    def parsedArguments(self) -> dict[str, Any] | None:
        """
        The arguments as the object Ollama sends, or C{None} while they are incomplete JSON.
        """
        if not self.arguments.strip():
            return None
        try:
            parsed = json.loads(self.arguments)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else {"value": parsed}

    def finalArguments(self) -> dict[str, Any]:
        """
        The arguments at the end of the stream: empty or unparsable text is kept as best we can.
        """
        parsed = self.parsedArguments()
        if parsed is not None:
            return parsed
        return {"value": self.arguments} if self.arguments.strip() else {}


@define
class StreamTranslator:
    """
    Turns the events of TabbyAPI's stream (L{tabbyproxy.tabbywire.ChatStreamDecoder}'s, from
    either generation's shape, chat or completions) into Ollama's NDJSON objects for one request.

    Feed the events of each read to L{feed} and write what it returns; end with L{finish} for a
    stream, or ignore L{feed}'s output and answer L{aggregate} for C{stream: false}.  An error
    event gives nothing here: the route ends the stream with an C{{"error": ...}} line.

    @ivar what: C{"chat"} (objects carry C{message}) or C{"generate"} (objects carry C{response}).
    @ivar modelName: the model name the client sent, echoed exactly.
    @ivar clock: returns the time in seconds, like C{time.time} or C{reactor.seconds}.
    @ivar startedAt: when the request arrived, by C{clock}.
    @ivar loadDuration: seconds the request waited for the model to load.
    @ivar callIds: makes the id of each tool call in the reply.
    @ivar topLogprobs: how many of the likeliest tokens the client asked for at each place.
    """

    what: What
    modelName: str
    clock: Clock
    startedAt: float
    loadDuration: float = 0.0
    callIds: Callable[[], str] = newToolCallId
    topLogprobs: int = 0
    _logprobs: list[dict[str, Any]] = field(factory=list, init=False)
    _content: list[str] = field(factory=list, init=False)
    _thinking: list[str] = field(factory=list, init=False)
    _toolCalls: dict[int, _ToolCall] = field(factory=dict, init=False)
    _finishReason: str | None = field(default=None, init=False)
    _usage: Usage = field(default=Usage(None, None), init=False)
    _chunks: int = field(default=0, init=False)
    _firstOutputAt: float | None = field(default=None, init=False)
    # The start of every streamed line: the model name, escaped once.
    _prefix: str | None = field(default=None, init=False)

    def feed(self, events: Iterable[Event]) -> list[dict[str, Any]]:
        """
        The events of one read in, the Ollama objects to write now out: one per piece of text or
        reasoning, and one with the tool calls complete so far (JSON arguments that parse), or
        all of them once the generation finished.  The objects of one read share its time stamp.
        """
        return [self._textLine(*line) if isinstance(line, tuple) else line for line in self._translate(events)]

    def feedNDJSON(self, events: Iterable[Event]) -> bytes:
        """
        L{feed}'s objects as NDJSON, exactly as compact C{json.dumps} writes them, a line each;
        the lines of text and reasoning, one per token, are filled into a template instead of
        building and encoding an object for each.
        """
        if self._prefix is None:
            self._prefix = '{"model":' + _jsonString(self.modelName) + ',"created_at":"'
        prefix = self._prefix
        pieces = []
        for line in self._translate(events):
            if isinstance(line, tuple):
                createdAt, text, thinking = line
                self._chunks += 1
                thought = ',"thinking":' + _jsonString(thinking) if thinking else ""
                if self.what == "chat":
                    pieces.append(f'{prefix}{createdAt}","message":{{"role":"assistant","content":'
                                  f'{_jsonString(text)}{thought}}},"done":false}}\n')
                else:
                    pieces.append(f'{prefix}{createdAt}","response":{_jsonString(text)}{thought},"done":false}}\n')
            else:
                pieces.append(_encodeCompact(line) + "\n")
        return "".join(pieces).encode("ascii")

    def _translate(self, events: Iterable[Event]) -> list[dict[str, Any] | tuple[str, str, str]]:
        """
        L{feed}'s objects, with each line of text or reasoning as its time stamp, text and
        reasoning, to be made into an object or a line.
        """
        lines: list[dict[str, Any] | tuple[str, str, str]] = []
        createdAt = ""
        toolCallsChanged = False
        for event in events:
            if isinstance(event, TextDelta):
                createdAt = createdAt or self._output()
                self._content.append(event.text)
                lines.append((createdAt, event.text, ""))
            elif isinstance(event, ReasoningDelta):
                createdAt = createdAt or self._output()
                self._thinking.append(event.text)
                lines.append((createdAt, "", event.text))
            elif isinstance(event, TokenLogprobs):
                entries = [self._ollamaLogprob(token, value, top) for token, value, top in event.tokens]
                self._logprobs.extend(entries)
                last = lines[-1] if lines else None
                if isinstance(last, tuple):
                    lines[-1] = {**self._textLine(*last), "logprobs": entries}
            elif isinstance(event, ToolCallStart):
                self._toolCalls[event.index] = _ToolCall(self.callIds(), name=event.name)
                toolCallsChanged = True
            elif isinstance(event, ToolCallArguments):
                if event.index not in self._toolCalls:
                    self._toolCalls[event.index] = _ToolCall(self.callIds())
                self._toolCalls[event.index].arguments += event.text
                toolCallsChanged = True
            elif isinstance(event, Finish):
                self._finishReason = event.reason
                lines.extend(self._toolCallLines(flush=True))
            elif isinstance(event, Usage):
                self._usage = event
                lines.extend(self._toolCallLines(flush=True))
        if toolCallsChanged:
            lines.extend(self._toolCallLines(flush=False))
        return lines

    def _output(self) -> str:
        """
        Note that output is being written now, and the time stamp for it.
        """
        now = self.clock()
        if self._firstOutputAt is None:
            self._firstOutputAt = now
        return ollamaTimestamp(now)

    def _textLine(self, createdAt: str, text: str, thinking: str) -> dict[str, Any]:
        self._chunks += 1
        if self.what == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            return {"model": self.modelName, "created_at": createdAt, "message": message, "done": False}
        line: dict[str, Any] = {"model": self.modelName, "created_at": createdAt, "response": text}
        if thinking:
            line["thinking"] = thinking
        line["done"] = False
        return line

    def _ollamaLogprob(self, token: str, value: float, top: tuple[tuple[str, float], ...]) -> dict[str, Any]:
        """
        One of Ollama's C{logprobs} entries: the token, its log probability and UTF-8 bytes, and
        the likeliest tokens at its place (left out when none were asked for).
        """
        entry: dict[str, Any] = {"token": token, "logprob": value, "bytes": list(token.encode("utf-8"))}
        if self.topLogprobs and top:
            entry["top_logprobs"] = [
                {"token": name, "logprob": logprob, "bytes": list(name.encode("utf-8"))}
                for name, logprob in top[: self.topLogprobs]
            ]
        return entry

    def _ollamaToolCall(self, index: int, call: _ToolCall) -> dict[str, Any]:
        arguments = call.finalArguments()
        return {
            "id": call.callId,
            "function": {"index": index, "name": call.name, "arguments": arguments},
        }

    def _toolCallLines(self, flush: bool) -> list[dict[str, Any]]:
        """
        A non-final line with the tool calls complete so far (JSON arguments that parse), or all
        of them when C{flush}.
        """
        if not self._toolCalls:
            return []
        ready = []
        for index in sorted(self._toolCalls):
            call = self._toolCalls[index]
            if call.emitted or not (flush or (call.name and call.parsedArguments() is not None)):
                continue
            call.emitted = True
            ready.append(self._ollamaToolCall(index, call))
        if not ready or self.what != "chat":
            return []
        createdAt = self._output()
        self._chunks += 1
        return [{"model": self.modelName, "created_at": createdAt,
                 "message": {"role": "assistant", "content": "", "tool_calls": ready}, "done": False}]

    def _final(self, message: dict[str, Any], response: str, thinking: str) -> dict[str, Any]:
        now = self.clock()
        usage = self._usage
        promptTokens = usage.promptTokens
        completionTokens = usage.completionTokens
        promptTime = usage.promptTime
        completionTime = usage.completionTime
        generationStart = self.startedAt + self.loadDuration
        firstOutput = self._firstOutputAt if self._firstOutputAt is not None else now
        reason = self._finishReason
        line: dict[str, Any] = {"model": self.modelName, "created_at": ollamaTimestamp(now)}
        if self.what == "chat":
            line["message"] = message
            line["done_reason"] = "length" if reason == "length" else "stop"
            line["done"] = True
        else:
            line["response"] = response
            if thinking:
                line["thinking"] = thinking
            line["done"] = True
            line["done_reason"] = "length" if reason == "length" else "stop"
        line.update(
            total_duration=_nanoseconds(now - self.startedAt),
            load_duration=_nanoseconds(self.loadDuration),
            prompt_eval_count=int(promptTokens) if promptTokens is not None else 0,
            prompt_eval_duration=_nanoseconds(
                promptTime if promptTime is not None else firstOutput - generationStart
            ),
            eval_count=int(completionTokens) if completionTokens is not None else self._chunks,
            eval_duration=_nanoseconds(
                completionTime if completionTime is not None else now - firstOutput
            ),
        )
        return line

    def finish(self) -> dict[str, Any]:
        """
        The last line of a stream: C{done: true}, C{done_reason} (C{"length"} or C{"stop"}, tool
        calls count as C{"stop"}), an empty message or response, and the durations in
        nanoseconds, from TabbyAPI's usage when it sent one, else from the clock (and the
        number of lines written as C{eval_count}).  Tool calls never completed before the end are
        included in its message.
        """
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        leftover = [
            self._ollamaToolCall(index, call)
            for index, call in sorted(self._toolCalls.items())
            if not call.emitted
        ]
        if leftover and self.what == "chat":
            message["tool_calls"] = leftover
        return self._final(message, "", "")

    def aggregate(self) -> dict[str, Any]:
        """
        The single answer for C{stream: false}: L{finish}'s object with the whole content,
        thinking, tool calls and log probabilities.
        """
        content = "".join(self._content)
        thinking = "".join(self._thinking)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        calls = [
            self._ollamaToolCall(index, call) for index, call in sorted(self._toolCalls.items())
        ]
        if calls:
            message["tool_calls"] = calls
        final = self._final(message, content, thinking)
        if self._logprobs:
            final["logprobs"] = self._logprobs
        return final


# ---------------------------------------------------------------------------------------------
# Embeddings

EMBEDDINGS_PATH = "/v1/embeddings"


def embedInputs(body: Mapping[str, Any]) -> list[str]:
    """
    The texts of an Ollama C{/api/embed} body: C{input} as one string or a list of strings.
    An empty string or list, or no C{input}, gives no texts: the request only loads the model.

    @raise OllamaRequestError: for any other C{input}.
    """
    value = body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise OllamaRequestError("input must be a string or an array of strings")


def embeddingsPrompt(body: Mapping[str, Any]) -> list[str]:
    """
    The text of a legacy C{/api/embeddings} body (C{prompt}), as a list of none or one.

    @raise OllamaRequestError: when C{prompt} is not a string.
    """
    prompt = _string(body, "prompt")
    return [prompt] if prompt else []


def embedDimensions(body: Mapping[str, Any]) -> int | None:
    """
    C{dimensions} of an C{/api/embed} body: how many leading values of each vector to keep.

    @raise OllamaRequestError: when it is not a positive integer.
    """
    value = body.get("dimensions")
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OllamaRequestError("dimensions must be a positive integer")
    return value


def embeddingsUpstreamBody(texts: list[str]) -> dict[str, Any]:
    """
    TabbyAPI's C{/v1/embeddings} request for C{texts}, with vectors as JSON numbers.
    """
    return {"input": texts, "encoding_format": "float"}


def upstreamEmbeddings(document: object, count: int) -> tuple[list[list[float]], int]:
    """
    The vectors of TabbyAPI's C{/v1/embeddings} answer, in input order, and its prompt token
    count (0 when it gives none).

    @param count: how many inputs were sent; the answer must have one vector for each.
    @raise UpstreamError: when the answer is not that.
    """
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list) or len(data) != count:
        raise UpstreamError(f"TabbyAPI's embeddings answer does not hold {count} vectors")
    byIndex: dict[int, list[float]] = {}
    for position, item in enumerate(data):
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(vector, list) or not all(_number(v) is not None for v in vector):
            raise UpstreamError("TabbyAPI's embeddings answer holds something that is not a vector")
        index = item.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            index = position
        byIndex[index] = [float(v) for v in vector]
    if len(byIndex) != count:
        raise UpstreamError("TabbyAPI's embeddings answer repeats an index")
    usage = document.get("usage") if isinstance(document, dict) else None
    tokens = _number(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
    return [byIndex[index] for index in range(count)], int(tokens or 0)


def normalized(vector: list[float], dimensions: int | None = None) -> list[float]:
    """
    C{vector} cut to its first C{dimensions} values and scaled to length 1, as Ollama's
    C{/api/embed} returns vectors (a zero vector stays zero).
    """
    if dimensions is not None:
        vector = vector[:dimensions]
    # Scaled by the largest value first, so squaring neither underflows nor overflows.
    largest = max((abs(value) for value in vector), default=0.0)
    if largest == 0 or not math.isfinite(largest):
        return list(vector)
    scaled = [value / largest for value in vector]
    length = math.sqrt(math.fsum(value * value for value in scaled))
    return [value / length for value in scaled]


def embedReply(
    modelName: str,
    vectors: list[list[float]],
    totalDuration: float,
    loadDuration: float,
    promptTokens: int,
    dimensions: int | None = None,
) -> dict[str, Any]:
    """
    The answer to C{/api/embed}: the vectors normalized (and cut to C{dimensions}), the
    durations in nanoseconds and the prompt token count.
    """
    return {
        "model": modelName,
        "embeddings": [normalized(vector, dimensions) for vector in vectors],
        "total_duration": _nanoseconds(totalDuration),
        "load_duration": _nanoseconds(loadDuration),
        "prompt_eval_count": promptTokens,
    }


def embeddingsReply(vectors: list[list[float]]) -> dict[str, Any]:
    """
    The answer to the legacy C{/api/embeddings}: the one vector as TabbyAPI gave it, or an
    empty one for a request that only loaded the model.
    """
    return {"embedding": vectors[0] if vectors else []}
