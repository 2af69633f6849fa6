"""
What every route table shares: the proxy's state, reading a JSON body safely, writing a JSON
answer, and errors.

A route raises what went wrong (L{ClientError} for bad input, L{SchedulingError} when no model
could be had, L{UpstreamAnswered}, L{UpstreamUnreachable} or L{UpstreamBroken} when TabbyAPI
failed) and L{registerErrorAnswers} answers it once for the whole table, in its API's
L{ErrorShape}: as a JSON document with the status, or, once a stream has started, as one more
event of that stream.  Anything else is a bug: it is logged with its traceback and answered with
a 500 in the same shape, never with twisted.web's HTML page.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from attrs import field, frozen
from klein import Klein
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from tabbyproxy.auth import Permission, authProblem
from tabbyproxy.config import Catalog, Keys, TabbyInstall
from tabbyproxy.history import RequestHistory
from tabbyproxy.jsontypes import describeJSON
from tabbyproxy.keepalive import KeepAliveError, parseKeepAlive
from tabbyproxy.logbuffer import LogBuffer
from tabbyproxy.metrics import Metrics
from tabbyproxy.server import DEFAULT_MAX_BODY, headersSent, modelOf, noteBody, noteRoute, requestIdOf
from tabbyproxy.scheduler import SchedulingError, Scheduler
from tabbyproxy.tabbywire import sseEvent
from tabbyproxy.upstream import Upstream, UpstreamAnswered, UpstreamBroken, UpstreamUnreachable

log = Logger()

# Built once: json.dumps with arguments makes a new encoder per call.
_encodeCompact = json.JSONEncoder(separators=(",", ":")).encode

# A variable part of a werkzeug rule: <name> or <converter:name>.
_RULE_VARIABLE = re.compile(r"<(?:[^<>:]+:)?([^<>:]+)>")


class RouteTable(Klein):
    """
    A Klein app that tells each request it serves which of its routes matched (L{noteRoute}):
    the rule, with C{{name}} for each variable part, so that C{//health}, C{/h%65alth} and
    C{/health} count as one route in the metrics.
    """

    def __init__(self) -> None:
        super().__init__()
        self._routeNames: dict[str, str] = {}

    def execute_endpoint(self, endpoint: str, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        name = self._routeNames.get(endpoint)
        if name is None:
            rule = next(self.url_map.iter_rules(endpoint)).rule
            name = self._routeNames[endpoint] = _RULE_VARIABLE.sub(r"{\1}", rule)
        noteRoute(request, name)
        return super().execute_endpoint(endpoint, request, *args, **kwargs)


def _refuseConstant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finiteNumber(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"the number {text} is out of range")
    return number


# JSON as RFC 8259 has it: Python's json module would also take NaN and Infinity, and read 1e400
# as infinity; passed on, either would be a body TabbyAPI cannot read.
_decodeStrict = json.JSONDecoder(parse_float=_finiteNumber, parse_constant=_refuseConstant).decode


class ClientError(Exception):
    """
    A request the proxy will not serve, with the status and message the client should see.

    @ivar kind: the OpenAI error C{type} for this error.
    """

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


@frozen
class ProxyState:
    """
    What the routes share: the profiles, the keys, the child's scheduler, the upstream client.

    @ivar catalog: a callable so a reload can swap the profiles under running routes.
    @ivar openModelList: whether the model lists (C{/api/tags}, C{/api/show}, C{/v1/models})
        answer without a key.
    @ivar currentKeys: the keys as they are now (L{tabbyproxy.auth.KeyWatcher}), when they are
        followed; else the install's.
    """

    catalog: Callable[[], Catalog]
    install: TabbyInstall
    scheduler: Scheduler
    upstream: Upstream
    clock: IReactorTime
    maxBodySize: int = DEFAULT_MAX_BODY
    metrics: Metrics = field(factory=Metrics)
    logs: LogBuffer = field(factory=LogBuffer)
    history: RequestHistory = field(factory=RequestHistory)
    openModelList: bool = False
    currentKeys: Callable[[], Keys] | None = None

    @property
    def keys(self) -> Keys:
        return self.install.keys if self.currentKeys is None else self.currentKeys()

    def requireKey(self, request: IRequest, needed: Permission = Permission.API) -> None:
        """
        @raise ClientError: 401 when the request's key does not grant C{needed}.
        """
        problem = authProblem(request, self.keys, needed)
        if problem is not None:
            raise ClientError(401, problem, "authentication_error")

    def requireListingKey(self, request: IRequest) -> None:
        """
        L{requireKey} for a route that lists or describes models, unless those are open.
        """
        if not self.openModelList:
            self.requireKey(request)


# What /status and the dashboard show to the admin only: where the child listens, which process
# it is, the last error, which holds TabbyAPI's output with the server's paths, and how a
# memory estimate was made (it names the model folder).
_ADMIN_ONLY = frozenset({"pid", "port", "last_error", "last_lines", "estimate"})


def forDashboards(document: Any) -> Any:
    """
    C{document} without the admin's fields (L{_ADMIN_ONLY}), at any depth.
    """
    if isinstance(document, dict):
        return {key: forDashboards(value) for key, value in document.items() if key not in _ADMIN_ONLY}
    if isinstance(document, list):
        return [forDashboards(value) for value in document]
    return document



def readJSONObject(request: IRequest, maxBodySize: int) -> dict[str, Any]:
    """
    The request's body as a JSON object.

    @raise ClientError: 413 over C{maxBodySize}, 400 for anything that is not a JSON object.
    """
    content = request.content
    if content is None:
        raise ClientError(400, "missing request body")
    content.seek(0, 2)
    size = content.tell()
    if size > maxBodySize:
        raise ClientError(413, f"request body of {size} bytes is over the limit of {maxBodySize} bytes")
    content.seek(0)
    raw = content.read()
    if not raw.strip():
        raise ClientError(400, "missing request body")
    noteBody(request, raw)
    try:
        # UTF-8 only, as JSON on the wire must be: json.loads would also take UTF-16 and let
        # encoded surrogates through.
        body = _decodeStrict(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError) as e:
        raise ClientError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ClientError(400, f"request body must be a JSON object, not {describeJSON(body)}")
    if b"\\ud" in raw or b"\\uD" in raw:
        _refuseLoneSurrogates(body)
    return body


def _refuseLoneSurrogates(body: dict[str, Any]) -> None:
    """
    @raise ClientError: 400 when a string of C{body} holds a lone UTF-16 surrogate (C{"\\ud800"}
        without its pair), which JSON's escapes allow but is no character: no text can be
        encoded with it, so no route and no model can use it.
    """
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ClientError(400, f"request body is not valid JSON: \\u{ord(e.object[e.start]):04x} is a lone "
                               "surrogate, not a character (strings must be valid Unicode)") from None


def takeKeepAlive(body: dict[str, Any]) -> float | None:
    """
    Remove C{keep_alive} from a request body (it is the proxy's, never TabbyAPI's) and parse it.

    @return: the idle time in seconds, or C{None} when the request did not say.
    @raise ClientError: 400 for a value that is neither seconds nor a duration.
    """
    value = body.pop("keep_alive", None)
    if value is None:
        return None
    try:
        return parseKeepAlive(value)
    except KeepAliveError as e:
        raise ClientError(400, str(e)) from e


# Reason phrases twisted.web does not know (its status line would say "Unknown Status").
_REASONS = {422: b"Unprocessable Entity", 429: b"Too Many Requests"}


def queryFlag(request: IRequest, name: bytes) -> bool:
    """
    Whether the query has C{name} as a bare flag (C{?logs}) or with a value other than 0;
    C{request.args} leaves out bare flags.
    """
    query = request.uri.partition(b"?")[2]
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        if key == name:
            return value not in (b"0", b"false")
    return False


@contextmanager
def producing(request: IRequest, producer: IPushProducer) -> Iterator[None]:
    """
    Register C{producer} with C{request} for the block's time, so the transport pauses it while
    the client's connection is full; unregistered at the end, unless the client has gone.
    """
    consumer = IConsumer(request)
    consumer.registerProducer(producer, True)
    try:
        yield
    finally:
        # A request whose client already left has no channel to unregister from.
        if getattr(request, "channel", None) is not None:
            consumer.unregisterProducer()


def writeJSON(request: IRequest, status: int, document: object) -> bytes:
    """
    Set the status and content type for a JSON answer and return its bytes.
    """
    request.setResponseCode(status, _REASONS.get(status))
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return _encodeCompact(document).encode("utf-8")


def ndjsonLine(document: object) -> bytes:
    """
    One NDJSON line: compact JSON and a newline, nothing else.
    """
    return _encodeCompact(document).encode("utf-8") + b"\n"


# -- the error shapes of the APIs

# OpenAI's error codes for the statuses the proxy answers with.
_OPENAI_CODES = {
    400: "invalid_request", 401: "invalid_api_key", 404: "model_not_found", 408: "request_timeout",
    413: "request_too_large", 414: "uri_too_long", 431: "headers_too_large",
}


def errorDocument(status: int, message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """
    OpenAI's error body: C{{"error": {"message", "type", "code", "param"}}}, C{param} null as
    the proxy never blames one field.
    """
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "code": _OPENAI_CODES.get(status, str(status)),
                      "param": None}}


def invalidURLDocument(method: str, path: str) -> dict[str, Any]:
    """
    OpenAI's answer to a path it has no route for: C{Invalid URL (POST /v1/nope)}, C{code} null.
    """
    return {"error": {"message": f"Invalid URL ({method} {path})", "type": "invalid_request_error",
                      "code": None, "param": None}}



def errorLine(message: str) -> dict[str, Any]:
    """
    Ollama's error body, also its last line of a stream that failed: C{{"error": "..."}}.
    """
    return {"error": message}


@frozen
class ErrorShape:
    """
    How one API answers an error.

    @ivar document: the error's JSON document, from its status, message and OpenAI error type.
    @ivar inStream: that document framed as one more event of a stream already under way.
    @ivar status: the status the API answers for the proxy's own (Anthropic's 529 for 503).
    @ivar requestIdKey: where the document carries the request's id, if it does.
    @ivar noRoute: the 404 document for a path the API has no route for, from the method and
        path; by default the document of a 404 saying C{no route PATH}.
    """

    document: Callable[[int, str, str], object]
    inStream: Callable[[object], bytes]
    status: Callable[[int], int] = int
    requestIdKey: str | None = None
    noRoute: Callable[[str, str], object] | None = None

    def answer(self, request: IRequest, status: int, message: str, kind: str = "invalid_request_error") -> bytes | None:
        """
        Answer C{request} with an error: a JSON document with C{status}, or one more event once
        its stream has started (its status went out already).
        """
        status = self.status(status)
        return self.answerWith(request, status, self.document(status, message, kind))

    def answerWith(self, request: IRequest, status: int, document: object) -> bytes | None:
        """
        Answer C{request} with C{document}, as L{answer} does.
        """
        if self.requestIdKey is not None and isinstance(document, dict):
            document[self.requestIdKey] = requestIdOf(request)
        if headersSent(request):
            request.write(self.inStream(document))
            return None
        return writeJSON(request, status, document)

    def body(self, status: int, message: str) -> bytes:
        """
        The bytes of the error's document, for answers written before any route runs.
        """
        status = self.status(status)
        document = self.document(status, message, "invalid_request_error")
        if self.requestIdKey is not None and isinstance(document, dict):
            # Answered before any route ran: the id is in the X-Request-Id header only.
            document[self.requestIdKey] = None
        return _encodeCompact(document).encode("utf-8")


OPENAI = ErrorShape(document=errorDocument, inStream=sseEvent, noRoute=invalidURLDocument)
"""C{/v1/*}: C{{"error": {"message", "type", "code", "param"}}}, an SSE event in a stream."""

PLAIN = ErrorShape(document=lambda status, message, kind: errorLine(message), inStream=ndjsonLine)
"""C{/api/*} (Ollama's) and the admin routes: C{{"error": "..."}}, an NDJSON line in a stream."""

# Anthropic's error types by status; 529 is its "overloaded".
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error",
}


def anthropicStatus(status: int) -> int:
    """
    The status Anthropic answers where the proxy would answer C{status}: a full queue or a
    model that cannot start now (503) is its C{overloaded_error}, 529, which its clients retry.
    """
    return 529 if status == 503 else status


def anthropicErrorDocument(status: int, message: str, kind: str = "") -> dict[str, Any]:
    """
    Anthropic's error body: C{{"type": "error", "error": {"type", "message"}}}.
    """
    if status in _ANTHROPIC_TYPES:
        kind = _ANTHROPIC_TYPES[status]
    elif 400 <= status < 500:
        kind = "invalid_request_error"
    else:
        kind = "api_error"
    return {"type": "error", "error": {"type": kind, "message": message}}


def anthropicErrorEvent(document: object) -> bytes:
    """
    Anthropic's error in a stream under way: an C{error} event.
    """
    return b"event: error\ndata: " + _encodeCompact(document).encode("utf-8") + b"\n\n"


ANTHROPIC = ErrorShape(document=anthropicErrorDocument, inStream=anthropicErrorEvent, status=anthropicStatus,
                       requestIdKey="request_id")
"""C{/v1/messages}: C{{"type": "error", "error": {"type", "message"}, "request_id"}}, an
C{error} event in a stream."""

# Which shape a path's errors take, for answers given before a route is known; first match wins.
_SHAPES_BY_PREFIX: tuple[tuple[bytes, ErrorShape], ...] = ((b"/v1/messages/", ANTHROPIC), (b"/v1/", OPENAI))


def errorBodyFor(path: bytes, status: int, message: str) -> bytes:
    """
    An error document in the shape of the API C{path} belongs to.
    """
    for prefix, shape in _SHAPES_BY_PREFIX:
        if path.startswith(prefix) or path == prefix.rstrip(b"/"):
            return shape.body(status, message)
    return PLAIN.body(status, message)


def registerErrorAnswers(app: Klein, shape: ErrorShape) -> None:
    """
    Make C{app} answer every error its routes raise in C{shape}: an unknown path with a 404, a
    wrong method with a 405 (Klein's own answers are HTML), the proxy's own errors with their
    status, and anything unexpected with a 500 after logging it with its traceback.
    """

    @app.handle_errors(NotFound)
    def notFound(self: Any, request: IRequest, failure: Failure) -> bytes | None:
        path = request.path.decode("utf-8", "replace")
        if shape.noRoute is None:
            return shape.answer(request, 404, f"no route {path}")
        return shape.answerWith(request, 404, shape.noRoute(request.method.decode("ascii", "replace"), path))

    @app.handle_errors(MethodNotAllowed)
    def wrongMethod(self: Any, request: IRequest, failure: Failure) -> bytes | None:
        return shape.answer(request, 405, f"{request.method.decode('ascii', 'replace')} is not allowed here")

    @app.handle_errors(ClientError)
    def refused(self: Any, request: IRequest, failure: Failure) -> bytes | None:
        error = failure.value
        assert isinstance(error, ClientError)
        return shape.answer(request, error.status, error.message, error.kind)

    @app.handle_errors(SchedulingError)
    def noModel(self: Any, request: IRequest, failure: Failure) -> bytes | None:
        error = failure.value
        assert isinstance(error, SchedulingError)
        return shape.answer(request, error.status, str(error))

    @app.handle_errors(UpstreamAnswered)
    def tabbyRefused(self: Any, request: IRequest, failure: Failure) -> bytes | None:
        error = failure.value
        assert isinstance(error, UpstreamAnswered)
        return shape.answer(request, error.status, error.message)

    @app.handle_errors(UpstreamUnreachable, UpstreamBroken)
    def tabbyFailed(self: Any, request: IRequest, failure: Failure) -> bytes | None:
        model = modelOf(request)
        problem = str(failure.value)
        log.error("TabbyAPI failed a request for {model}: {problem}", model=model, problem=problem,
                  request_id=requestIdOf(request))
        if failure.check(UpstreamBroken):
            problem = f"{problem} (model {model}); see GET /status"
        return shape.answer(request, 502, problem)

    @app.handle_errors(Exception)
    def unexpected(self: Any, request: IRequest, failure: Failure) -> bytes | None:
        requestId = requestIdOf(request)
        log.failure("Unexpected error answering {method} {path}", failure,
                    method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
                    request_id=requestId)
        return shape.answer(request, 500, f"internal error in tabbyproxy (request {requestId}): see its log")
