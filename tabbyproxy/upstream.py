"""
The one exchange with a TabbyAPI child: send a request, and stream its answer back.

L{Upstream.call} sends a request and returns the response once TabbyAPI answered with success; it
raises L{UpstreamUnreachable} when TabbyAPI did not answer and L{UpstreamAnswered} when it answered
with an error (having reported a 503, TabbyAPI's sign of a failed generator, to the lease).  Any
other exception is a bug, and reaches the route's error handler with its traceback.

The body of a response is pumped into the client's request as it arrives (L{Upstream.pipe}),
through a small body protocol whose transport is registered as the request's producer: a slow
client pauses the upstream read instead of growing the proxy's memory, and a client that leaves
stops it, which closes the connection to TabbyAPI so it stops generating.
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Callable, Mapping, cast

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IRequest, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from tabbyproxy.supervisor import Lease
from tabbyproxy.tabbywire import upstreamErrorMessage

# Headers of TabbyAPI's answer worth passing on; hop-by-hop and framing headers are the proxy's.
RELAYED_HEADERS = (b"content-type", b"cache-control", b"x-accel-buffering")

# What a request that never got an answer fails with.
_NO_ANSWER = (ConnectError, ConnectingCancelledError, ResponseNeverReceived, ResponseFailed)


def treqClient(agent: IAgent) -> HTTPClient:
    """
    treq's API over C{agent}, for the supervisor's C{/health} checks, with a cookie jar that never
    stores anything.
    """
    return HTTPClient(agent, cookiejar=cast(Any, CookieJar(DefaultCookiePolicy(allowed_domains=[]))))


class UpstreamUnreachable(Exception):
    """
    TabbyAPI did not answer a request: no connection, or the connection ended before an answer.

    @ivar model: the profile id of the child asked.
    """

    def __init__(self, model: str, problem: str) -> None:
        super().__init__(f"TabbyAPI for {model} did not answer: {problem}")
        self.model = model


class UpstreamAnswered(Exception):
    """
    TabbyAPI answered with an error status; C{message} says what it said, fit for the client.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamBroken(Exception):
    """
    The connection to TabbyAPI ended before its answer was complete.
    """


@implementer(IBodyProducer)
class BytesProducer:
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

    def __init__(self, agent: IAgent, headers: Mapping[bytes, list[bytes]]) -> None:
        """
        @param agent: reaches the children (the pooled agent of L{tabbyproxy.relaypool}; an
            in-memory agent in tests).
        @param headers: sent with every request: TabbyAPI's key, when auth is on.
        """
        self.agent = agent
        self.headers = headers

    async def call(self, lease: Lease, method: str, path: str, body: bytes | None = None) -> IResponse:
        """
        Send one request to the child and wait for its answer; the answer's body is not read yet.

        @return: the response, when TabbyAPI answered with a status below 400.
        @raise UpstreamUnreachable: when TabbyAPI did not answer.
        @raise UpstreamAnswered: when it answered with an error.
        """
        headers = dict(self.headers)
        producer = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            producer = BytesProducer(body)
        url = (lease.baseURL + path).encode("ascii")
        try:
            response: IResponse = await self.agent.request(method.encode("ascii"), url, Headers(headers), producer)
        except CancelledError:
            raise
        except _NO_ANSWER as e:
            if _cancelled(e):
                # The client left: Twisted reports the cancel as a request that got no answer.
                raise CancelledError() from e
            raise UpstreamUnreachable(lease.profile.id, str(e)) from e
        if response.code >= 400:
            if response.code == 503:
                # TabbyAPI answers 503 once its generator failed; its /health then tells.
                lease.suspect()
            raw = await self.read(response)
            raise UpstreamAnswered(response.code, upstreamErrorMessage(response.code, raw))
        return response

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

    @classmethod
    async def collect(cls, response: IResponse, request: IRequest) -> bytes:
        """
        The whole body of a non-streamed answer, held back until it is complete, so that one
        cut off is an error rather than half a document; stopped when C{request}'s client leaves.

        @raise UpstreamBroken: when the connection to TabbyAPI broke before the body was complete.
        """
        pieces: list[bytes] = []
        await cls.pipe(response, request, pieces.append)
        return b"".join(pieces)

    @staticmethod
    async def read(response: IResponse) -> bytes:
        """
        The whole body of a small answer (an error, a model card).

        @raise UpstreamBroken: when the connection to TabbyAPI broke before the body was complete.
        """
        try:
            body: bytes = await treq.content(response)
        except ResponseFailed as e:
            raise UpstreamBroken(f"the connection to TabbyAPI broke: {e}") from e
        return body


def _cancelled(error: Exception) -> bool:
    """
    Whether a request failed only because it was cancelled: Twisted wraps the cancel of a request
    in flight in C{ResponseNeverReceived} (or C{ResponseFailed}), and one still connecting in
    C{ConnectingCancelledError}.
    """
    if isinstance(error, ConnectingCancelledError):
        return True
    reasons = getattr(error, "reasons", ())
    return bool(reasons) and all(reason.check(CancelledError) for reason in reasons)
