"""
The relay's hot path in L{tabbyproxy.upstream}: the chunked decoder, and the client that sends the
proxy's requests to TabbyAPI over persistent connections (on real loopback TCP, since what is
pinned is how Twisted's HTTP client uses them).
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _globalReactor
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tabbyproxy.relaypool import BytesProducer, ChunkedDecoder, MalformedChunkedBody, RelayAgent
from tabbyproxy.channel import ProxyChannel
from tabbyproxy.upstream import ReadTimeouts, UpstreamStalled, _BodyPump

reactor: Any = _globalReactor



def chunked(pieces: list[bytes], trailers: list[bytes] = []) -> bytes:  # noqa: B006
    """
    C{pieces} framed as a chunked body, ending with C{trailers}.
    """
    framed = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece)
    return framed + b"0\r\n" + b"".join(trailer + b"\r\n" for trailer in trailers) + b"\r\n"


class Recorder:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.finished: list[bytes] = []
        self.decoder = ChunkedDecoder(self.data.append, self.finished.append)

    def feed(self, wire: bytes, cuts: list[int]) -> list[int]:
        """
        Feed C{wire} cut at C{cuts}; return how many data callbacks each call made.
        """
        calls = []
        start = 0
        for end in [*sorted(set(cuts)), len(wire)]:
            before = len(self.data)
            self.decoder.dataReceived(wire[start:end])
            calls.append(len(self.data) - before)
            start = end
        return calls


class ChunkedDecoderTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(
        pieces=st.lists(st.binary(max_size=300), max_size=20),
        trailers=st.lists(st.sampled_from([b"X-Usage: 12", b"Expires: never"]), max_size=2),
        rest=st.binary(max_size=10),
        data=st.data(),
    )
    def test_anyCutGivesTheBody(self, pieces: list[bytes], trailers: list[bytes], rest: bytes, data: Any) -> None:
        """
        However the bytes are cut, the body arrives whole and in order, each read's bytes in at
        most one callback, and the finish callback gets what followed the last chunk.
        """
        body = chunked(pieces, trailers)
        wire = body + rest
        # The parser hands over what follows the body in the read that ends the body.
        cuts = data.draw(st.lists(st.integers(0, len(body) - 1), max_size=12))
        recorder = Recorder()
        calls = recorder.feed(wire, cuts)
        self.assertEqual(b"".join(recorder.data), b"".join(pieces))
        self.assertTrue(all(count <= 1 for count in calls))
        self.assertEqual(recorder.finished, [rest])
        self.assertEqual(recorder.decoder.state, "FINISHED")

    def test_restAfterTheLastChunk(self) -> None:
        """
        Bytes after the terminating chunk in the same read go to the finish callback.
        """
        recorder = Recorder()
        recorder.decoder.dataReceived(chunked([b"hello"]) + b"HTTP/1.1 200")
        self.assertEqual((recorder.data, recorder.finished), ([b"hello"], [b"HTTP/1.1 200"]))

    def test_chunkExtensionsIgnored(self) -> None:
        """
        A chunk size may carry extensions after a semicolon.
        """
        recorder = Recorder()
        recorder.decoder.dataReceived(b"5;name=value\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(recorder.data, [b"hello"])

    def test_malformedSizes(self) -> None:
        """
        A size that is not plain hexadecimal digits breaks the body.
        """
        for line in (b"", b"0x5", b"+5", b" 5", b"5 ", b"1_0", b"g"):
            recorder = Recorder()
            with self.subTest(line=line):
                self.assertRaises(MalformedChunkedBody, recorder.decoder.dataReceived, line + b"\r\nhello\r\n")

    def test_chunkWithoutCRLF(self) -> None:
        """
        A chunk whose data is not followed by CRLF breaks the body.
        """
        recorder = Recorder()
        self.assertRaises(MalformedChunkedBody, recorder.decoder.dataReceived, b"5\r\nhelloXX0\r\n\r\n")

    def test_endlessSizeLine(self) -> None:
        """
        A size line that never ends is refused once it is over Twisted's limit, even in pieces.
        """
        recorder = Recorder()
        recorder.decoder.dataReceived(b"1" * 1000)
        self.assertRaises(MalformedChunkedBody, recorder.decoder.dataReceived, b"1" * 100)

    def test_endlessTrailer(self) -> None:
        """
        Trailers are bounded too.
        """
        recorder = Recorder()
        recorder.decoder.dataReceived(b"0\r\n")
        self.assertRaises(MalformedChunkedBody, recorder.decoder.dataReceived, b"X" * 70000)

    def test_cutShort(self) -> None:
        """
        A body cut anywhere before its last chunk and trailer leaves the decoder unfinished,
        which is how the agent tells a body cut short.
        """
        for wire in (b"", b"5\r\nhel", b"5\r\nhello\r\n", b"5\r\nhello\r\n0\r\n"):
            recorder = Recorder()
            recorder.decoder.dataReceived(wire)
            with self.subTest(wire=wire):
                self.assertNotEqual(recorder.decoder.state, "FINISHED")

    def test_finishedDecoderLetsItsOwnerGo(self) -> None:
        """
        Once the last chunk is decoded, the decoder drops its callbacks: an owner whose bound
        methods they are (as Twisted's parser is) and who holds the decoder is freed by
        reference counting alone, with no cycle for the garbage collector.
        """

        class Owner:
            def __init__(self) -> None:
                self.data: list[bytes] = []
                self.rest: list[bytes] = []
                self.decoder = ChunkedDecoder(self.received, self.finished)

            def received(self, data: bytes) -> None:
                self.data.append(data)

            def finished(self, rest: bytes) -> None:
                self.rest.append(rest)

        enabled = gc.isenabled()
        gc.disable()
        try:
            owner = Owner()
            owner.decoder.dataReceived(chunked([b"one", b"two"]) + b"next")
            self.assertEqual((owner.data, owner.rest), ([b"onetwo"], [b"next"]))
            gone = weakref.ref(owner)
            del owner
            self.assertIsNone(gone())
        finally:
            if enabled:
                gc.enable()

    def test_dataAfterTheEnd(self) -> None:
        """
        The parser never feeds a finished decoder; if it did, that is a bug, not data.
        """
        recorder = Recorder()
        recorder.decoder.dataReceived(chunked([b"x"]))
        self.assertRaises(RuntimeError, recorder.decoder.dataReceived, b"more")


class Tokens(Resource):
    """
    Streams C{count} small chunks, each written on its own like TabbyAPI's tokens, and records the
    client port of each request (to see connections being reused).
    """

    isLeaf = True

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.clientPorts: list[int] = []
        self.bodies: list[bytes] = []
        self.headers: list[Headers] = []
        self.uris: list[bytes] = []

    def render(self, request: IRequest) -> int:
        self.uris.append(request.uri)
        self.clientPorts.append(request.getClientAddress().port)
        self.bodies.append(request.content.read() if request.content is not None else b"")
        self.headers.append(request.requestHeaders)
        request.setHeader(b"content-type", b"text/event-stream")
        for index in range(self.count):
            request.write(b"data: %d\r\n\r\n" % index)
        request.finish()
        return NOT_DONE_YET


class Collect(Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class ProducerTransport:
    """
    The body transport a pump reads from: records what the pump asks of it.
    """

    def __init__(self) -> None:
        self.asked: list[str] = []

    def pauseProducing(self) -> None:
        self.asked.append("pause")

    def resumeProducing(self) -> None:
        self.asked.append("resume")

    def stopProducing(self) -> None:
        self.asked.append("stop")


class BodyPumpSilenceTests(SynchronousTestCase):
    def test_oneTimerMovedPerPiece(self) -> None:
        """
        The wait for the next piece of a body is one timer, moved on by each piece: 300 s
        before the first piece, then a timer of 120 s, moved on by each piece after; none runs
        while the client holds the body paused, and the wait starts over when it resumes.  A
        silence that lasts ends the body with L{UpstreamStalled} naming the option.
        """
        clock = Clock()
        done: Deferred[None] = Deferred()
        pieces: list[bytes] = []
        transport = ProducerTransport()
        pump = _BodyPump(None, pieces.append, done, clock, ReadTimeouts(300.0, 120.0))
        pump.makeConnection(transport)
        clock.advance(299)
        pump.dataReceived(b"a")
        [first] = clock.getDelayedCalls()
        clock.advance(119)
        for piece in (b"b", b"c"):
            pump.dataReceived(piece)
            clock.advance(119)
        self.assertEqual(clock.getDelayedCalls(), [first])
        self.assertEqual((pieces, transport.asked), ([b"a", b"b", b"c"], []))
        pump.pauseProducing()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(1000)
        pump.resumeProducing()
        clock.advance(119)
        self.assertEqual(transport.asked, ["pause", "resume"])
        clock.advance(1)
        self.assertEqual(transport.asked, ["pause", "resume", "stop"])
        pump.connectionLost(Failure(ResponseDone()))
        stalled = self.failureResultOf(done, UpstreamStalled)
        self.assertEqual(str(stalled.value), "TabbyAPI sent nothing for 120s (--chunk-timeout)")


class CountedWrites(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.writes += 1
        super().writeSequence(data)


class RelayPoolTests(TestCase):
    def setUp(self) -> None:
        self.tokens = Tokens(200)
        self.port = reactor.listenTCP(0, Site(self.tokens), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.agent = RelayAgent(reactor)
        self.addCleanup(self.agent.closeCachedConnections)
        self.url = b"http://127.0.0.1:%d/v1/chat/completions" % (self.port.getHost().port,)

    async def relay(self) -> list[bytes]:
        response = await self.agent.request(b"POST", self.url, Headers({b"x-api-key": [b"k"]}), BytesProducer(b'{"a":1}'))
        self.assertEqual(response.code, 200)
        collect = Collect()
        response.deliverBody(collect)
        await collect.done
        return collect.pieces

    async def test_bodyIsCoalesced(self) -> None:
        """
        An answer of 200 chunks arrives whole, in far fewer pieces than chunks: the pool's
        connections decode with L{ChunkedDecoder}, which hands on a read at a time.
        """
        pieces = await self.relay()
        self.assertEqual(b"".join(pieces), b"".join(b"data: %d\r\n\r\n" % i for i in range(200)))
        self.assertLess(len(pieces), 20)

    async def test_requestAsSent(self) -> None:
        """
        The body and the given headers reach the server; the body is sent with its length.
        """
        await self.relay()
        self.assertEqual(self.tokens.bodies, [b'{"a":1}'])
        [headers] = self.tokens.headers
        self.assertEqual(headers.getRawHeaders(b"x-api-key"), [b"k"])
        self.assertEqual(headers.getRawHeaders(b"content-length"), [b"7"])
        self.assertEqual(headers.getRawHeaders(b"host"), [b"127.0.0.1:%d" % (self.port.getHost().port,)])

    async def test_pathsOfOneOrigin(self) -> None:
        """
        Requests to several paths and queries of one origin each reach their own path and query.
        """
        base = self.url.rsplit(b"/v1/", 1)[0]
        for target in (b"/v1/models?x=1&y=%2F", b"/health", b""):
            response = await self.agent.request(b"GET", base + target)
            collect = Collect()
            response.deliverBody(collect)
            await collect.done
        self.assertEqual(self.tokens.uris, [b"/v1/models?x=1&y=%2F", b"/health", b"/"])

    async def test_connectionReused(self) -> None:
        """
        Requests one after another use one persistent connection.
        """
        await self.relay()
        await self.relay()
        await self.relay()
        self.assertEqual(len(set(self.tokens.clientPorts)), 1)

    async def test_requestSentAtOnce(self) -> None:
        """
        A request on a kept connection goes to the socket as it is made, without waiting for the
        reactor's next turn: its connection is never registered for writing.
        """
        await self.relay()
        writers = set(reactor.getWriters())
        answered = self.agent.request(b"POST", self.url, Headers(), BytesProducer(b'{"a":1}'))
        self.assertEqual(set(reactor.getWriters()), writers)
        response = await answered
        collect = Collect()
        response.deliverBody(collect)
        await collect.done
        self.assertEqual(self.tokens.bodies, [b'{"a":1}', b'{"a":1}'])

    async def test_bodyAskedForAtOnceNeverPauses(self) -> None:
        """
        A body asked for as its response arrives, as the proxy asks for it, never pauses the
        connection at the end of the headers (a stopReading and a startReading, an C{epoll_ctl}
        call each) on a kept connection.
        """
        await self.relay()
        removed: list[object] = []
        removeReader = reactor.removeReader

        def counting(reader: Any) -> None:
            removed.append(reader)
            removeReader(reader)

        self.patch(reactor, "removeReader", counting)
        await self.relay()
        await self.relay()
        self.assertEqual([reader for reader in removed if isinstance(reader, tcp.Client)], [])

    async def test_bodyAskedForLaterWaitsPaused(self) -> None:
        """
        A body not asked for while its headers are read waits with the connection paused, and
        arrives whole once asked for.
        """
        rest: Deferred[None] = Deferred()

        class InTwoParts(Resource):
            isLeaf = True

            def render(self, request: IRequest) -> int:
                request.write(b"first ")
                rest.addCallback(lambda _: (request.write(b"and rest"), request.finish()))
                return NOT_DONE_YET

        port = reactor.listenTCP(0, Site(InTwoParts()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        response = await self.agent.request(b"GET", b"http://127.0.0.1:%d/" % (port.getHost().port,))
        await deferLater(reactor, 0, lambda: None)
        connection = response._connection.transport  # type: ignore[attr-defined]
        self.assertIsInstance(connection, tcp.Client)
        self.assertNotIn(connection, reactor.getReaders())
        rest.callback(None)
        collect = Collect()
        response.deliverBody(collect)
        await collect.done
        self.assertEqual(b"".join(collect.pieces), b"first and rest")

    async def test_cancelWhileConnecting(self) -> None:
        """
        A request cancelled before its connection is made fails as Twisted's endpoints report
        it, and leaves no connection behind.
        """
        asked = self.agent.request(b"GET", self.url)
        asked.cancel()
        with self.assertRaises(ConnectingCancelledError):
            await asked

    async def test_nothingListening(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        address = port.getHost()
        await port.stopListening()
        with self.assertRaises(ConnectError):
            await self.agent.request(b"GET", b"http://127.0.0.1:%d/health" % (address.port,))

    async def test_brokenBodyFails(self) -> None:
        """
        A chunked answer that is cut short fails the body instead of ending it quietly.
        """

        class Broken(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(  # type: ignore[union-attr]
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\ndata: 1\r\n\r\n")
                self.transport.loseConnection()  # type: ignore[union-attr]

        port = reactor.listenTCP(0, Factory.forProtocol(Broken), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = b"http://127.0.0.1:%d/" % (port.getHost().port,)
        response = await self.agent.request(b"GET", url, Headers(), None)
        collect = Collect()
        response.deliverBody(collect)
        with self.assertRaises(ResponseFailed):
            await collect.done


def proxyChannel() -> ProxyChannel:
    return ProxyChannel(lambda path, status, message: b"{}")


def answerWrites(channel: ProxyChannel) -> None:
    """
    What a request's first write makes its channel write: headers, then a chunk's framing.
    """
    channel.writeHeaders(b"HTTP/1.1", b"200", b"OK",
                         Headers({b"content-type": [b"text/event-stream"], b"x-two": [b"a", b"b"]}))
    channel.writeSequence([b"5\r\n", b"hello", b"\r\n"])
    channel.write(b"more")


class CorkTests(SynchronousTestCase):
    def test_heldUntilUncorked(self) -> None:
        """
        What is written to a corked channel reaches the transport in one write when it is
        uncorked, byte for byte what the same writes make uncorked; a second cork while corked
        does nothing.
        """
        plain, corked = proxyChannel(), proxyChannel()
        plainTransport, corkedTransport = StringTransport(), CountedWrites()
        plain.makeConnection(plainTransport)
        corked.makeConnection(corkedTransport)
        answerWrites(plain)
        self.assertTrue(corked.cork())
        self.assertFalse(corked.cork())
        answerWrites(corked)
        self.assertEqual((corkedTransport.value(), corkedTransport.writes), (b"", 0))
        corked.uncork()
        self.assertEqual(corkedTransport.value(), plainTransport.value())
        self.assertEqual(corkedTransport.writes, 1)
        corked.write(b"after")
        self.assertEqual(corkedTransport.writes, 2)


class Received(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.arrived: Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.arrived is not None:
            arrived, self.arrived = self.arrived, None
            arrived.callback(None)


class CorkOverTCPTests(TestCase):
    async def test_sentAtOnce(self) -> None:
        """
        Over TCP, uncorking sends at once: nothing stays in the transport's buffer and the
        socket is never registered for writing; what the socket does not take at once (here,
        more than its buffer) goes through the transport as any write, in order.
        """
        made: Deferred[ProxyChannel] = Deferred()

        class Announcing(ProxyChannel):
            def connectionMade(self) -> None:
                super().connectionMade()
                made.callback(self)

        port = reactor.listenTCP(0, Factory.forProtocol(lambda: Announcing(lambda path, status, message: b"{}")),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = Received()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        transport = client.transport
        assert transport is not None
        self.addCleanup(transport.loseConnection)
        channel = await made
        channel.cork()
        answerWrites(channel)
        channel.uncork()
        self.assertNotIn(channel.transport, reactor.getWriters())
        expected = StringTransport()
        plain = proxyChannel()
        plain.makeConnection(expected)
        answerWrites(plain)
        large = b"x" * (8 * 1024 * 1024)
        channel.cork()
        channel.write(large)
        channel.uncork()
        self.assertIn(channel.transport, reactor.getWriters())
        channel.write(b"end")
        while len(client.data) < len(expected.value()) + len(large) + 3:
            client.arrived = Deferred()
            await client.arrived
        self.assertEqual(client.data, expected.value() + large + b"end")
