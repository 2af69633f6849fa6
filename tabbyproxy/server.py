"""
The proxy's HTTP server: L{ProxySite} makes L{ProxyChannel}s (see L{tabbyproxy.channel}) that make
L{ProxyRequest}s.

Each request gets an id (the client's C{X-Request-Id} when it sent a sane one, else a new one,
always sent back), one structured access log line and its metrics when it ends, and a body limit
that acts before any route runs: a C{Content-Length} over the limit, or a chunked body that grows
past it, is answered with a 413 at once and the connection closed, without buffering it.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any, Callable, cast
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from tabbyproxy.channel import ErrorBody, ProxyChannel, rawResponse
from tabbyproxy.limits import DEFAULT_MAX_CONNECTIONS, ConnectionLimit
from tabbyproxy.metrics import Metrics

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_CLIENT_TIMEOUT = 60.0
DEFAULT_REQUEST_TIMEOUT = 300.0

_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")

# The route label of a request no route table matched (a 404, a 403 before routing).
UNMATCHED = "unmatched"

# An absolute-form request target (GET http://host:port/path HTTP/1.1): its authority and the rest.
_ABSOLUTE_FORM = re.compile(rb"(?i)https?://([^/?#]*)(.*)", re.S)

# Answers whose body is a stream of events, counted per event for the chunk metrics.
_EVENT_SEPARATORS = {b"text/event-stream": b"data:", b"application/x-ndjson": b"\n"}


# Query parameter names (once percent-decoded) whose value is a secret: masked in the access log.
_SECRET_NAME = re.compile(rb"(?i)key|token|secret|passw|pwd|auth|sig|cred|session")
# What separates query parameters, kept by re.split so the target is rebuilt as it came.
_QUERY_SEPARATOR = re.compile(rb"([&;])")


def maskedTarget(uri: bytes) -> bytes:
    """
    A request target fit for a log line: the value of every query parameter named like a
    credential (C{api_key}, C{token}, C{password}, ..., also when its name is percent-encoded)
    replaced by C{***}.
    """
    path, question, query = uri.partition(b"?")
    if not question:
        return uri
    parts = _QUERY_SEPARATOR.split(query)
    for index in range(0, len(parts), 2):
        name, equals, _ = parts[index].partition(b"=")
        if equals and _SECRET_NAME.search(unquote_to_bytes(name.replace(b"+", b" "))):
            parts[index] = name + b"=***"
    return path + b"?" + b"".join(parts)


def requestIdOf(request: IRequest) -> str | None:
    """
    The id the proxy gave C{request} (sent back as C{X-Request-Id}), for log events about it.
    """
    return request.requestId if isinstance(request, ProxyRequest) else None


def headersSent(request: IRequest) -> bool:
    """
    Whether C{request}'s status line and headers went out (its answer has started), which
    C{IRequest} does not say.
    """
    return isinstance(request, Request) and bool(request.startedWriting)


def modelOf(request: IRequest) -> str | None:
    """
    The profile C{request} is for, once a route said so with L{noteModel}.
    """
    return request.modelId if isinstance(request, ProxyRequest) else None


def writeWhole(request: IRequest, body: bytes) -> None:
    """
    Write C{body}, an answer's whole body, to C{request}: framed by its C{Content-Length} where
    the answer has not started and says nothing of its framing (twisted.web would chunk it, as
    for a body whose end it does not know), and on a L{ProxyChannel} sent with the headers in one
    C{send}, at once, rather than at the reactor's next turn.
    """
    if isinstance(request, Request) and not request.startedWriting and request.code not in http.NO_BODY_CODES:
        headers = request.responseHeaders
        if not headers.hasHeader(b"content-length") and not headers.hasHeader(b"transfer-encoding"):
            headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    _writeAtOnce(request, body)


def sendHeaders(request: IRequest) -> None:
    """
    Send C{request}'s status line and headers now, ahead of its body, in one C{send} at once on
    a L{ProxyChannel}: twisted.web would hold them for the first piece of the body.
    """
    if not headersSent(request):
        _writeAtOnce(request, b"")


def _writeAtOnce(request: IRequest, data: bytes) -> None:
    """
    C{request.write(data)}, with what it makes the channel write (the headers first, if they
    have not gone yet) sent in one C{send} at once on a L{ProxyChannel}.
    """
    channel = getattr(request, "channel", None)
    corked = isinstance(channel, ProxyChannel) and channel.cork()
    try:
        request.write(data)
    finally:
        if corked:
            cast(ProxyChannel, channel).uncork()


def noteModel(request: IRequest, modelId: str) -> None:
    """
    Say which model C{request} is for, so its access log line and metrics carry it.
    """
    if isinstance(request, ProxyRequest):
        request.modelId = modelId


def noteUsage(request: IRequest, tokensIn: int, tokensOut: int) -> None:
    """
    Say how many tokens C{request}'s prompt and answer had, when a route knows it exactly, for
    the dashboard's request history.
    """
    if isinstance(request, ProxyRequest):
        request.usage = (tokensIn, tokensOut)


def noteBody(request: IRequest, raw: bytes) -> None:
    """
    Keep a reference to the body a route read: twisted.web drops the request's content before
    the request is accounted, and the history may keep its prompt (C{--keep-request-bodies}).
    """
    if isinstance(request, ProxyRequest):
        request.body = raw


def noteRoute(request: IRequest, route: str) -> None:
    """
    Say which route C{request} matched (its rule, such as C{/v1/models/{name}}), so its metrics
    are labelled by the route and never by the path the client spelled.
    """
    if isinstance(request, ProxyRequest):
        request.route = route


class ProxyRequest(Request):
    """
    A request with an id (the client's C{X-Request-Id} when it sent a sane one, else a new one,
    always sent back), an access log line and metrics when it ends, and a body limit: a
    C{Content-Length} over the site's limit, or a chunked body that grows past it, is answered
    with a 413 at once and the connection closed, without buffering it.

    @ivar route: the route the request matched, once routed (L{UNMATCHED} when none did).
    @ivar modelId: the profile the request is for, once a route knows it.
    @ivar usage: the prompt's and the answer's tokens, when a route knows them exactly.
    @ivar body: the body a route read, if one did.
    """

    log = Logger()

    _refused = False
    _bodySize = 0
    _awaitingBody = False
    requestId = ""
    route = UNMATCHED
    modelId: str | None = None
    _arrivedAt = 0.0
    _firstByteAt: float | None = None
    _firstEventAt: float | None = None
    usage: tuple[int, int] | None = None
    body: bytes | None = None
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

    def __repr__(self) -> str:
        # Twisted's repr shows the whole target, and log events carry the request as their source.
        return (f"<{type(self).__name__} at 0x{id(self):x} method={self.method.decode('latin-1')} "
                f"uri={maskedTarget(self.uri).decode('latin-1')} clientproto={self.clientproto.decode('latin-1')}>")

    def process(self) -> None:
        site = self._proxySite = self._site()
        self._arrivedAt = site.reactor.seconds() if site is not None else 0.0
        sent = self.getHeader(b"x-request-id")
        if sent is not None and _CLIENT_REQUEST_ID.fullmatch(sent):
            self.requestId = sent.decode("ascii")
        else:
            self.requestId = site.newRequestId() if site is not None else os.urandom(8).hex()
        self.setHeader(b"X-Request-Id", self.requestId.encode("ascii"))
        super().process()

    def write(self, data: bytes) -> None:
        if self._firstByteAt is None:
            site = self._proxySite
            self._firstByteAt = site.reactor.seconds() if site is not None else 0.0
            contentType = self.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
            self._eventSeparator = _EVENT_SEPARATORS.get(contentType.split(b";", 1)[0].strip())
        if self._eventSeparator is not None:
            events = data.count(self._eventSeparator)
            if events and not self._events:
                site = self._proxySite
                self._firstEventAt = site.reactor.seconds() if site is not None else 0.0
            self._events += events
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
        route = self.route
        model = self.modelId or ""
        series = site.metrics.forRequest(route, model, status)
        series.requests.inc()
        series.seconds.observe(seconds)
        if self._firstByteAt is not None and series.firstByte is not None:
            series.firstByte.observe(self._firstByteAt - self._arrivedAt)
        if self._events and series.chunks is not None:
            series.chunks.inc(self._events)
        self.log.info(
            "{method} {path} {status} {seconds:.3f}s{forModel}",
            method=self.method.decode("latin-1"),
            path=maskedTarget(self.uri).decode("latin-1"),
            status=status,
            seconds=seconds,
            forModel=f" ({model})" if model else "",
            request_id=self.requestId,
            route=route,
            model=self.modelId,
            client=getattr(self.getClientAddress(), "host", None),
        )
        if site.requestFinished is not None:
            site.requestFinished(self, status, seconds)

    def processingFailed(self, reason: Any) -> Any:
        """
        The last resort for a failure no route answered: logged with its traceback, and answered
        with a 500 in the shape of the path's API, never with twisted.web's HTML page; a response
        already under way is ended.
        """
        self.log.failure("Unexpected error answering {method} {path}", reason, method=self.method.decode("latin-1"),
                         path=maskedTarget(self.uri).decode("latin-1"), request_id=self.requestId)
        if self.finished or self._disconnected:
            return reason
        if not self.startedWriting:
            site = self._proxySite
            message = f"internal error in tabbyproxy (request {self.requestId}): see its log"
            body = site.errorBody(self.path, 500, message) if site is not None else message.encode()
            self.setResponseCode(500)
            self.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            self.setHeader(b"Content-Length", b"%d" % len(body))
            self.write(body)
        self.finish()
        return reason

    @property
    def arrivedAt(self) -> float:
        return self._arrivedAt

    @property
    def firstTokenSeconds(self) -> float | None:
        """
        Seconds from arrival to the first streamed event (comments while waiting for a model do
        not count), or to the first byte of an answer that is not a stream.
        """
        first = self._firstEventAt if self._firstEventAt is not None else self._firstByteAt
        return None if first is None else first - self._arrivedAt

    @property
    def streamedEvents(self) -> int:
        return self._events

    def _site(self) -> ProxySite | None:
        site = getattr(self.channel, "site", None)
        return site if isinstance(site, ProxySite) else None

    def gotLength(self, length: int | None) -> None:
        site = self._site()
        if getattr(self.channel, "overLimit", False) and site is not None:
            self.refuse(503, f"the proxy has {site.connections.limit} connections open, its limit "
                             "(--max-connections); try again shortly")
            return
        if site is not None and length is not None and length > site.maxBodySize:
            self.refuse(413, f"request body of {length} bytes is over the limit of {site.maxBodySize} bytes")
            return
        self._awaitingBody = True
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._bodySize += len(data)
        site = self._site()
        if site is not None and self._bodySize > site.maxBodySize:
            self.refuse(413, f"request body is over the limit of {site.maxBodySize} bytes")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._awaitingBody = False
        if self._refused:
            # The answer went out already and the connection is closing.
            return
        absolute = _ABSOLUTE_FORM.fullmatch(path)
        if absolute is not None:
            # RFC 9112 3.2.2: a server takes the target's authority for the Host header, and the
            # rest as the origin-form target.
            authority, target = absolute.groups()
            self.requestHeaders.setRawHeaders(b"host", [authority.rpartition(b"@")[2]])
            path = target if target.startswith(b"/") else b"/" + target
        super().requestReceived(command, path, version)

    @property
    def incomplete(self) -> bool:
        """
        Whether the request's headers are in but its body is not complete yet.
        """
        return self._awaitingBody and not self._refused

    def refuse(self, status: int, message: str) -> None:
        """
        Answer now, before the request is complete, with a JSON error in the shape of its API,
        and close the connection.
        """
        self._refused = True
        self._awaitingBody = False
        # Nothing of the body is kept from now on, and no "100 Continue" invites the rest of it.
        self.content = cast(Any, _Discard())
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        site = self._site()
        if not isinstance(channel, ProxyChannel) or site is None:
            return
        method, path = channel.requestTarget()
        self.log.info(
            "Refused {method} {path} with {status}: {message}",
            method=method.decode("latin-1"),
            path=path.decode("latin-1"),
            status=status,
            message=message,
        )
        if channel.transport is not None:
            channel.transport.write(rawResponse(status, site.errorBody(path, status, message)))
        channel.loseConnection()


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


class ProxySite(Site):
    """
    The proxy's HTTP server: L{ProxyChannel}s making L{ProxyRequest}s, with the body limit.

    @param maxBodySize: the largest request body accepted, in bytes.
    @param timeout: how long a connection may stay silent while the client sends a request (its
        headers or its body) or between requests; while the proxy answers, it never times out.
    @param requestTimeout: the most seconds a request may take from its first byte to the end
        of its body.
    @param maxConnections: how many client connections may be open at once; a request on one
        more gets a 503.
    @param metrics: where each request's count, duration and time to first byte go.
    @param errorBody: the JSON error document for a path, a status and a message, for the
        answers given before any route runs.
    """

    requestFactory = ProxyRequest
    displayTracebacks = False
    # Called with each request, its status and its duration once accounted (the request history).
    requestFinished: Callable[[IRequest, int, float], None] | None = None

    def __init__(
        self, resource: IResource, errorBody: ErrorBody, maxBodySize: int = DEFAULT_MAX_BODY,
        timeout: float = DEFAULT_CLIENT_TIMEOUT, requestTimeout: float = DEFAULT_REQUEST_TIMEOUT,
        maxConnections: int = DEFAULT_MAX_CONNECTIONS, metrics: Metrics | None = None, **kwargs: Any
    ) -> None:
        super().__init__(resource, timeout=timeout, **kwargs)
        self.errorBody = errorBody
        self.maxBodySize = maxBodySize
        self.requestTimeout = requestTimeout
        self.connections = ConnectionLimit(maxConnections)
        self.metrics = metrics if metrics is not None else Metrics()
        self._idPrefix = os.urandom(4).hex()
        self._idCounter = itertools.count()

    def newRequestId(self) -> str:
        """
        A new request id: 16 hex digits, a random prefix per site and a counter, as unique as
        a random id among the requests of one proxy without a uuid4 per request.
        """
        return f"{self._idPrefix}{next(self._idCounter) & 0xFFFFFFFF:08x}"

    def log(self, request: http.Request) -> None:
        # Each ProxyRequest logs itself, with structured fields, when it ends.
        pass

    def protocol(self) -> ProxyChannel:  # type: ignore[override]
        # A plain HTTP/1.1 channel: TabbyAPI's clients speak HTTP/1.1, and twisted.web's HTTP/2
        # switch (only used with TLS and the h2 package) would bypass these guards.
        return ProxyChannel(self.errorBody, self.requestTimeout, self.connections)


