"""
L{tabbyproxy.simulator.streaming.TokenProducer}: how many tokens the simulator writes per turn
of its reactor, the knob the benchmark uses to stand in for TabbyAPI's one write per token.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.simulator.generation import Piece
from tabbyproxy.simulator.knobs import SimulatorKnobs
from tabbyproxy.simulator.streaming import TokenProducer

PIECES = tuple(Piece("content", f"t{index} ") for index in range(10))


class TurnClock(Clock):
    """
    A clock that runs what is due one reactor turn at a time: calls scheduled during a turn
    wait for the next one, as in the reactor's C{runUntilCurrent} (L{Clock.advance} would run
    them at once).
    """

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.func(*call.args, **call.kw)


class TokenProducerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = TurnClock()
        self.emitted: list[Piece] = []
        self.done: list[bool] = []

    def producer(self, turnEach: bool) -> TokenProducer:
        return TokenProducer(self.clock, 0.0, PIECES, self.emitted.append, lambda: self.done.append(True),
                             turnEach=turnEach)

    def test_batchPerTurn(self) -> None:
        """
        With no delay and no C{turnEach}, a whole short answer comes out in one reactor turn.
        """
        self.producer(turnEach=False).start()
        self.clock.turn()
        self.assertEqual(self.emitted, list(PIECES))
        self.assertEqual(self.done, [True])

    def test_turnEach(self) -> None:
        """
        With C{turnEach}, each turn of the reactor emits exactly one token, and the end comes in
        the turn after the last.
        """
        self.producer(turnEach=True).start()
        for count in range(1, len(PIECES) + 1):
            self.clock.turn()
            self.assertEqual(self.emitted, list(PIECES[:count]))
            self.assertEqual(self.done, [])
        self.clock.turn()
        self.assertEqual(self.done, [True])

    def test_turnEachPaused(self) -> None:
        """
        A paused producer emits nothing in its turns and picks up where it stopped.
        """
        producer = self.producer(turnEach=True)
        producer.start()
        self.clock.turn()
        producer.pauseProducing()
        self.clock.turn()
        self.assertEqual(self.emitted, list(PIECES[:1]))
        producer.resumeProducing()
        self.clock.turn()
        self.assertEqual(self.emitted, list(PIECES[:2]))


class KnobTests(SynchronousTestCase):
    def test_tokenTurns(self) -> None:
        """
        C{token_turns} in the C{simulator:} section turns the mode on; it is off by default.
        """
        self.assertTrue(SimulatorKnobs.fromSection({"token_turns": True}).tokenTurns)
        self.assertFalse(SimulatorKnobs.fromSection({}).tokenTurns)
