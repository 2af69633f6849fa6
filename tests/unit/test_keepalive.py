"""
Parsing Ollama's C{keep_alive} values, the human form of a duration, and the resettable idle
timer, driven by a fake clock.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.keepalive import (
    FOREVER,
    MAX_SECONDS,
    IdleTimer,
    KeepAliveError,
    describeDuration,
    parseKeepAlive,
)

# Same examples on every run, no example database on disk, no wall-clock deadline.

UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

# A number as Go writes it in a duration: "5", "1.5", ".5", "5."
numberTexts = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(str),
    st.tuples(
        st.integers(min_value=0, max_value=10**4), st.integers(min_value=0, max_value=999_999)
    ).map(lambda whole_fraction: f"{whole_fraction[0]}.{whole_fraction[1]}"),
    st.integers(min_value=0, max_value=999).map(lambda fraction: f".{fraction}"),
    st.integers(min_value=0, max_value=999).map(lambda whole: f"{whole}."),
)
durationParts = st.lists(
    st.tuples(numberTexts, st.sampled_from(sorted(UNIT_SECONDS))), min_size=1, max_size=6
)


class ParseKeepAliveNumberTests(SynchronousTestCase):
    """
    JSON numbers are seconds.
    """

    def test_integerIsSeconds(self) -> None:
        """
        A JSON integer is a number of seconds, returned as a float.
        """
        result = parseKeepAlive(300)
        self.assertEqual(result, 300.0)
        self.assertIsInstance(result, float)

    def test_floatIsSeconds(self) -> None:
        """
        A JSON float is a number of seconds, fractions kept.
        """
        self.assertEqual(parseKeepAlive(1.5), 1.5)

    def test_negativeIsForever(self) -> None:
        """
        Any negative number means "keep loaded until told otherwise".
        """
        self.assertEqual(parseKeepAlive(-1), FOREVER)
        self.assertEqual(parseKeepAlive(-0.001), FOREVER)
        self.assertEqual(parseKeepAlive(-(10**9)), FOREVER)

    def test_zeroIsUnloadNow(self) -> None:
        """
        Zero is "unload as soon as the last request ends": C{0.0}, not L{FOREVER}.
        """
        self.assertEqual(parseKeepAlive(0), 0.0)
        self.assertEqual(parseKeepAlive(0.0), 0.0)

    def test_nanRejected(self) -> None:
        """
        NaN is not a duration; the message says so.
        """
        error = self.assertRaises(KeepAliveError, parseKeepAlive, math.nan)
        self.assertIn("NaN", str(error))


class ParseKeepAliveStringTests(SynchronousTestCase):
    """
    Strings are Go durations, or bare numbers of seconds.
    """

    def test_goDurations(self) -> None:
        """
        Go duration strings, with one or several unit parts and fractions, become seconds.
        """
        cases = {
            "5m": 300.0,
            "90s": 90.0,
            "1h30m": 5400.0,
            "300ms": 0.3,
            "1.5h": 5400.0,
            "2h45m30.5s": 9930.5,
            "0": 0.0,
            "0s": 0.0,
        }
        for text, seconds in cases.items():
            self.assertTrue(
                math.isclose(parseKeepAlive(text), seconds), f"{text!r} -> {parseKeepAlive(text)}"
            )

    def test_negativeDurationIsForever(self) -> None:
        """
        A negative Go duration, like a negative number, means forever.
        """
        self.assertEqual(parseKeepAlive("-1m"), FOREVER)
        self.assertEqual(parseKeepAlive("-1"), FOREVER)

    def test_bareNumericStringIsSeconds(self) -> None:
        """
        Unlike Ollama, a bare numeric string is accepted as seconds (as OLLAMA_KEEP_ALIVE is).
        """
        self.assertEqual(parseKeepAlive("300"), 300.0)
        self.assertEqual(parseKeepAlive("2.5"), 2.5)

    def test_surroundingWhitespaceIgnored(self) -> None:
        """
        Whitespace around a duration is ignored.
        """
        self.assertEqual(parseKeepAlive(" 5m\n"), 300.0)

    def test_badStringsRejectedWithClearMessage(self) -> None:
        """
        Strings that are neither a number nor a Go duration raise L{KeepAliveError} quoting the
        value and showing the accepted forms.
        """
        for text in ["5 minutes", "", "m", "5d", "1h 30m", "--5m", "nan", "inf"]:
            error = self.assertRaises(KeepAliveError, parseKeepAlive, text)
            message = str(error)
            self.assertIn(repr(text), message)
            self.assertIn('"5m"', message)

    def test_nonNumbersRejected(self) -> None:
        """
        Booleans, null, arrays and objects are rejected with a message naming, in JSON's words,
        what was sent.
        """
        cases: list[tuple[object, str]] = [
            (True, "not a boolean"),
            (False, "not a boolean"),
            (None, "not null"),
            ([], "not an array"),
            (["5m"], "not an array"),
            ({}, "not an object"),
            ({"seconds": 5}, "not an object"),
        ]
        for value, described in cases:
            error = self.assertRaises(KeepAliveError, parseKeepAlive, value)
            self.assertIn(described, str(error))

    def test_errorIsValueError(self) -> None:
        """
        L{KeepAliveError} is a L{ValueError}, so generic input validation catches it.
        """
        self.assertTrue(issubclass(KeepAliveError, ValueError))


class ParseKeepAlivePropertyTests(SynchronousTestCase):
    """
    Properties of the parser over generated input.
    """

    @settings(max_examples=300)
    @given(durationParts)
    def test_unitPartsSumUp(self, parts: list[tuple[str, str]]) -> None:
        """
        Any sequence of Go unit parts parses to the sum of its parts.
        """
        text = "".join(number + unit for number, unit in parts)
        expected = sum(float(number) * UNIT_SECONDS[unit] for number, unit in parts)
        self.assertTrue(
            math.isclose(parseKeepAlive(text), expected, rel_tol=1e-9, abs_tol=1e-12),
            f"{text!r} -> {parseKeepAlive(text)}, expected {expected}",
        )

    @settings(max_examples=300)
    @given(durationParts)
    def test_negatedPartsAreForever(self, parts: list[tuple[str, str]]) -> None:
        """
        A leading minus on any non-zero duration means forever.
        """
        text = "".join(number + unit for number, unit in parts)
        expected = sum(float(number) * UNIT_SECONDS[unit] for number, unit in parts)
        result = parseKeepAlive("-" + text)
        if expected > 0:
            self.assertEqual(result, FOREVER)
        else:
            self.assertEqual(result, 0.0)

    @settings(max_examples=300)
    @given(st.text())
    def test_anyTextParsesOrRaisesKeepAliveError(self, text: str) -> None:
        """
        Arbitrary text either parses to a non-negative number of seconds (or L{FOREVER}), or
        raises L{KeepAliveError}; never another exception.
        """
        try:
            result = parseKeepAlive(text)
        except KeepAliveError:
            return
        self.assertIsInstance(result, float)
        self.assertFalse(math.isnan(result))
        self.assertTrue(result >= 0 or result == FOREVER)

    @settings(max_examples=300)
    @given(st.text(alphabet="0123456789.+-hmsnuµμ \t", max_size=20))
    def test_durationLikeTextParsesOrRaisesKeepAliveError(self, text: str) -> None:
        """
        Text made of duration characters (more likely to get deep into the parser) also either
        parses to a non-negative number or L{FOREVER}, or raises L{KeepAliveError}.
        """
        try:
            result = parseKeepAlive(text)
        except KeepAliveError:
            return
        self.assertFalse(math.isnan(result))
        self.assertTrue(result >= 0 or result == FOREVER)

    @settings(max_examples=300)
    @given(st.one_of(st.integers(), st.floats(allow_nan=False)))
    def test_anyNumberIsSecondsForeverOrOutOfRange(self, number: float) -> None:
        """
        Every JSON number within Go's duration range is accepted: non-negative ones as they are,
        negative ones as forever; every number beyond it is refused as out of range.
        """
        if abs(number) > MAX_SECONDS:
            error = self.assertRaises(KeepAliveError, parseKeepAlive, number)
            self.assertIn("out of range", str(error))
        elif number < 0:
            self.assertEqual(parseKeepAlive(number), FOREVER)
        else:
            self.assertEqual(parseKeepAlive(number), float(number))


class DescribeDurationTests(SynchronousTestCase):
    """
    The short human form of an idle time.
    """

    def test_forever(self) -> None:
        """
        L{FOREVER} reads as "forever".
        """
        self.assertEqual(describeDuration(FOREVER), "forever")

    def test_minutesAndSeconds(self) -> None:
        """
        Minutes and seconds are both shown when both are non-zero.
        """
        self.assertEqual(describeDuration(899), "14m 59s")

    def test_zero(self) -> None:
        """
        Zero is "0s", never an empty string.
        """
        self.assertEqual(describeDuration(0), "0s")

    def test_wholeHour(self) -> None:
        """
        Zero parts are left out: one hour is just "1h".
        """
        self.assertEqual(describeDuration(3600), "1h")

    def test_allParts(self) -> None:
        """
        Hours, minutes and seconds together, rounded to the second.
        """
        self.assertEqual(describeDuration(9930.4), "2h 45m 30s")


class IdleTimerTests(SynchronousTestCase):
    """
    L{IdleTimer} over a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.fired: list[float] = []
        self.timer = IdleTimer(self.clock, lambda: self.fired.append(self.clock.seconds()))

    def test_armFiresAfterTheTime(self) -> None:
        """
        An armed timer calls C{onExpire} once its time has passed, and not before.
        """
        self.timer.arm(60)
        self.clock.advance(59.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [60.0])
        self.clock.advance(1000)
        self.assertEqual(self.fired, [60.0])

    def test_rearmResets(self) -> None:
        """
        Arming an armed timer moves its deadline; only one delayed call is ever pending.
        """
        self.timer.arm(60)
        self.clock.advance(50)
        self.timer.arm(60)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(50)
        self.assertEqual(self.fired, [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [110.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rearmShorter(self) -> None:
        """
        Re-arming with a shorter time brings the deadline forward.
        """
        self.timer.arm(600)
        self.timer.arm(5)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(5)
        self.assertEqual(self.fired, [5.0])

    def test_stopCancels(self) -> None:
        """
        A stopped timer never fires and leaves no delayed call behind.
        """
        self.timer.arm(60)
        self.timer.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(120)
        self.assertEqual(self.fired, [])

    def test_stopWhenDisarmed(self) -> None:
        """
        Stopping a timer that is not armed (or has already fired) does nothing.
        """
        self.timer.stop()
        self.timer.arm(1)
        self.clock.advance(1)
        self.timer.stop()
        self.assertEqual(self.fired, [1.0])

    def test_armForeverDisarms(self) -> None:
        """
        Arming with L{FOREVER} cancels a pending expiry instead of scheduling one.
        """
        self.timer.arm(60)
        self.timer.arm(FOREVER)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.timer.deadline)
        self.clock.advance(10**6)
        self.assertEqual(self.fired, [])

    def test_armAgainAfterExpiry(self) -> None:
        """
        After firing, the timer can be armed again and fires again.
        """
        self.timer.arm(10)
        self.clock.advance(10)
        self.timer.arm(10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10)
        self.assertEqual(self.fired, [10.0, 20.0])

    def test_armFromExpiryCallback(self) -> None:
        """
        C{onExpire} may arm the timer again; the new call is kept.
        """
        fired: list[float] = []

        def expire() -> None:
            fired.append(self.clock.seconds())
            if len(fired) < 2:
                timer.arm(5)

        timer = IdleTimer(self.clock, expire)
        timer.arm(5)
        self.clock.advance(5)
        self.assertEqual(timer.deadline, 10.0)
        self.clock.advance(5)
        self.assertEqual(fired, [5.0, 10.0])
        self.assertIsNone(timer.deadline)

    def test_deadline(self) -> None:
        """
        C{deadline} is the clock time the timer fires at, or C{None} when disarmed, stopped or
        already fired.
        """
        self.assertIsNone(self.timer.deadline)
        self.clock.advance(100)
        self.timer.arm(60)
        self.assertEqual(self.timer.deadline, 160.0)
        self.clock.advance(30)
        self.timer.arm(60)
        self.assertEqual(self.timer.deadline, 190.0)
        self.timer.stop()
        self.assertIsNone(self.timer.deadline)
        self.timer.arm(1)
        self.clock.advance(1)
        self.assertIsNone(self.timer.deadline)

    def test_armZeroFiresOnNextTick(self) -> None:
        """
        Zero seconds ("unload now") fires as soon as the clock runs, not synchronously.
        """
        self.timer.arm(0)
        self.assertEqual(self.fired, [])
        self.clock.advance(0)
        self.assertEqual(self.fired, [0.0])


class ParseKeepAliveHugeNumberTests(SynchronousTestCase):
    """
    Integers too large for a float, as Python's C{json} module happily produces them.
    """

    def test_hugeIntegerIsClearError(self) -> None:
        """
        An integer beyond the float range (C{json.loads("1" + "0" * 400)} is a valid int), of
        either sign, is a L{KeepAliveError} (a 400), never an L{OverflowError} (a 500) and never
        L{FOREVER}.
        """
        for value in (10**400, -(10**400)):
            self.assertRaises(KeepAliveError, parseKeepAlive, value)

    def test_beyondGoRangeIsClearError(self) -> None:
        """
        Numbers and durations beyond Go's C{ParseDuration} range (about 292 years), and the
        infinities Python's C{json} accepts, are refused with a message naming the limit; the
        largest value inside the range is accepted.
        """
        for value in (1e308, 1e17, -1e17, math.inf, -math.inf, "99999999h", "-99999999h"):
            error = self.assertRaises(KeepAliveError, parseKeepAlive, value)
            self.assertIn("out of range", str(error))
        self.assertEqual(parseKeepAlive(MAX_SECONDS), MAX_SECONDS)
        self.assertEqual(parseKeepAlive("2562047h"), 2562047 * 3600.0)
