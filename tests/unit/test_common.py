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

from tabbyproxy.routes.common import OPENAI, ClientError, RouteTable, registerErrorAnswers


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

    def test_failedRequestIsAnsweredAndFreed(self) -> None:
        """
        A route's error is answered by the table's error handler, as with Klein's own resource,
        and the request is freed without the garbage collector too.
        """
        answer, request = self.serve(b"/refused")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertIn(b'"no"', answer)
        self.assertIsNone(request())
