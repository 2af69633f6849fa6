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

from typing import Callable, Mapping, cast
from weakref import WeakKeyDictionary

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from tabbyproxy.channel import ProxyChannel
from tabbyproxy.relaypool import BytesProducer
from tabbyproxy.scheduler import Lease
from tabbyproxy.tabbywire import upstreamErrorMessage

# Headers of TabbyAPI's answer worth passing on; hop-by-hop and framing headers are the proxy's.
RELAYED_HEADERS = (b"content-type", b"cache-control", b"x-accel-buffering")

# What a request that never got an answer fails with.
_NO_ANSWER = (ConnectError, ConnectingCancelledError, ResponseNeverReceived, ResponseFailed)


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


class UpstreamStalled(UpstreamBroken):
    """
    TabbyAPI's answer stopped coming: nothing arrived for longer than L{ReadTimeouts} allow, and
    the proxy closed the connection.
    """


@frozen
class ReadTimeouts:
    """
    How long the body of TabbyAPI's answer may stay silent while the client is reading it.

    @ivar firstToken: before its response headers, and again before the first piece of its
        body: a long prompt is read before the first token, which takes minutes on a big
        model, and a non-streamed answer comes whole, headers and all, once generated.
    @ivar betweenChunks: between two pieces.
    """

    firstToken: float = 300.0
    betweenChunks: float = 120.0


@implementer(IPushProducer)
class _BodyPump(Protocol):
    """
    Hands each piece of an upstream body to C{sink} and reports how the body ended.  It is the
    producer of the client's request, so a slow client pauses the upstream read, and it ends
    the body with L{UpstreamStalled} when TabbyAPI stays silent too long (while the client does
    not hold it paused).
    """

    transport: IPushProducer  # type: ignore[assignment]

    def __init__(self, request: Request | None, sink: Callable[[bytes], None], done: Deferred[None],
                 clock: IReactorTime, timeouts: ReadTimeouts) -> None:
        """
        @param request: the client's request, which paces the body; L{None} for a body no client
            reads as it comes (an error, read whole).
        """
        self.request = request
        self.sink = sink
        self.done = done
        self.clock = clock
        self.timeouts = timeouts
        self.producing = False
        self._received = False
        self._paused = False
        self._silence: IDelayedCall | None = None
        self._silenceLimit = 0.0
        self._stalled: str | None = None
        self._sinkFailure: Failure | None = None

    def connectionMade(self) -> None:
        if self.request is not None:
            self.request.registerProducer(self, True)
        self.producing = True
        self._watch()

    def dataReceived(self, data: bytes) -> None:
        self._received = True
        self._watch()
        # What the sink writes for this piece goes to the client in one send, at once.
        channel = self.request.channel if self.request is not None else None
        corked = isinstance(channel, ProxyChannel) and channel.cork()
        try:
            self.sink(data)
        except Exception:
            # The proxy's own fault (a translation that failed), not TabbyAPI's: the body ends
            # with it, reported as what it is.
            self._sinkFailure = Failure()
            self.stop()
        finally:
            if corked:
                cast(ProxyChannel, channel).uncork()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self._unwatch()
        if self.producing:
            self.producing = False
            # A request whose client already left has no channel to unregister from.
            if self.request is not None and self.request.channel is not None:
                self.request.unregisterProducer()
        if self.done.called:
            return
        if self._sinkFailure is not None:
            self.done.errback(self._sinkFailure)
        elif self._stalled is not None:
            self.done.errback(UpstreamStalled(self._stalled))
        elif isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            # Not Failure.check: it names every class of the exception's type (reflect.qual),
            # 2.6% of a small request's CPU.
            self.done.callback(None)
        else:
            self.done.errback(UpstreamBroken(f"the connection to TabbyAPI broke: {reason.getErrorMessage()}"))

    def stop(self) -> None:
        if self.producing:
            self.transport.stopProducing()

    def _watch(self) -> None:
        """
        Start the wait for the next piece of the body over: the timer of the last wait is
        moved on (once per piece, which a new timer for each cost the relay about 4% of its
        CPU), unless the wait is now shorter (after the first piece): a timer moved sooner is
        looked for through all of the reactor's timers, so a new one is made then.
        """
        if self._paused:
            self._unwatch()
            return
        limit = self._limit()[0]
        if self._silence is not None and self._silence.active() and limit == self._silenceLimit:
            self._silence.reset(limit)
        else:
            self._unwatch()
            self._silence = self.clock.callLater(limit, self._silent)
            self._silenceLimit = limit

    def _limit(self) -> tuple[float, str]:
        """
        How long the body may stay silent now, and the option that says so.
        """
        if self._received:
            return self.timeouts.betweenChunks, "--chunk-timeout"
        return self.timeouts.firstToken, "--first-token-timeout"

    def _unwatch(self) -> None:
        if self._silence is not None:
            if self._silence.active():
                self._silence.cancel()
            self._silence = None

    def _silent(self) -> None:
        self._silence = None
        limit, option = self._limit()
        self.abandon(f"TabbyAPI sent nothing for {limit:g}s ({option})")

    def abandon(self, reason: str) -> None:
        """
        End the body now with L{UpstreamStalled}C{(reason)}, and close TabbyAPI's request.
        """
        if self._stalled is None:
            self._stalled = reason
        self.stop()

    # IPushProducer, for the client's request: time the client holds the body paused is not
    # TabbyAPI's silence.

    def pauseProducing(self) -> None:
        self._paused = True
        self._unwatch()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self.transport.resumeProducing()
        self._watch()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class Upstream:
    """
    Sends requests to the leased TabbyAPI child.
    """

    def __init__(self, agent: IAgent, headers: Callable[[], Mapping[bytes, list[bytes]]], clock: IReactorTime,
                 timeouts: ReadTimeouts = ReadTimeouts()) -> None:
        """
        @param agent: reaches the children (the pooled agent of L{tabbyproxy.relaypool}; an
            in-memory agent in tests).
        @param headers: gives what to send with every request: TabbyAPI's admin key as it is
            now, when auth is on.
        @param clock: times the silences of an answer's body.
        @param timeouts: how long an answer's body may stay silent.
        """
        self.agent = agent
        self.headers = headers
        self.clock = clock
        self.timeouts = timeouts
        # The lease each answer of call() came on, so that its body ends when the child is
        # given up (Lease.onAbandon) without every route passing the lease on.
        self._leases: WeakKeyDictionary[IResponse, Lease] = WeakKeyDictionary()

    async def call(self, lease: Lease, method: str, path: str, body: bytes | None = None) -> IResponse:
        """
        Send one request to the child and wait for its answer; the answer's body is not read yet.

        @return: the response, when TabbyAPI answered with a status below 400.
        @raise UpstreamUnreachable: when TabbyAPI did not answer.
        @raise UpstreamAnswered: when it answered with an error.
        """
        headers = dict(self.headers())
        producer = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            producer = BytesProducer(body)
        url = (lease.baseURL + path).encode("ascii")
        asked: Deferred[IResponse] = self.agent.request(method.encode("ascii"), url, Headers(headers), producer)
        givenUp: list[str] = []

        def giveUp(reason: str) -> None:
            givenUp.append(reason)
            asked.cancel()

        limit = self.timeouts.firstToken
        timer = self.clock.callLater(
            limit, giveUp, f"no response within {limit:g}s (--first-token-timeout)")
        unhook = lease.onAbandon(giveUp)
        try:
            response: IResponse = await asked
        except (CancelledError, *_NO_ANSWER) as e:
            if givenUp:
                raise UpstreamUnreachable(lease.profile.id, givenUp[0]) from e
            if isinstance(e, CancelledError):
                raise
            if _cancelled(e):
                # The client left: Twisted reports the cancel as a request that got no answer.
                raise CancelledError() from e
            raise UpstreamUnreachable(lease.profile.id, str(e)) from e
        finally:
            unhook()
            if timer.active():
                timer.cancel()
        self._leases[response] = lease
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

    def pipe(self, response: IResponse, request: IRequest, sink: Callable[[bytes], None]) -> Deferred[None]:
        """
        Feed the body of C{response} to C{sink} as it arrives, paced by C{request}'s consumer.

        @return: fires when the body is complete, fails with L{UpstreamBroken} when the
            connection to TabbyAPI broke (L{UpstreamStalled} when it stayed silent too long, and
            the proxy closed it), and stops the download when cancelled.
        """
        # Every request twisted.web hands a route is a Request, which takes producers.
        return self._pump(response, cast(Request, request), sink)

    def _pump(self, response: IResponse, request: Request | None, sink: Callable[[bytes], None]) -> Deferred[None]:
        """
        L{pipe}, for a client's request or (L{None}) for none: a body read whole.
        """
        pump: _BodyPump

        def cancel(d: Deferred[None]) -> None:
            pump.stop()

        done: Deferred[None] = Deferred(cancel)
        pump = _BodyPump(request, sink, done, self.clock, self.timeouts)
        response.deliverBody(pump)
        lease = self._leases.get(response)
        if lease is not None and not done.called:
            unhook = lease.onAbandon(pump.abandon)

            def ended(result: object) -> object:
                unhook()
                return result

            done.addBoth(ended)
        return done

    async def collect(self, response: IResponse, request: IRequest) -> bytes:
        """
        The whole body of a non-streamed answer, held back until it is complete, so that one
        cut off is an error rather than half a document; stopped when C{request}'s client leaves.

        @raise UpstreamBroken: when the connection to TabbyAPI broke before the body was complete.
        """
        return await self._whole(response, cast(Request, request))

    async def read(self, response: IResponse) -> bytes:
        """
        The whole body of a small answer (an error), bounded as any body is: by the silences
        L{ReadTimeouts} allow, and by its child being given up.

        @raise UpstreamBroken: when the connection to TabbyAPI broke before the body was complete
            (L{UpstreamStalled} when it stayed silent too long, and the proxy closed it).
        """
        return await self._whole(response, None)

    async def _whole(self, response: IResponse, request: Request | None) -> bytes:
        """
        The body of C{response}, whole, paced by C{request} (L{_pump}).
        """
        pieces: list[bytes] = []
        await self._pump(response, request, pieces.append)
        return b"".join(pieces)


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
