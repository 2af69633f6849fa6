"""
What a streaming route sends while its model loads: the event stream's headers at once, then a
tick every L{TICK_INTERVAL} seconds (an SSE comment, or an API's own keep-alive event), so
clients with read timeouts survive loads that take minutes.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.iweb import IRequest

# How often a streaming request waiting for its model hears that it still waits.
TICK_INTERVAL = 5.0


def startEventStream(request: IRequest) -> None:
    """
    Answer C{request} with a 200 event stream that no cache or buffering proxy holds back.
    """
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Accel-Buffering", b"no")


def loadingComment(modelId: str, newline: str = "\n") -> Callable[[float], bytes]:
    """
    The SSE comment (which clients skip) saying which model a request waits for, and how long
    it has waited.
    """

    def comment(waited: float) -> bytes:
        return f": loading {modelId} ... {waited:.0f}s{newline}{newline}".encode("utf-8")

    return comment


class LoadingTicks:
    """
    Writes C{tick(secondsWaited)} to C{request} every L{TICK_INTERVAL} seconds until stopped,
    the first one at once when C{now}.
    """

    def __init__(
        self, request: IRequest, clock: IReactorTime, tick: Callable[[float], bytes], now: bool
    ) -> None:
        self.request = request
        self.clock = clock
        self.tick = tick
        self.since = clock.seconds()
        self.call = LoopingCall(self._write)
        self.call.clock = clock
        self.call.start(TICK_INTERVAL, now=now)

    def _write(self) -> None:
        self.request.write(self.tick(self.clock.seconds() - self.since))

    def stop(self) -> None:
        if self.call.running:
            self.call.stop()
