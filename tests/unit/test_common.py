"""
Tests for L{tabbyproxy.routes.common}: what every route table shares.
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from tabbyproxy.routes.common import OPENAI, AcyclicKleinResource, ClientError, RouteTable, registerErrorAnswers


class ServedRequestTests(SynchronousTestCase):
    def serve(self, path: bytes) -> tuple[bytes, weakref.ref[IRequest]]:
        """
        Serve one request for C{path} from a route table with the garbage collector off, and
        return what the client got and a weak reference to the request the route saw.
        """
        seen: list[weakref.ref[IRequest]] = []

        class Routes:
            app = RouteTable()
            registerErrorAnswers(app, OPENAI)

            @app.route("/hello")
            def hello(self, request: IRequest) -> bytes:
                seen.append(weakref.ref(request))
                return b"hello"

            @app.route("/refused")
            def refused(self, request: IRequest) -> bytes:
                seen.append(weakref.ref(request))
                raise ClientError(400, "no")

        channel = Site(Routes().app.resource()).buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        enabled = gc.isenabled()
        gc.disable()
        try:
            channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        finally:
            if enabled:
                gc.enable()
        [request] = seen
        return transport.value(), request

    def test_servedRequestIsFreedWithoutTheCollector(self) -> None:
        """
        Once a route's answer is written, nothing keeps the request alive: reference counting
        frees it, with no cycle left for the garbage collector (Klein's own resource leaves one
        per request).
        """
        answer, request = self.serve(b"/hello")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertIn(b"hello", answer)
        self.assertIsNone(request())

    def test_wholeAnswerHasItsLength(self) -> None:
        """
        An answer a route returns whole is sent with its C{Content-Length}, not chunked.
        """
        answer, _ = self.serve(b"/hello")
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: 5", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(body, b"hello")

    def test_failedRequestIsAnsweredAndFreed(self) -> None:
        """
        A route's error is answered by the table's error handler, as with Klein's own resource,
        and the request is freed without the garbage collector too.
        """
        answer, request = self.serve(b"/refused")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertIn(b'"no"', answer)
        self.assertIsNone(request())


class KeptMatchTests(SynchronousTestCase):
    """
    The matches a route table's resource keeps answer as werkzeug's matcher does.
    """

    def setUp(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        seen = self.seen

        class Routes:
            app = RouteTable()
            registerErrorAnswers(app, OPENAI)

            @app.route("/hello", methods=["GET"])
            def hello(self, request: IRequest) -> bytes:
                seen.append(("hello", {}))
                return b"hello"

            @app.route("/items/<name>", methods=["GET"])
            def item(self, request: IRequest, name: str) -> bytes:
                seen.append(("item", {"name": name}))
                return name.encode()

        resource = Routes().app.resource()
        assert isinstance(resource, AcyclicKleinResource)
        self.resource = resource
        self.channel = Site(self.resource).buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, None)

    def status(self, method: bytes, path: bytes) -> bytes:
        self.transport.clear()
        self.channel.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return self.transport.value().split(b" ", 2)[1]

    def test_sameAnswersAsTheMatcher(self) -> None:
        """
        A kept path is served by its route again; the same path with another method is still
        a 405 and an unknown path a 404, every time; a path with a variable part is matched
        each time, with its own value; only the match without variables is kept.
        """
        answers = [self.status(method, path) for method, path in [
            (b"GET", b"/hello"), (b"GET", b"/hello"), (b"POST", b"/hello"), (b"POST", b"/hello"),
            (b"GET", b"/nothing"), (b"GET", b"/nothing"), (b"GET", b"/items/a"), (b"GET", b"/items/b"),
            (b"HEAD", b"/hello"),
        ]]
        self.assertEqual(answers, [b"200", b"200", b"405", b"405", b"404", b"404", b"200", b"200", b"200"])
        self.assertEqual(self.seen, [("hello", {}), ("hello", {}), ("item", {"name": "a"}), ("item", {"name": "b"}),
                                     ("hello", {})])
        self.assertEqual(sorted(self.resource._matches), [("/hello", "GET", "http"), ("/hello", "HEAD", "http")])

    def test_matchedAgainLeavesNoGarbage(self) -> None:
        """
        A path matched before is matched again without werkzeug's matcher, whose recursive
        closure left a cycle per match: serving it leaves the garbage collector nothing.
        """
        self.status(b"GET", b"/hello")
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            self.assertEqual(self.status(b"GET", b"/hello"), b"200")
            self.assertEqual(gc.collect(), 0)
        finally:
            if enabled:
                gc.enable()

    def test_boundedMatches(self) -> None:
        """
        Past C{MAX_MATCHES} kept matches, paths are matched each time and nothing more is kept.
        """
        self.resource.MAX_MATCHES = 1
        self.assertEqual([self.status(b"GET", b"/hello"), self.status(b"HEAD", b"/hello"),
                          self.status(b"HEAD", b"/hello")], [b"200", b"200", b"200"])
        self.assertEqual(list(self.resource._matches), [("/hello", "GET", "http")])
