"""
The scheduler (L{tabbyproxy.scheduler}): which model runs, on a fake process reactor, a fake clock
and a fake TabbyAPI: no process, no socket, no time passes unless the test says so.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.child import ChildSettings, ChildState
from tabbyproxy.config import Profile
from tabbyproxy.keepalive import FOREVER
from tabbyproxy.scheduler import Lease, QueueFull, SchedulerSettings
from tests.support.fakes import RunningScheduler

GRACE = 10.0


class _SchedulerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        # The ports a fake other process holds: a child there is not trusted.
        self.squatted: set[int] = set()
        self.fake = RunningScheduler(
            Path(self.mktemp()),
            {
                "a": {"model": {"model_name": "A", "unload_timer": 60}, "template": {"temperature": 0.5}},
                "b": {"model": {"model_name": "B"}, "sampling": {"override_preset": "x"}},
                "c": {"model": {"model_name": "C"}},
            },
            settings=SchedulerSettings(
                unloadTimer=300, maxWaiting=3, child=ChildSettings(loadTimeout=100, stopGrace=GRACE)
            ),
            ownsListener=lambda port, pid: port not in self.squatted,
        )
        self.reactor, self.tabby, self.scheduler = self.fake.reactor, self.fake.tabby, self.fake.scheduler

    def profile(self, name: str) -> Profile:
        return self.fake.catalog.profiles[name]

    def acquire(self, name: str, keepAlive: float | None = None) -> Deferred[Lease]:
        return self.fake.acquire(name, keepAlive)

    def ready(self, name: str, keepAlive: float | None = None) -> Lease:
        """
        Acquire C{name} with a healthy TabbyAPI, so it starts and is granted at once.
        """
        return self.successResultOf(self.acquire(name, keepAlive))


class SchedulerTests(_SchedulerTestCase):
    def test_requestsDuringStartJoinOneSpawn(self) -> None:
        """
        Requests that arrive while their model starts wait for that start; there is one spawn,
        and all are served once C{/health} answers 200.
        """
        self.tabby.healthy = False
        waiting = [self.acquire("a") for _ in range(3)]
        self.reactor.advance(1)
        for d in waiting:
            self.assertNoResult(d)
        self.tabby.healthy = True
        self.reactor.advance(0.2)
        leases = [self.successResultOf(d) for d in waiting]
        self.assertEqual(len(self.reactor.spawned), 1)
        [running] = self.scheduler.snapshot()
        self.assertEqual(running.inFlight, 3)
        self.assertEqual({lease.child.pid for lease in leases}, {running.pid})

    def test_swapWaitsForInFlightRequests(self) -> None:
        """
        A request for another model waits while the running model has a request in flight; no
        signal reaches the child until that request ends, then the swap happens.
        """
        lease = self.ready("a")
        first = self.reactor.spawned[0]
        waiting = self.acquire("b")
        self.reactor.advance(1000)
        self.assertNoResult(waiting)
        self.assertEqual(first.signals, [])

        lease.release()
        self.assertEqual(first.signals, ["TERM"])
        second = self.successResultOf(waiting)
        self.assertEqual(second.profile.id, "b")
        self.assertEqual(len(self.reactor.alive), 1)

    def test_arrivalOrderIsKept(self) -> None:
        """
        A request for the running model that arrives after a request for another model waits
        behind it: a steady stream of requests for one model cannot starve another.
        """
        lease = self.ready("a")
        forB = self.acquire("b")
        laterA = self.acquire("a")
        self.assertNoResult(laterA)
        lease.release()
        leaseB = self.successResultOf(forB)
        self.assertNoResult(laterA)
        leaseB.release()
        self.assertEqual(self.successResultOf(laterA).profile.id, "a")
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual([p.configPath.exists() for p in self.reactor.spawned], [False, False, True])

    def test_fullQueueAnswersQueueFull(self) -> None:
        """
        Past C{maxWaiting} waiting requests, a new one fails at once with a message that says
        the server is busy.
        """
        lease = self.ready("a")
        for _ in range(3):
            self.acquire("b")
        failure = self.failureResultOf(self.acquire("c"), QueueFull)
        self.assertIn("server busy", str(failure.value))
        self.assertEqual(failure.value.status, 503)
        lease.release()

    def test_cancelledWaiterLeavesQueue(self) -> None:
        """
        A request cancelled while it waits (its client left) leaves the queue: the swap it asked
        for does not happen, and the running model's idle timer starts as usual.
        """
        lease = self.ready("a")
        waiting = self.acquire("b")
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual(self.scheduler.status()["waiting"], 0)
        lease.release()
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(60)
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])

    def test_idleTimerUsesProfileThenKeepAlive(self) -> None:
        """
        The idle timer is stopped while a request is in flight and armed when the count drops
        to zero: first for the profile's unload_timer, then for the latest request's keep_alive;
        a request without keep_alive leaves the duration alone.
        """
        lease = self.ready("a")
        self.reactor.advance(1000)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        lease.release()
        self.assertEqual(self.scheduler.status()["unload"]["fires_in_seconds"], 60)

        self.ready("a", keepAlive=120).release()
        self.ready("a").release()
        self.reactor.advance(119)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.reactor.advance(1)
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])

    def test_globalUnloadTimerWithoutProfileTimer(self) -> None:
        """
        A profile without unload_timer uses the global default.
        """
        self.ready("b").release()
        self.assertEqual(self.scheduler.status()["unload"]["fires_in_seconds"], 300)

    def test_keepAliveZeroUnloadsWhenLastRequestEnds(self) -> None:
        """
        keep_alive 0 unloads as soon as the last request in flight ends, not before.
        """
        first = self.ready("a")
        second = self.ready("a", keepAlive=0)
        first.release()
        self.assertEqual(self.reactor.spawned[0].signals, [])
        second.release()
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])

    def test_keepAliveForeverNeverUnloads(self) -> None:
        """
        A negative keep_alive keeps the model loaded however long it idles.
        """
        self.ready("a", keepAlive=FOREVER).release()
        self.reactor.advance(10**9)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        [running] = self.scheduler.snapshot()
        self.assertIsNone(running.expiresAt)

    def test_timerRacingARequestNeverServesAStoppingChild(self) -> None:
        """
        When the idle timer fires just as a request arrives, the request waits for the old child
        to exit and is served by a new one.
        """
        self.ready("a").release()
        old = self.reactor.spawned[0]
        old.obeys = set()
        self.reactor.advance(60)
        self.assertEqual(old.signals, ["TERM"])
        waiting = self.acquire("a")
        self.assertNoResult(waiting)
        old.exit(0)
        lease = self.successResultOf(waiting)
        self.assertIsNot(lease.child.protocol, old.protocol)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_unloadWaitsForInFlight(self) -> None:
        """
        An unload waits for the requests in flight, then stops the child; new requests for the
        model wait for the stop and start it again.
        """
        lease = self.ready("a")
        done = self.scheduler.unload()
        self.assertNoResult(done)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        waiting = self.acquire("a")
        self.assertNoResult(waiting)
        lease.release()
        self.successResultOf(done)
        self.successResultOf(waiting)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_unloadOfABusyModelDrainsIt(self) -> None:
        """
        An unload of a model with a request in flight makes it draining: the snapshot says so,
        a new request for it waits, and once the last request ends the model stops and the
        waiting request gets a fresh child.
        """
        lease = self.ready("a")
        self.scheduler.unload("a")
        self.assertEqual([m.state for m in self.scheduler.snapshot()], [ChildState.DRAINING])
        waiting = self.acquire("a")
        self.assertNoResult(waiting)
        lease.release()
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])
        self.assertEqual(self.successResultOf(waiting).child.pid, 1001)

    def test_unloadOfAnotherModelDoesNothing(self) -> None:
        """
        An unload that names a model that does not run leaves the running one alone.
        """
        self.ready("a").release()
        self.successResultOf(self.scheduler.unload("b"))
        self.assertEqual([m.profile.id for m in self.scheduler.snapshot()], ["a"])
        self.assertEqual(self.reactor.spawned[0].signals, [])
