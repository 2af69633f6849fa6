"""
Deterministic text generation without a model: a fixed vocabulary, words chosen from a digest
of the prompt, token ids that round-trip through encode and decode, embeddings, and the plan of
one generation (its pieces, reasoning, length, stop reason and usage).

Agent loops are tested with a directive: when the request offers tools and its last user
message holds C{[[call NAME {"arg": ...}]]} naming one of them, the answer is that tool call,
as TabbyAPI sends one; once a tool result follows the last assistant message, the answer is
text that quotes the result.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
import zlib
from typing import Any, Sequence

from attrs import frozen

from tabbyproxy.simulator.values import JSON, asBool


# A small fixed vocabulary: generated words and token ids both come from it, so that
# /v1/token/decode can turn ids from /v1/token/encode back into the same words.
VOCABULARY: tuple[str, ...] = (
    "amber", "basil", "cedar", "delta", "ember", "fable", "garnet", "harbor",
    "indigo", "jasper", "kestrel", "lumen", "maple", "nectar", "onyx", "pepper",
    "quartz", "raven", "sable", "tundra", "umber", "velvet", "willow", "xenon",
    "yonder", "zephyr", "acorn", "breeze", "cobalt", "dune", "echo", "fern",
    "glacier", "hollow", "iris", "juniper", "kelp", "lagoon", "meadow", "nimbus",
    "orchid", "pebble", "quill", "ripple", "summit", "thistle", "upland", "vale",
    "wren", "yarrow", "zinnia", "aspen", "birch", "canyon", "dawn", "estuary",
    "flint", "grove", "heath", "isle", "jade", "knoll", "lark", "moss",
)


def _digest(text: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256((salt + "\0" + text).encode()).digest()[:8], "big")


def wordCount(text: str) -> int:
    return len(text.split())


def chooseWords(prompt: str, count: int) -> list[str]:
    """
    Deterministic words for a prompt: the same prompt always gives the same answer.
    """
    return [VOCABULARY[_digest(prompt, str(i)) % len(VOCABULARY)] for i in range(count)]


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = {IM_START: 151644, IM_END: 151645}
"""
ChatML's special tokens and their ids (Qwen's): one token each, wherever they stand.
"""
_SPECIAL_NAMES = {tokenId: name for name, tokenId in SPECIAL_TOKENS.items()}
_SPECIAL = re.compile("(" + "|".join(re.escape(name) for name in SPECIAL_TOKENS) + ")")


def encodeText(text: str) -> list[int]:
    """
    One token id per word and per special token: vocabulary words get their index, special
    tokens their id, other words a stable hash above the vocabulary.
    """
    ids = []
    for part in _SPECIAL.split(text):
        if part in SPECIAL_TOKENS:
            ids.append(SPECIAL_TOKENS[part])
            continue
        for word in part.split():
            if word in VOCABULARY:
                ids.append(VOCABULARY.index(word))
            else:
                ids.append(len(VOCABULARY) + zlib.crc32(word.encode()) % 30000)
    return ids


def decodeTokens(tokens: Sequence[int]) -> str:
    """
    The inverse of L{encodeText} for vocabulary words and special tokens; other ids decode to
    a placeholder.
    """
    return " ".join(
        VOCABULARY[t] if 0 <= t < len(VOCABULARY) else _SPECIAL_NAMES.get(t, f"<tok{t}>") for t in tokens
    )


def chatPrompt(messages: Sequence[Any], addGenerationPrompt: bool) -> str:
    """
    Chat messages through the simulator's ChatML template, as TabbyAPI renders a model's chat
    template: each message C{<|im_start|>ROLE\nTEXT<|im_end|>\n}, then
    C{<|im_start|>assistant\n} when a reply is to follow.
    """
    parts = [
        f"{IM_START}{message.get('role', 'user')}\n{messageText(message.get('content'))}{IM_END}\n"
        for message in messages if isinstance(message, dict)
    ]
    if addGenerationPrompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def contextProblem(contextLength: int, maxSeqLen: int, maxTokens: int, cacheSize: int,
                   chunkSize: int | None, boundary: int = 256) -> str | None:
    """
    Why TabbyAPI refuses a prompt of C{contextLength} tokens before it generates (its
    C{validate_context_requirements}, common/errors.py), or C{None} when it fits: longer than
    C{max_seq_len}, or a first job allocation larger than the cache.  With output chunking
    (TabbyAPI's default, C{chunkSize} given) the allocation is the prompt and one chunk, rounded
    up to C{boundary}; without, the prompt and C{max_tokens} (0 fills the context).
    """
    if contextLength > maxSeqLen:
        return (f"Prompt length {contextLength} exceeds the available context size "
                f"of {maxSeqLen} tokens")
    if maxTokens <= 0:
        maxTokens = maxSeqLen - contextLength - 1
    if chunkSize is not None:
        required = (contextLength - 1 + chunkSize + boundary - 1) // boundary * boundary
    else:
        required = contextLength + maxTokens
    if required > cacheSize:
        return (f"Initial job allocation requires {required} cache tokens, "
                f"which exceeds the available context size of {cacheSize} tokens")
    return None


def embeddingVector(text: str) -> list[float]:
    """
    Eight deterministic floats in [-1, 1) for a text.
    """
    raw = hashlib.sha256(text.encode()).digest()
    return [round(int.from_bytes(raw[i:i + 4], "big") / 2**31 - 1.0, 6) for i in range(0, 32, 4)]


def messageText(content: Any) -> str:
    """
    The text of a chat message's content, which is a string or a list of typed parts.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


@frozen
class Piece:
    """
    One generated token: C{kind} is C{"content"} or C{"reasoning"}.
    """

    kind: str
    text: str


@frozen
class Plan:
    """
    Everything a generation will produce, decided up front from the request.
    """

    pieces: tuple[Piece, ...]
    finishReason: str
    eosReason: str
    toolCalls: list[JSON] | None
    promptTokens: int


_DIRECTIVE = re.compile(r"\[\[call\s+([^\s\]]+)\s*")
_decodeJSON = json.JSONDecoder()


def _directive(text: str) -> tuple[str, str] | None:
    """
    The tool name and JSON arguments of the last C{[[call NAME {json}]]} in C{text}.
    """
    found = None
    for match in _DIRECTIVE.finditer(text):
        arguments: object = {}
        end = match.end()
        if text.startswith("{", end):
            try:
                arguments, end = _decodeJSON.raw_decode(text, end)
            except ValueError:
                continue
        if text.startswith("]]", end) and isinstance(arguments, dict):
            found = (match.group(1), json.dumps(arguments))
    return found


def _toolName(tool: object) -> str | None:
    if not isinstance(tool, dict):
        return None
    function = tool.get("function")
    name = (function if isinstance(function, dict) else tool).get("name")
    return name if isinstance(name, str) else None


def toolTurn(messages: Sequence[Any], tools: list[Any] | None) -> tuple[str, str, str] | None:
    """
    What a tool loop asks of this answer: C{("result", text, "")} when tool results follow the
    last assistant message (their text, to quote), C{("call", name, arguments)} when the last
    user message's directive names an offered tool, else C{None}.
    """
    results: list[str] = []
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            break
        if isinstance(message, dict) and message.get("role") == "tool":
            results.insert(0, messageText(message.get("content")))
    if results:
        return ("result", "\n".join(results), "")
    # The last user message, behind the system messages an agent may add after it.
    lastUser = next((messageText(m.get("content")) for m in reversed(messages)
                     if isinstance(m, dict) and m.get("role") == "user"), None)
    if not tools or lastUser is None:
        return None
    directive = _directive(lastUser)
    if directive is None or directive[0] not in {_toolName(tool) for tool in tools or []}:
        return None
    return ("call", *directive)


def _thinkingRequested(body: JSON) -> bool:
    for holder in (body, body.get("template_vars"), body.get("chat_template_kwargs")):
        if isinstance(holder, dict) and asBool(holder.get("enable_thinking", False)):
            return True
    return False


def _jsonRequested(body: JSON) -> bool:
    responseFormat = body.get("response_format")
    if isinstance(responseFormat, dict) and responseFormat.get("type") in (
        "json", "json_object", "json_schema"
    ):
        return True
    return body.get("json_schema") is not None


def requestedMaxTokens(body: JSON) -> int | None:
    for name in ("max_tokens", "max_completion_tokens", "max_length"):
        value = body.get(name)
        if value is not None:
            # 0 means "fill the context" to TabbyAPI; here that is the default length.
            return int(value) or None
    return None


def planGeneration(
    modelName: str, promptText: str, promptTokens: int, body: JSON, defaultTokens: int,
    tools: list[Any] | None, stopAfterTokens: int | None = None,
) -> Plan:
    """
    Decide the tokens of one answer: the model's name, then words hashed from the prompt.

    With C{max_tokens} the answer is exactly that long and ends with C{length} (unless
    C{stopAfterTokens} is shorter: then it is that long and ends on a stop token); without it the
    answer is C{defaultTokens} long and ends on a stop token.  A tool loop (L{toolTurn}) is
    answered with its tool call, or with text quoting the tool's result.
    """
    messages = body.get("messages")
    turn = toolTurn(messages if isinstance(messages, list) else [], tools)
    quoted: list[str] | None = None
    if turn is not None and turn[0] == "call":
        call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": turn[1], "arguments": turn[2]}}
        return Plan(_reasoning(body, promptText), "tool_calls", "stop_token", [call], promptTokens)
    if turn is not None:
        words = f'The tool said: "{turn[1]}"'.split(" ")
        quoted = [word + " " for word in words[:-1]] + words[-1:]
    elif tools and re.search(r"\bweather\b", promptText, re.IGNORECASE):
        first = tools[0] if isinstance(tools[0], dict) else {}
        function: JSON = first["function"] if isinstance(first.get("function"), dict) else first
        call = {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {
                "name": str(function.get("name", "tool")),
                "arguments": '{"city": "Paris"}',
            },
        }
        return Plan((), "tool_calls", "stop_token", [call], promptTokens)
    maxTokens = requestedMaxTokens(body)
    if maxTokens is not None and stopAfterTokens is not None and maxTokens > stopAfterTokens:
        maxTokens, defaultTokens = None, stopAfterTokens
    if quoted is not None:
        texts = quoted[:maxTokens] if maxTokens is not None else quoted
        # The quote ends on a stop token unless max_tokens cut it short.
        maxTokens = maxTokens if maxTokens is not None and maxTokens < len(quoted) else None
    else:
        count = maxTokens if maxTokens is not None else defaultTokens
        texts = ([modelName + " "] + [w + " " for w in chooseWords(promptText, max(count - 1, 0))])
        texts = texts[:count]
    if _jsonRequested(body) and texts:
        escaped = [json.dumps(t)[1:-1] for t in texts]
        escaped[-1] = escaped[-1].rstrip()
        escaped[0] = '{"answer": "' + escaped[0]
        escaped[-1] = escaped[-1] + '"}'
        texts = escaped
    pieces = [*_reasoning(body, promptText), *(Piece("content", t) for t in texts)]
    if maxTokens is not None:
        return Plan(tuple(pieces), "length", "max_new_tokens", None, promptTokens)
    return Plan(tuple(pieces), "stop", "stop_token", None, promptTokens)


def _reasoning(body: JSON, promptText: str) -> tuple[Piece, ...]:
    """
    The reasoning that comes first when the request turns thinking on.
    """
    if not _thinkingRequested(body):
        return ()
    thought = chooseWords("reasoning\0" + promptText, 1)[0]
    return (Piece("reasoning", "Thinking "), Piece("reasoning", "about "), Piece("reasoning", thought + ". "))


def requestedLogprobs(body: JSON) -> int | None:
    """
    How many likeliest tokens each generated token's logprobs list, or C{None} when the request
    asks for no logprobs: C{logprobs} (chat's boolean, an integer for completions) or
    C{top_logprobs}; TabbyAPI takes C{logprobs} above 1 as the count (the older OpenAI form).
    """
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    count = int(top) if isinstance(top, int) and not isinstance(top, bool) else 0
    if isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs > 1:
        count = logprobs
    if not logprobs and not count:
        return None
    return count


def tokenLogprob(text: str, top: int) -> JSON:
    """
    TabbyAPI's logprobs entry for one generated token (its C{ChatCompletionLogprob}): the token,
    its id, a deterministic log probability, and C{top} alternatives, the token itself first.
    """
    def logprob(token: str) -> float:
        return -round((_digest(token, "logprob") % 3000) / 1000, 3)

    def tokenId(token: str) -> int:
        ids = encodeText(token)
        return ids[0] if ids else 0

    value = logprob(text)
    alternatives = [{"token": text, "token_id": tokenId(text), "logprob": value}]
    for index, word in enumerate(chooseWords("alternatives\0" + text, max(top - 1, 0))):
        alternatives.append({"token": word + " ", "token_id": tokenId(word),
                             "logprob": round(value - 1.0 - index - logprob(word) / 10, 3)})
    return {"token": text, "token_id": tokenId(text), "logprob": value,
            "top_logprobs": alternatives[:top]}


def completionLogprobs(entries: Sequence[JSON]) -> JSON:
    """
    Chat logprobs entries in the completions form, as TabbyAPI converts them
    (C{chat_logprobs_to_completion_logprobs}): parallel lists, one map of alternatives per
    token (C{None} without), offsets counted from the first token of C{entries}.
    """
    offsets, offset = [], 0
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {
        "tokens": [entry["token"] for entry in entries],
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": [{top["token"]: top["logprob"] for top in entry["top_logprobs"]} or None
                         for entry in entries],
        "text_offset": offsets,
    }


def usageObject(promptTokens: int, completionTokens: int, completionTime: float) -> JSON:
    """
    HEAD's eight-field usage; per-second rates are the string "Indeterminate" for zero time.
    """
    promptTime = round(0.002 + promptTokens * 0.0004, 6)
    completionTime = round(max(completionTime, 0.0005 * completionTokens), 6)

    def rate(tokens: int, seconds: float) -> float | str:
        return round(tokens / seconds, 2) if seconds > 0 else "Indeterminate"

    return {
        "prompt_tokens": promptTokens,
        "prompt_time": promptTime,
        "prompt_tokens_per_sec": rate(promptTokens, promptTime),
        "completion_tokens": completionTokens,
        "completion_time": completionTime,
        "completion_tokens_per_sec": rate(completionTokens, completionTime),
        "total_tokens": promptTokens + completionTokens,
        "total_time": round(promptTime + completionTime, 6),
    }


