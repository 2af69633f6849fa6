"""
What every route needs: the shared state of the proxy, reading a JSON body safely, writing a JSON
answer, and the root resource that sends C{/v1/*} to the OpenAI routes, C{/api/*} to the Ollama
routes and the rest to the admin routes.

It also holds the HTTP server's guards, which act before any route runs: L{ProxySite} refuses a
body over the size limit as soon as its length is known (or, when chunked, as soon as it grows
past the limit) instead of buffering it, answers a client that stalls while sending a request with
a 408, and a request line or headers over twisted.web's limits with a 414 or 431; L{CORSResource}
answers cross-origin requests from the configured origins.  These early answers are JSON in the
error shape of the route the request was for.
"""

from __future__ import annotations

import json
import re
import uuid
from http import HTTPStatus
from typing import Any, Callable, Sequence, cast

from attrs import field, frozen
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from tabbyproxy.auth import Permission, authProblem
from tabbyproxy.config import Catalog, Keys, TabbyInstall
from tabbyproxy.keepalive import KeepAliveError, parseKeepAlive
from tabbyproxy.logbuffer import LogBuffer
from tabbyproxy.metrics import Metrics
from tabbyproxy.supervisor import Supervisor
from tabbyproxy.upstream import Upstream

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_CLIENT_TIMEOUT = 60.0


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
    What the routes share: the profiles, the keys, the child's supervisor, the upstream client.

    @ivar catalog: a callable so a reload can swap the profiles under running routes.
    """

    catalog: Callable[[], Catalog]
    install: TabbyInstall
    supervisor: Supervisor
    upstream: Upstream
    clock: Any
    maxBodySize: int = DEFAULT_MAX_BODY
    metrics: Metrics = field(factory=Metrics)
    logs: LogBuffer = field(factory=LogBuffer)

    @property
    def keys(self) -> Keys:
        return self.install.keys

    def requireKey(self, request: IRequest, needed: Permission = Permission.API) -> None:
        """
        @raise ClientError: 401 when the request's key does not grant C{needed}.
        """
        problem = authProblem(request, self.keys, needed)
        if problem is not None:
            raise ClientError(401, problem, "authentication_error")


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
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ClientError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ClientError(400, f"request body must be a JSON object, not a JSON {type(body).__name__}")
    return body


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


def writeJSON(request: IRequest, status: int, document: object) -> bytes:
    """
    Set the status and content type for a JSON answer and return its bytes.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


class Router(Resource):
    """
    Picks the route table by the first path segment.  Each table is a Klein resource that sees
    the whole path, so routes are written with their full paths.
    """

    isLeaf = True

    def __init__(self, openai: IResource, ollama: IResource, admin: IResource) -> None:
        super().__init__()
        self._bySegment = {b"v1": openai, b"api": ollama}
        self._admin = admin

    def render(self, request: IRequest) -> Any:
        segments = request.postpath
        first = segments[0] if segments else b""
        return self._bySegment.get(first, self._admin).render(request)


# OpenAI's error codes for the statuses the proxy answers with.
_OPENAI_CODES = {
    400: "invalid_request", 401: "invalid_api_key", 404: "model_not_found", 408: "request_timeout",
    413: "request_too_large", 414: "uri_too_long", 431: "headers_too_large",
}


def errorDocument(status: int, message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """
    OpenAI's error body: C{{"error": {"message", "type", "code"}}}.
    """
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "code": _OPENAI_CODES.get(status, str(status))}}


def errorBodyFor(path: bytes, status: int, message: str) -> bytes:
    """
    An error document in the shape of the API C{path} belongs to: OpenAI's under C{/v1/},
    C{{"error": "..."}} (Ollama's, and the admin routes') elsewhere.
    """
    document: object
    if path.startswith(b"/v1/") or path == b"/v1":
        document = errorDocument(status, message)
    else:
        document = {"error": message}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def answerMissingRoutes(app: Klein) -> None:
    """
    Make C{app} answer an unknown path with a 404 and a wrong method with a 405, as JSON in the
    error shape of the API the path belongs to (Klein's own answers are HTML).
    """

    @app.handle_errors(NotFound)
    def notFound(self: Any, request: IRequest, failure: Failure) -> bytes:
        return noRoute(request, 404)

    @app.handle_errors(MethodNotAllowed)
    def wrongMethod(self: Any, request: IRequest, failure: Failure) -> bytes:
        return noRoute(request, 405)


def noRoute(request: IRequest, status: int) -> bytes:
    """
    The answer for a path no route has (404) or a method the route does not take (405), in the
    error shape of the API the path belongs to.
    """
    if status == 404:
        message = f"no route {request.path.decode('utf-8', 'replace')}"
    else:
        message = f"{request.method.decode('ascii', 'replace')} is not allowed here"
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return errorBodyFor(request.path, status, message)


def _rawResponse(status: int, body: bytes) -> bytes:
    """
    A complete HTTP/1.1 response that ends the connection, for answers written straight to the
    transport while twisted.web is still reading the request.
    """
    reason = HTTPStatus(status).phrase.encode("ascii")
    head = (
        b"HTTP/1.1 %d %s\r\n" % (status, reason)
        + b"Content-Type: application/json; charset=utf-8\r\n"
        + b"Content-Length: %d\r\n" % (len(body),)
        + b"Connection: close\r\n\r\n"
    )
    return head + body


_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")

# Paths whose last part is a name: one metrics label for all of them.
_NAMED_ROUTES = ((b"/v1/models/", "/v1/models/{model}"), (b"/api/blobs/", "/api/blobs/{digest}"))

# Answers whose body is a stream of events, counted per event for the chunk metrics.
_EVENT_SEPARATORS = {b"text/event-stream": b"data:", b"application/x-ndjson": b"\n"}


def requestIdOf(request: IRequest) -> str | None:
    """
    The id the proxy gave C{request} (sent back as C{X-Request-Id}), for log events about it.
    """
    return request.requestId if isinstance(request, ProxyRequest) else None


def noteModel(request: IRequest, modelId: str) -> None:
    """
    Say which model C{request} is for, so its access log line and metrics carry it.
    """
    if isinstance(request, ProxyRequest):
        request.modelId = modelId


def routeLabel(path: bytes, status: int) -> str:
    """
    The route a path belongs to, with few enough values to be a metrics label.
    """
    if status == 404:
        return "unmatched"
    for prefix, label in _NAMED_ROUTES:
        if path.startswith(prefix):
            return label
    return path.decode("utf-8", "replace")


class ProxyRequest(Request):
    """
    A request with an id (the client's C{X-Request-Id} when it sent a sane one, else a new one,
    always sent back), an access log line and metrics when it ends, and a body limit: a
    C{Content-Length} over the site's limit, or a chunked body that grows past it, is answered
    with a 413 at once and the connection closed, without buffering it.

    @ivar modelId: the profile the request is for, once a route knows it.
    """

    log = Logger()

    _refused = False
    _bodySize = 0
    _awaitingBody = False
    requestId = ""
    modelId: str | None = None
    _arrivedAt = 0.0
    _firstByteAt: float | None = None
    _eventSeparator: bytes | None = None
    _events = 0
    _accounted = False
    # Kept from the start: twisted.web drops the channel (and with it the site) once finished.
    _proxySite: ProxySite | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Every route reads JSON: parsing form bodies into request.args would be wasted work
        # (and a multipart body is costly to parse).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    def process(self) -> None:
        site = self._proxySite = self._site()
        self._arrivedAt = site.reactor.seconds() if site is not None else 0.0
        sent = self.getHeader(b"x-request-id")
        if sent is not None and _CLIENT_REQUEST_ID.fullmatch(sent):
            self.requestId = sent.decode("ascii")
        else:
            self.requestId = uuid.uuid4().hex[:16]
        self.setHeader(b"X-Request-Id", self.requestId.encode("ascii"))
        super().process()

    def write(self, data: bytes) -> None:
        if self._firstByteAt is None:
            site = self._proxySite
            self._firstByteAt = site.reactor.seconds() if site is not None else 0.0
            contentType = self.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
            self._eventSeparator = _EVENT_SEPARATORS.get(contentType.split(b";", 1)[0].strip())
        if self._eventSeparator is not None:
            self._events += data.count(self._eventSeparator)
        super().write(data)

    def finish(self) -> None:
        super().finish()
        self._account(self.code)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if not self.finished:
            # nginx's "client closed request": the client left before the answer ended.
            self._account(499)

    def _account(self, status: int) -> None:
        site = self._proxySite
        if self._accounted or site is None or not self.requestId:
            return
        self._accounted = True
        seconds = site.reactor.seconds() - self._arrivedAt
        path = _pathOf(self.uri)
        route = routeLabel(path, status)
        model = self.modelId or ""
        metrics = site.metrics
        metrics.requests.labels(route, model, str(status)).inc()
        metrics.requestSeconds.labels(route, model).observe(seconds)
        if self._firstByteAt is not None and model:
            metrics.firstByteSeconds.labels(route, model).observe(self._firstByteAt - self._arrivedAt)
        if self._events and model:
            metrics.chunks.labels(model).inc(self._events)
        self.log.info(
            "{method} {path} {status} {seconds:.3f}s{forModel}",
            method=self.method.decode("latin-1"),
            path=self.uri.decode("latin-1"),
            status=status,
            seconds=seconds,
            forModel=f" ({model})" if model else "",
            request_id=self.requestId,
            route=route,
            model=self.modelId,
            client=getattr(self.getClientAddress(), "host", None),
        )

    def _site(self) -> ProxySite | None:
        site = getattr(self.channel, "site", None)
        return site if isinstance(site, ProxySite) else None

    def gotLength(self, length: int | None) -> None:
        site = self._site()
        if site is not None and length is not None and length > site.maxBodySize:
            self._refuse(413, f"request body of {length} bytes is over the limit of {site.maxBodySize} bytes")
            return
        self._awaitingBody = True
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._bodySize += len(data)
        site = self._site()
        if site is not None and self._bodySize > site.maxBodySize:
            self._refuse(413, f"request body is over the limit of {site.maxBodySize} bytes")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._awaitingBody = False
        if self._refused:
            # The answer went out already and the connection is closing.
            return
        super().requestReceived(command, path, version)

    def answerEarly(self, status: int, message: str) -> None:
        """
        Answer now, before the request is complete, and close the connection.
        """
        self._refuse(status, message)

    @property
    def incomplete(self) -> bool:
        """
        Whether the request's headers are in but its body is not complete yet.
        """
        return self._awaitingBody and not self._refused

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._awaitingBody = False
        # Nothing of the body is kept from now on, and no "100 Continue" invites the rest of it.
        self.content = cast(Any, _Discard())
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        if channel is None:
            return
        path = _pathOf(getattr(channel, "_path", b""))
        self.log.info(
            "Refused {method} {path} with {status}: {message}",
            method=getattr(channel, "_command", b"?").decode("latin-1"),
            path=path.decode("latin-1"),
            status=status,
            message=message,
        )
        if channel.transport is not None:
            channel.transport.write(_rawResponse(status, errorBodyFor(path, status, message)))
        channel.loseConnection()


def _pathOf(uri: bytes) -> bytes:
    return uri.split(b"?", 1)[0]


class _Discard:
    """
    The content of a refused request: takes writes and keeps nothing.
    """

    def write(self, data: bytes) -> None:
        pass

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class ProxyChannel(HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel with clear answers where it would close silently or answer an
    empty 400: a request line over C{MAX_LENGTH} (16 KiB) gets a 414, a header line over it, too
    many headers or too many header bytes a 431, a malformed request a 400, and a client that
    stalls while sending a request a 408 (an idle keep-alive connection is just closed).
    """

    log = Logger()

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.requests:
            path = _pathOf(getattr(self, "_path", b""))
            self._answer(431, path, f"a request header line is over the limit of {self.MAX_LENGTH} bytes")
        else:
            path = _pathOf(line.split(b" ", 2)[1] if line.count(b" ") >= 1 else b"")
            self._answer(414, path, f"the request line is over the limit of {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        path = _pathOf(getattr(self, "_path", b""))
        headerCount = getattr(self, "_receivedHeaderCount", 0)
        headerSize = getattr(self, "_receivedHeaderSize", 0)
        if headerCount > self.maxHeaders:
            self._answer(431, path, f"more than {self.maxHeaders} request headers")
        elif headerSize > self.totalHeadersSize:
            self._answer(431, path, f"the request line and headers are over the limit of {self.totalHeadersSize} bytes")
        else:
            self._answer(400, path, "malformed HTTP request")

    def timeoutConnection(self) -> None:
        pending = self.requests[-1] if self.requests else None
        if isinstance(pending, ProxyRequest) and pending.incomplete:
            pending.answerEarly(408, f"the request was not complete within {self.timeOut:g}s (--client-timeout)")
        elif self.requests:
            path = _pathOf(getattr(self, "_path", b""))
            self._answer(408, path, f"the request headers were not complete within {self.timeOut:g}s (--client-timeout)")
        super().timeoutConnection()

    def _answer(self, status: int, path: bytes, message: str) -> None:
        self.log.info("Refused a request with {status}: {message}", status=status, message=message)
        if self.transport is not None and not getattr(self.transport, "disconnecting", False):
            self.transport.write(_rawResponse(status, errorBodyFor(path, status, message)))
        self.loseConnection()


class ProxySite(Site):
    """
    The proxy's HTTP server: L{ProxyChannel}s making L{ProxyRequest}s, with the body limit.

    @param maxBodySize: the largest request body accepted, in bytes.
    @param timeout: how long a connection may stay silent while the client sends a request (its
        headers or its body) or between requests; while the proxy answers, it never times out.
    @param metrics: where each request's count, duration and time to first byte go.
    """

    requestFactory = ProxyRequest
    displayTracebacks = False

    def __init__(
        self, resource: IResource, maxBodySize: int = DEFAULT_MAX_BODY, timeout: float = DEFAULT_CLIENT_TIMEOUT,
        metrics: Metrics | None = None, **kwargs: Any
    ) -> None:
        super().__init__(resource, timeout=timeout, **kwargs)
        self.maxBodySize = maxBodySize
        self.metrics = metrics if metrics is not None else Metrics()

    def log(self, request: http.Request) -> None:
        # Each ProxyRequest logs itself, with structured fields, when it ends.
        pass

    def protocol(self) -> ProxyChannel:  # type: ignore[override]
        # A plain HTTP/1.1 channel: TabbyAPI's clients speak HTTP/1.1, and twisted.web's HTTP/2
        # switch (only used with TLS and the h2 package) would bypass these guards.
        return ProxyChannel()


class CORSResource(Resource):
    """
    Cross-origin access for browsers, off unless origins are configured: a request whose
    C{Origin} is allowed gets C{Access-Control-Allow-Origin}, and its preflight (C{OPTIONS} with
    C{Access-Control-Request-Method}) a 204 listing the methods and headers it may use.  Any
    other request goes to the wrapped resource untouched.

    @param origins: the allowed origins, exactly as browsers send them
        (C{https://chat.example.org}), or C{*} for any.
    """

    isLeaf = True

    ALLOWED_METHODS = b"GET, POST, DELETE, HEAD, OPTIONS"
    ALLOWED_HEADERS = b"Authorization, Content-Type, X-API-Key, X-Admin-Key"
    MAX_AGE = b"600"

    def __init__(self, wrapped: IResource, origins: Sequence[str]) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._any = "*" in origins
        self._origins = frozenset(origin.encode("utf-8") for origin in origins if origin != "*")

    def render(self, request: IRequest) -> Any:
        origin = request.getHeader(b"origin")
        allowed = origin is not None and (self._any or origin in self._origins)
        if origin is not None:
            request.responseHeaders.addRawHeader(b"Vary", b"Origin")
        if allowed:
            assert origin is not None
            request.setHeader(b"Access-Control-Allow-Origin", b"*" if self._any else origin)
            if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
                request.setHeader(b"Access-Control-Allow-Methods", self.ALLOWED_METHODS)
                request.setHeader(b"Access-Control-Allow-Headers", self.ALLOWED_HEADERS)
                request.setHeader(b"Access-Control-Max-Age", self.MAX_AGE)
                request.setResponseCode(204)
                return b""
        return self._wrapped.render(request)
