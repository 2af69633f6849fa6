"""
Talking to the TabbyAPI child: sending one request and streaming its answer back.

The body of an upstream response is pumped into the client's request as it arrives, through a
small body protocol whose transport is registered as the request's producer: a slow client pauses
the upstream read instead of growing the proxy's memory, and a client that leaves stops it, which
closes the connection to TabbyAPI so it stops generating.

TabbyAPI sends every token as its own HTTP chunk, so the chunked decoding of its answers is the
proxy's hottest loop.  The connections of L{makeConnectionPool} decode with L{ChunkedDecoder},
which hands on everything one read of the socket holds in one piece: one write to the client per
read instead of one per token, and a third of the time of Twisted's decoder per answer.
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Callable, Mapping, cast

import treq
import treq.client
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss, _DataLoss, maxChunkSizeLineLength
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IRequest, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from tabbyproxy.supervisor import Lease

# Headers of TabbyAPI's answer worth passing on; hop-by-hop and framing headers are the proxy's.
RELAYED_HEADERS = (b"content-type", b"cache-control", b"x-accel-buffering")


class UpstreamBroken(Exception):
    """
    The connection to TabbyAPI ended before its answer was complete.
    """


def makeHTTPClient(reactor: Any, pool: HTTPConnectionPool) -> TabbyClient:
    """
    The client for talking to TabbyAPI over C{pool}: see L{TabbyClient}.
    """
    return TabbyClient(reactor, pool)


def makeConnectionPool(reactor: Any) -> HTTPConnectionPool:
    """
    Persistent connections to TabbyAPI, enough for many concurrent streams, whose chunked answers
    are decoded by L{ChunkedDecoder}.  Requests are not retried: a generation request is not safe
    to send twice.
    """
    pool = _RelayConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 256
    pool.retryAutomatically = False
    return pool


class TabbyClient(treq.client.HTTPClient):
    """
    A treq client for TabbyAPI whose L{relay} sends the proxy's forwarded requests straight to
    its Agent.

    treq wraps every request in a cookie jar and gzip decoding, parses its URL with hyperlink and
    writes its body from a cooperator task on a later turn of the reactor; the proxy needs none
    of that to talk to its own child, and it was an eighth of the proxy's CPU in a profile of
    streaming load.  The treq API stays for the rest (the supervisor's health polls), with a
    cookie jar that never stores anything, so no client's cookies reach another.
    """

    def __init__(self, reactor: Any, pool: HTTPConnectionPool) -> None:
        self.agent = Agent.usingEndpointFactory(reactor, _TCPEndpoints(reactor), pool=pool)
        super().__init__(self.agent, cookiejar=cast(Any, CookieJar(DefaultCookiePolicy(allowed_domains=[]))))

    def relay(self, method: bytes, url: bytes, headers: Headers, body: bytes | None) -> Deferred[IResponse]:
        """
        Send one request; its body, if any, is written at once.
        """
        producer = None if body is None else _BytesProducer(body)
        response: Deferred[IResponse] = self.agent.request(method, url, headers, producer)
        return response


@implementer(IAgentEndpointFactory)
class _TCPEndpoints:
    """
    Plain TCP endpoints: TabbyAPI listens on a loopback address, so the proxy needs neither TLS nor
    L{HostnameEndpoint}'s name handling, which the default Agent redoes for every request.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"http":
            raise SchemeNotSupported(f"TabbyAPI is reached over http, not {uri.scheme!r}")
        return TCP4ClientEndpoint(self.reactor, uri.host.decode("ascii"), uri.port)


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body that is all there at once.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class MalformedChunkedBody(Exception):
    """
    The upstream's chunked framing is broken; the connection is given up.
    """


_HEX_DIGITS = b"0123456789abcdefABCDEF"


class ChunkedDecoder:
    """
    Decodes a body sent with C{Transfer-Encoding: chunked}, a drop-in for Twisted's
    C{_ChunkedTransferDecoder} in an C{HTTPClientParser}.

    Each call to L{dataReceived} hands all the body bytes it found to C{dataCallback} at once,
    however many chunks they came in, and walks the framing with C{bytes.find} rather than one
    method call per state.  Trailers are read and dropped.

    @ivar state: C{"CHUNK_LENGTH"}, C{"BODY"}, C{"CRLF"}, C{"TRAILER"} or C{"FINISHED"}.
    """

    def __init__(self, dataCallback: Callable[[bytes], None], finishCallback: Callable[[bytes], None]) -> None:
        """
        @param dataCallback: called with body bytes as they are decoded.
        @param finishCallback: called once after the last chunk, with the bytes that followed it.
        """
        self.dataCallback = dataCallback
        self.finishCallback = finishCallback
        self.state = "CHUNK_LENGTH"
        # Bytes of the current chunk still to come, in state BODY.
        self._remaining = 0
        # The start of a size line, the CRLF after a chunk or a trailer line, cut by a read.
        self._partial = b""
        self._trailerSize = 0

    def dataReceived(self, data: bytes) -> None:
        """
        Decode C{data}, the next bytes of the body.

        @raise MalformedChunkedBody: when the framing is broken.
        """
        if self._partial:
            data = self._partial + data
            self._partial = b""
        pieces: list[bytes] = []
        position, end = 0, len(data)
        state = self.state
        while position < end:
            if state == "BODY":
                stop = position + self._remaining
                pieces.append(data[position:stop])
                if stop > end:
                    self._remaining = stop - end
                    position = end
                    break
                position, state = stop, "CRLF"
            elif state == "CRLF":
                if end - position < 2:
                    break
                if data[position:position + 2] != b"\r\n":
                    raise MalformedChunkedBody("a chunk did not end with CRLF")
                position += 2
                state = "CHUNK_LENGTH"
            elif state == "CHUNK_LENGTH":
                lineEnd = data.find(b"\r\n", position, position + maxChunkSizeLineLength)
                if lineEnd == -1:
                    if end - position >= maxChunkSizeLineLength:
                        raise MalformedChunkedBody("a chunk size line is too long")
                    break
                size = data[position:lineEnd].split(b";", 1)[0]
                if not size or size.strip(_HEX_DIGITS):
                    raise MalformedChunkedBody(f"a chunk size is not a hexadecimal number: {size!r}")
                self._remaining = int(size, 16)
                position = lineEnd + 2
                state = "BODY" if self._remaining else "TRAILER"
            elif state == "TRAILER":
                lineEnd = data.find(b"\r\n", position)
                if lineEnd == -1:
                    if self._trailerSize + end - position > 2**16:
                        raise MalformedChunkedBody("the trailer is too long")
                    break
                if lineEnd > position:
                    self._trailerSize += lineEnd + 2 - position
                    position = lineEnd + 2
                    continue
                self.state = "FINISHED"
                self._deliver(pieces)
                self.finishCallback(data[lineEnd + 2:])
                return
            else:
                raise RuntimeError("ChunkedDecoder.dataReceived called after the last chunk")
        self.state = state
        self._partial = data[position:]
        self._deliver(pieces)

    def _deliver(self, pieces: list[bytes]) -> None:
        if len(pieces) == 1:
            self.dataCallback(pieces[0])
        elif pieces:
            self.dataCallback(b"".join(pieces))

    def noMoreData(self) -> None:
        """
        The connection closed: the body must be complete.

        @raise _DataLoss: when it was cut short (Twisted's parser turns that into a failed body).
        """
        if self.state != "FINISHED":
            raise _DataLoss(f"the chunked body ended in state {self.state}")


class _RelayClientProtocol(HTTP11ClientProtocol):
    """
    An HTTP/1.1 client connection whose responses are decoded by L{ChunkedDecoder}.

    Twisted has no public hook for a response's transfer decoder: the parser looks its decoders
    up on itself, so each new parser gets ours.  tests/test_upstream.py checks that it is used.
    """

    def request(self, request: Any) -> Deferred[IResponse]:
        finished: Deferred[IResponse] = super().request(request)
        parser = getattr(self, "_parser", None)
        if parser is not None:
            parser._transferDecoders = {b"chunked": ChunkedDecoder}
        return finished


class _RelayClientFactory(_HTTP11ClientFactory):
    # Not a log line for each connection opened and closed.
    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _RelayClientProtocol(self._quiescentCallback)


class _RelayConnectionPool(HTTPConnectionPool):
    _factory = _RelayClientFactory


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
        @param http: a L{TabbyClient}, or any treq-like client (C{StubTreq} in tests), which is
            then used through treq's C{request}.
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
        if isinstance(self.http, TabbyClient):
            url = (lease.baseURL + path).encode("ascii")
            return self.http.relay(method.encode("ascii"), url, Headers(headers), body)
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
