"""
L{tabbyproxy.relaypool.RelayAgent}, the proxy's HTTP client for TabbyAPI, over in-memory
connections: what it writes, how it reads each kind of answer, when it keeps a connection, and
how its requests and bodies fail.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from tabbyproxy.relaypool import BodyCutShort, BytesProducer, MalformedResponse, RelayAgent

ORIGIN = b"http://127.0.0.1:5001"


class Body(Protocol):
    """
    A response body's protocol: what arrived, and how it ended.
    """

    def __init__(self) -> None:
        self.data = b""
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.ended = reason


class RelayAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.agent = RelayAgent(self.reactor)

    def ask(self, method: bytes = b"GET", path: bytes = b"/health", body: bytes | None = None,
            headers: Headers | None = None) -> Deferred[IResponse]:
        return self.agent.request(method, ORIGIN + path, headers, None if body is None else BytesProducer(body))

    def connect(self) -> tuple[Any, StringTransport]:
        """
        Make the connection the agent asked the reactor for.
        """
        host, port, factory, _, _ = self.reactor.tcpClients.pop()
        self.assertEqual((host, port), ("127.0.0.1", 5001))
        connection = factory.buildProtocol(None)
        assert connection is not None
        transport = StringTransport()
        connection.makeConnection(transport)
        return connection, transport

    def exchange(self, answer: bytes, method: bytes = b"GET") -> tuple[IResponse, Body, Any, StringTransport]:
        """
        One request on a new connection, answered with C{answer}, its body delivered.
        """
        asked = self.ask(method)
        connection, transport = self.connect()
        connection.dataReceived(answer)
        response = self.successResultOf(asked)
        body = Body()
        response.deliverBody(body)
        return response, body, connection, transport

    def test_requestWrittenWhole(self) -> None:
        """
        A request goes out in one write: the request line, C{Host}, the given headers, the
        body's length and the body.
        """
        self.ask(b"POST", b"/v1/chat/completions?x=1", b'{"a":1}', Headers({b"x-api-key": [b"k"]}))
        _, transport = self.connect()
        self.assertEqual(transport.value(), b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:5001\r\n"
                                            b"X-Api-Key: k\r\nContent-Length: 7\r\n\r\n{\"a\":1}")

    def test_bodylessPostSaysItsLength(self) -> None:
        self.ask(b"POST", b"/unload")
        _, transport = self.connect()
        self.assertEqual(transport.value(), b"POST /unload HTTP/1.1\r\nHost: 127.0.0.1:5001\r\nContent-Length: 0\r\n\r\n")

    def test_unwritableRequestLine(self) -> None:
        """
        A target or method that would break the request line fails the request, and nothing
        is sent.
        """
        for method, path in ((b"GET", b"/a b"), (b"GET", b"/a\r\nX: 1"), (b"GE T", b"/")):
            with self.subTest(method=method, path=path):
                self.failureResultOf(self.ask(method, path), ValueError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_chunkedAnswerAndTheConnectionKept(self) -> None:
        """
        A chunked answer, cut anywhere, arrives whole with its status and headers (framing
        headers are the connection's, as in Twisted's client); the connection is kept, and the
        next request goes out on it.
        """
        answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        for cut in range(1, len(answer)):
            with self.subTest(cut=cut):
                asked = self.ask()
                connection, transport = self.connect()
                connection.dataReceived(answer[:cut])
                connection.dataReceived(answer[cut:])
                response = self.successResultOf(asked)
                body = Body()
                response.deliverBody(body)
                self.assertEqual((response.code, response.phrase, response.version), (200, b"OK", (b"HTTP", 1, 1)))
                self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
                self.assertIsNone(response.headers.getRawHeaders(b"transfer-encoding"))
                self.assertEqual(response.length, UNKNOWN_LENGTH)
                self.assertEqual(body.data, b"hello world")
                assert body.ended is not None
                body.ended.trap(ResponseDone)
                transport.clear()
                again = self.ask(b"GET", b"/v1/models")
                self.assertEqual(self.reactor.tcpClients, [])
                self.assertTrue(transport.value().startswith(b"GET /v1/models HTTP/1.1\r\n"))
                connection.connectionLost(Failure(ConnectionDone()))
                self.failureResultOf(again, ResponseNeverReceived)

    def test_answerOfAKnownLength(self) -> None:
        response, body, _, transport = self.exchange(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope!")
        self.assertEqual((response.code, response.length, body.data), (404, 5, b"nope!"))
        assert body.ended is not None
        body.ended.trap(ResponseDone)
        self.assertFalse(transport.disconnecting)

    def test_answerUntilTheEnd(self) -> None:
        """
        An answer that says neither its length nor chunks ends with the connection, as
        possibly complete (C{PotentialDataLoss}, as Twisted's client reports it); the connection
        is not kept.
        """
        _, body, connection, _ = self.exchange(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        self.assertIsNone(body.ended)
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.data, b"all of it")
        assert body.ended is not None
        body.ended.trap(PotentialDataLoss)
        self.ask()
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_interimAnswerSkipped(self) -> None:
        response, body, _, _ = self.exchange(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual((response.code, body.data), (200, b"hi"))

    def test_answersWithoutABody(self) -> None:
        """
        A 204, a 304 and the answer to a HEAD have no body, whatever their headers say, and
        leave the connection kept.
        """
        for method, answer in ((b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
                               (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
                               (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")):
            with self.subTest(method=method, answer=answer):
                _, body, connection, transport = self.exchange(answer, method)
                self.assertEqual(body.data, b"")
                assert body.ended is not None
                body.ended.trap(ResponseDone)
                self.assertFalse(transport.disconnecting)
                connection.connectionLost(Failure(ConnectionDone()))

    def test_connectionCloseIsNotKept(self) -> None:
        for answer in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
                       b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx"):
            with self.subTest(answer=answer):
                _, body, connection, transport = self.exchange(answer)
                self.assertEqual(body.data, b"x")
                self.assertTrue(transport.disconnecting)
                connection.connectionLost(Failure(ConnectionDone()))
                self.ask()
                self.connect()

    def test_malformedAnswers(self) -> None:
        """
        What is not an HTTP/1 answer's head fails the request with C{ResponseFailed} naming the
        problem, and the connection is given up.
        """
        for answer in (b"ICY 200 OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nX: " + b"x" * 70000):
            with self.subTest(answer=answer[:60]):
                asked = self.ask()
                connection, transport = self.connect()
                connection.dataReceived(answer)
                failure = self.failureResultOf(asked, ResponseFailed)
                [reason] = failure.value.reasons
                reason.trap(MalformedResponse)
                self.assertTrue(transport.disconnecting)

    def test_lostBeforeTheAnswer(self) -> None:
        asked = self.ask()
        connection, _ = self.connect()
        connection.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(asked, ResponseNeverReceived)
        [reason] = failure.value.reasons
        reason.trap(ConnectionLost)

    def test_bodyCutShort(self) -> None:
        """
        A connection that ends inside a chunked body, or before a body's length, fails the body
        with C{ResponseFailed}.
        """
        for answer in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                       b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"):
            with self.subTest(answer=answer):
                _, body, connection, _ = self.exchange(answer)
                connection.connectionLost(Failure(ConnectionDone()))
                self.assertEqual(body.data, b"hel")
                assert body.ended is not None
                body.ended.trap(ResponseFailed)
                self.assertEqual([reason.type for reason in body.ended.value.reasons], [ConnectionDone, BodyCutShort])

    def test_cancelWhileWaitingClosesTheConnection(self) -> None:
        asked = self.ask()
        connection, transport = self.connect()
        asked.cancel()
        self.failureResultOf(asked, CancelledError)
        self.assertTrue(transport.disconnecting)
        connection.connectionLost(Failure(ConnectionLost()))
        self.ask()
        self.connect()

    def test_unclaimedBodyPausesReading(self) -> None:
        """
        A body not asked for in the read that brought its headers pauses the connection's
        reading, and what came is held; asking for it hands that on and reading goes on.
        """
        asked = self.ask()
        connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        response = self.successResultOf(asked)
        self.assertEqual(transport.producerState, "paused")
        body = Body()
        response.deliverBody(body)
        self.assertEqual((transport.producerState, body.data), ("producing", b"hi"))
        self.assertRaises(RuntimeError, response.deliverBody, Body())

    def test_claimedInTheSameReadNeverPauses(self) -> None:
        asked = self.ask()
        connection, transport = self.connect()
        paused: list[str] = []
        self.patch(transport, "pauseProducing", lambda: paused.append("pause"))
        body = Body()
        asked.addCallback(lambda response: response.deliverBody(body))
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
        self.assertEqual((paused, body.data), ([], b"body"))

    def test_bodyPacedByItsProtocol(self) -> None:
        """
        The body's protocol pauses and resumes the connection's reading through its transport;
        a body that ends while paused leaves the connection reading, and kept.
        """
        asked = self.ask()
        connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        response = self.successResultOf(asked)
        body = Body()
        response.deliverBody(body)
        assert body.transport is not None
        body.transport.pauseProducing()  # type: ignore[attr-defined]
        self.assertEqual(transport.producerState, "paused")
        body.transport.resumeProducing()  # type: ignore[attr-defined]
        self.assertEqual(transport.producerState, "producing")
        body.transport.pauseProducing()  # type: ignore[attr-defined]
        connection.dataReceived(b"body")
        self.assertEqual((transport.producerState, body.data), ("producing", b"body"))
        self.ask()
        self.assertEqual(self.reactor.tcpClients, [])

    def test_stopProducingEndsTheBody(self) -> None:
        _, body, connection, transport = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart")
        assert body.transport is not None
        body.transport.stopProducing()  # type: ignore[attr-defined]
        self.assertTrue(transport.disconnecting)
        connection.dataReceived(b"of it")
        connection.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(body.data, b"part")
        assert body.ended is not None
        body.ended.trap(ResponseFailed)

    def test_idleConnectionLostIsDropped(self) -> None:
        _, _, connection, _ = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        connection.connectionLost(Failure(ConnectionDone()))
        self.ask()
        self.connect()

    def test_closeCachedConnections(self) -> None:
        """
        Closing the idle connections fires once they are closed; the next request connects anew.
        """
        _, _, connection, transport = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        closed = self.agent.closeCachedConnections()
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(closed)
        connection.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)
        self.ask()
        self.connect()

    def test_closeCachedConnectionsStopsTheSweep(self) -> None:
        """
        Once the idle connections are closed, nothing is left to time them out.
        """
        self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.agent.closeCachedConnections()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_idleConnectionClosedBeforeTabbyAPIWould(self) -> None:
        """
        An idle connection is used again within L{RelayAgent.IDLE_TIMEOUT}, and closed by the
        agent once it has been idle that long (under uvicorn's 5 s, so that no request meets
        TabbyAPI's own close); the next request connects anew, and no timer is left.
        """
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        _, _, connection, transport = self.exchange(answer)
        self.reactor.advance(RelayAgent.IDLE_TIMEOUT - 0.5)
        self.assertFalse(transport.disconnecting)
        asked = self.ask()
        self.assertEqual(self.reactor.tcpClients, [])
        connection.dataReceived(answer)
        self.successResultOf(asked)
        self.reactor.advance(RelayAgent.IDLE_TIMEOUT - 0.5)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.5)
        self.assertTrue(transport.disconnecting)
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.ask()
        self.connect()

    def test_sweepClosesOnlyTheTimedOut(self) -> None:
        """
        Of two idle connections, the one idle for L{RelayAgent.IDLE_TIMEOUT} is closed and the
        other kept, until its own time comes.
        """
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        first, second = self.ask(), self.ask()
        (older, olderTransport), (younger, youngerTransport) = self.connect(), self.connect()
        older.dataReceived(answer)
        self.reactor.advance(1)
        younger.dataReceived(answer)
        self.successResultOf(first)
        self.successResultOf(second)
        self.reactor.advance(RelayAgent.IDLE_TIMEOUT - 1)
        self.assertEqual((olderTransport.disconnecting, youngerTransport.disconnecting), (True, False))
        self.reactor.advance(1)
        self.assertTrue(youngerTransport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_timedOutWhileTheSweepIsLate(self) -> None:
        """
        A request never goes out on a connection idle for L{RelayAgent.IDLE_TIMEOUT}, even when
        the reactor was too busy to run the sweep: that connection is closed, and the request
        connects anew.
        """
        _, _, _, transport = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.reactor.rightNow += RelayAgent.IDLE_TIMEOUT
        self.ask()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:5001\r\n\r\n")
        self.connect()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_anExchangeLeavesNoCycle(self) -> None:
        """
        Once its body is read, nothing keeps an answer alive: reference counting frees it, with
        no cycle for the garbage collector.
        """
        enabled = gc.isenabled()
        gc.disable()
        try:
            response, body, connection, _ = self.exchange(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
            gone = weakref.ref(response)
            del response, body
            self.assertIsNone(gone())
        finally:
            if enabled:
                gc.enable()
