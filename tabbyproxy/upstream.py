"""
Talking to the TabbyAPI child: sending one request and streaming its answer back.

The body of an upstream response is pumped into the client's request as it arrives, through a
small body protocol whose transport is registered as the request's producer: a slow client pauses
the upstream read instead of growing the proxy's memory, and a client that leaves stops it, which
closes the connection to TabbyAPI so it stops generating.
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Callable, Mapping, cast

import treq
import treq.client
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IRequest, IResponse
from twisted.web.server import Request

from tabbyproxy.supervisor import Lease

# Headers of TabbyAPI's answer worth passing on; hop-by-hop and framing headers are the proxy's.
RELAYED_HEADERS = (b"content-type", b"cache-control", b"x-accel-buffering")


class UpstreamBroken(Exception):
    """
    The connection to TabbyAPI ended before its answer was complete.
    """


def makeHTTPClient(reactor: Any, pool: HTTPConnectionPool) -> Any:
    """
    A treq client for talking to TabbyAPI over C{pool}: no redirects followed, and a cookie jar
    that never stores anything, so no client's cookies reach another.
    """
    return treq.client.HTTPClient(
        Agent(reactor, pool=pool),
        cookiejar=cast(Any, CookieJar(DefaultCookiePolicy(allowed_domains=[]))),
    )


def makeConnectionPool(reactor: Any) -> HTTPConnectionPool:
    """
    Persistent connections to TabbyAPI, enough for many concurrent streams.  Requests are not
    retried: a generation request is not safe to send twice.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 256
    pool.retryAutomatically = False
    return pool


class _BodyPump(Protocol):
    """
    Hands each piece of an upstream body to C{sink} and reports how the body ended.
    """

    transport: IPushProducer  # type: ignore[assignment]

    def __init__(self, request: Request, sink: Callable[[bytes], None], done: Deferred[None]) -> None:
        self.request = request
        self.sink = sink
        self.done = done
        self.producing = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        self.producing = True

    def dataReceived(self, data: bytes) -> None:
        self.sink(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.producing:
            self.producing = False
            # A request whose client already left has no channel to unregister from.
            if self.request.channel is not None:
                self.request.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(UpstreamBroken(f"the connection to TabbyAPI broke: {reason.getErrorMessage()}"))

    def stop(self) -> None:
        if self.producing:
            self.transport.stopProducing()


class Upstream:
    """
    Sends requests to the leased TabbyAPI child.
    """

    log = Logger()

    def __init__(self, http: Any, reactor: Any, headers: Mapping[bytes, list[bytes]]) -> None:
        """
        @param http: a treq C{HTTPClient} (or C{StubTreq} in tests).
        @param headers: sent with every request: TabbyAPI's key, when auth is on.
        """
        self.http = http
        self.reactor = reactor
        self.headers = headers

    def send(self, lease: Lease, method: str, path: str, body: bytes | None = None) -> Deferred[IResponse]:
        """
        Start one request to the child; the answer's body is not read yet.
        """
        headers = dict(self.headers)
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
        d: Deferred[IResponse] = self.http.request(
            method,
            lease.baseURL + path,
            data=body,
            headers=headers,
            unbuffered=True,
            allow_redirects=False,
            reactor=self.reactor,
        )
        return d

    @staticmethod
    def copyHeaders(response: IResponse, request: IRequest) -> None:
        """
        Give the client TabbyAPI's status and the headers that describe the body.
        """
        request.setResponseCode(response.code)
        for name in RELAYED_HEADERS:
            values = response.headers.getRawHeaders(name)
            if values:
                request.responseHeaders.setRawHeaders(name, values)

    @staticmethod
    def pipe(response: IResponse, request: IRequest, sink: Callable[[bytes], None]) -> Deferred[None]:
        """
        Feed the body of C{response} to C{sink} as it arrives, paced by C{request}'s consumer.

        @return: fires when the body is complete, fails with L{UpstreamBroken} when the
            connection to TabbyAPI broke, and stops the download when cancelled.
        """
        pump: _BodyPump

        def cancel(d: Deferred[None]) -> None:
            pump.stop()

        done: Deferred[None] = Deferred(cancel)
        # Every request twisted.web hands a route is a Request, which takes producers.
        pump = _BodyPump(cast(Request, request), sink, done)
        response.deliverBody(pump)
        return done

    @staticmethod
    async def read(response: IResponse) -> bytes:
        """
        The whole body of a small answer (an error, a model card).
        """
        body: bytes = await treq.content(response)
        return body


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
        lines = (self._partial + data).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        # A CRLF cut in two reads as CR then LF: the extra empty line is harmless, as empty
        # lines carry no data.
        self._partial = lines.pop()
        payloads = []
        for line in lines:
            if line.startswith(b"data:"):
                payload = line[5:]
                payloads.append(payload[1:] if payload.startswith(b" ") else payload)
        return payloads
