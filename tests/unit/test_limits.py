"""
The operating system's limits (L{tabbyproxy.limits}), and the proxy's answers when a connection
takes too long to send its request or comes when the connection cap is full, over an in-memory
transport with a fake clock.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from tabbyproxy.channel import ProxyChannel
from tabbyproxy.limits import (
    FALLBACK_BACKLOG,
    RESERVED_FILES,
    ConnectionLimit,
    FileLimit,
    connectionRoom,
    raiseFileLimit,
    systemBacklog,
    withBacklog,
)
from tabbyproxy.routes.common import errorBodyFor
from tabbyproxy.server import ProxySite


class FakeLimits:
    """
    C{getrlimit} and C{setrlimit} over one remembered open-file limit.
    """

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limit = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limit

    def setrlimit(self, which: int, limit: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed")
        self.limit = limit


class FileLimitTests(SynchronousTestCase):
    def raised(self, limits: FakeLimits) -> FileLimit:
        return raiseFileLimit(limits.getrlimit, limits.setrlimit)

    def test_softLimitRaisedToHard(self) -> None:
        """
        The soft open-file limit (1024 under systemd) is raised to the hard limit.
        """
        limits = FakeLimits(1024, 524288)
        self.assertEqual(self.raised(limits), FileLimit(before=1024, soft=524288, hard=524288))
        self.assertEqual(limits.limit, (524288, 524288))

    def test_unlimitedOrRefusedLeavesSoftLimit(self) -> None:
        """
        An unlimited hard limit, or one the system refuses to give, leaves the soft limit alone.
        """
        unlimited = FakeLimits(1024, resource.RLIM_INFINITY)
        self.assertEqual(self.raised(unlimited).soft, 1024)
        self.assertEqual(unlimited.limit, (1024, resource.RLIM_INFINITY))
        refused = FakeLimits(256, 10240, refuse=True)
        self.assertEqual(self.raised(refused), FileLimit(before=256, soft=256, hard=10240))

    def test_connectionRoom(self) -> None:
        """
        The connections a limit leaves room for are the soft limit less the proxy's own files.
        """
        self.assertEqual(connectionRoom(FileLimit(1024, 1024, 1024)), 1024 - RESERVED_FILES)
        self.assertEqual(connectionRoom(FileLimit(10, 10, 10)), 1)
        self.assertIsNone(connectionRoom(FileLimit(1024, resource.RLIM_INFINITY, resource.RLIM_INFINITY)))


class BacklogTests(SynchronousTestCase):
    def test_systemBacklog(self) -> None:
        """
        The backlog is the system's somaxconn, or 1024 where it cannot be read or makes no sense.
        """
        somaxconn = Path(self.mktemp())
        somaxconn.write_text("4096\n")
        self.assertEqual(systemBacklog(somaxconn), 4096)
        for text in ("0\n", "many\n"):
            somaxconn.write_text(text)
            self.assertEqual(systemBacklog(somaxconn), FALLBACK_BACKLOG)
        self.assertEqual(systemBacklog(Path(self.mktemp())), FALLBACK_BACKLOG)

    def test_withBacklog(self) -> None:
        """
        A TCP, SSL or UNIX endpoint gets the backlog unless it gives its own; other types stay
        as they are.
        """
        self.assertEqual(withBacklog("tcp:9000:interface=127.0.0.1", 4096),
                         "tcp:9000:interface=127.0.0.1:backlog=4096")
        self.assertEqual(withBacklog("unix:/run/tabbyproxy.sock", 10), "unix:/run/tabbyproxy.sock:backlog=10")
        self.assertEqual(withBacklog("tcp:9000:backlog=5", 4096), "tcp:9000:backlog=5")
        self.assertEqual(withBacklog("systemd:domain=INET:index=0", 4096), "systemd:domain=INET:index=0")


class ConnectionLimitTests(SynchronousTestCase):
    def test_countsOpenConnections(self) -> None:
        """
        Connections within the limit are let in; one more is not, until one closes.
        """
        limit = ConnectionLimit(2)
        self.assertEqual([limit.opened(), limit.opened(), limit.opened()], [True, True, False])
        limit.closed()
        limit.closed()
        self.assertTrue(limit.opened())


class Connection:
    """
    One client connection to a L{ProxySite} over an in-memory transport.
    """

    def __init__(self, site: ProxySite) -> None:
        channel = site.buildProtocol(None)
        assert isinstance(channel, ProxyChannel)
        self.channel = channel
        self.transport = StringTransport()
        channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answer(self) -> tuple[int, str]:
        """
        The status and the error message the connection was answered with (in OpenAI's shape or
        in the plain one).
        """
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        error = json.loads(body)["error"]
        return int(head.split(b" ")[1]), error if isinstance(error, str) else error["message"]

    def close(self) -> None:
        self.channel.connectionLost()


class ChannelLimitTests(SynchronousTestCase):
    """
    A request must arrive whole within --request-timeout, however steadily its bytes come, and
    a connection over --max-connections is answered with a 503 and closed.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        root = Resource()
        root.putChild(b"health", _Health())
        self.site = ProxySite(root, errorBodyFor, timeout=5, requestTimeout=20, maxConnections=2, reactor=self.clock)

    def test_slowSenderGets408(self) -> None:
        """
        A client that sends one byte a second never stays silent for --client-timeout, yet its
        request is answered with a 408 once --request-timeout has passed since its first byte,
        and the connection is closed.
        """
        connection = Connection(self.site)
        request = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
        for byte in range(19):
            connection.send(request[byte:byte + 1])
            self.clock.advance(1)
        self.assertEqual(connection.transport.value(), b"")
        connection.send(request[19:20])
        self.clock.advance(1)
        status, message = connection.answer()
        self.assertEqual(status, 408)
        self.assertIn("not complete within 20s (--request-timeout)", message)
        self.assertTrue(connection.transport.disconnecting)

    def test_slowBodyGets408(self) -> None:
        """
        The bound covers the body too: headers sent at once, then a body that trickles in.
        """
        connection = Connection(self.site)
        connection.send(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
        for _ in range(20):
            connection.send(b"x")
            self.clock.advance(1)
        status, message = connection.answer()
        self.assertEqual(status, 408)
        self.assertIn("--request-timeout", message)

    def test_boundIsPerRequest(self) -> None:
        """
        The clock stops once a request is in, and a keep-alive connection's next request gets a
        clock of its own: four requests, each sent in two parts 4 s apart, are all answered
        although the connection has been sending for longer than --request-timeout.
        """
        connection = Connection(self.site)
        for _ in range(4):
            connection.send(b"GET /health HTTP/1.1\r\n")
            self.clock.advance(4)
            connection.send(b"Host: localhost\r\n\r\n")
            self.clock.advance(4)
        self.assertEqual(connection.transport.value().count(b"HTTP/1.1 200 "), 4)
        self.assertNotIn(b"408", connection.transport.value())
        connection.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connectionOverTheCapGets503(self) -> None:
        """
        With --max-connections 2, a third connection's request is answered with a 503 that
        names the option, and closed; once a connection closes, a new one is served.
        """
        first, second, third = (Connection(self.site) for _ in range(3))
        third.send(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, message = third.answer()
        self.assertEqual(status, 503)
        self.assertIn("2 connections open, its limit (--max-connections)", message)
        self.assertTrue(third.transport.disconnecting)
        third.close()
        first.close()
        fourth = Connection(self.site)
        fourth.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertIn(b"HTTP/1.1 200 ", fourth.transport.value())
        second.close()
        fourth.close()
        self.assertEqual(self.site.connections.current, 0)


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"ok"
