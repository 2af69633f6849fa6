"""
twisted.web's HTTP/1.1 channel with clear answers where it would close silently or answer an empty
400, a bound on the whole time a request may take to arrive, and the raw answers written to a
connection before any route runs.

The channel also sends what one read of TabbyAPI's answer makes (headers, chunk framing, the
chunk), or a whole answer with its headers, in one C{send}, at once (L{ProxyChannel.cork},
L{sendAtOnce}): Twisted's transport holds every write for the reactor's next turn, registering
the socket for writing and unregistering it once sent, two C{epoll_ctl} calls and a turn of the
reactor per relayed chunk.

The channel has no public hooks for these cases, so this module, and only this module, overrides
and reads private C{HTTPChannel} names: C{_respondToBadRequestAndDisconnect}, and the request line
and header counters C{_command}, C{_path}, C{_receivedHeaderCount} and C{_receivedHeaderSize};
and it reads a TCP transport's buffers (C{dataBuffer}, C{_tempDataBuffer}) to send only when
nothing waits before.  L{missingHooks} says which of them a Twisted release lacks; without them
the channel answers as Twisted's own does (an empty 400 or a closed connection), which the
start-up log warns about, and writes go through the transport as Twisted's do.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Callable, Protocol, cast

from twisted.internet import tcp
from twisted.internet.interfaces import IAddress, IDelayedCall, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from twisted.web.http_headers import Headers

from tabbyproxy.limits import ConnectionLimit

ErrorBody = Callable[[bytes, int, str], bytes]
"""The JSON error document for a path, a status and a message, in the shape of the path's API."""



class EarlyAnswering(Protocol):
    """
    A request that can be refused while its body is still coming.
    """

    @property
    def incomplete(self) -> bool:
        """Whether its headers are in but its body is not complete yet."""

    def refuse(self, status: int, message: str) -> None:
        """Answer now and close the connection."""


def missingHooks() -> list[str]:
    """
    The private C{HTTPChannel} names L{ProxyChannel} relies on that this Twisted lacks.
    """
    missing = [
        f"twisted.web.http.HTTPChannel.{name}"
        for name in ("_respondToBadRequestAndDisconnect", "_receivedHeaderCount", "_receivedHeaderSize")
        if not hasattr(HTTPChannel, name)
    ]
    missing += [f"twisted.internet.tcp.Connection.{name}" for name in ("dataBuffer", "_writeDisconnected", "writeSomeData")
                if not hasattr(tcp.Connection, name)]
    return missing


def _sendable(transport: object) -> bool:
    """
    Whether C{transport} is a TCP connection whose socket may be written to right now: open,
    not closing, and with nothing of its own still waiting to be sent (a Twisted without those
    buffers never is).
    """
    return (isinstance(transport, tcp.Connection) and bool(transport.connected) and not transport.disconnecting
            and getattr(transport, "_writeDisconnected", True) is False
            and getattr(transport, "dataBuffer", True) == b"" and getattr(transport, "_tempDataBuffer", True) == [])


def sendAtOnce(transport: object, data: bytes) -> None:
    """
    Write C{data} to C{transport} (an C{ITransport}): straight to the socket when it is a TCP
    connection with nothing waiting (L{_sendable}), and whatever the socket does not take at
    once, or all of it, through the transport, as any write.  The transport's own write would
    hold it all for the reactor's next turn, registering the socket for writing and
    unregistering it once sent: two C{epoll_ctl} calls and a turn of the reactor.
    """
    if _sendable(transport):
        sent = cast(tcp.Connection, transport).writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
    if data:
        cast(ITransport, transport).write(data)


def rawResponse(status: int, body: bytes) -> bytes:
    """
    A complete HTTP/1.1 JSON response that ends the connection, for answers written straight to
    the transport while twisted.web is still reading the request.
    """
    reason = HTTPStatus(status).phrase.encode("ascii")
    head = (
        b"HTTP/1.1 %d %s\r\n" % (status, reason)
        + b"Content-Type: application/json; charset=utf-8\r\n"
        + b"Content-Length: %d\r\n" % (len(body),)
        + b"Connection: close\r\n\r\n"
    )
    return head + body


def pathOf(uri: bytes) -> bytes:
    """
    The path of a request target, without its query.
    """
    return uri.split(b"?", 1)[0]


class ProxyChannel(HTTPChannel):
    """
    A request line over C{MAX_LENGTH} (16 KiB) gets a 414, a header line over it, too many headers
    or too many header bytes a 431, a malformed request a 400, and a client that stalls while
    sending a request, or takes longer than C{requestTimeout} in all to send it, a 408 (an idle
    keep-alive connection is just closed).

    @ivar errorBody: makes the JSON body of those answers.
    @ivar requestTimeout: the most seconds a request may take from its first byte to the end of
        its body, however steadily its bytes come; C{None} for no bound.
    @ivar connections: the count of open connections this one joins.
    @ivar overLimit: whether this connection came when C{connections} was full, so its request
        gets a 503.
    """

    log = Logger()
    overLimit = False
    _deadline: IDelayedCall | None = None
    _answering = False
    # What was written while corked, in order; None when not corked.
    _corked: list[bytes] | None = None
    _host: IAddress | None = None

    def __init__(
        self, errorBody: ErrorBody, requestTimeout: float | None = None, connections: ConnectionLimit | None = None
    ) -> None:
        super().__init__()
        self.errorBody = errorBody
        self.requestTimeout = requestTimeout
        self.connections = connections

    def connectionMade(self) -> None:
        if self.connections is not None:
            self.overLimit = not self.connections.opened()
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.connections is not None:
            self.connections.closed()
            self.connections = None
        self._stopDeadline()
        super().connectionLost(reason)

    def getHost(self) -> IAddress:
        # twisted.web asks it for every request, a getsockname call each time; a connection's own
        # address does not change.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def dataReceived(self, data: bytes) -> None:
        # The first byte of a request starts its clock; the clock stops when its body is in.
        if self._deadline is None and self.requestTimeout is not None and not self._answering:
            self._deadline = self.callLater(self.requestTimeout, self._tooSlow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stopDeadline()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self._answering = False
        super().requestDone(request)

    def _stopDeadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _tooSlow(self) -> None:
        self._deadline = None
        assert self.requestTimeout is not None
        self._stalled(f"{self.requestTimeout:g}s (--request-timeout)")

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.requests:
            self._answer(431, self._requestPath(), f"a request header line is over the limit of {self.MAX_LENGTH} bytes")
        else:
            path = pathOf(line.split(b" ", 2)[1] if line.count(b" ") >= 1 else b"")
            self._answer(414, path, f"the request line is over the limit of {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        path = self._requestPath()
        if self._receivedHeaderCount > self.maxHeaders:
            self._answer(431, path, f"more than {self.maxHeaders} request headers")
        elif self._receivedHeaderSize > self.totalHeadersSize:
            self._answer(431, path, f"the request line and headers are over the limit of {self.totalHeadersSize} bytes")
        else:
            self._answer(400, path, "malformed HTTP request")

    def timeoutConnection(self) -> None:
        if self.requests:
            self._stalled(f"{self.timeOut:g}s (--client-timeout)")
        super().timeoutConnection()

    def _stalled(self, within: str) -> None:
        """
        Answer the request being read with a 408, saying it was not complete C{within} a time.
        """
        pending = self.requests[-1] if self.requests else None
        if pending is not None and getattr(pending, "incomplete", False):
            cast(EarlyAnswering, pending).refuse(408, f"the request was not complete within {within}")
        else:
            self._answer(408, self._requestPath(), f"the request headers were not complete within {within}")

    def cork(self) -> bool:
        """
        Hold what the answer writes from now on, to be sent in one go by L{uncork}.

        @return: whether this call corked the channel (C{False}: it was already).
        """
        if self._corked is not None:
            return False
        self._corked = []
        return True

    def uncork(self) -> None:
        """
        Send what was written since L{cork}: straight to the socket when the transport is a TCP
        connection with nothing waiting, else (and whatever the socket does not take at once)
        through the transport, as any write.
        """
        pieces, self._corked = self._corked, None
        if not pieces or self.transport is None:
            return
        sendAtOnce(self.transport, b"".join(pieces))

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        if self._corked is None or not isinstance(headers, Headers):
            self.uncork()
            super().writeHeaders(version, code, reason, headers)
            return
        # As HTTPChannel.writeHeaders lays them out.
        self._corked.extend((version, b" ", code, b" ", reason, b"\r\n"))
        for name, values in headers.getAllRawHeaders():
            for value in values:
                self._corked.extend((name, b": ", value, b"\r\n"))
        self._corked.append(b"\r\n")

    def write(self, data: bytes) -> None:
        if self._corked is None:
            super().write(data)
        else:
            self._corked.append(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        if self._corked is None:
            super().writeSequence(iovec)
        else:
            self._corked.extend(iovec)

    def requestTarget(self) -> tuple[bytes, bytes]:
        """
        The method and path of the request being read, as far as they are known.
        """
        return getattr(self, "_command", b"?"), self._requestPath()

    def _requestPath(self) -> bytes:
        # Set once the request line is read, deleted once all headers are.
        return pathOf(getattr(self, "_path", b""))

    def _answer(self, status: int, path: bytes, message: str) -> None:
        self.log.info("Refused a request with {status}: {message}", status=status, message=message)
        if self.transport is not None and not getattr(self.transport, "disconnecting", False):
            self.transport.write(rawResponse(status, self.errorBody(path, status, message)))
        self.loseConnection()
