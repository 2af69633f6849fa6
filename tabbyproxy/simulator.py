"""
A GPU-free stand-in for TabbyAPI (HEAD e632af4), run as ``python -m tabbyproxy.simulator``.

The proxy supervises TabbyAPI as a child process, and its tests need a child that starts, answers,
streams, fails and dies the way the real server does, in milliseconds and without a model.  This
program is that child: it reads ``config.yml`` from its working directory and an optional
``--config`` override exactly like TabbyAPI, prints TabbyAPI-style console lines to stdout (the
proxy only ever sees TabbyAPI's console through a pipe), and serves TabbyAPI's HTTP API with
deterministic generated text.  Misbehaviour for tests is switched on by a ``simulator:`` section in
the merged config, which real TabbyAPI silently ignores; see L{SimulatorKnobs}.

The wire details (status codes, JSON bodies, header rules, SSE framing) follow
``reference/tabbyapi.md`` and the captures of a real TabbyAPI; where the two differ from the OpenAI
API the TabbyAPI behaviour wins, quirks included, because the proxy must cope with the real thing.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import socket
import struct
import sys
import time
import uuid
import zlib
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Sequence

import yaml
from attrs import define, field, frozen
from zope.interface import implementer

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

JSON = dict[str, Any]

DEFAULT_SEQ_LEN = 8192

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

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SERVICE_INFO: JSON = {
    "version": 0.1,
    "software": {
        "name": "TabbyAPI",
        "repository": "https://github.com/theroyallab/tabbyAPI",
        "homepage": "https://github.com/theroyallab/tabbyAPI",
    },
    "api": {
        "openai": {
            "name": "OpenAI API",
            "relative_url": "/v1",
            "documentation": "https://theroyallab.github.io/tabbyAPI",
            "version": 1,
        },
        "koboldai": {
            "name": "KoboldAI API",
            "relative_url": "/api",
            "documentation": "https://theroyallab.github.io/tabbyAPI",
            "version": 1,
        },
    },
}

NO_MODEL = "No models are currently loaded."


# --------------------------------------------------------------------------------------------
# Console


class Console:
    """
    TabbyAPI's console log, imitated on stdout.

    Lines look like ``2026-11-26 05:39:36.812 INFO:     message``.  They are not wrapped at 80
    columns the way Rich does on a pipe, because nothing gains from reproducing that; a consumer
    that copes with wrapped lines copes with unwrapped ones too.  Every line is flushed at once
    since stdout is a pipe and the supervisor reads it live.
    """

    def line(self, level: str, message: str) -> None:
        now = datetime.now()
        stamp = now.strftime("%Y-%m-%d %H:%M:%S") + f".{now.microsecond // 1000:03d}"
        text = f"{stamp} {level + ':':<9} {message}\n"
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            # The reader went away; the server keeps working without its console.
            pass

    def info(self, message: str) -> None:
        self.line("INFO", message)

    def warning(self, message: str) -> None:
        self.line("WARNING", message)

    def error(self, message: str) -> None:
        self.line("ERROR", message)


# --------------------------------------------------------------------------------------------
# Configuration


def filterNoneValues(value: Any) -> Any:
    """
    Drop keys whose value is None, recursively, as TabbyAPI does before merging, so a blank key
    in an override falls back to config.yml and then to the default.
    """
    if isinstance(value, dict):
        return {k: filterNoneValues(v) for k, v in value.items() if v is not None}
    return value


def deepMerge(base: JSON, override: JSON) -> JSON:
    """
    Merge C{override} into a copy of C{base} per key, descending into sections.
    """
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deepMerge(merged[key], value)
        else:
            merged[key] = value
    return merged


def readYaml(path: Path) -> JSON:
    """
    Read a YAML mapping; an empty file is an empty mapping.
    """
    with path.open(encoding="utf8") as f:
        loaded = yaml.safe_load(f)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} does not hold a mapping")
    return loaded


_ENV_SECTIONS = ("network", "model", "embeddings", "simulator", "developer", "logging")


def configFromEnvironment(environ: dict[str, str]) -> JSON:
    """
    Read C{TABBY_<SECTION>_<KEY>} variables, TabbyAPI's second config source.
    """
    result: JSON = {}
    for name, raw in environ.items():
        for section in _ENV_SECTIONS:
            prefix = f"TABBY_{section.upper()}_"
            if name.startswith(prefix) and len(name) > len(prefix):
                result.setdefault(section, {})[name[len(prefix):].lower()] = yaml.safe_load(raw)
    return result


def loadMergedConfig(cwd: Path, args: argparse.Namespace, environ: dict[str, str]) -> JSON:
    """
    Build the effective config the way C{TabbyConfig.load} does: config.yml in the working
    directory, then the environment, then either the C{--config} file or (only when there is
    no C{--config}) the other command-line flags.
    """
    sources: list[JSON] = []
    base = cwd / "config.yml"
    if base.exists():
        sources.append(readYaml(base))
    sources.append(configFromEnvironment(environ))
    if args.config is not None:
        sources.append(readYaml(cwd / args.config))
    else:
        network: JSON = {}
        if args.host is not None:
            network["host"] = args.host
        if args.port is not None:
            network["port"] = args.port
        if args.disable_auth is not None:
            network["disable_auth"] = args.disable_auth
        sources.append({"network": network})
    merged: JSON = {}
    for source in sources:
        merged = deepMerge(merged, filterNoneValues(source))
    return merged


def _asBool(value: Any) -> bool:
    # Flags arrive as strings from the command line and environment; pydantic-style coercion.
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "y", "t")
    return bool(value)


def _asOptionalInt(value: Any) -> int | None:
    if value is None or value is False:
        return None
    return int(value)


@frozen
class SimulatorKnobs:
    """
    Test switches from the C{simulator:} config section (real TabbyAPI ignores the section).

    @ivar loadTime: seconds spent "loading" before the port opens.
    @ivar tokenDelay: seconds between generated tokens.
    @ivar tokens: completion length when a request gives no C{max_tokens}.
    @ivar failLoad: fail the start-up load with a traceback and exit status 1.
    @ivar crashAfterTokens: after this many tokens of one request, the process dies with
        C{os._exit(1)}.
    @ivar hangAtStart: never open the port (SIGTERM still works).
    @ivar ignoreSigterm: log and ignore SIGTERM and SIGINT; only SIGKILL ends the process.
    @ivar failGenerationAfter: the generation request after this many fails like a backend
        exception, and /health reports unhealthy from then on.
    """

    loadTime: float = 0.0
    tokenDelay: float = 0.0
    tokens: int = 16
    failLoad: bool = False
    crashAfterTokens: int | None = None
    hangAtStart: bool = False
    ignoreSigterm: bool = False
    failGenerationAfter: int | None = None

    @classmethod
    def fromSection(cls, section: JSON) -> SimulatorKnobs:
        return cls(
            loadTime=float(section.get("load_time", 0) or 0),
            tokenDelay=float(section.get("token_delay", 0) or 0),
            tokens=int(section.get("tokens", 16)),
            failLoad=_asBool(section.get("fail_load", False)),
            crashAfterTokens=_asOptionalInt(section.get("crash_after_tokens")),
            hangAtStart=_asBool(section.get("hang_at_start", False)),
            ignoreSigterm=_asBool(section.get("ignore_sigterm", False)),
            failGenerationAfter=_asOptionalInt(section.get("fail_generation_after")),
        )


@frozen
class SimulatorConfig:
    """
    The part of TabbyAPI's config the simulator acts on, with TabbyAPI's defaults.
    """

    host: str = "127.0.0.1"
    port: int = 5000
    disableAuth: bool = False
    ssePingInterval: float = 15.0
    modelDir: Path = Path("models")
    modelName: str | None = None
    maxSeqLen: int | None = None
    cacheSize: int | None = None
    cacheMode: str = "FP16"
    chunkSize: int = 2048
    maxBatchSize: int | None = None
    promptTemplate: str | None = None
    embeddingModelName: str | None = None
    knobs: SimulatorKnobs = SimulatorKnobs()

    @classmethod
    def fromMerged(cls, merged: JSON, cwd: Path) -> SimulatorConfig:
        def section(name: str) -> JSON:
            value = merged.get(name)
            return value if isinstance(value, dict) else {}

        network, model = section("network"), section("model")
        modelDir = Path(str(model.get("model_dir", "models")))
        if not modelDir.is_absolute():
            modelDir = cwd / modelDir
        modelName = model.get("model_name")
        return cls(
            host=str(network.get("host", "127.0.0.1")),
            port=int(network.get("port", 5000)),
            disableAuth=_asBool(network.get("disable_auth", False)),
            ssePingInterval=float(network.get("sse_ping_interval", 15)),
            modelDir=modelDir,
            modelName=str(modelName) if modelName else None,
            maxSeqLen=_asOptionalInt(model.get("max_seq_len")),
            cacheSize=_asOptionalInt(model.get("cache_size")),
            cacheMode=str(model.get("cache_mode", "FP16")),
            chunkSize=int(model.get("chunk_size", 2048)),
            maxBatchSize=_asOptionalInt(model.get("max_batch_size")),
            promptTemplate=model.get("prompt_template"),
            embeddingModelName=section("embeddings").get("embedding_model_name") or None,
            knobs=SimulatorKnobs.fromSection(section("simulator")),
        )


# --------------------------------------------------------------------------------------------
# Auth


@define
class AuthKeys:
    """
    The keys from api_tokens.yml, checked with TabbyAPI's header rules (reference section 3).
    """

    apiKeys: list[str]
    adminKey: str
    disabled: bool = False

    @classmethod
    def load(cls, cwd: Path, disabled: bool, console: Console) -> AuthKeys:
        """
        Read api_tokens.yml, or generate and write it when missing, as TabbyAPI does at start.
        The key values are printed only when they were just generated, which is also the only
        time TabbyAPI's console is the sole place a person could learn them.
        """
        if disabled:
            console.warning(
                "Disabling authentication makes your instance vulnerable. Set the "
                "`disable_auth` flag to False in config.yml if you want to share this "
                "instance with others."
            )
            return cls(apiKeys=[], adminKey="", disabled=True)
        path = cwd / "api_tokens.yml"
        if path.exists():
            data = readYaml(path)
            raw = data.get("api_key") or []
            apiKeys = [str(k) for k in (raw if isinstance(raw, list) else [raw])]
            keys = cls(apiKeys=apiKeys, adminKey=str(data.get("admin_key") or ""))
            console.info("Your API and admin keys are in api_tokens.yml.")
            return keys
        keys = cls(apiKeys=[secrets.token_hex(16)], adminKey=secrets.token_hex(16))
        with path.open("w", encoding="utf8") as f:
            yaml.safe_dump({"api_key": keys.apiKeys[0], "admin_key": keys.adminKey}, f)
        console.info(f"Your API key is: {keys.apiKeys[0]}")
        console.info(f"Your admin key is: {keys.adminKey}")
        console.info(
            "If these keys get compromised, make sure to delete api_tokens.yml and "
            "restart the server. Have fun!"
        )
        return keys

    def isAdmin(self, key: str) -> bool:
        return bool(self.adminKey) and hmac.compare_digest(key.encode(), self.adminKey.encode())

    def isApi(self, key: str) -> bool:
        # Check every key rather than stopping early, so timing does not reveal which matched.
        found = False
        for candidate in self.apiKeys:
            found |= hmac.compare_digest(key.encode(), candidate.encode())
        return found or self.isAdmin(key)

    def checkApiKey(self, request: Request) -> str | None:
        """
        Return the 401 message for an API route, or None when the request may proceed.
        """
        return self._check(request, "x-api-key", self.isApi, "API")

    def checkAdminKey(self, request: Request) -> str | None:
        """
        Return the 401 message for an admin route, or None when the request may proceed.
        """
        return self._check(request, "x-admin-key", self.isAdmin, "admin")

    def _check(self, request: Request, header: str, valid: Callable[[str], bool], kind: str) -> str | None:
        """
        TabbyAPI's rule for both kinds of route: its own header first, else C{Authorization:
        Bearer}; a present but wrong key fails even when the other header would pass.
        """
        if self.disabled:
            return None
        key = request.getHeader(header)
        if key is None:
            authorization = request.getHeader("authorization")
            if authorization is None:
                return f"Please provide an {kind} key"
            key = _bearerToken(authorization)
        return None if key is not None and valid(key) else f"Invalid {kind} key"

    def permission(self, request: Request) -> str | None:
        """
        C{get_key_permission}: the first of x-admin-key, x-api-key, authorization decides;
        None means the key it found is not valid.
        """
        if self.disabled:
            return "admin"
        key = request.getHeader("x-admin-key")
        if key is None:
            key = request.getHeader("x-api-key")
        if key is None:
            authorization = request.getHeader("authorization")
            key = _bearerToken(authorization) if authorization is not None else None
        if key is None:
            return None
        if self.isAdmin(key):
            return "admin"
        if self.isApi(key):
            return "api"
        return None


def _bearerToken(authorization: str) -> str | None:
    parts = authorization.split(" ")
    if len(parts) < 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


# --------------------------------------------------------------------------------------------
# Text generation


def _digest(text: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256((salt + "\0" + text).encode()).digest()[:8], "big")


def wordCount(text: str) -> int:
    return len(text.split())


def chooseWords(prompt: str, count: int) -> list[str]:
    """
    Deterministic words for a prompt: the same prompt always gives the same answer.
    """
    return [VOCABULARY[_digest(prompt, str(i)) % len(VOCABULARY)] for i in range(count)]


def encodeText(text: str) -> list[int]:
    """
    One token id per word: vocabulary words get their index, others a stable hash above it.
    """
    ids = []
    for word in text.split():
        if word in VOCABULARY:
            ids.append(VOCABULARY.index(word))
        else:
            ids.append(len(VOCABULARY) + zlib.crc32(word.encode()) % 30000)
    return ids


def decodeTokens(tokens: Sequence[int]) -> str:
    """
    The inverse of L{encodeText} for vocabulary words; other ids decode to a placeholder.
    """
    return " ".join(
        VOCABULARY[t] if 0 <= t < len(VOCABULARY) else f"<tok{t}>" for t in tokens
    )


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


def _thinkingRequested(body: JSON) -> bool:
    for holder in (body, body.get("template_vars"), body.get("chat_template_kwargs")):
        if isinstance(holder, dict) and _asBool(holder.get("enable_thinking", False)):
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
    tools: list[Any] | None,
) -> Plan:
    """
    Decide the tokens of one answer: the model's name, then words hashed from the prompt.

    With C{max_tokens} the answer is exactly that long and ends with C{length}; without it the
    answer is C{defaultTokens} long and ends on a stop token.
    """
    if tools and re.search(r"\bweather\b", promptText, re.IGNORECASE):
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
    count = maxTokens if maxTokens is not None else defaultTokens
    texts = ([modelName + " "] + [w + " " for w in chooseWords(promptText, max(count - 1, 0))])
    texts = texts[:count]
    if _jsonRequested(body) and texts:
        escaped = [json.dumps(t)[1:-1] for t in texts]
        escaped[-1] = escaped[-1].rstrip()
        escaped[0] = '{"answer": "' + escaped[0]
        escaped[-1] = escaped[-1] + '"}'
        texts = escaped
    pieces = [Piece("content", t) for t in texts]
    if _thinkingRequested(body):
        thought = chooseWords("reasoning\0" + promptText, 1)[0]
        pieces = [
            Piece("reasoning", "Thinking "), Piece("reasoning", "about "),
            Piece("reasoning", thought + ". "),
        ] + pieces
    if maxTokens is not None:
        return Plan(tuple(pieces), "length", "max_new_tokens", None, promptTokens)
    return Plan(tuple(pieces), "stop", "stop_token", None, promptTokens)


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


# --------------------------------------------------------------------------------------------
# The token producer


@implementer(IPushProducer)
@define
class TokenProducer:
    """
    Emits a plan's pieces one at a time on the clock, as a push producer.

    Registered on the request, it stops scheduling tokens while the transport is paused, so a
    slow reader holds the simulator back instead of making it buffer the whole answer.
    """

    clock: IReactorTime
    delay: float
    pieces: tuple[Piece, ...]
    onPiece: Callable[[Piece], None]
    onDone: Callable[[], None]
    crashAfter: int | None = None
    emitted: int = 0
    paused: bool = False
    stopped: bool = False
    _call: IDelayedCall | None = None

    def start(self) -> None:
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self.paused and not self.stopped:
            self._call = self.clock.callLater(self.delay, self._step)

    def _step(self) -> None:
        self._call = None
        # With no delay, emit a batch per reactor turn: fast like a real GPU, yet the loop
        # still ends at once when a write makes the transport pause us.
        batch = 1 if self.delay > 0 else 256
        while batch > 0 and not self.paused and not self.stopped:
            batch -= 1
            if self.crashAfter is not None and self.emitted >= self.crashAfter:
                crashNow(self.clock)
                self.stopped = True
                return
            if self.emitted >= len(self.pieces):
                self.stopped = True
                self.onDone()
                return
            piece = self.pieces[self.emitted]
            self.emitted += 1
            self.onPiece(piece)
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None


def crashNow(clock: IReactorTime) -> None:
    """
    Die like a backend that segfaulted: no cleanup, no [DONE], exit status 1.

    The short delay lets the reactor hand the tokens already written to the kernel, so the
    client sees a stream that stops mid-answer rather than one that never started.
    """
    sys.stdout.flush()
    clock.callLater(0.05, os._exit, 1)


# --------------------------------------------------------------------------------------------
# HTTP plumbing


def dumpJson(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf8")


class HTTPError(Exception):
    """
    An error answer: status and body, as FastAPI's HTTPException and validation produce.
    """

    def __init__(self, code: int, body: Any, logged: bool = False) -> None:
        super().__init__(code, body)
        self.code = code
        self.body = body
        # TabbyAPI's handle_request_error prints "Sent to request: ..." for these.
        self.logged = logged


def detail(code: int, message: str, logged: bool = False) -> HTTPError:
    return HTTPError(code, {"detail": message}, logged)


class SimulatorRequest(Request):
    """
    A request that writes one uvicorn-style access line, when the response starts.
    """

    accessLogged = False

    def logAccess(self) -> None:
        if self.accessLogged:
            return
        self.accessLogged = True
        console = getattr(getattr(self.channel, "site", None), "console", None)
        if console is None:
            return
        peer = self.getClientAddress()
        client = f"{getattr(peer, 'host', '-')}:{getattr(peer, 'port', 0)}"
        method = self.method.decode("latin-1")
        path = self.uri.decode("latin-1")
        version = self.clientproto.decode("latin-1")
        console.info(f'{client} - "{method} {path} {version}" {self.code}')


class SimulatorSite(Site):
    """
    A Site that keeps the console for access lines instead of Twisted's log format.
    """

    requestFactory = SimulatorRequest

    def __init__(self, resource: Resource, console: Console) -> None:
        super().__init__(resource)
        self.console = console
        self.displayTracebacks = False

    def log(self, request: http.Request) -> None:
        if isinstance(request, SimulatorRequest):
            request.logAccess()


def startResponse(request: Request, code: int, contentType: str) -> None:
    request.setResponseCode(code, HTTPStatus(code).phrase.encode())
    request.setHeader("content-type", contentType)
    request.setHeader("server", "uvicorn")
    request.setHeader("vary", "Origin")


def startEventStream(request: Request) -> None:
    startResponse(request, 200, "text/event-stream; charset=utf-8")
    request.setHeader("cache-control", "no-store")
    request.setHeader("connection", "keep-alive")
    request.setHeader("x-accel-buffering", "no")
    if isinstance(request, SimulatorRequest):
        request.logAccess()


def sseEvent(payload: Any) -> bytes:
    data = payload if isinstance(payload, bytes) else dumpJson(payload)
    return b"data: " + data + b"\r\n\r\n"


def pingComment() -> bytes:
    return f": ping - {datetime.now(timezone.utc)}\r\n\r\n".encode()


def validationError(kind: str, loc: list[Any], msg: str, value: Any, ctx: JSON | None = None
                    ) -> JSON:
    error: JSON = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx is not None:
        error["ctx"] = ctx
    return error


def parseBody(request: Request) -> Any:
    """
    Decode the JSON body like FastAPI: malformed JSON or a missing body is a 422 that comes
    before any auth check.
    """
    assert request.content is not None
    raw = request.content.read()
    if not raw.strip():
        raise HTTPError(422, {"detail": [validationError("missing", ["body"], "Field required",
                                                           None)]})
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise HTTPError(422, {"detail": [validationError(
            "json_invalid", ["body", e.pos], "JSON decode error", {}, {"error": e.msg})]})
    except UnicodeDecodeError:
        raise HTTPError(422, {"detail": [validationError(
            "json_invalid", ["body", 0], "JSON decode error", {}, {"error": "Invalid UTF-8"})]})


def requireObject(body: Any) -> JSON:
    if not isinstance(body, dict):
        raise HTTPError(422, {"detail": [validationError(
            "model_attributes_type", ["body"],
            "Input should be a valid dictionary or object to extract fields from", body)]})
    return body


def validateSampler(body: JSON, required: Sequence[str]) -> None:
    """
    The few pydantic checks a proxy can trip over: required fields and the non-negative
    penalties and lengths that OpenAI allows but TabbyAPI rejects.
    """
    errors: list[JSON] = []
    for name in required:
        if name not in body:
            errors.append(validationError("missing", ["body", name], "Field required", body))
    for name in ("max_tokens", "max_completion_tokens", "max_length"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            errors.append(validationError(
                "int_type", ["body", name], "Input should be a valid integer", value))
    for name in ("max_tokens", "frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            bound: float | int = 0 if name == "max_tokens" else 0.0
            errors.append(validationError(
                "greater_than_equal", ["body", name],
                "Input should be greater than or equal to 0", value, {"ge": bound}))
    if errors:
        raise HTTPError(422, {"detail": errors})


# --------------------------------------------------------------------------------------------
# The server


@frozen
class LoadedModel:
    """
    The model the simulated container holds.
    """

    name: str
    path: Path
    maxSeqLen: int


@define
class Generation:
    """
    One in-flight generation request, so shutdown and unload can stop it.
    """

    requestId: str
    producer: TokenProducer | None = None
    # Called by /v1/model/unload: the job fails the way a cancelled backend job does.
    abort: Callable[[], None] | None = None
    # Called at shutdown: the response just ends, as uvicorn's should_exit ends SSE streams.
    shutdown: Callable[[], None] | None = None


@define
class Simulator:
    """
    The simulated TabbyAPI: its state (loaded model, keys, health) and its HTTP routes.
    """

    reactor: Any
    config: SimulatorConfig
    cwd: Path
    console: Console
    model: LoadedModel | None = None
    auth: AuthKeys = field(factory=lambda: AuthKeys([], "", True))
    healthIssues: list[JSON] = field(factory=list)
    generationCount: int = 0
    generations: dict[str, Generation] = field(factory=dict)
    port: IListeningPort | None = None
    exitCode: int = 0
    loadError: BaseException | None = None
    shuttingDown: bool = False

    # ---- start-up and shutdown -------------------------------------------------------------

    def choosePort(self) -> int | None:
        """
        TabbyAPI's start-up port check: a busy port moves the server to port+1, and if that
        one is busy too it gives up and exits 0 without serving.
        """
        port = self.config.port
        if not portInUse(self.config.host, port):
            return port
        if not portInUse(self.config.host, port + 1):
            self.console.warning(f"Port {port} is currently in use. Switching to {port + 1}.")
            return port + 1
        self.console.error(
            f"Ports {port} and {port + 1} are in use by other programs. "
            "Please free one of them or change the port in config.yml."
        )
        return None

    def begin(self) -> None:
        """
        Run start-up: port check, the (simulated) model load, keys, then listening.
        """
        port = self.choosePort()
        if port is None:
            self.reactor.stop()
            return
        knobs = self.config.knobs
        if self.config.modelName is not None:
            path = (self.config.modelDir / self.config.modelName).resolve()
            self.console.info("Attempting to load a prompt template if present.")
            self.console.info('Using template "chatml" for chat completions.')
            self.console.info(f"Loading model: {path}")
        if knobs.hangAtStart:
            return
        self.reactor.callLater(knobs.loadTime, self.finishStartup, port)

    def finishStartup(self, port: int) -> None:
        if self.shuttingDown:
            return
        if self.config.modelName is not None or self.config.knobs.failLoad:
            try:
                self.model = self.loadModel(self.config.modelName, self.config.knobs.failLoad)
            except ValueError as e:
                # Re-raised after the reactor stops, so Python prints the real traceback and
                # exits 1, exactly as an uncaught load failure does in TabbyAPI.
                self.loadError = e
                self.reactor.stop()
                return
            self.console.info("Model successfully loaded.")
        if self.config.embeddingModelName:
            self.console.info(f"Loading embedding model: {self.config.embeddingModelName}")
            self.console.info("Embedding model successfully loaded.")
        self.auth = AuthKeys.load(self.cwd, self.config.disableAuth, self.console)
        self.console.info("Generation logging is disabled")
        try:
            self.port = self.reactor.listenTCP(
                port, SimulatorSite(self.resource(), self.console), interface=self.config.host
            )
        except CannotListenError as e:
            self.console.error(f"[Errno 98] error while attempting to bind on address: {e}")
            self.exitCode = 1
            self.reactor.stop()
            return
        base = f"http://{self.config.host}:{port}"
        self.console.info(f"Developer documentation: {base}/redoc")
        self.console.info("Starting OAI API")
        self.console.info(f"Completions: {base}/v1/completions")
        self.console.info(f"Chat completions: {base}/v1/chat/completions")
        self.console.info(f"Started server process [{os.getpid()}]")
        self.console.info("Waiting for application startup.")
        self.console.info("Application startup complete.")
        self.console.info(f"Uvicorn running on {base} (Press CTRL+C to quit)")

    def loadModel(self, name: str | None, forceFailure: bool = False) -> LoadedModel:
        """
        "Load" a model: its folder must hold config.json, as HFModel.from_directory requires.
        """
        path = (self.config.modelDir / (name or "")).resolve()
        try:
            if forceFailure:
                raise RuntimeError("Simulated load failure (simulator.fail_load is set)")
            with (path / "config.json").open(encoding="utf8") as f:
                hfConfig = json.load(f)
        except (OSError, RuntimeError, json.JSONDecodeError) as exc:
            raise ValueError(f"Failed to load config.json from {path}") from exc
        maxSeqLen = self.config.maxSeqLen
        if maxSeqLen is None or maxSeqLen == -1:
            maxSeqLen = int(hfConfig.get("max_position_embeddings") or DEFAULT_SEQ_LEN) \
                if isinstance(hfConfig, dict) else DEFAULT_SEQ_LEN
        return LoadedModel(name=path.name, path=path, maxSeqLen=maxSeqLen)

    def onSignal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.config.knobs.ignoreSigterm:
            self.console.warning(f"Received {name}; ignoring it (simulator.ignore_sigterm).")
            return
        if self.shuttingDown:
            return
        self.shuttingDown = True
        if self.port is not None:
            self.console.info("Shutting down")
            for generation in list(self.generations.values()):
                if generation.producer is not None:
                    generation.producer.stopProducing()
                if generation.shutdown is not None:
                    generation.shutdown()
            self.port.stopListening()
            self.console.info("Waiting for application shutdown.")
            self.console.info("Application shutdown complete.")
            self.console.info(f"Finished server process [{os.getpid()}]")
        self.console.warning("Shutdown signal called. Exiting gracefully.")
        self.exitCode = 0
        self.reactor.stop()

    # ---- routing ----------------------------------------------------------------------------

    def resource(self) -> Resource:
        return SimulatorResource(self)

    def routes(self) -> dict[str, dict[str, Callable[[Request], bytes | int]]]:
        return {
            "/health": {"GET": self.health},
            "/.well-known/serviceinfo": {"GET": self.serviceInfo},
            "/v1/models": {"GET": self.listModels},
            "/v1/model/list": {"GET": self.listModels},
            "/v1/model": {"GET": self.currentModel},
            "/v1/model/load": {"POST": self.loadModelRoute},
            "/v1/model/unload": {"POST": self.unloadModel},
            "/v1/auth/permission": {"GET": self.authPermission},
            "/v1/chat/completions": {"POST": self.chatCompletions},
            "/v1/completions": {"POST": self.completions},
            "/v1/embeddings": {"POST": self.embeddings},
            "/v1/token/encode": {"POST": self.encode},
            "/v1/token/decode": {"POST": self.decode},
        }

    def dispatch(self, request: Request) -> bytes | int:
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        handlers = self.routes().get(path)
        try:
            if handlers is None:
                raise detail(404, "Not Found")
            handler = handlers.get(method)
            if handler is None:
                request.setHeader("allow", ", ".join(handlers))
                raise detail(405, "Method Not Allowed")
            return handler(request)
        except HTTPError as e:
            if e.logged:
                self.console.error(f"Sent to request: {e.body['detail']}")
            return self.respond(request, e.code, e.body)

    def respond(self, request: Request, code: int, body: Any) -> bytes:
        startResponse(request, code, "application/json")
        return dumpJson(body)

    def requireApi(self, request: Request) -> None:
        problem = self.auth.checkApiKey(request)
        if problem is not None:
            raise detail(401, problem)

    def requireAdmin(self, request: Request) -> None:
        problem = self.auth.checkAdminKey(request)
        if problem is not None:
            raise detail(401, problem)

    def requireModel(self) -> LoadedModel:
        if self.model is None:
            raise detail(503, NO_MODEL, logged=True)
        return self.model

    # ---- simple routes -------------------------------------------------------------------

    def health(self, request: Request) -> bytes:
        if self.healthIssues:
            return self.respond(request, 503, {"status": "unhealthy", "issues": self.healthIssues})
        return self.respond(request, 200, {"status": "healthy", "issues": []})

    def serviceInfo(self, request: Request) -> bytes:
        return self.respond(request, 200, SERVICE_INFO)

    def modelCard(self, name: str, parameters: JSON | None = None) -> JSON:
        return {"id": name, "object": "model", "created": int(time.time()),
                "owned_by": "tabbyAPI", "logging": None, "parameters": parameters}

    def listModels(self, request: Request) -> bytes:
        self.requireApi(request)
        if self.auth.permission(request) == "admin":
            names = sorted(p.name for p in self.config.modelDir.iterdir() if p.is_dir()) \
                if self.config.modelDir.is_dir() else []
        else:
            names = [self.model.name] if self.model is not None else []
        return self.respond(request, 200, {"object": "list",
                                           "data": [self.modelCard(n) for n in names]})

    def currentModel(self, request: Request) -> bytes:
        self.requireApi(request)
        model = self.requireModel()
        c = self.config
        parameters = {
            "max_seq_len": model.maxSeqLen,
            "cache_size": c.cacheSize or model.maxSeqLen,
            "cache_mode": c.cacheMode,
            "rope_scale": 1.0,
            "rope_alpha": 1.0,
            "max_batch_size": c.maxBatchSize or 256,
            "chunk_size": c.chunkSize,
            "prompt_template": c.promptTemplate or "chatml",
            "prompt_template_content": CHATML_TEMPLATE,
            "use_vision": False,
            "draft": None,
        }
        return self.respond(request, 200, self.modelCard(model.name, parameters))

    def authPermission(self, request: Request) -> bytes:
        self.requireApi(request)
        permission = self.auth.permission(request)
        if permission is None:
            raise detail(400, "The provided authentication key is invalid.", logged=True)
        return self.respond(request, 200, {"permission": permission})

    def unloadModel(self, request: Request) -> bytes:
        self.requireAdmin(request)
        self.requireModel()
        # skip_wait: running jobs are cancelled rather than waited for.
        for generation in list(self.generations.values()):
            if generation.abort is not None:
                generation.abort()
        self.model = None
        self.console.info("Model unloaded.")
        return self.respond(request, 200, None)

    def loadModelRoute(self, request: Request) -> bytes | int:
        """
        POST /v1/model/load: SSE progress events, a "finished" event, and no [DONE].
        """
        body = requireObject(parseBody(request))
        self.requireAdmin(request)
        name = body.get("model_name")
        if not name:
            raise detail(400, "A model name was not provided for load.", logged=True)
        if not (self.config.modelDir / str(name)).is_dir():
            raise detail(400, "Could not find the model path for load. Check model name or "
                              "config.yml?", logged=True)
        startEventStream(request)
        already = self.model is not None and self.model.name == str(name)
        modules = 1 if already else 4
        if not already:
            self.model = None
        step = 0.0 if already else self.config.knobs.loadTime / modules
        state = {"module": 0}

        def progress() -> None:
            if request.finished or request.channel is None:
                return
            state["module"] += 1
            module = state["module"]
            event = {"model_type": "model", "module": module, "modules": modules,
                     "status": "processing"}
            request.write(sseEvent(event))
            if module < modules:
                self.reactor.callLater(step, progress)
                return
            if not already:
                try:
                    self.model = self.loadModel(str(name))
                except ValueError as e:
                    request.write(sseEvent({"error": {"message": str(e), "trace": None}}))
                    request.finish()
                    return
                self.console.info("Model successfully loaded.")
            request.write(sseEvent(dict(event, status="finished")))
            request.finish()

        self.console.info(f"Loading model: {(self.config.modelDir / str(name)).resolve()}")
        self.reactor.callLater(step, progress)
        return NOT_DONE_YET

    def embeddings(self, request: Request) -> bytes:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["input"])
        if not self.config.embeddingModelName:
            raise detail(503, "No embedding models are currently loaded.", logged=True)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for index, text in enumerate(inputs):
            vector = embeddingVector(str(text))
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": encoded, "index": index})
        tokens = sum(wordCount(str(t)) for t in inputs)
        return self.respond(request, 200, {
            "object": "list", "data": data, "model": self.config.embeddingModelName,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        })

    def encode(self, request: Request) -> bytes:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["text"])
        self.requireModel()
        text = body["text"]
        if isinstance(text, list):
            text = " ".join(messageText(m.get("content")) for m in text if isinstance(m, dict))
        tokens = encodeText(str(text))
        return self.respond(request, 200, {"tokens": tokens, "length": len(tokens)})

    def decode(self, request: Request) -> bytes:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["tokens"])
        self.requireModel()
        tokens = [int(t) for t in body["tokens"]]
        return self.respond(request, 200, {"text": decodeTokens(tokens)})

    # ---- generation ------------------------------------------------------------------------

    def chatCompletions(self, request: Request) -> bytes | int:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["messages"])
        messages = [m for m in body["messages"] if isinstance(m, dict)] \
            if isinstance(body["messages"], list) else []
        promptText = ""
        for message in reversed(messages):
            if message.get("role") == "user":
                promptText = messageText(message.get("content"))
                break
        else:
            if messages:
                promptText = messageText(messages[-1].get("content"))
        promptTokens = sum(wordCount(messageText(m.get("content"))) for m in messages)
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        return self.generate(request, body, "chat", promptText, promptTokens, tools)

    def completions(self, request: Request) -> bytes | int:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["prompt"])
        prompt = body["prompt"]
        promptText = "\n".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
        return self.generate(request, body, "completion", promptText, wordCount(promptText),
                             None)

    def generate(self, request: Request, body: JSON, kind: str, promptText: str,
                 promptTokens: int, tools: list[Any] | None) -> bytes | int:
        if self.model is None and body.get("model") is not None:
            # TabbyAPI dereferences model.container.model_dir on None here: a plain-text 500
            # from Starlette's error middleware (so without the CORS "vary" header).
            self.console.error("Exception in ASGI application")
            self.console.error("Traceback (most recent call last):")
            self.console.error("    model_path = model.container.model_dir")
            self.console.error("AttributeError: 'NoneType' object has no attribute 'model_dir'")
            request.setResponseCode(500, b"Internal Server Error")
            request.setHeader("content-type", "text/plain; charset=utf-8")
            request.setHeader("server", "uvicorn")
            return b"Internal Server Error"
        model = self.requireModel()
        if promptTokens > model.maxSeqLen:
            raise HTTPError(400, {"error": {
                "message": f"Prompt length {promptTokens} exceeds the available context size "
                           f"of {model.maxSeqLen} tokens",
                "type": "invalid_request_error", "param": None,
                "code": "context_length_exceeded"}})
        requestId = uuid.uuid4().hex
        plan = planGeneration(model.name, promptText, promptTokens, body,
                              self.config.knobs.tokens, tools)
        streamOptions = body.get("stream_options")
        includeUsage = isinstance(streamOptions, dict) and \
            _asBool(streamOptions.get("include_usage", False))
        self.generationCount += 1
        failing = self.config.knobs.failGenerationAfter is not None and \
            self.generationCount == self.config.knobs.failGenerationAfter + 1
        label = "Chat completion" if kind == "chat" else "Completion"
        if _asBool(body.get("stream", False)):
            stream = EventStream(self, request, requestId, kind, model.name, plan, includeUsage)
            if failing:
                stream.failAtStart(label)
            else:
                stream.start()
            return NOT_DONE_YET
        if failing:
            self.markUnhealthy()
            raise detail(503, f"{label} {requestId} aborted. Maybe the model was unloaded? "
                              "Please check the server console.", logged=True)
        return self.generateWhole(request, requestId, kind, model.name, plan, includeUsage,
                                  label)

    def markUnhealthy(self) -> None:
        description = "RuntimeError: Simulated generation failure " \
                      "(simulator.fail_generation_after)"
        self.console.error("FATAL ERROR with generation. Attempting to recreate the generator. "
                           "If this fails, please restart the server.")
        self.console.error(description)
        self.healthIssues.append({
            "time": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "description": description,
        })

    def logMetrics(self, requestId: str, plan: Plan, tokens: int, seconds: float) -> None:
        speed = f"{tokens / seconds:.2f} T/s" if seconds > 0 else "Indeterminate T/s"
        self.console.info(
            f"Metrics (ID: {requestId}): {tokens} tokens generated in {seconds:.2f} seconds "
            f"(Queue: 0.0 s, Process: 0 cached tokens and {plan.promptTokens} new tokens at "
            f"{max(plan.promptTokens, 1) * 2500.0:.2f} T/s, Generate: {speed}, "
            f"Context: {plan.promptTokens} tokens)"
        )

    def generateWhole(self, request: Request, requestId: str, kind: str, modelName: str,
                      plan: Plan, includeUsage: bool, label: str) -> int:
        """
        A non-streaming answer: tokens are still produced on the clock (so token_delay and
        crash_after_tokens apply), then sent as one JSON body.
        """
        started = self.reactor.seconds()
        collected: list[Piece] = []
        generation = Generation(requestId)

        def finished() -> None:
            self.generations.pop(requestId, None)
            elapsed = self.reactor.seconds() - started
            self.logMetrics(requestId, plan, len(collected), elapsed)
            if request.finished or request.channel is None:
                return
            content = "".join(p.text for p in collected if p.kind == "content") or None
            reasoning = "".join(p.text for p in collected if p.kind == "reasoning") or None
            usage = usageObject(plan.promptTokens, len(collected), elapsed) \
                if includeUsage else None
            choice: JSON
            if kind == "chat":
                choice = {
                    "index": 0, "finish_reason": plan.finishReason,
                    "eos_reason": plan.eosReason,
                    "stop_str": "<|im_end|>" if plan.eosReason == "stop_token" else None,
                    "message": {"role": "assistant", "content": content,
                                "reasoning_content": reasoning, "tool_calls": plan.toolCalls,
                                "tool_call_id": None},
                    "logprobs": None,
                }
                response = {"id": f"cmpl-{requestId}", "choices": [choice],
                            "created": int(time.time()), "model": modelName,
                            "object": "chat.completion", "usage": usage}
            else:
                choice = {"index": 0, "finish_reason": plan.finishReason,
                          "eos_reason": plan.eosReason, "logprobs": None,
                          "text": content or ""}
                response = {"id": f"cmpl-{requestId}", "choices": [choice],
                            "created": int(time.time()), "model": modelName,
                            "object": "text_completion", "usage": usage}
            request.write(self.respond(request, 200, response))
            request.finish()

        producer = TokenProducer(self.reactor, self.config.knobs.tokenDelay, plan.pieces,
                                 collected.append, finished, self.config.knobs.crashAfterTokens)
        generation.producer = producer

        def aborted() -> None:
            producer.stopProducing()
            self.generations.pop(requestId, None)
            if not request.finished and request.channel is not None:
                request.write(self.respond(request, 503, {"detail": (
                    f"{label} {requestId} aborted. Maybe the model was unloaded? "
                    "Please check the server console.")}))
                request.finish()

        def lost(reason: Failure) -> None:
            if not producer.stopped:
                producer.stopProducing()
                self.generations.pop(requestId, None)
                self.console.error(f"{label} generation {requestId} cancelled by user.")

        def shutdown() -> None:
            producer.stopProducing()
            self.generations.pop(requestId, None)
            transport = request.channel.transport if request.channel is not None else None
            if transport is not None:
                transport.loseConnection()

        generation.abort = aborted
        generation.shutdown = shutdown
        request.notifyFinish().addErrback(lost)
        self.generations[requestId] = generation
        producer.start()
        return NOT_DONE_YET


@define
class EventStream:
    """
    One streaming generation: writes HEAD-shaped SSE chunks, pings, usage and [DONE].
    """

    sim: Simulator
    request: Request
    requestId: str
    kind: str
    modelName: str
    plan: Plan
    includeUsage: bool
    producer: TokenProducer | None = None
    pingCall: IDelayedCall | None = None
    started: float = 0.0
    created: int = field(factory=lambda: int(time.time()))
    closed: bool = False

    @property
    def label(self) -> str:
        return "Chat completion" if self.kind == "chat" else "Completion"

    def chunk(self, choice: JSON, usage: JSON | None = None) -> JSON:
        streamId = f"chatcmpl-{self.requestId}"
        if self.kind == "chat":
            result: JSON = {"id": streamId, "object": "chat.completion.chunk",
                            "created": self.created, "choices": [choice]}
            if usage is not None:
                result["usage"] = usage
            result["model"] = self.modelName
            return result
        result = {"id": streamId, "object": "text_completion", "choices": [choice],
                  "created": self.created, "model_name": self.modelName}
        if usage is not None:
            result["usage"] = usage
        return result

    def delta(self, piece: Piece | None) -> JSON:
        if piece is None:
            return {} if self.kind == "chat" else {"text": ""}
        if self.kind == "chat":
            key = "content" if piece.kind == "content" else "reasoning_content"
            return {key: piece.text}
        return {"text": piece.text}

    def choice(self, piece: Piece | None, finish: bool) -> JSON:
        body = self.delta(piece)
        choice: JSON = {"index": 0}
        if self.kind == "chat":
            choice["delta"] = body
        else:
            choice.update(body)
        if finish and not self.includeUsage:
            choice["finish_reason"] = self.plan.finishReason
            choice["eos_reason"] = self.plan.eosReason
        else:
            choice["finish_reason"] = None
        return choice

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.request.write(data)

    def open(self) -> None:
        startEventStream(self.request)
        self.started = self.sim.reactor.seconds()
        self.request.notifyFinish().addErrback(self.lost)
        self.sim.generations[self.requestId] = Generation(
            self.requestId, abort=lambda: self.fail(self.label), shutdown=self.close)

    def start(self) -> None:
        self.open()
        pieces = self.plan.pieces
        # The last piece is held back and sent in the finishing chunk, which is how HEAD
        # carries the final text together with finish_reason.
        self.producer = TokenProducer(
            self.sim.reactor, self.sim.config.knobs.tokenDelay, pieces, self.onPiece,
            self.onDone, self.sim.config.knobs.crashAfterTokens)
        self.sim.generations[self.requestId].producer = self.producer
        self.request.registerProducer(self.producer, True)
        self.schedulePing()
        self.producer.start()

    def schedulePing(self) -> None:
        interval = self.sim.config.ssePingInterval
        if interval > 0 and not self.closed:
            self.pingCall = self.sim.reactor.callLater(interval, self.ping)

    def ping(self) -> None:
        self.pingCall = None
        if self.closed:
            return
        # A paused reader gets no pings either: they would pile up in the buffer.
        if self.producer is None or not self.producer.paused:
            self.write(pingComment())
        self.schedulePing()

    def onPiece(self, piece: Piece) -> None:
        assert self.producer is not None
        last = self.producer.emitted == len(self.plan.pieces) and not self.plan.toolCalls
        self.write(sseEvent(self.chunk(self.choice(piece, finish=last))))

    def onDone(self) -> None:
        plan = self.plan
        if plan.toolCalls:
            calls = [dict(call, index=i) for i, call in enumerate(plan.toolCalls)]
            choice: JSON = {"index": 0, "delta": {"tool_calls": calls}}
            if self.includeUsage:
                choice["finish_reason"] = None
            else:
                choice["finish_reason"] = plan.finishReason
                choice["eos_reason"] = plan.eosReason
            self.write(sseEvent(self.chunk(choice)))
        elif not plan.pieces and not self.includeUsage:
            self.write(sseEvent(self.chunk(self.choice(None, finish=True))))
        elapsed = self.sim.reactor.seconds() - self.started
        emitted = len(plan.pieces)
        if self.includeUsage:
            finishing = self.choice(None, finish=False)
            finishing["finish_reason"] = plan.finishReason
            usage = usageObject(plan.promptTokens, emitted, elapsed)
            self.write(sseEvent(self.chunk(finishing, usage)))
        self.sim.logMetrics(self.requestId, plan, emitted, elapsed)
        self.write(sseEvent(b"[DONE]"))
        self.close()

    def failAtStart(self, label: str) -> None:
        self.open()
        self.sim.markUnhealthy()
        self.fail(label)

    def fail(self, label: str) -> None:
        """
        A generation error after the 200 went out: one error event, and no [DONE].
        """
        if self.closed:
            return
        message = f"{label} aborted. Please check the server console."
        self.sim.console.error(f"Sent to request: {message}")
        self.write(sseEvent({"error": {"message": message, "trace": None}}))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sim.generations.pop(self.requestId, None)
        if self.pingCall is not None:
            self.pingCall.cancel()
            self.pingCall = None
        if self.producer is not None:
            self.producer.stopProducing()
            self.request.unregisterProducer()
        if not self.request.finished and self.request.channel is not None:
            self.request.finish()

    def lost(self, reason: Failure) -> None:
        if self.closed:
            return
        self.sim.console.error(f"{self.label} generation {self.requestId} cancelled by user.")
        self.closed = True
        self.sim.generations.pop(self.requestId, None)
        if self.pingCall is not None:
            self.pingCall.cancel()
            self.pingCall = None
        if self.producer is not None:
            self.producer.stopProducing()


class SimulatorResource(Resource):
    """
    The single leaf resource; routing is by exact path so 404 and 405 answer like Starlette.
    """

    isLeaf = True

    def __init__(self, sim: Simulator) -> None:
        super().__init__()
        self.sim = sim

    def render(self, request: Request) -> bytes | int:
        return self.sim.dispatch(request)


def portInUse(host: str, port: int) -> bool:
    """
    TabbyAPI's is_port_in_use: a port is busy when something accepts a connection on it.
    """
    target = "127.0.0.1" if host in ("0.0.0.0", "localhost", "") else host
    with socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET) as s:
        s.settimeout(0.5)
        return s.connect_ex((target, port)) == 0


# --------------------------------------------------------------------------------------------
# Entry point


def parseArgs(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tabbyproxy.simulator",
        description="A GPU-free TabbyAPI simulator for tests.",
    )
    parser.add_argument("--config", default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", default=None)
    parser.add_argument("--disable-auth", dest="disable_auth", default=None)
    # Other TabbyAPI flags are accepted and ignored, so any TabbyAPI command line works here.
    parsed, _ = parser.parse_known_args(list(argv))
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    from twisted.internet import reactor as _reactor

    # The default reactor provides time, TCP and threads (callFromThread), all used here.
    reactor: Any = _reactor
    # Twisted's own errors go to stderr (warnings and up), never into the TabbyAPI console.
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr),
                              [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    console = Console()
    args = parseArgs(sys.argv[1:] if argv is None else argv)
    cwd = Path.cwd()
    if args.config is not None:
        console.info("Config file override detected in args.")
    config = SimulatorConfig.fromMerged(
        loadMergedConfig(cwd, args, dict(os.environ)), cwd)
    sim = Simulator(reactor=reactor, config=config, cwd=cwd, console=console)

    def handler(signum: int, frame: FrameType | None) -> None:
        # Signal handlers may not touch the reactor directly; callFromThread wakes it safely.
        reactor.callFromThread(sim.onSignal, signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    reactor.callWhenRunning(sim.begin)
    reactor.run(installSignalHandlers=False)
    if sim.loadError is not None:
        raise sim.loadError
    return sim.exitCode


if __name__ == "__main__":
    sys.exit(main())
