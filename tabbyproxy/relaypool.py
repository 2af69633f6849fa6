"""
The HTTP/1.1 client the proxy talks to TabbyAPI with (L{RelayAgent}): persistent connections to
the children's loopback origins, and the chunked decoder of their answers (L{ChunkedDecoder}).

It does what the proxy asks of a client and nothing more: a request with a whole body, written
with its headers in one C{send} at once; an answer's status line and headers, then its body,
chunked, of a known length, or up to the end of the connection; the connection kept for the
next request when the answer allows.  No redirects, retries, TLS, proxies or name lookups:
TabbyAPI listens on a loopback address.  Twisted's own client (its agent, pool, parser and
response state machine, with a Failure and a timer for every answer) was about a sixth of the
proxy's CPU on small requests and a fifth of the memory each held stream keeps.

The agent and its answers are Twisted's C{IAgent} and C{IResponse}, so the rest of the proxy,
and tests that serve it in memory with Twisted's client, see only those.

TabbyAPI sends every token as its own HTTP chunk, so decoding its answers is the proxy's hottest
loop.  L{ChunkedDecoder} hands on everything one read of the socket holds in one piece: one write
to the client per read instead of one per token.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IConsumer, IConnector, IDelayedCall
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss, maxChunkSizeLineLength
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from tabbyproxy.channel import sendAtOnce


class MalformedChunkedBody(Exception):
    """
    The upstream's chunked framing is broken; the connection is given up.
    """


class MalformedResponse(Exception):
    """
    What TabbyAPI sent is not an HTTP/1.1 answer the relay can read; the connection is given up.
    """


class BodyCutShort(Exception):
    """
    The connection ended before the end of an answer's body, as its framing tells it.
    """


_HEX_DIGITS = b"0123456789abcdefABCDEF"

# The longest status line and headers read: TabbyAPI's are a few hundred bytes.
MAX_HEAD = 64 * 1024

# A method (an HTTP token) and a request target (printable ASCII, no space) that can be written.
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")

# Twisted's client keeps these out of an answer's headers: they are the connection's business.
_CONNECTION_HEADERS = frozenset(
    (b"connection", b"content-length", b"keep-alive", b"proxy-connection", b"te", b"trailers",
     b"transfer-encoding", b"upgrade"))

# What an answer holds as its body's protocol once the body ended.
_DELIVERED = Protocol()

# How every complete body ends (as Twisted's own connectionDone, one Failure for all).
_BODY_DONE = Failure(ResponseDone("Response body fully received"))


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body that is all there at once.  L{RelayAgent} writes it together with the
    request's headers; any other agent (tests serve the proxy in memory with Twisted's) runs it
    as a producer.
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


def _ignore(data: bytes) -> None:
    """
    What a finished L{ChunkedDecoder} calls instead of its callbacks (it calls nothing).
    """


class ChunkedDecoder:
    """
    Decodes a body sent with C{Transfer-Encoding: chunked}.

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
                # The callbacks are bound methods of the decoder's owners, which hold the
                # decoder: dropped, they are freed by reference counting rather than left to
                # the garbage collector.
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


@implementer(IResponse)
class RelayResponse:
    """
    An answer's status and headers, and its body as it comes: held until L{deliverBody} (with
    the connection's reading paused if the read that brought the headers did not ask for it),
    then handed to the body's protocol, whose transport this is (an C{IPushProducer} that pauses,
    resumes and stops the connection's reading).
    """

    request = None
    previousResponse = None

    def __init__(self, connection: _Connection, version: tuple[bytes, int, int], code: int, phrase: bytes,
                 headers: Headers, length: int | object) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection: _Connection | None = connection
        self._protocol: Protocol | None = None
        # What came before the body was asked for, and how it ended if it did.
        self._held: list[bytes] = []
        self._ended: Failure | None = None

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Protocol) -> None:
        if self._protocol is not None:
            raise RuntimeError("the body of this answer is already delivered")
        self._protocol = protocol
        protocol.makeConnection(self)
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._ended is not None:
            ended, self._ended = self._ended, None
            self._protocol = _DELIVERED
            protocol.connectionLost(ended)
        elif self._connection is not None:
            self._connection.bodyAskedFor(protocol.dataReceived)

    def bodyData(self, data: bytes) -> None:
        """
        Body bytes, held until the body is asked for (then its protocol takes them straight).
        """
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        else:
            self._held.append(data)

    def bodyEnded(self, reason: Failure) -> None:
        """
        The body is complete (C{ResponseDone}), or ended otherwise.
        """
        self._connection = None
        protocol = self._protocol
        if protocol is not None:
            # The protocol holds this answer as its transport: dropped, neither keeps the
            # other for the garbage collector.
            self._protocol = _DELIVERED
            protocol.connectionLost(reason)
        else:
            self._ended = reason

    # The body protocol's transport: an IPushProducer.

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pauseReading()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resumeReading()

    def stopProducing(self) -> None:
        if self._connection is not None:
            self._connection.abort()

    abortConnection = stopProducing
    loseConnection = stopProducing


class _Connection(Protocol):
    """
    One persistent connection to a child: one request at a time, its answer read as it comes.

    @ivar state: C{"idle"} (kept for the next request), C{"waiting"} (for an answer's head),
        C{"body"} (reading its body) or C{"closed"}.
    """

    def __init__(self, agent: RelayAgent, key: tuple[str, int]) -> None:
        self.agent = agent
        self.key = key
        self.state = "idle"
        self.closed: Deferred[None] = Deferred()
        self._answered: Deferred[IResponse] | None = None
        self._method = b""
        self._head = b""
        self._response: RelayResponse | None = None
        # How the body is framed: a chunked decoder, a count of bytes left, or (both None) the
        # connection's end; and where its bytes go.
        self._decoder: ChunkedDecoder | None = None
        self._remaining: int | None = None
        self._sink: Callable[[bytes], None] = _ignore
        self._persistent = False
        # Reading is paused while the body's protocol asks it to be, or while a body waits to be
        # asked for; _paused says whether the transport is paused.
        self._consumerPaused = False
        self._unclaimed = False
        self._paused = False
        self._first: tuple[bytes, bytes, Deferred[IResponse]] | None = None
        # When the connection last became idle (the reactor's seconds).
        self.idleSince = 0.0

    def connectionMade(self) -> None:
        first, self._first = self._first, None
        if first is not None:
            self.send(*first)

    def send(self, data: bytes, method: bytes, answered: Deferred[IResponse]) -> None:
        """
        Send a request (C{data}, written whole) and fire C{answered} with its answer's head.
        """
        self.state = "waiting"
        self._answered = answered
        self._method = method
        self._head = b""
        sendAtOnce(self.transport, data)

    def abort(self) -> None:
        """
        Close the connection now: what it was reading ends with a failure.
        """
        if self.state != "closed":
            self.state = "closed"
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]

    def pauseReading(self) -> None:
        self._consumerPaused = True
        self._pace()

    def resumeReading(self) -> None:
        self._consumerPaused = False
        self._pace()

    def bodyAskedFor(self, sink: Callable[[bytes], None]) -> None:
        """
        The body's protocol takes its bytes now: straight to it, and reading goes on.
        """
        self._sink = sink
        if self._decoder is not None:
            self._decoder.dataCallback = sink
        self._unclaimed = False
        self._pace()

    def _pace(self) -> None:
        pause = self._consumerPaused or self._unclaimed
        if pause != self._paused and self.transport is not None:
            self._paused = pause
            if pause:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == "body":
            self._bodyReceived(data)
        elif state == "waiting":
            self._headReceived(data)
        else:
            # Nothing was asked: a server that talks out of turn is not kept.
            self.state = "closed"
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _headReceived(self, data: bytes) -> None:
        head = self._head + data if self._head else data
        while True:
            end = head.find(b"\r\n\r\n")
            if end == -1:
                self._head = head
                if len(head) > MAX_HEAD:
                    self._malformed(f"the answer's head is over {MAX_HEAD} bytes")
                return
            try:
                version, code, phrase, headers, framing = _parseHead(head[:end])
            except MalformedResponse as e:
                self._head = head
                self._malformed(str(e))
                return
            head = head[end + 4:]
            if 100 <= code < 200:
                # An interim answer (100 Continue): the real one follows.
                continue
            break
        self._head = b""
        chunked, length, persistent = framing
        if self._method == b"HEAD" or code in (204, 304):
            chunked, length = False, 0
        response = RelayResponse(self, version, code, phrase, headers, UNKNOWN_LENGTH if length is None else length)
        self._response = response
        self._sink = response.bodyData
        self._persistent = persistent and (chunked or length is not None)
        if chunked:
            self._decoder = ChunkedDecoder(response.bodyData, self._bodyDone)
            self._remaining = None
        else:
            self._decoder = None
            self._remaining = length
        self.state = "body"
        answered, self._answered = self._answered, None
        assert answered is not None
        answered.callback(response)
        if self._response is not response or self.state != "body":
            return
        if self._remaining == 0:
            self._bodyDone(head)
            return
        if head:
            self._bodyReceived(head)
        if self._response is response and response._protocol is None:
            # Not asked for in this read: nothing more is read until it is.
            self._unclaimed = True
            self._pace()

    def _bodyReceived(self, data: bytes) -> None:
        decoder = self._decoder
        if decoder is not None:
            try:
                decoder.dataReceived(data)
            except MalformedChunkedBody as e:
                self._broken(Failure(e))
            return
        remaining = self._remaining
        if remaining is None:
            self._sink(data)
        elif len(data) < remaining:
            self._remaining = remaining - len(data)
            self._sink(data)
        else:
            self._remaining = 0
            self._sink(data[:remaining])
            self._bodyDone(data[remaining:])

    def _bodyDone(self, rest: bytes) -> None:
        """
        The body is complete: the connection goes back to the agent first (so that what the
        body's end sets off can use it), then the body's protocol learns it.
        """
        response = self._response
        if self.state != "body" or response is None:
            # Aborted while the body was handed on: connectionLost tells its protocol.
            return
        self._response = self._decoder = None
        self._sink = _ignore
        self._consumerPaused = self._unclaimed = False
        if self._persistent and not rest and self.transport is not None and not self.transport.disconnecting:  # type: ignore[attr-defined]
            self._pace()
            self.state = "idle"
            self.agent.keep(self)
        else:
            self.state = "closed"
            if self.transport is not None:
                self.transport.loseConnection()
        response.bodyEnded(_BODY_DONE)

    def _malformed(self, problem: str) -> None:
        self._broken(Failure(MalformedResponse(problem)))

    def _broken(self, reason: Failure) -> None:
        """
        Give the connection up, failing the request or body under way with C{reason}.
        """
        self.state = "closed"
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self._fail(reason)

    def _fail(self, reason: Failure) -> None:
        answered, self._answered = self._answered, None
        response, self._response = self._response, None
        untilTheEnd = self._decoder is None and self._remaining is None
        self._decoder = None
        self._sink = _ignore
        if answered is not None and not answered.called:
            kind = ResponseFailed if self._head else ResponseNeverReceived
            answered.errback(kind([reason]))
        if response is not None:
            if untilTheEnd:
                # A body framed by the connection's end is complete, as far as anyone can tell.
                response.bodyEnded(Failure(PotentialDataLoss()))
            else:
                response.bodyEnded(Failure(ResponseFailed([reason, Failure(BodyCutShort())])))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.state == "idle":
            self.agent.forget(self)
        self.state = "closed"
        if self._answered is not None or self._response is not None:
            self._fail(reason)
        self.closed.callback(None)


def _parseHead(head: bytes) -> tuple[tuple[bytes, int, int], int, bytes, Headers, tuple[bool, int | None, bool]]:
    """
    The version, status, reason phrase and headers of an answer's head (without its blank
    line), and how its body is framed: whether chunked, its length if it says one, and whether
    the connection may be kept after it.

    @raise MalformedResponse: when it is not an HTTP/1 answer's head the relay can read.
    """
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(status[1]) != 3 or not status[1].isdigit():
        raise MalformedResponse(f"not an HTTP/1 status line: {lines[0][:100]!r}")
    minor = 1 if status[0] == b"HTTP/1.1" else 0
    headers = Headers()
    chunked, length, persistent = False, None, minor == 1
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        name, value = name.strip(), value.strip()
        if not colon or not name:
            raise MalformedResponse(f"not a header line: {line[:100]!r}")
        lower = name.lower()
        if lower not in _CONNECTION_HEADERS:
            headers.addRawHeader(name, value)
        elif lower == b"transfer-encoding":
            if value.lower().rsplit(b",", 1)[-1].strip() != b"chunked":
                raise MalformedResponse(f"a transfer coding the relay does not read: {value[:100]!r}")
            chunked = True
        elif lower == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise MalformedResponse(f"not a content length: {value[:100]!r}")
            length = int(value)
        elif lower == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if b"close" in tokens:
                persistent = False
            elif b"keep-alive" in tokens:
                persistent = True
    if chunked and length is not None:
        # The chunks frame the body (RFC 9112, 6.3); the connection is not kept after such an answer.
        length, persistent = None, False
    code = int(status[1])
    return (b"HTTP", 1, minor), code, status[2] if len(status) > 2 else b"", headers, (chunked, length, persistent)


class _Connecting(ClientFactory):
    """
    A new connection for one request, sent as soon as it is made; cancelled while connecting,
    the request fails with C{ConnectingCancelledError}, as Twisted's endpoints report it.
    """

    noisy = False

    def __init__(self, agent: RelayAgent, key: tuple[str, int], data: bytes, method: bytes) -> None:
        self.agent = agent
        self.key = key
        self.answered: Deferred[IResponse] | None = Deferred(self.cancel)
        self.first: tuple[bytes, bytes, Deferred[IResponse]] | None = (data, method, self.answered)
        self.connector: IConnector | None = None
        self.connection: _Connection | None = None
        self.cancelled = False

    def buildProtocol(self, addr: Any) -> _Connection:
        connection = self.connection = _Connection(self.agent, self.key)
        # The connector keeps its factory as long as the connection lasts: not the request.
        connection._first, self.first, self.answered = self.first, None, None
        return connection

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        answered = self.answered
        if answered is None or answered.called:
            return
        if self.cancelled:
            answered.errback(ConnectingCancelledError(connector.getDestination()))
        else:
            answered.errback(reason)

    def cancel(self, answered: Deferred[IResponse]) -> None:
        if self.connection is not None:
            self.connection.abort()
        elif self.connector is not None:
            self.cancelled = True
            self.connector.stopConnecting()


@implementer(IAgent)
class RelayAgent:
    """
    The proxy's client for the children's base URLs: keeps up to L{MAX_IDLE} idle connections
    per origin for the next requests, for L{IDLE_TIMEOUT} seconds at most (one that TabbyAPI
    closed is dropped at once), and sends each request whole with its headers.

    TabbyAPI's server (uvicorn, with its defaults) closes a connection after 5 idle seconds.  A
    request sent on it just then would meet the close on its way and fail with nothing answered,
    and a request is not sent twice: so the agent closes an idle connection itself a second
    before TabbyAPI would.

    Its requests fail as Twisted's agent's do: C{ConnectError} when nothing listens,
    C{ResponseNeverReceived} (or C{ResponseFailed}, once part of an answer came) when the
    connection ended without an answer, and a cancel while connecting with
    C{ConnectingCancelledError}; a body cut short ends with C{ResponseFailed}.
    """

    MAX_IDLE = 256
    IDLE_TIMEOUT = 4.0
    # Children come and go on new ports; the origins' cache is dropped when it holds this many.
    MAX_ORIGINS = 64
    CONNECT_TIMEOUT = 30.0

    def __init__(self, reactor: Any) -> None:
        """
        @param reactor: an C{IReactorTCP} and C{IReactorTime}.
        """
        self.reactor = reactor
        self._origins: dict[bytes, tuple[tuple[str, int], bytes]] = {}
        # Each origin's idle connections, the longest idle first.
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        # Closes the connections that outstay IDLE_TIMEOUT. Armed when one becomes idle with none
        # armed; a request that takes the last idle one leaves it armed (it then finds nothing),
        # so that a steady load does not arm and cancel it per request.
        self._sweep: IDelayedCall | None = None

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        # http://host:port/path?query: the origin ends at the first "/" after the scheme's.
        cut = uri.find(b"/", uri.find(b"//") + 2)
        origin, target = (uri, b"/") if cut == -1 else (uri[:cut], uri[cut:])
        known = self._origins.get(origin)
        if known is None:
            parsed = URI.fromBytes(origin)
            if parsed.scheme != b"http":
                return fail(SchemeNotSupported(f"TabbyAPI is reached over http, not {parsed.scheme!r}"))
            if len(self._origins) >= self.MAX_ORIGINS:
                self._origins.clear()
            known = self._origins[origin] = ((parsed.host.decode("ascii"), parsed.port), parsed.netloc)
        key, host = known
        if not _METHOD.fullmatch(method) or not _TARGET.fullmatch(target):
            return fail(ValueError(f"not a request line the relay can send: {method!r} {target!r}"))
        if bodyProducer is not None and not isinstance(bodyProducer, BytesProducer):
            return fail(TypeError("the relay sends whole bodies only (a BytesProducer)"))
        parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                if name.lower() not in (b"host", b"content-length"):
                    for value in values:
                        parts += (name, b": ", value, b"\r\n")
        if bodyProducer is not None:
            parts += (b"Content-Length: %d\r\n\r\n" % bodyProducer.length, bodyProducer.body)
        elif method in (b"POST", b"PUT"):
            parts.append(b"Content-Length: 0\r\n\r\n")
        else:
            parts.append(b"\r\n")
        data = b"".join(parts)
        idle = self._idle.get(key)
        while idle:
            # The most recently used first: the others time out when they are not needed.
            connection = idle.pop()
            if not idle:
                del self._idle[key]
            if self.reactor.seconds() - connection.idleSince >= self.IDLE_TIMEOUT:
                # The sweep is late (a busy reactor): this one and the older ones have timed out.
                self._close(connection)
                self._sweepNow()
                break
            if connection.state == "idle" and connection.transport is not None \
                    and not connection.transport.disconnecting:  # type: ignore[attr-defined]
                answered: Deferred[IResponse] = Deferred(lambda d: connection.abort())
                connection.send(data, method, answered)
                return answered
        connecting = _Connecting(self, key, data, method)
        first = connecting.answered
        assert first is not None
        connecting.connector = self.reactor.connectTCP(key[0], key[1], connecting, timeout=self.CONNECT_TIMEOUT)
        return first

    def keep(self, connection: _Connection) -> None:
        """
        Keep C{connection}, idle now, for the next request to its origin.
        """
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.MAX_IDLE:
            self._close(connection)
            return
        connection.idleSince = self.reactor.seconds()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self.reactor.callLater(self.IDLE_TIMEOUT, self._sweepNow)

    def forget(self, connection: _Connection) -> None:
        """
        C{connection}, idle, closed: it is not kept any more.
        """
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]
                if not self._idle:
                    self._stopSweep()

    def _close(self, connection: _Connection) -> None:
        connection.state = "closed"
        connection.transport.loseConnection()  # type: ignore[union-attr]

    def _sweepNow(self) -> None:
        """
        Close the connections idle for L{IDLE_TIMEOUT} or longer, and come back when the next
        one will have been.
        """
        self._stopSweep()
        now = self.reactor.seconds()
        for key, idle in list(self._idle.items()):
            expired = 0
            while expired < len(idle) and now - idle[expired].idleSince >= self.IDLE_TIMEOUT:
                expired += 1
            for connection in idle[:expired]:
                self._close(connection)
            del idle[:expired]
            if not idle:
                del self._idle[key]
        if self._idle:
            oldest = min(idle[0].idleSince for idle in self._idle.values())
            self._sweep = self.reactor.callLater(oldest + self.IDLE_TIMEOUT - now, self._sweepNow)

    def _stopSweep(self) -> None:
        if self._sweep is not None:
            if self._sweep.active():
                self._sweep.cancel()
            self._sweep = None

    def closeCachedConnections(self) -> Deferred[None]:
        """
        Close the idle connections (the proxy stops); fires once they are closed.
        """
        closing = []
        self._stopSweep()
        for idle in self._idle.values():
            for connection in idle:
                closing.append(connection.closed)
                self._close(connection)
        self._idle.clear()
        return DeferredList(closing).addCallback(lambda _: None)
