"""
The connection pool the proxy talks to TabbyAPI over, and the chunked decoder its connections use.

TabbyAPI sends every token as its own HTTP chunk, so the chunked decoding of its answers is the
proxy's hottest loop.  Twisted's own decoder hands on one token at a time; L{ChunkedDecoder} hands
on everything one read of the socket holds in one piece: one write to the client per read instead
of one per token, and a third of the time per answer.

Twisted has no public hook for a response's transfer decoder, nor for the protocol a pool's
connections speak, so this module, and only this module, uses private names:
C{twisted.web._newclient.HTTP11ClientProtocol._parser} and its C{_transferDecoders},
C{twisted.web._newclient.Request._writeHeaders} (to write a whole body with the headers),
C{HTTP11ClientProtocol._transportProxy} and C{TransportProxyProducer} (to hold the pause its
parser makes at the end of a response's headers),
C{Agent._requestWithEndpoint} and C{_computeHostValue} (to work out an origin once),
C{twisted.web.client._HTTP11ClientFactory} with its C{_quiescentCallback}, and
C{HTTPConnectionPool._factory}, and the C{twisted.web.http._DataLoss} its parser turns into a
failed body.  L{missingHooks} says which of them a Twisted release lacks;
L{makeConnectionPool} then warns and falls back to Twisted's own pool, which is slower but correct.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IConsumer, IReactorTCP, IReactorTime, IStreamClientEndpoint, ITransport
from twisted.logger import Logger
from twisted.web import _newclient, client
from twisted.web import http as twistedHTTP
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http import maxChunkSizeLineLength
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from tabbyproxy.channel import sendAtOnce

log = Logger()


class MalformedChunkedBody(Exception):
    """
    The upstream's chunked framing is broken; the connection is given up.
    """


_HEX_DIGITS = b"0123456789abcdefABCDEF"


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body that is all there at once.  The relay pool's connections write it together
    with the request's headers (L{_writeWhole}) instead of running it as a producer.
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


class _Lines:
    """
    Collects what C{Request._writeHeaders} writes, to be sent with the body in one write.
    """

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writeSequence(self, data: list[bytes]) -> None:
        self.parts.extend(data)


def _writeWhole(request: Any, body: bytes, transport: ITransport) -> Deferred[None]:
    """
    Write C{request} (a C{twisted.web._newclient.Request}) and its whole C{body} in one write,
    sent at once (L{sendAtOnce}): Twisted's own path runs the body as a producer, with a
    consumer, its Deferreds and a producer registration on the transport, which cost about 7% of
    the proxy's CPU on small requests.
    """
    lines = _Lines()
    request._writeHeaders(lines, b"Content-Length: %d\r\n" % len(body))
    lines.parts.append(body)
    sendAtOnce(transport, b"".join(lines.parts))
    return succeed(None)


def _ignore(data: bytes) -> None:
    """
    What a finished L{ChunkedDecoder} calls instead of its callbacks (it calls nothing).
    """


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
                finish = self.finishCallback
                # The callbacks are the parser's bound methods, and the parser holds this
                # decoder: dropped, the parser, its response and request are freed by reference
                # counting rather than left to the garbage collector.
                self.dataCallback = self.finishCallback = _ignore
                finish(data[lineEnd + 2:])
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

        @raise twisted.web.http._DataLoss: when it was cut short (Twisted's parser turns that into a failed body).
        """
        if self.state != "FINISHED":
            raise twistedHTTP._DataLoss(f"the chunked body ended in state {self.state}")


def missingHooks() -> list[str]:
    """
    The private Twisted names L{makeConnectionPool} relies on that this Twisted lacks.
    """
    missing = []
    protocol = getattr(_newclient, "HTTP11ClientProtocol", None)
    factory = getattr(client, "_HTTP11ClientFactory", None)
    if protocol is None:
        missing.append("twisted.web._newclient.HTTP11ClientProtocol")
    if getattr(_newclient, "HTTPClientParser", None) is None or not hasattr(
        _newclient.HTTPClientParser, "_transferDecoders"
    ):
        missing.append("twisted.web._newclient.HTTPClientParser._transferDecoders")
    if not hasattr(getattr(_newclient, "Request", None), "_writeHeaders"):
        missing.append("twisted.web._newclient.Request._writeHeaders")
    for name in ("_requestWithEndpoint", "_computeHostValue"):
        if not hasattr(Agent, name):
            missing.append(f"twisted.web.client.Agent.{name}")
    if factory is None:
        missing.append("twisted.web.client._HTTP11ClientFactory")
    elif not _keepsQuiescentCallback(factory):
        missing.append("twisted.web.client._HTTP11ClientFactory._quiescentCallback")
    if not hasattr(twistedHTTP, "_DataLoss"):
        missing.append("twisted.web.http._DataLoss")
    if getattr(_newclient, "TransportProxyProducer", None) is None:
        missing.append("twisted.web._newclient.TransportProxyProducer")
    if protocol is not None and not hasattr(protocol, "_transportProxy"):
        missing.append("twisted.web._newclient.HTTP11ClientProtocol._transportProxy")
    if not hasattr(HTTPConnectionPool, "_factory"):
        missing.append("twisted.web.client.HTTPConnectionPool._factory")
    return missing


def _keepsQuiescentCallback(factory: type) -> bool:
    try:
        instance = factory(lambda protocol: None, None)
    except TypeError:
        return False
    return hasattr(instance, "_quiescentCallback")


def makeConnectionPool(reactor: IReactorTime) -> HTTPConnectionPool:
    """
    Persistent connections to TabbyAPI, enough for many concurrent streams, whose chunked answers
    are decoded by L{ChunkedDecoder}.  Requests are not retried: a generation request is not safe
    to send twice.
    """
    missing = missingHooks()
    if missing:
        log.warn(
            "This Twisted lacks {names}: TabbyAPI's answers are decoded by Twisted's own (slower) "
            "chunked decoder",
            names=", ".join(missing),
        )
        pool = HTTPConnectionPool(reactor, persistent=True)
    else:
        pool = _relayPoolClass()(reactor, persistent=True)
    pool.maxPersistentPerHost = 256
    pool.retryAutomatically = False
    return pool


def makeAgent(reactor: IReactorTCP, pool: HTTPConnectionPool) -> IAgent:
    """
    The agent for TabbyAPI's loopback address, over C{pool} (Twisted's own agent where this
    Twisted lacks a name L{RelayAgent} uses; L{makeConnectionPool} has warned of it).
    """
    if missingHooks():
        return Agent.usingEndpointFactory(reactor, _TCPEndpoints(reactor), pool=pool)
    return RelayAgent(reactor, pool)


class RelayAgent(Agent):
    """
    An agent for a few fixed origins (the children's base URLs): what Twisted's agent works out
    for every request from the URL (the parsed origin, the endpoint, the pool's key, the
    C{Host} header) is worked out once per origin.
    """

    # Children come and go on new ports; the cache is dropped when it holds this many origins.
    MAX_ORIGINS = 64

    def __init__(self, reactor: IReactorTCP, pool: HTTPConnectionPool) -> None:
        super().__init__(reactor, pool=pool)
        self._endpoints = _TCPEndpoints(reactor)
        self._origins: dict[bytes, tuple[URI, tuple[bytes, bytes, int], IStreamClientEndpoint, bytes]] = {}

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        # http://host:port/path?query: the origin ends at the first "/" after the scheme's.
        cut = uri.find(b"/", uri.find(b"//") + 2)
        origin, target = (uri, b"/") if cut == -1 else (uri[:cut], uri[cut:])
        known = self._origins.get(origin)
        if known is None:
            parsed = URI.fromBytes(origin)
            try:
                endpoint = self._endpoints.endpointForURI(parsed)
            except SchemeNotSupported:
                return fail()
            if len(self._origins) >= self.MAX_ORIGINS:
                self._origins.clear()
            key = (parsed.scheme, parsed.host, parsed.port)
            known = self._origins[origin] = (
                parsed, key, endpoint, self._computeHostValue(parsed.scheme, parsed.host, parsed.port))
        parsed, key, endpoint, host = known
        path, _, query = target.partition(b"?")
        parsedURI = URI(parsed.scheme, parsed.netloc, parsed.host, parsed.port, path, b"", query, b"")
        headers = Headers() if headers is None else headers.copy()
        headers.setRawHeaders(b"Host", [host])
        # The request line is checked as Twisted checks it when the request is written.
        return self._requestWithEndpoint(key, endpoint, method, parsedURI, headers, bodyProducer, target)


@implementer(IAgentEndpointFactory)
class _TCPEndpoints:
    """
    Plain TCP endpoints: TabbyAPI listens on a loopback address, so the proxy needs neither TLS nor
    L{HostnameEndpoint}'s name handling, which the default Agent redoes for every request.
    """

    def __init__(self, reactor: IReactorTCP) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"http":
            raise SchemeNotSupported(f"TabbyAPI is reached over http, not {uri.scheme!r}")
        return TCP4ClientEndpoint(self.reactor, uri.host.decode("ascii"), uri.port)


def _relayPoolClass() -> type[HTTPConnectionPool]:
    """
    A pool whose connections install L{ChunkedDecoder} in each response's parser; built only once
    L{missingHooks} found every private name it subclasses.
    """

    class HeldPause(_newclient.TransportProxyProducer):
        """
        The go-between of a response's parser and its connection, which holds a pause made
        while a read of the connection is handled (while L{holding}) until the read is done,
        and makes it then if it still stands.  The parser pauses the connection at the end of
        each response's headers until the body is asked for, and the proxy asks for it in the
        same read: the pause and the resume were an C{epoll_ctl} call each, for no read missed.
        """

        holding = False
        _held = False

        def pauseProducing(self) -> None:
            if self.holding:
                self._held = True
            else:
                super().pauseProducing()

        def resumeProducing(self) -> None:
            if self._held:
                self._held = False
            else:
                super().resumeProducing()

        def release(self) -> None:
            """
            The read is handled: make the pause that still stands.
            """
            self.holding = False
            if self._held:
                self._held = False
                super().pauseProducing()

    class RelayClientProtocol(_newclient.HTTP11ClientProtocol):
        def request(self, request: Any) -> Any:
            whole = type(request.bodyProducer) is BytesProducer
            if whole:
                request.writeTo = partial(_writeWhole, request, request.bodyProducer.body)
            try:
                finished = super().request(request)
            finally:
                if whole:
                    # Written by now; kept, the partial and its request would be a cycle left
                    # to the garbage collector.
                    del request.writeTo
            parser = getattr(self, "_parser", None)
            if parser is not None:
                parser._transferDecoders = {b"chunked": ChunkedDecoder}
                # Nothing is read before the request is made, so nothing used the plain proxy.
                self._transportProxy = parser.transport = HeldPause(self.transport)
            return finished

        def dataReceived(self, data: bytes) -> None:
            proxy = self._transportProxy
            if not isinstance(proxy, HeldPause):
                super().dataReceived(data)
                return
            proxy.holding = True
            try:
                super().dataReceived(data)
            finally:
                proxy.release()

    class RelayClientFactory(client._HTTP11ClientFactory):
        # Not a log line for each connection opened and closed.
        noisy = False

        def buildProtocol(self, addr: Any) -> _newclient.HTTP11ClientProtocol:
            return RelayClientProtocol(self._quiescentCallback)

    class RelayConnectionPool(HTTPConnectionPool):
        _factory = RelayClientFactory

    return RelayConnectionPool
