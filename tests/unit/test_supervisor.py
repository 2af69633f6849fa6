"""
The scheduler and the child's life, with a fake process reactor, a fake clock and a StubTreq
TabbyAPI: no process, no socket, no time passes unless the test says so.
"""

from __future__ import annotations

import stat
from pathlib import Path

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.config import Catalog
from tabbyproxy.keepalive import FOREVER
from tabbyproxy.supervisor import (
    Lease,
    QueueFull,
    ShuttingDown,
    StartFailed,
    Supervisor,
    SupervisorSettings,
)
from tests.support.fakes import FakeProcessReactor, FakeTabby, fakeInstall, writeProfiles

GRACE = 10.0


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        self.catalog: Catalog = writeProfiles(
            root / "config",
            {
                "a": {"model": {"model_name": "A", "unload_timer": 60}, "template": {"temperature": 0.5}},
                "b": {"model": {"model_name": "B"}, "sampling": {"override_preset": "x"}},
                "c": {"model": {"model_name": "C"}},
            },
        )
        self.reactor = FakeProcessReactor()
        self.tabby = FakeTabby()
        self.runtime = root / "runtime"
        self.runtime.mkdir()
        self.ports = iter(range(7001, 8000))
        self.squatted: set[int] = set()
        self.supervisor = Supervisor(
            fakeInstall(root / "tabby"),
            self.reactor,
            StubTreq(self.tabby),
            self.runtime,
            SupervisorSettings(unloadTimer=300, loadTimeout=100, stopGrace=GRACE, maxWaiting=3),
            pickPort=lambda: next(self.ports),
            ownsListener=self.ownsListener,
        )
        self.supervisor.startService()

    def ownsListener(self, port: int, pid: int) -> bool:
        """
        The fake listener check: ports in C{squatted} are held by another process.
        """
        return port not in self.squatted

    def profile(self, name: str):  # type: ignore[no-untyped-def]
        return self.catalog.profiles[name]

    def acquire(self, name: str, keepAlive: float | None = None) -> Deferred[Lease]:
        return self.supervisor.acquire(self.profile(name), keepAlive)

    def ready(self, name: str, keepAlive: float | None = None) -> Lease:
        """
        Acquire C{name} with a healthy TabbyAPI, so it starts and is granted at once.
        """
        return self.successResultOf(self.acquire(name, keepAlive))

    def test_firstRequestSpawnsTabbyWithGeneratedConfig(self) -> None:
        """
        The first request spawns C{main.py --config FILE} in the TabbyAPI directory; the file holds
        the profile's TabbyAPI sections and the chosen loopback port, without the proxy's own keys,
        and only its owner can read it.
        """
        lease = self.ready("b")
        [process] = self.reactor.spawned
        self.assertEqual(process.args[:2], ["python", "main.py"])
        self.assertEqual(process.path, str(self.supervisor.install.directory))
        config = process.config()
        self.assertEqual(config["model"], {"model_name": "B"})
        self.assertEqual(config["sampling"], {"override_preset": "x"})
        self.assertEqual(config["network"], {"host": "127.0.0.1", "port": 7001, "disable_auth": True})
        self.assertEqual(stat.S_IMODE(process.configPath.stat().st_mode), 0o600)
        self.assertEqual(lease.baseURL, "http://127.0.0.1:7001")

        profileA = self.profile("a")
        self.assertNotIn("unload_timer", self.supervisor.install.childConfig(profileA, 1)["model"])
        self.assertNotIn("template", self.supervisor.install.childConfig(profileA, 1))

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
        self.assertEqual(self.supervisor.current.inFlight, 3)  # type: ignore[union-attr]
        self.assertEqual({lease.child for lease in leases}, {self.supervisor.current})

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
        self.assertEqual(self.supervisor.status()["waiting"], 0)
        lease.release()
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(60)
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])

    def test_exitDuringStartFailsWaitersWithLastLines(self) -> None:
        """
        When the child exits before it is ready, every request waiting for it fails with the
        exit status and the last lines it printed; the next request tries a fresh start.
        """
        self.tabby.healthy = False
        waiting = [self.acquire("a"), self.acquire("a")]
        process = self.reactor.spawned[0]
        process.print("Loading model: /models/A\nValueError: Failed to load config.json from /models/A\n")
        process.exit(1)
        for d in waiting:
            failure = self.failureResultOf(d, StartFailed)
            self.assertIn("exited with status 1", str(failure.value))
            self.assertIn("ValueError: Failed to load config.json", str(failure.value))
        self.assertIn("exited with status 1", self.supervisor.status()["last_error"])
        self.assertFalse(process.configPath.exists())

        self.tabby.healthy = True
        self.successResultOf(self.acquire("a"))
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_loadTimeoutFailsWaitersAndKillsStubbornChild(self) -> None:
        """
        A child that never becomes healthy is abandoned after the load timeout: waiters fail,
        it gets SIGTERM, and SIGKILL after the grace period if it ignores that.
        """
        self.tabby.healthy = False
        waiting = self.acquire("a")
        process = self.reactor.spawned[0]
        process.obeys = {"KILL"}
        self.reactor.advance(99)
        self.assertNoResult(waiting)
        self.reactor.advance(1)
        self.assertIn("did not become ready", str(self.failureResultOf(waiting, StartFailed).value))
        self.assertEqual(process.signals, ["TERM"])
        self.reactor.advance(GRACE)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertTrue(process.exited)
        self.assertIsNone(self.supervisor.current)

    def test_portHeldByAnotherProcessFailsTheStart(self) -> None:
        """
        When C{/health} answers 200 on the child's port but the listening socket is another
        process's (a local user bound the port first), the start fails with a message saying
        so, no request is granted (so none is sent there), the child is stopped, and the next
        start picks another port.
        """
        self.squatted.add(7001)
        waiting = self.acquire("a")
        process = self.reactor.spawned[0]
        message = str(self.failureResultOf(waiting, StartFailed).value)
        self.assertIn("port 7001 is held by a process that is not TabbyAPI for a", message)
        self.assertIn("sends it no request and no key", message)
        self.assertEqual(process.signals, ["TERM"])
        self.assertIn("port 7001 is held", self.supervisor.status()["last_error"])

        lease = self.ready("a")
        self.assertEqual(lease.baseURL, "http://127.0.0.1:7002")

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
        self.assertEqual(self.supervisor.status()["unload"]["fires_in_seconds"], 60)

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
        self.assertEqual(self.supervisor.status()["unload"]["fires_in_seconds"], 300)

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
        self.assertIsNone(self.supervisor.expiresAt())

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
        done = self.supervisor.unload()
        self.assertNoResult(done)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        waiting = self.acquire("a")
        self.assertNoResult(waiting)
        lease.release()
        self.successResultOf(done)
        self.successResultOf(waiting)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_crashWhileReadyIsReportedAndRecovered(self) -> None:
        """
        A child that dies while serving is recorded in the status, and the next request starts
        a fresh one; the dead child's leases can still be released.
        """
        lease = self.ready("a")
        self.reactor.spawned[0].exit(signal=9)
        self.assertIn("killed by signal 9", self.supervisor.status()["last_error"])
        self.assertEqual(self.supervisor.status()["state"], "stopped")
        lease.release()
        self.successResultOf(self.acquire("a"))
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stopServiceWaitsForChildExit(self) -> None:
        """
        Stopping the service fails waiting requests, sends SIGTERM, and fires only once the child
        has exited (after SIGKILL when it ignores SIGTERM).
        """
        lease = self.ready("a")
        process = self.reactor.spawned[0]
        process.obeys = {"KILL"}
        waiting = self.acquire("b")
        stopped = self.supervisor.stopService()
        self.failureResultOf(waiting, ShuttingDown)
        self.assertNoResult(stopped)
        self.reactor.advance(GRACE)
        self.successResultOf(stopped)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.failureResultOf(self.acquire("a"), ShuttingDown)
        lease.release()

    def test_childOutputIsLoggedWithModel(self) -> None:
        """
        Each line the child prints is logged with the model's id.
        """
        with capturedLogs() as events:
            self.ready("a")
            self.reactor.spawned[0].print("Model successfully loaded.\nUvicorn running")
            self.reactor.spawned[0].exit(0)
        lines = [e for e in events if e.get("model") == "a" and "line" in e]
        self.assertEqual([e["line"] for e in lines], ["Model successfully loaded.", "Uvicorn running"])
