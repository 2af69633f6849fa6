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
from typing import Any, Callable, Iterator, Mapping

from attrs import field, frozen
from klein import Klein
from klein._app import ErrorMethods
from klein._dihttp import Response
from klein._interfaces import IKleinRequest
from klein._resource import (KleinResource, StandInResource, URLDecodeError, ensure_utf8_bytes, extractURLparts,
                             route_metadata)
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python import log as legacyLog
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRenderable, IRequest
from twisted.web.resource import IResource, getChildForRequest
from twisted.web.template import renderElement
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import MapAdapter, RequestRedirect, Rule

from tabbyproxy.auth import Permission, authProblem
from tabbyproxy.config import Catalog, Keys, TabbyInstall
from tabbyproxy.history import RequestHistory
from tabbyproxy.jsontypes import describeJSON
from tabbyproxy.keepalive import KeepAliveError, parseKeepAlive
from tabbyproxy.logbuffer import LogBuffer
from tabbyproxy.metrics import Metrics
from tabbyproxy.server import DEFAULT_MAX_BODY, headersSent, modelOf, noteBody, noteRoute, requestIdOf, writeWhole
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

    def resource(self) -> KleinResource:
        return AcyclicKleinResource(self)


class AcyclicKleinResource(KleinResource):
    """
    Klein's resource, rendering as C{KleinResource.render} does (Klein 24.8), without the cycle it
    leaves behind each request: its C{processing_failed} closure refers to itself, so everything
    the request's closures hold (the request, its channel's buffers, the mapper) was freed only by
    the garbage collector, which took about 8% of the proxy's CPU on small requests.  Here the
    error handling is a method, and a served request is freed by reference counting alone.

    The routes a path without variable parts matched are kept (a few hundred at most): werkzeug's
    matcher is a recursive closure, so each match left a cycle for the garbage collector too.

    This uses Klein's private names (C{klein._resource}, C{klein._app}, C{klein._dihttp}); a
    Klein release that renames them fails the import, and the unit tests with it.
    """

    # How many (path, method, scheme) matches are kept; later ones are matched each time.
    MAX_MATCHES = 256

    def __init__(self, app: Klein) -> None:
        super().__init__(app)
        self._matches: dict[tuple[str, str, str], tuple[Rule, Mapping[str, Any]]] = {}

    def render(self, request: IRequest) -> Any:
        try:
            urlScheme, serverName, serverPort, pathInfo, scriptName = extractURLparts(request)
        except URLDecodeError as e:
            for what, fail in e.errors:
                legacyLog.err(fail, f"Invalid encoding in {what}.")
            request.setResponseCode(400)
            return b"Non-UTF-8 encoding in URL."
        method = request.method.decode("utf-8")
        mapper = self._app.url_map.bind(serverName, scriptName, path_info=pathInfo,
                                        default_method=method, url_scheme=urlScheme)
        IKleinRequest(request).mapper = mapper
        finished = [False]

        def noteFinished(result: object) -> None:
            finished[0] = True

        def execute() -> Deferred[Any]:
            rule, kwargs = self._match(mapper, pathInfo, method, urlScheme)
            endpoint = rule.endpoint
            segments = route_metadata(self._app.endpoints[endpoint]).segment_count
            request.prepath.extend(request.postpath[:segments])
            request.postpath = request.postpath[segments:]
            request.notifyFinish().addBoth(noteFinished)  # type: ignore[attr-defined]
            d = maybeDeferred(self._app.execute_endpoint, endpoint, request, **kwargs)
            request.notifyFinish().addErrback(lambda _: d.cancel())  # type: ignore[attr-defined]
            return d

        def writeResponse(r: object) -> None:
            if r is StandInResource:
                return
            if isinstance(r, str):
                r = r.encode("utf-8")
            if isinstance(r, bytes):
                writeWhole(request, r)
            if not finished[0]:
                request.finish()

        d = maybeDeferred(execute)
        d.addCallback(self._process, request)
        d.addErrback(self._processingFailed, self._app._error_handlers, request, finished)
        d.addCallback(writeResponse)
        d.addErrback(legacyLog.err, _why="Unhandled Error writing response")
        return server.NOT_DONE_YET

    def _match(self, mapper: MapAdapter, pathInfo: str, method: str, urlScheme: str) -> tuple[Rule, Mapping[str, Any]]:
        """
        C{mapper.match}'s rule and arguments for the request: the same for the same path,
        method and scheme (the tables' rules match neither host nor subdomain), so a match
        without arguments is kept.  What raises (a 404, a 405, a redirect) is matched each time.
        """
        key = (pathInfo, method, urlScheme)
        kept = self._matches.get(key)
        if kept is not None:
            return kept
        found = mapper.match(return_rule=True)
        if not found[1] and len(self._matches) < self.MAX_MATCHES:
            self._matches[key] = found
        return found

    @staticmethod
    def _process(r: object, request: IRequest) -> Any:
        """
        Render what a route returned, down to bytes or a resource that renders itself.
        """
        if isinstance(r, Response):
            r = r._applyToRequest(request)
        if IResource.providedBy(r):
            request.render(getChildForRequest(r, request))  # type: ignore[attr-defined]
            return StandInResource
        if IRenderable.providedBy(r):
            renderElement(request, r)
            return StandInResource
        return r

    def _processingFailed(self, failure: Failure, handlers: ErrorMethods, request: IRequest,
                          finished: list[bool]) -> Deferred[Any] | None:
        """
        Answer C{failure} with the first of C{handlers} that takes it, else Klein's defaults.
        """
        if finished[0]:
            # Nothing can reach a client that left.
            if not failure.check(CancelledError):
                legacyLog.err(failure, "Unhandled Error Processing Request.")
            return None
        for index, (kinds, handler) in enumerate(handlers):
            if failure.check(*kinds):
                d = maybeDeferred(self._app.execute_error_handler, handler, request, failure)
                d.addCallback(self._process, request)
                return d.addErrback(self._processingFailed, handlers[index + 1:], request, finished)
        if failure.check(HTTPException):
            error = failure.value
            assert isinstance(error, HTTPException)
            request.setResponseCode(error.code)
            answer = error.get_response({})
            for header, value in answer.headers:
                request.setHeader(ensure_utf8_bytes(header), ensure_utf8_bytes(value))
            return succeed(ensure_utf8_bytes(b"".join(answer.iter_encoded())))
        request.processingFailed(failure)  # type: ignore[attr-defined]
        return None


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

    # werkzeug answers a path with an empty segment (/v1//models/x) that would match once merged
    # with a redirect, which no API client follows: it is a path no route has, as //v1/models is.
    @app.handle_errors(NotFound, RequestRedirect)
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
