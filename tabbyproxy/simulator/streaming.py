"""
Streamed generations: a push producer that emits one token per clock tick (so a slow reader
holds the simulator back), and the SSE stream of a chat or text completion built on it, with
pings, usage and ``[DONE]`` as TabbyAPI writes them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from attrs import define, field
from zope.interface import implementer

from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.python.failure import Failure
from twisted.web.server import Request

from tabbyproxy.simulator.generation import Piece, Plan, completionLogprobs, tokenLogprob, usageObject
from tabbyproxy.simulator.httpwire import pingComment, sseEvent, startEventStream
from tabbyproxy.simulator.knobs import crashNow
from tabbyproxy.simulator.values import JSON

if TYPE_CHECKING:
    from tabbyproxy.simulator.server import Simulator


@implementer(IPushProducer)
@define
class TokenProducer:
    """
    Emits a plan's pieces one at a time on the clock, as a push producer.

    Registered on the request, it stops scheduling tokens while the transport is paused, so a
    slow reader holds the simulator back instead of making it buffer the whole answer.

    @ivar turnEach: with no delay, emit one piece per reactor turn rather than a batch.
    """

    clock: IReactorTime
    delay: float
    pieces: tuple[Piece, ...]
    onPiece: Callable[[Piece], None]
    onDone: Callable[[], None]
    crashAfter: int | None = None
    turnEach: bool = False
    emitted: int = 0
    paused: bool = False
    stopped: bool = False
    _call: IDelayedCall | None = None

    def start(self) -> None:
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self.paused and not self.stopped:
            self._call = self.clock.callLater(self.delay, self._step)

    def _step(self) -> None:
        self._call = None
        # With no delay, emit a batch per reactor turn: fast like a real GPU, yet the loop
        # still ends at once when a write makes the transport pause us.  TabbyAPI itself writes
        # each token in a turn of its own (one TCP write each): turnEach does the same, so that
        # a relay in front is not handed whole answers to coalesce.
        batch = 1 if self.delay > 0 or self.turnEach else 256
        while batch > 0 and not self.paused and not self.stopped:
            batch -= 1
            if self.crashAfter is not None and self.emitted >= self.crashAfter:
                crashNow(self.clock)
                self.stopped = True
                return
            if self.emitted >= len(self.pieces):
                self.stopped = True
                self.onDone()
                return
            piece = self.pieces[self.emitted]
            self.emitted += 1
            self.onPiece(piece)
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None


@define
class Generation:
    """
    One in-flight generation request, so shutdown and unload can stop it.
    """

    requestId: str
    producer: TokenProducer | None = None
    # Called by /v1/model/unload: the job fails the way a cancelled backend job does.
    abort: Callable[[], None] | None = None
    # Called at shutdown: the response just ends, as uvicorn's should_exit ends SSE streams.
    shutdown: Callable[[], None] | None = None


@define
class EventStream:
    """
    One streaming generation: writes HEAD-shaped SSE chunks, pings, usage and [DONE].
    """

    sim: Simulator
    request: Request
    requestId: str
    kind: str
    modelName: str
    plan: Plan
    includeUsage: bool
    logprobs: int | None = None
    producer: TokenProducer | None = None
    pingCall: IDelayedCall | None = None
    started: float = 0.0
    created: int = field(factory=lambda: int(time.time()))
    closed: bool = False

    @property
    def label(self) -> str:
        return "Chat completion" if self.kind == "chat" else "Completion"

    def chunk(self, choice: JSON, usage: JSON | None = None) -> JSON:
        streamId = f"chatcmpl-{self.requestId}"
        if self.kind == "chat":
            result: JSON = {"id": streamId, "object": "chat.completion.chunk",
                            "created": self.created, "choices": [choice]}
            if usage is not None:
                result["usage"] = usage
            result["model"] = self.modelName
            return result
        result = {"id": streamId, "object": "text_completion", "choices": [choice],
                  "created": self.created, "model_name": self.modelName}
        if usage is not None:
            result["usage"] = usage
        return result

    def delta(self, piece: Piece | None) -> JSON:
        if piece is None:
            return {} if self.kind == "chat" else {"text": ""}
        if self.kind == "chat":
            key = "content" if piece.kind == "content" else "reasoning_content"
            return {key: piece.text}
        return {"text": piece.text}

    def choice(self, piece: Piece | None, finish: bool) -> JSON:
        body = self.delta(piece)
        choice: JSON = {"index": 0}
        if self.kind == "chat":
            choice["delta"] = body
        else:
            choice.update(body)
        if finish and not self.includeUsage:
            choice["finish_reason"] = self.plan.finishReason
            choice["eos_reason"] = self.plan.eosReason
        else:
            choice["finish_reason"] = None
        if piece is not None and piece.kind == "content" and self.logprobs is not None:
            # Only the answer's tokens carry logprobs, not the reasoning's (TabbyAPI collects
            # them in the content span).
            entry = tokenLogprob(piece.text, self.logprobs)
            choice["logprobs"] = {"content": [entry]} if self.kind == "chat" else completionLogprobs([entry])
        return choice

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.request.write(data)

    def open(self) -> None:
        startEventStream(self.request)
        self.started = self.sim.reactor.seconds()
        self.request.notifyFinish().addErrback(self.lost)
        self.sim.generations[self.requestId] = Generation(
            self.requestId, abort=lambda: self.fail(self.label), shutdown=self.close)

    def start(self) -> None:
        self.open()
        pieces = self.plan.pieces
        # The last piece is held back and sent in the finishing chunk, which is how HEAD
        # carries the final text together with finish_reason.
        self.producer = TokenProducer(
            self.sim.reactor, self.sim.config.knobs.tokenDelay, pieces, self.onPiece,
            self.onDone, self.sim.config.knobs.crashAfterTokens, self.sim.config.knobs.tokenTurns)
        self.sim.generations[self.requestId].producer = self.producer
        self.request.registerProducer(self.producer, True)
        self.schedulePing()
        self.producer.start()

    def schedulePing(self) -> None:
        interval = self.sim.config.ssePingInterval
        if interval > 0 and not self.closed:
            self.pingCall = self.sim.reactor.callLater(interval, self.ping)

    def ping(self) -> None:
        self.pingCall = None
        if self.closed:
            return
        # A paused reader gets no pings either: they would pile up in the buffer.
        if self.producer is None or not self.producer.paused:
            self.write(pingComment())
        self.schedulePing()

    def onPiece(self, piece: Piece) -> None:
        assert self.producer is not None
        last = self.producer.emitted == len(self.plan.pieces) and not self.plan.toolCalls
        self.write(sseEvent(self.chunk(self.choice(piece, finish=last))))

    def onDone(self) -> None:
        plan = self.plan
        if plan.toolCalls:
            calls = [dict(call, index=i) for i, call in enumerate(plan.toolCalls)]
            choice: JSON = {"index": 0, "delta": {"tool_calls": calls}}
            if self.includeUsage:
                choice["finish_reason"] = None
            else:
                choice["finish_reason"] = plan.finishReason
                choice["eos_reason"] = plan.eosReason
            self.write(sseEvent(self.chunk(choice)))
        elif not plan.pieces and not self.includeUsage:
            self.write(sseEvent(self.chunk(self.choice(None, finish=True))))
        elapsed = self.sim.reactor.seconds() - self.started
        emitted = len(plan.pieces)
        if self.includeUsage:
            finishing = self.choice(None, finish=False)
            finishing["finish_reason"] = plan.finishReason
            usage = usageObject(plan.promptTokens, emitted, elapsed)
            self.write(sseEvent(self.chunk(finishing, usage)))
        self.sim.logMetrics(self.requestId, plan, emitted, elapsed)
        self.write(sseEvent(b"[DONE]"))
        self.close()

    def failAtStart(self, label: str) -> None:
        self.open()
        self.sim.markUnhealthy()
        self.fail(label)

    def fail(self, label: str) -> None:
        """
        A generation error after the 200 went out: one error event, and no [DONE].
        """
        if self.closed:
            return
        message = f"{label} aborted. Please check the server console."
        self.sim.console.error(f"Sent to request: {message}")
        self.write(sseEvent({"error": {"message": message, "trace": None}}))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sim.generations.pop(self.requestId, None)
        if self.pingCall is not None:
            self.pingCall.cancel()
            self.pingCall = None
        if self.producer is not None:
            self.producer.stopProducing()
            self.request.unregisterProducer()
        if not self.request.finished and self.request.channel is not None:
            self.request.finish()

    def lost(self, reason: Failure) -> None:
        if self.closed:
            return
        self.sim.console.error(f"{self.label} generation {self.requestId} cancelled by user.")
        self.closed = True
        self.sim.generations.pop(self.requestId, None)
        if self.pingCall is not None:
            self.pingCall.cancel()
            self.pingCall = None
        if self.producer is not None:
            self.producer.stopProducing()


